"""One API for parameter-efficient fine-tuning of our encoders and decoders.

``apply_peft(model, PeftSection(method="lora", r=8))`` freezes every backbone weight and
injects the method's trainable parts by module name: a target is a suffix of a module
path (``query`` matches ``layers.3.attention.query``) or a regular expression
(``re:layers\\.[0-5]\\.attention\\.(query|value)$``). A target that matches nothing is
an error listing every target not found and the linear layers that exist. Task heads
live outside the backbone and stay trainable.

Methods: lora (rsLoRA scaling option), adalora (rank budget pruned during training by
``AdaLoraController``, no user call needed), adapter (Houlsby bottlenecks after attention
and after the FFN), prefix (per-layer key/value prefixes, MLP reparameterisation while
training), prompt (soft prompt embeddings), bitfit (biases only), ia3 (learned scales
on keys, values and the FFN input).

Adapter files (``save_adapter``): adapter.safetensors + adapter_config.json, kilobytes to
a few MB, loaded onto the base model with ``load_adapter``; LoRA also in the Hugging Face
peft format (``peft_format.py``). Model folders of a peft model record the method, so
``load_model`` rebuilds it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError, CorruptFileError
from lmforge.fileio import atomic_directory, load_tensors, read_json, save_tensors, write_json
from lmforge.hardware import module_device
from lmforge.models import backbone_of
from lmforge.peft.layers import AdaLoraLinear, AdapterLinear, IA3Linear, LoraLinear
from lmforge.peft.prompts import PrefixTuning, SoftPrompt

Method = Literal["none", "lora", "adalora", "adapter", "prefix", "prompt", "bitfit", "ia3"]
ADAPTER_MARKS = ("lora_", "adapter_", "ia3_", "prompt.", "peft_prefix.")


@dataclass
class PeftSection:
    """Which parameter-efficient method, and its settings (``--peft.method lora --peft.r 8``)."""

    method: Method = "none"
    targets: list[str] = field(default_factory=list)  # default: per method and model family
    r: int = 8
    alpha: float = 16.0
    # LoRA's input dropout: 0, as peft. At 0.05 it drew a mask over every adapted layer's input
    # (9x the model's own dropout elements): 1.4x slower steps on 456-token passages and
    # 1.3x on tweets, for no better score (docs/results.md, "Parameter-efficient")
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init_r: int = 12  # adalora: starting rank per module
    target_r: int = 4  # adalora: average final rank per module
    tinit: int = 0  # adalora: steps before pruning starts
    tfinal: int = 0  # adalora: steps at the end with the final budget fixed
    delta_t: int = 10  # adalora: steps between budget updates
    beta1: float = 0.85  # adalora: smoothing of the sensitivity
    beta2: float = 0.85  # adalora: smoothing of its uncertainty
    orth_reg: float = 0.1  # adalora: weight of the orthogonality regulariser
    adapter_size: int = 64
    prefix_length: int = 16
    prefix_projection: bool = True
    prefix_hidden: int = 256
    prompt_length: int = 16

    def __post_init__(self) -> None:
        problems = []
        for name in ("r", "init_r", "target_r", "adapter_size", "prefix_length", "prompt_length", "delta_t",
                     "prefix_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout}: must be in [0, 1)")
        if self.target_r > self.init_r:
            problems.append(f"target_r={self.target_r} exceeds init_r={self.init_r}")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ALL_ENCODER_LINEAR = r"re:layers\.\d+\.(attention\.(query|key|value|output)|intermediate|output)$"
ALL_DECODER_LINEAR = r"re:layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$"
# the peak learning rate each method trains at unless --train.lr is given: a few thousand fresh
# parameters do not move at full fine-tuning's 5e-5 (docs/results.md, "Parameter-efficient");
# LoRA's 2e-3 is the rate within 1 point of full fine-tuning on both swept tasks (3e-3 diverged
# on one, 1e-3 trailed by 3 points on the other)
DEFAULT_LR = {"lora": 2e-3, "adalora": 2e-3, "adapter": 1e-3, "ia3": 3e-3, "bitfit": 1e-3, "prefix": 3e-3,
              "prompt": 1e-2}


def default_targets(method: str, model: nn.Module) -> list[str]:
    decoder = backbone_of(model).causal
    return {  # LoRA on every linear layer of the blocks: on q/v alone it trailed full fine-tuning by 9 points
        "lora": [ALL_DECODER_LINEAR if decoder else ALL_ENCODER_LINEAR],
        "adalora": ["q_proj", "k_proj", "v_proj", "o_proj"] if decoder
        else ["attention.query", "attention.key", "attention.value", "attention.output"],
        "adapter": ["o_proj", "down_proj"] if decoder else ["attention.output", r"re:layers\.\d+\.output$"],
        "ia3": ["k_proj", "v_proj", "down_proj"] if decoder
        else ["attention.key", "attention.value", r"re:layers\.\d+\.output$"],
    }.get(method, [])


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers matching any pattern; every pattern must match."""
    from lmforge.deploy.quantize import QuantizedLinear

    linear = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, QuantizedLinear))]
    found = {p: [n for n in linear if _matches(n, p)] for p in patterns}
    missing = [p for p, names in found.items() if not names]
    if missing:
        shapes = sorted({re.sub(r"\.\d+\.", ".{i}.", n) for n in linear})
        raise ConfigError([f"peft targets not found: {', '.join(missing)}; linear layers here: {', '.join(shapes)}"])
    return sorted({n for names in found.values() for n in names}, key=linear.index)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module.train(getattr(parent, child).training)  # an eval-mode model stays in eval mode (no adapter dropout)
    setattr(parent, child, module)


