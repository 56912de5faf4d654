"""Model families: BERT-style encoder and GPT-2/Llama-style decoder."""

from lmforge.models.backbone import Backbone, backbone_of
from lmforge.models.config import DecoderConfig, EncoderConfig, ModelConfig, config_from_dict
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder, MaskedLM, MaskedLMHead
from lmforge.models.layers import KVCache
from lmforge.models.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "Backbone",
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "KVCache",
    "MaskedLM",
    "MaskedLMHead",
    "ModelConfig",
    "backbone_of",
    "build_model",
    "config_from_dict",
    "preset",
    "resize_token_embeddings",
]


def build_model(config: ModelConfig, with_mlm_head: bool = False):  # type: ignore[no-untyped-def]
    """A freshly initialised model for a config (encoders optionally with the MLM head)."""
    if isinstance(config, DecoderConfig):
        return Decoder(config)
    return MaskedLM(config) if with_mlm_head else Encoder(config)


def resize_token_embeddings(model, size: int) -> None:  # type: ignore[no-untyped-def]
    """Grow the input (and untied output) embeddings to ``size`` rows, e.g. for added
    special tokens; new rows start at the mean of the existing ones."""
    import torch
    from torch import nn

    def grow(old: torch.Tensor) -> nn.Parameter:
        extra = old.detach().mean(0, keepdim=True).expand(size - old.shape[0], -1)
        return nn.Parameter(torch.cat([old.detach(), extra], 0))

    if size <= model.config.vocab_size:
        return
    if isinstance(model, MaskedLM):
        head_bias = model.mlm_head.bias
        model.mlm_head.bias = nn.Parameter(torch.cat([head_bias.detach(), head_bias.new_zeros(size - len(head_bias))]))
        model = model.encoder
    if isinstance(model, Encoder):
        embedding = model.embeddings.word_embeddings
    else:
        embedding = model.embed_tokens
        if not model.config.tie_embeddings:
            model.lm_head.weight = grow(model.lm_head.weight)
            model.lm_head.out_features = size
    embedding.weight = grow(embedding.weight)
    embedding.num_embeddings = size
    model.config.vocab_size = size
