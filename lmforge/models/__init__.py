"""Model families: BERT-style encoder and GPT-2/Llama-style decoder."""

from lmforge.models.config import DecoderConfig, EncoderConfig, ModelConfig, config_from_dict
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder, MaskedLM, MaskedLMHead
from lmforge.models.layers import KVCache
from lmforge.models.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "KVCache",
    "MaskedLM",
    "MaskedLMHead",
    "ModelConfig",
    "build_model",
    "config_from_dict",
    "preset",
]


def build_model(config: ModelConfig, with_mlm_head: bool = False):  # type: ignore[no-untyped-def]
    """A freshly initialised model for a config (encoders optionally with the MLM head)."""
    if isinstance(config, DecoderConfig):
        return Decoder(config)
    return MaskedLM(config) if with_mlm_head else Encoder(config)
