"""A small FAQ written for the tests (constructed; four categories) and a knowledge base built
from it once per session with MiniLM and one short epoch."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.tasks.conftest import tiny_decoder_dir, tiny_encoder_dir  # noqa: F401  (shared fixtures)

FAQ = [
    ("permit-apply", "permits", "How do I apply for a building permit?",
     "Send the building permit application to the municipality's building committee with drawings and a site plan."),
    ("permit-time", "permits", "How long does a building permit decision take?",
     "The building permit decision usually takes up to ten weeks after the application is complete."),
    ("permit-cost", "permits", "What does a building permit cost?",
     "The municipality charges a building permit fee of about 25,000 SEK for a house."),
    ("permit-need", "permits", "Do I need a permit for a garden shed?",
     "A garden shed under 15 square metres needs no permit if it stands 4.5 metres from the boundary."),
    ("permit-refused", "permits", "What happens if my permit is refused?",
     "You can appeal a refused permit to the county administrative board within three weeks."),
    ("kitchen-time", "renovation", "How long does a kitchen renovation take?",
     "A full kitchen renovation takes four to six weeks from demolition to the new worktop."),
    ("kitchen-cost", "renovation", "How much does a new kitchen cost?",
     "A new kitchen with cabinets, worktop and appliances costs 150,000 to 300,000 SEK."),
    ("bathroom-waterproof", "renovation", "Why must a bathroom be waterproofed?",
     "Waterproofing membranes stop leaks into walls and floors; insurers require certified installers."),
    ("bathroom-time", "renovation", "How long does a bathroom renovation take?",
     "Expect three to five weeks, because tiling waits for the membrane to cure."),
    ("floor-heating", "renovation", "Can I install underfloor heating in an old house?",
     "Yes: electric mats fit under tiles in old houses; water-borne systems need a thicker floor build-up."),
    ("rot-what", "tax", "What is the ROT deduction?",
     "ROT is a tax reduction of 30 percent on labour costs for repairs and renovation of your home."),
    ("rot-limit", "tax", "What is the maximum ROT deduction per year?",
     "Each person can deduct at most 50,000 SEK of ROT per calendar year."),
    ("rot-materials", "tax", "Does ROT cover materials?",
     "No, ROT covers labour only; materials, travel and machinery are paid in full."),
    ("rut-what", "tax", "What is the RUT deduction?",
     "RUT is a tax reduction of 50 percent on household services such as cleaning and gardening."),
    ("invoice-split", "tax", "How should the contractor invoice a tax deduction?",
     "The contractor deducts the reduction on the invoice and claims it from the Tax Agency."),
    ("contract-what", "contracts", "What should a construction contract contain?",
     "Parties, scope, price, timeline with milestones, payment plan, warranty and dispute resolution."),
    ("contract-deposit", "contracts", "Should I pay a deposit before work starts?",
     "Avoid large deposits; pay in instalments tied to completed milestones instead."),
    ("contract-delay", "contracts", "What if the contractor is late?",
     "The contract's delay penalty applies, usually a share of the price per week of delay."),
    ("contract-warranty", "contracts", "How long is the warranty on construction work?",
     "The warranty period is normally two years for workmanship and five for some materials."),
    ("contract-defects", "contracts", "Who pays for defects found at final inspection?",
     "The contractor must repair defects noted at the final inspection at their own cost."),
]


def write_faq(path: Path, rows: list[tuple[str, ...]] | None = None, header: tuple[str, ...] = (
        "id", "category", "question", "answer")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(FAQ if rows is None else rows)
    return path


@pytest.fixture(scope="session")
def faq_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_faq(tmp_path_factory.mktemp("faq") / "faq.csv")


@pytest.fixture(scope="session")
def kb_dir(faq_file: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.apps.support import BuildConfig, build_kb

    out = tmp_path_factory.mktemp("kb") / "kb"
    build_kb(str(faq_file), out, model=minilm_dir, category_field="category", id_field="id",
             config=BuildConfig(epochs=1, batch_size=8, test_share=0.25, validation_share=0.25), progress=False)
    return out