def _is_feedforward_out(name: str) -> bool:
    return name.endswith("down_proj") or re.search(r"layers\.\d+\.output$", name) is not None


def apply_peft(model: nn.Module, section: PeftSection) -> dict[str, Any]:
    """Freeze ``model`` and inject the method; returns what was done (targets, counts)."""
    if section.method == "none":
        return {"method": "none"}
    backbone = backbone_of(model)
    device = module_device(model)  # adapters are made on the CPU (same init everywhere), then moved here
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    targets = section.targets or default_targets(section.method, model)
    chosen: list[str] = []
    config = backbone.config  # type: ignore[union-attr]
    if section.method in ("lora", "adalora", "adapter", "ia3"):
        chosen = find_targets(backbone, targets)
        for name in chosen:
            base = backbone.get_submodule(name)
            if not isinstance(base, nn.Linear):  # a quantised layer: LoRA trains beside its frozen integers
                if section.method != "lora":
                    raise ConfigError([f"peft.method={section.method}: a quantised model takes only LoRA "
                                       f"({name} is quantised); use peft.method=lora or the fp32 model"])
                base.add_lora(section.r, section.alpha, section.dropout, section.rslora)  # type: ignore[operator]
                continue
            if section.method == "lora":
                new: nn.Module = LoraLinear.wrap(base, section.r, section.alpha, section.dropout, section.rslora)
            elif section.method == "adalora":
                new = AdaLoraLinear.wrap(base, section.init_r, section.alpha, section.dropout)
            elif section.method == "adapter":
                new = AdapterLinear.wrap(base, section.adapter_size)
            else:
                new = IA3Linear.wrap(base, scale_input=_is_feedforward_out(name))
            _replace(backbone, name, new)
    elif section.method == "bitfit":
        biases = [p for n, p in backbone.named_parameters() if n.endswith(".bias")]
        if not biases:
            raise ConfigError(["peft.method=bitfit: this model has no bias parameters (Llama-style layers have "
                               "none); choose another method"])
        for parameter in biases:
            parameter.requires_grad_(True)
    elif section.method == "prompt":
        embeddings = backbone.input_embeddings()
        rows = torch.randint(0, embeddings.weight.shape[0], (section.prompt_length,),
                             generator=torch.Generator().manual_seed(0))
        backbone.prompt = SoftPrompt(section.prompt_length, config.hidden_size, embeddings.weight[rows].detach())
    elif section.method == "prefix":
        heads = backbone.key_value_heads
        prefix = PrefixTuning(config.num_layers, heads, config.head_dim, section.prefix_length, config.hidden_size,
                              section.prefix_projection, section.prefix_hidden)
        backbone.peft_prefix = prefix
        attach_prefix(backbone)
    for name, parameter in backbone.named_parameters():
        if any(mark in name for mark in ADAPTER_MARKS):
            parameter.requires_grad_(True)
    model.to(device)
    model.peft_config = section.to_dict()  # type: ignore[assignment]
    return {"method": section.method, "targets": chosen, **count_parameters(model)}


def attach_prefix(backbone: nn.Module) -> None:
    """Point every attention layer at its slice of ``backbone.peft_prefix``."""
    prefix = backbone.peft_prefix  # type: ignore[union-attr]
    for index in range(len(backbone.layers)):  # type: ignore[union-attr]
        attention = backbone.attention(index)  # type: ignore[operator]
        attention.prefix = (lambda i: lambda: prefix.layer(i))(index)


