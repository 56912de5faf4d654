"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, adapters, prefix and prompt tuning,
BitFit and IA3 under one API (see core.py)."""

from lmforge.peft.adalora import AdaLoraController
from lmforge.peft.core import (
    AdapterBank,
    PeftSection,
    adapter_tensors,
    apply_peft,
    count_parameters,
    find_targets,
    load_adapter,
    load_adapter_tensors,
    merge,
    save_adapter,
    split_peft_state,
    unmerge,
)

__all__ = ["AdaLoraController", "AdapterBank", "PeftSection", "adapter_tensors", "apply_peft", "count_parameters",
           "find_targets", "load_adapter", "load_adapter_tensors", "merge", "save_adapter", "split_peft_state",
           "unmerge"]
