"""Named model sizes. ``preset(name, **overrides)`` returns a validated config.

Encoder sizes follow the BERT miniatures (Turc et al. 2019): tiny 2x128, mini 4x256,
small 4x512, medium 8x512, base 12x768. Decoder presets give the exact shapes of
GPT-2 124M and SmolLM2-135M, plus tiny variants for tests.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError
from lmforge.models.config import DecoderConfig, EncoderConfig, ModelConfig

_GPT2 = dict(norm="layernorm", position="learned", mlp="gelu", hidden_act="gelu_new",
             attention_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5)
_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", hidden_act="silu",
              attention_bias=False, mlp_bias=False)

PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    # BERT-family encoders
    "bert-tiny": (EncoderConfig, dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512)),
    "bert-mini": (EncoderConfig, dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)),
    "bert-small": (EncoderConfig, dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048)),
    "bert-medium": (EncoderConfig, dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048)),
    "bert-base": (EncoderConfig, dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)),
    "minilm-l6": (EncoderConfig, dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)),
    # GPT-2 family
    "gpt2-tiny": (DecoderConfig, dict(_GPT2, vocab_size=50257, hidden_size=64, num_layers=2, num_heads=2,
                                      intermediate_size=256, max_position_embeddings=1024)),
    "gpt2-mini": (DecoderConfig, dict(_GPT2, vocab_size=50257, hidden_size=256, num_layers=4, num_heads=4,
                                      intermediate_size=1024, max_position_embeddings=1024)),
    "gpt2-124m": (DecoderConfig, dict(_GPT2, vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                                      intermediate_size=3072, max_position_embeddings=1024)),
    # Llama family
    "llama-tiny": (DecoderConfig, dict(_LLAMA, vocab_size=32000, hidden_size=64, num_layers=2, num_heads=4,
                                       num_kv_heads=2, intermediate_size=172, max_position_embeddings=2048)),
    "llama-mini": (DecoderConfig, dict(_LLAMA, vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4,
                                       num_kv_heads=2, intermediate_size=688, max_position_embeddings=2048)),
    "smollm2-135m": (DecoderConfig, dict(_LLAMA, vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                                         num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                                         rope_theta=100000.0, tie_embeddings=True, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=2)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Config for a named preset, with field overrides (e.g. ``vocab_size=21128``)."""
    if name not in PRESETS:
        raise ConfigError([f"preset {name!r} is unknown (known: {', '.join(sorted(PRESETS))})"],
                          where="model preset")
    cls, fields = PRESETS[name]
    return cls.from_dict({**fields, **overrides})