def count_parameters(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_share": trainable / max(total, 1)}


def is_adapter_key(name: str, method: str) -> bool:
    return any(mark in name for mark in ADAPTER_MARKS) or (method == "bitfit" and name.endswith(".bias"))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make up the adapter (prefix MLPs baked into their prefixes)."""
    config = getattr(model, "peft_config", None)
    if not config:
        raise ConfigError(["this model has no parameter-efficient method applied"])
    backbone = backbone_of(model)
    tensors = {n: t.detach().contiguous() for n, t in backbone.state_dict().items() if is_adapter_key(n, config["method"])
               and not n.startswith("peft_prefix.")}
    if hasattr(backbone, "peft_prefix"):
        tensors["peft_prefix.prefix"] = backbone.peft_prefix.values().detach().contiguous()  # type: ignore[union-attr,operator]
    return tensors


def save_adapter(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """adapter.safetensors + adapter_config.json (and, for LoRA, the HF peft files in peft/)."""
    folder = Path(folder)
    config = dict(model.peft_config)  # type: ignore[arg-type]
    config["prefix_projection"] = False  # what is stored is the baked prefix
    with atomic_directory(folder) as tmp:
        save_tensors(adapter_tensors(model), tmp / "adapter.safetensors")
        write_json(tmp / "adapter_config.json", {"peft": config, "base_model": backbone_of(model).config.to_dict(),  # type: ignore[union-attr,operator]
                                                 **(extra or {})})
        if config["method"] == "lora":
            from lmforge.peft.peft_format import save_peft_format

            try:
                save_peft_format(model, tmp / "peft")
            except ConfigError as error:  # e.g. GPT-2: lmforge's own format still holds the adapter
                write_json(tmp / "peft-format-skipped.json", {"reason": str(error)})
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> PeftSection:
    """Apply the adapter stored in ``folder`` to a base model (strict)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise CorruptFileError(f"{folder}: no adapter_config.json (not an adapter folder)")
    meta = read_json(folder / "adapter_config.json")
    base = backbone_of(model).config.to_dict()  # type: ignore[union-attr,operator]
    differs = [k for k, v in meta["base_model"].items() if base.get(k) != v]
    if differs:
        raise ConfigError([f"{folder}: the adapter was made for another base model ({', '.join(differs)} differ)"])
    section = PeftSection(**meta["peft"])
    apply_peft(model, section)
    load_adapter_tensors(model, load_tensors(folder / "adapter.safetensors"), str(folder))
    return section


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    backbone = backbone_of(model)
    expected = {n for n in backbone.state_dict() if is_adapter_key(n, model.peft_config["method"])}  # type: ignore[index]
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CorruptFileError(f"{where}: adapter tensors do not fit (missing: {missing[:5]}, unexpected: "
                               f"{unexpected[:5]})")
    state = backbone.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if state[name].shape != tensor.shape:
                raise CorruptFileError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model "
                                       f"{tuple(state[name].shape)}")
            state[name].copy_(tensor)


def split_peft_state(state: dict[str, torch.Tensor], method: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors) of a saved peft model; for bitfit the biases count
    as base weights too (they are the trained copies)."""
    adapter = {k: v for k, v in state.items() if any(m in k for m in ADAPTER_MARKS)}
    base = {k: v for k, v in state.items() if k not in adapter}
    return base, adapter


def merge(model: nn.Module) -> int:
    """Fold LoRA / IA3 updates into the base weights (same outputs, no extra cost)."""
    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, IA3Linear))]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge(model: nn.Module) -> int:
    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, IA3Linear))]
    for layer in layers:
        layer.unmerge()
    return len(layers)


class AdapterBank:
    """Several adapters of one method and shape on one base model; ``use(name)`` switches."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.active: str | None = None

    def load(self, name: str, folder: str | Path) -> None:
        folder = Path(folder)
        if not getattr(self.model, "peft_config", None):
            load_adapter(self.model, folder)
        else:
            meta = read_json(folder / "adapter_config.json")["peft"]
            current = {k: v for k, v in self.model.peft_config.items() if k != "prefix_projection"}  # type: ignore[union-attr]
            if {k: v for k, v in meta.items() if k != "prefix_projection"} != current:
                raise ConfigError([f"{folder}: adapter {name!r} has other settings than the loaded ones; one bank "
                                   "holds adapters of one method and shape"])
        self.adapters[name] = load_tensors(folder / "adapter.safetensors")
        self.use(name)

    def use(self, name: str) -> None:
        if name not in self.adapters:
            raise ConfigError([f"no adapter {name!r} (loaded: {', '.join(self.adapters)})"])
        load_adapter_tensors(self.model, self.adapters[name], name)
        self.active = name
