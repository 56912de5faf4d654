"""LoRA adapters in the Hugging Face peft format.

``save_peft_format`` writes adapter_config.json + adapter_model.safetensors so that
``peft.PeftModel.from_pretrained(base, folder)`` applies the same update to the
transformers model of the same weights (BertModel for our encoders, LlamaForCausalLM /
GPT2LMHeadModel for our decoders). Module names go through the same key maps as the
weights (lmforge.interop.hf). GPT-2 stores its layers as fused, transposed ``Conv1D``
modules, so GPT-2 adapters are refused here (they still save in lmforge's own format).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.errors import ConfigError
from lmforge.fileio import save_tensors, write_json
from lmforge.peft.layers import LoraLinear


def hf_module_name(model: nn.Module, name: str) -> str:
    """The transformers module path (from the top model class) of one of our linear layers."""
    from lmforge.interop import hf

    family = hf.family_of(model)
    if family is hf.GPT2:
        raise ConfigError(["the peft-format export covers Llama, Qwen2 and BERT models (GPT-2 fuses q/k/v into c_attn)"])
    prefix = "" if family is hf.BERT else family.base_prefix  # BertModel (AutoModel) has no prefix
    renamed = family.modules.inverse().module(name)
    if renamed is None:
        raise ConfigError([f"LoRA on {name!r} has no equivalent module in the transformers model (peft format)"])
    return prefix + renamed


def save_peft_format(model: nn.Module, folder: Path) -> Path:
    from lmforge.models import backbone_of

    backbone = backbone_of(model)
    layers = {name: m for name, m in backbone.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        raise ConfigError(["no LoRA layers to save in the peft format"])
    tensors, targets = {}, []
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        path = hf_module_name(backbone, name)
        targets.append(path)  # full paths: peft matches them exactly (a suffix like "dense" would catch more)
        tensors[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    config = model.peft_config  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if backbone.causal else "FEATURE_EXTRACTION",
        "r": first.r, "lora_alpha": config["alpha"], "lora_dropout": config["dropout"], "use_rslora": config["rslora"],
        "target_modules": sorted(set(targets)), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None})
    return folder
