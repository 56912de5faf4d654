"""Typed model configurations for the two families lmforge builds.

``EncoderConfig`` describes the BERT family (BERT, MiniLM: post-LN, absolute positions,
token types). ``DecoderConfig`` describes GPT-2 and Llama shapes in one config: the
fields ``norm``, ``position``, ``mlp`` and the bias flags select the variant.

Both validate on construction and report every bad field in one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


def _check_positive(config: Any, names: tuple[str, ...], problems: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{name}={value!r}: must be a positive integer")


def _check_probability(config: Any, names: tuple[str, ...], problems: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            problems.append(f"{name}={value!r}: must be a probability in [0, 1)")


def _check_choice(config: Any, name: str, allowed: tuple[str, ...], problems: list[str]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        problems.append(f"{name}={value!r}: must be one of {', '.join(allowed)}")


class _ConfigMixin:
    """Dict round trip shared by both configs; unknown keys are an error naming them."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # type: ignore[no-untyped-def]
        allowed = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(
                [f"unknown key {k!r} (allowed: {', '.join(sorted(allowed))})" for k in unknown],
                where=cls.__name__,
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class EncoderConfig(_ConfigMixin):
    """BERT-family encoder: post-LN blocks, token types, and positions either learned
    absolute (BERT, position="learned") or rotary on queries and keys (RoFormer,
    position="rope": no position table; relative offsets are built in, which a small
    model trained from scratch learns to use far sooner than a learned table)."""

    vocab_size: int = 30522
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    add_pooler: bool = True
    initializer_range: float = 0.02
    position: str = "learned"
    rope_theta: float = 10000.0
    family: Literal["encoder"] = "encoder"
    # after structured pruning: attention heads and FFN sizes per layer (None: the same everywhere)
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_positive(
            self,
            ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size"),
            problems,
        )
        _check_probability(self, ("hidden_dropout", "attention_dropout"), problems)
        _check_choice(self, "hidden_act", ACTIVATIONS, problems)
        _check_choice(self, "position", ("learned", "rope"), problems)
        if not problems and self.position == "rope" and (self.hidden_size // self.num_heads) % 2:
            problems.append(f"head size {self.hidden_size // self.num_heads}: rotary positions need an even size")
        if not problems and self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        for name in ("heads_per_layer", "intermediate_per_layer"):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.num_layers or any(
                    not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in sizes)):
                problems.append(f"{name}={sizes!r}: must be {self.num_layers} positive integers (one per layer)")
        if self.family != "encoder":
            problems.append(f"family={self.family!r}: must be 'encoder'")
        if problems:
            raise ConfigError(problems, where="EncoderConfig")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def heads(self, layer: int) -> int:
        """Attention heads of one layer (fewer than ``num_heads`` after pruning)."""
        return self.heads_per_layer[layer] if self.heads_per_layer else self.num_heads

    def intermediate(self, layer: int) -> int:
        """FFN width of one layer."""
        return self.intermediate_per_layer[layer] if self.intermediate_per_layer else self.intermediate_size


@dataclass
class DecoderConfig(_ConfigMixin):
    """GPT-2 / Llama-family decoder-only transformer (pre-norm blocks).

    GPT-2: norm="layernorm", position="learned", mlp="gelu", hidden_act="gelu_new", biases on.
    Llama: norm="rmsnorm", position="rope", mlp="swiglu", hidden_act="silu", biases off.
    """

    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    head_dim: int | None = None  # None = hidden_size // num_heads
    intermediate_size: int = 1024
    max_position_embeddings: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "rope"
    rope_theta: float = 10000.0
    mlp: str = "swiglu"
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_output_bias: bool | None = None  # None: as attention_bias (Qwen2: q/k/v biases, none on o_proj)
    mlp_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    family: Literal["decoder"] = "decoder"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. source file)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        problems: list[str] = []
        _check_positive(
            self,
            ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
             "intermediate_size", "max_position_embeddings"),
            problems,
        )
        _check_probability(self, ("dropout",), problems)
        _check_choice(self, "norm", ("rmsnorm", "layernorm"), problems)
        _check_choice(self, "position", ("rope", "learned"), problems)
        _check_choice(self, "mlp", ("swiglu", "gelu"), problems)
        _check_choice(self, "hidden_act", ACTIVATIONS, problems)
        if not problems:
            if self.head_dim is None:
                if self.hidden_size % self.num_heads:
                    problems.append(
                        f"hidden_size={self.hidden_size} is not divisible by "
                        f"num_heads={self.num_heads} (set head_dim explicitly)"
                    )
                else:
                    self.head_dim = self.hidden_size // self.num_heads
            elif self.head_dim <= 0:
                problems.append(f"head_dim={self.head_dim!r}: must be a positive integer")
            assert self.num_kv_heads is not None
            if self.num_heads % self.num_kv_heads:
                problems.append(
                    f"num_heads={self.num_heads} is not divisible by "
                    f"num_kv_heads={self.num_kv_heads}"
                )
            if self.position == "rope" and self.head_dim and self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim}: rotary embeddings need an even size")
        if self.family != "decoder":
            problems.append(f"family={self.family!r}: must be 'decoder'")
        if problems:
            raise ConfigError(problems, where="DecoderConfig")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)


ModelConfig = EncoderConfig | DecoderConfig


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Build the right config class from a dict carrying ``family``."""
    family = data.get("family")
    if family == "encoder":
        return EncoderConfig.from_dict(data)
    if family == "decoder":
        return DecoderConfig.from_dict(data)
    raise ConfigError([f"family={family!r}: must be 'encoder' or 'decoder'"], where="model config")
