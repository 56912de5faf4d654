"""Pretraining objectives: masked LM (+NSP/SOP) for encoders, causal LM for decoders."""

from lmforge.objectives.base import Objective, ObjectiveOutput
from lmforge.objectives.clm import CausalLMObjective, linear_cross_entropy
from lmforge.objectives.mlm import MaskedLMObjective, MaskingConfig, mask_tokens

__all__ = ["CausalLMObjective", "MaskedLMObjective", "MaskingConfig", "Objective", "ObjectiveOutput",
           "linear_cross_entropy", "mask_tokens"]
