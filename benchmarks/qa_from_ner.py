"""An extractive-QA set built honestly from People's Daily NER annotations (SQuAD v2.0 JSON).

No Chinese (or any) QA corpus installs offline, so this builds one whose answers are
gold annotations: for each paragraph (cut to its first 300 characters) one question per
entity type — "文中提到的人是谁？" (PER), "文中提到了哪个地方？" (LOC), "文中提到了哪个机构？"
(ORG) — answered by the first entity of that type, or marked unanswerable when the
paragraph has none. It tests the QA machinery (windows, offsets, no-answer) on real
text; it is easier than open questions, since the question only names a type.

    python benchmarks/qa_from_ner.py --output runs/qa-zh   # writes train.json, validation.json, test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.data.corpora import corpus

QUESTIONS = {"PER": "文中提到的人是谁？", "LOC": "文中提到了哪个地方？", "ORG": "文中提到了哪个机构？"}


def build(split: str, limit: int) -> dict:
    from seqeval.metrics.sequence_labeling import get_entities

    paragraphs = []
    for index, example in enumerate(corpus("peoples_daily_ner").examples(split)):  # type: ignore[arg-type]
        if len(paragraphs) >= limit:
            break
        tokens, tags = example["tokens"][:300], example["tags"][:300]
        context = "".join(tokens)
        starts = [0]
        for token in tokens:
            starts.append(starts[-1] + len(token))
        first: dict[str, tuple[int, int]] = {}
        for kind, start, end in get_entities(tags):
            first.setdefault(kind, (starts[start], starts[end + 1]))
        qas = []
        for kind, question in QUESTIONS.items():
            qid = f"{split}-{index}-{kind}"
            if kind in first:
                s, e = first[kind]
                qas.append({"id": qid, "question": question, "answers": [{"text": context[s:e], "answer_start": s}],
                            "is_impossible": False})
            else:
                qas.append({"id": qid, "question": question, "answers": [], "is_impossible": True})
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "v2.0", "data": [{"title": f"peoples_daily_{split}", "paragraphs": paragraphs}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/qa-zh")
    parser.add_argument("--train", type=int, default=1500, help="paragraphs (3 questions each)")
    parser.add_argument("--eval", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for split, limit in (("train", args.train), ("validation", args.eval), ("test", args.eval)):
        (out / f"{split}.json").write_text(json.dumps(build(split, limit), ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out}/train.json, validation.json, test.json")


if __name__ == "__main__":
    main()
