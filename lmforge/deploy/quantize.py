"""Quantised models: int8 and group-wise int4 weights stored in an ordinary model folder.

Methods (``quantize_model(model, method)``):

    int8   encoders: dynamic int8 (weights int8 per output row; activations quantised per
           row at run time where an int8 kernel is faster here); decoders: weight-only int8
    int4   decoders (and encoders): weight-only int4, groups of ``group_size`` inputs with
           an fp16 scale and minimum each (w = q * scale + min, q in 0..15), two per byte

Word embeddings (and so a tied output projection) are int8 per row in both methods; a
separate ``lm_head`` is int8 too. Norms, biases, position embeddings and task heads stay
fp32. The stored tensors of a quantised Linear ``X`` are ``X.qweight`` (int8, or uint8
pairs of int4), ``X.scale`` (and ``X.minimum`` for int4) and ``X.bias``; config.json says
which modules are quantised, so ``load_model`` rebuilds the same modules before loading.

Kernels are chosen once at load, by measuring (``choose_kernel``), never by assuming an
instruction set: on the AVX2-only CPUs here torch's int8 matmul (``_int_mm``) runs 50x
slower than fp32 and the packed int4 kernel 10x slower, so those machines compute with the
weights dequantised once at load (the folder is still 4-7x smaller), while fbgemm's
dynamic int8 GEMM runs 1.8x faster than fp32 and is taken for encoders. On a Xeon with AMX
int8 tiles oneDNN's dynamic int8 GEMM is the fastest (2.3-7x fp32, fbgemm 1.3-2.2x) and is
taken there.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.layers import Dropout
from lmforge.peft.layers import add_low_rank

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32


# ----------------------------------------------------------------------------- storage
def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q int8 (out, in), scale fp32 (out, 1)); w ~ q * scale."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (weight / scale).round().clamp(-127, 127).to(torch.int8), scale


def quantize_groups_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups along the input: (packed uint8 (out, in/2), scale and
    minimum fp16 (out, in/group)); w ~ q * scale + minimum, q in 0..15."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    best_error = torch.full_like(low, float("inf"))
    best_scale, best_low = torch.ones_like(low), low.clone()
    # Each group keeps the range (full, or clipped towards its middle) that reconstructs it
    # best: 16 levels spent on one far outlier cost every other weight of the group.
    for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75):
        middle, half = (high + low) / 2, (high - low) / 2 * shrink
        scale = (2 * half / 15.0).half().float().clamp(min=1e-8)  # rounded as stored
        start = (middle - half).half().float()
        q = ((groups - start) / scale).round().clamp(0, 15)
        error = ((q * scale + start - groups) ** 2).sum(-1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_low = torch.where(better, scale, best_scale), torch.where(better, start, best_low)
    scale, low = best_scale, best_low
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.uint8).reshape(out_features, in_features)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale.squeeze(-1).half(), low.squeeze(-1).half()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) values 0..15 (uint8)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


# ----------------------------------------------------------------------------- kernels
DYNAMIC_ENGINES = ("fbgemm", "onednn")  # torch's dynamic int8 GEMMs: the kernel names are the engines'


def _dynamic_engines() -> tuple[str, ...]:
    """The dynamic int8 GEMM engines this torch build has."""
    ops = getattr(torch.ops, "quantized", None)
    if ops is None or not hasattr(ops, "linear_dynamic"):
        return ()
    return tuple(e for e in DYNAMIC_ENGINES if e in torch.backends.quantized.supported_engines)


def _dynamic_pack(engine: str, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """``engine``'s prepacked form of an int8 per-row weight (the exact stored integers). The
    packed object carries its engine: ``linear_dynamic`` runs it whatever the global engine is."""
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated; the GEMM is what we use
        warnings.simplefilter("ignore")
        try:
            torch.backends.quantized.engine = engine
            zeros = torch.zeros(q.shape[0], dtype=torch.long)
            qtensor = torch._make_per_channel_quantized_tensor(q, scale.reshape(-1).double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qtensor, bias)
        finally:
            torch.backends.quantized.engine = previous


def _timed(function: Callable[[], Any], budget_s: float = 0.02) -> float:
    function()
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        start = time.perf_counter()
        function()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best


INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4pack CPU kernel takes
# Encoders' products are timed at two row counts (rows = batch x tokens) and a layer keeps
# the fastest kernel of each: below SMALL_BELOW rows the small-inputs one runs. On the AMX
# Xeon oneDNN was 1.7-2.3x fbgemm at 512 rows of three of four BERT shapes but slower than
# fbgemm at 64-192 rows of 256 x 256.
ROWS_LARGE, ROWS_SMALL, SMALL_BELOW = 512, 64, 192
# oneDNN builds (JIT-compiles) a kernel for each new row count, 0.8 ms a layer against a
# 0.04-0.1 ms product: rows are padded to a multiple of this so that few row counts occur
# (zero rows change neither the activations' quantisation range nor the other rows).
ONEDNN_ROW_MULTIPLE = 64


@functools.cache
def choose_kernel(bits: int, dynamic: bool, in_features: int, out_features: int, group_size: int | None = None,
                  rows: int | None = None) -> str:
    """The fastest kernel on this machine for one layer shape, measured once per process:
    ``dequant`` (fp32 weights made once at load), ``fbgemm`` or ``onednn`` (dynamic int8:
    fbgemm's GEMM, or oneDNN's, which runs on AMX int8 tiles where a CPU has them and was
    2.3-7x fp32 on the AMX Xeon against fbgemm's 1.3-2.2x) or ``int4pack`` / ``int8pack``
    (torch's weight-only CPU kernels; int4pack only for the group sizes it takes). Products
    are timed at ``rows`` (default: 512 for encoders, 1 row, decoding, for weight-only)."""
    if not torch.get_default_device().type == "cpu":
        return "dequant"
    rows = rows or (ROWS_LARGE if dynamic else 1)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    x = torch.randn(rows, in_features, generator=generator)
    timings = {"dequant": _timed(lambda: F.linear(x, weight))}
    try:
        if bits == 8 and dynamic and _dynamic_engines():
            q, scale = quantize_rows_int8(weight)
            for engine in _dynamic_engines():
                try:
                    packed = _dynamic_pack(engine, q, scale, None)
                    timings[engine] = _timed(lambda p=packed: torch.ops.quantized.linear_dynamic(x, p, True))
                except (RuntimeError, NotImplementedError):  # an engine this CPU cannot run
                    continue
        elif bits == 8 and hasattr(torch, "_weight_int8pack_mm"):
            q, scale = quantize_rows_int8(weight)
            flat = scale.reshape(-1)
            timings["int8pack"] = _timed(lambda: torch._weight_int8pack_mm(x, q, flat))
        elif (bits == 4 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and group_size in INT4PACK_GROUPS
              and in_features % group_size == 0):  # type: ignore[operator]
            layer = QuantizedLinear.from_linear(nn.Linear(in_features, out_features, bias=False), 4, group_size)
            packed, scale_zero = layer._int4pack()
            timings["int4pack"] = _timed(
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero))
    except (RuntimeError, NotImplementedError):  # a kernel this build or CPU lacks
        pass
    return min(timings, key=lambda name: timings[name])


# ----------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored in int8 or int4 (see the module docstring).

    ``prepare`` builds the runtime form for the chosen kernel once (``reset_buffers`` calls
    it after loading); ``forward`` only reads it. LoRA may be added on top (``add_lora``):
    the quantised base stays frozen, ``lora_A``/``lora_B`` train, keys as ``LoraLinear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None,
                 dynamic: bool = False) -> None:
        super().__init__()
        if bits == 4 and (not group_size or in_features % group_size or group_size % 2):
            raise ConfigError([f"group_size={group_size}: int4 needs an even group size dividing the input size "
                               f"({in_features})"])
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        self.dynamic = dynamic and bits == 8
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features, 1))
        else:
            groups = in_features // group_size  # type: ignore[operator]
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
            self.register_buffer("minimum", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel = self.small_kernel = "dequant"  # for inputs of many rows / of few (dynamic int8)
        self.runtime: Any = None  # the kernel's form of the weight (not saved)
        self.small_runtime: Any = None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None, dynamic: bool = False) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, dynamic)
        with torch.no_grad():
            if bits == 8:
                layer.qweight, layer.scale = quantize_rows_int8(linear.weight)
            else:
                layer.qweight, layer.scale, layer.minimum = quantize_groups_int4(linear.weight, group_size)  # type: ignore[arg-type]
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach().float().clone()  # type: ignore[union-attr]
        return layer

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (out, in) the stored integers stand for."""
        if self.bits == 8:
            return self.qweight.float() * self.scale.float()
        q = unpack_int4(self.qweight).float().reshape(self.out_features, -1, self.group_size)  # type: ignore[arg-type]
        w = q * self.scale.float().unsqueeze(-1) + self.minimum.float().unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = unpack_int4(self.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scale, low = self.scale.float(), self.minimum.float()
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        return packed, torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.prepare()

    @torch.no_grad()
    def prepare(self, kernel: str | None = None, small_kernel: str | None = None) -> None:
        """Build the runtime weights for ``kernel`` and, for inputs of fewer than SMALL_BELOW
        rows, ``small_kernel`` (defaults: the ones measured fastest here; ``small_kernel``
        defaults to ``kernel`` when only that is given)."""
        if self.qweight.device.type != "cpu":
            kernel = small_kernel = "dequant"
        small_kernel = small_kernel or kernel
        shape = (self.bits, self.dynamic, self.in_features, self.out_features, self.group_size)
        self.kernel = kernel or choose_kernel(*shape)
        self.small_kernel = small_kernel or (choose_kernel(*shape, rows=ROWS_SMALL) if self.dynamic else self.kernel)
        self.runtime = self._runtime(self.kernel)
        self.small_runtime = self.runtime if self.small_kernel == self.kernel else self._runtime(self.small_kernel)

    def _runtime(self, kernel: str) -> Any:
        if kernel in DYNAMIC_ENGINES:
            return _dynamic_pack(kernel, self.qweight, self.scale, self.bias)
        if kernel == "int8pack":
            return self.scale.reshape(-1).float()
        if kernel == "int4pack":
            return self._int4pack()
        return self.dequantized()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        super()._apply(fn, recurse)
        if self.runtime is not None:  # moved or cast: the runtime form follows the stored one
            self.prepare(self.kernel, self.small_kernel)
        return self

    @property
    def dense_weight(self) -> bool:
        """True when forward is exactly ``F.linear(x, weight, bias)`` on a dense weight made
        at load, so the decoder may fuse and re-lay it out as it does a Linear's."""
        return self.kernel == self.small_kernel == "dequant" and self.lora_A is None

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the other layers see it (fp32, dequantised)."""
        if self.kernel == "dequant":
            return self.runtime
        return self.small_runtime if self.small_kernel == "dequant" else self.dequantized()

    def add_lora(self, r: int, alpha: float, dropout: float, rslora: bool = False) -> None:
        """Train a low-rank update on top of the frozen quantised weight (QLoRA style)."""
        import math

        self.r, self.scaling = r, (alpha / math.sqrt(r) if rslora else alpha / r)
        self.lora_dropout = Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the packed kernels have no backward: when a gradient must flow to x (LoRA in an
        # earlier layer), the dequantised product below carries it
        rows = x.numel() // self.in_features
        kernel, runtime = (self.small_kernel, self.small_runtime) if rows < SMALL_BELOW else (self.kernel, self.runtime)
        if x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
            kernel = None
        if kernel in DYNAMIC_ENGINES:
            flat = x.reshape(rows, self.in_features)
            pad = -rows % ONEDNN_ROW_MULTIPLE if kernel == "onednn" else 0
            if pad:
                flat = F.pad(flat, (0, 0, 0, pad))
            y = torch.ops.quantized.linear_dynamic(flat, runtime, True)
            y = (y[:rows] if pad else y).reshape(*x.shape[:-1], self.out_features)
        elif kernel == "int8pack":
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, runtime)
            y = y.reshape(*x.shape[:-1], self.out_features) + (self.bias if self.bias is not None else 0)
        elif kernel == "int4pack":
            packed, scale_zero = runtime
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), packed,
                                                           self.group_size, scale_zero)
            y = y.reshape(*x.shape[:-1], self.out_features) + (self.bias if self.bias is not None else 0)
        else:
            weight = runtime if kernel == "dequant" else self.weight
            y = F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_A is not None:
            y = add_low_rank(y, x, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)
        return y

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{group}, kernel={self.kernel}" + (
            f" ({self.small_kernel} below {SMALL_BELOW} rows)" if self.small_kernel != self.kernel else "")


class QuantizedEmbedding(nn.Module):
    """An embedding table stored int8 per row; ``weight`` is the table dequantised once."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, 1))
        self.runtime: torch.Tensor | None = None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> QuantizedEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim)
        layer.qweight, layer.scale = quantize_rows_int8(embedding.weight)
        return layer

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.prepare()

    @torch.no_grad()
    def prepare(self) -> None:
        self.runtime = self.qweight.float() * self.scale

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedEmbedding:
        super()._apply(fn, recurse)
        if self.runtime is not None:
            self.prepare()
        return self

    @property
    def weight(self) -> torch.Tensor:
        assert self.runtime is not None, "prepare() was not called"
        return self.runtime

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


# ----------------------------------------------------------------------------- whole models
EMBEDDING_NAMES = ("embeddings.word_embeddings", "embed_tokens", "encoder.embeddings.word_embeddings")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def quantize_model(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Any]:
    """Replace the model's Linear layers and word embeddings by quantised ones, in place;
    returns the spec saved in config.json (``{"method", "group_size", "linear", "embeddings"}``)."""
    if method not in METHODS:
        raise ConfigError([f"method={method!r}: must be one of {', '.join(METHODS)} (or onnx-int8)"])
    if is_quantized(model):
        raise ConfigError(["this model is already quantised; quantise the original (fp32) model instead"])
    dynamic = method == "int8" and not getattr(model, "causal", False)
    spec: dict[str, Any] = {"method": method, "group_size": group_size if method == "int4" else None,
                            "dynamic": dynamic, "linear": {}, "embeddings": []}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            bits = 8 if method == "int8" or name == "lm_head" or module.in_features % group_size else 4
            spec["linear"][name] = bits
        elif isinstance(module, nn.Embedding) and name in EMBEDDING_NAMES:
            spec["embeddings"].append(name)
    _swap(model, spec, lambda name, old: _quantized_from(old, spec, name))
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            module.prepare()
    return spec


def _quantized_from(old: nn.Module, spec: dict[str, Any], name: str) -> nn.Module:
    if isinstance(old, nn.Embedding):
        return QuantizedEmbedding.from_embedding(old)
    assert isinstance(old, nn.Linear)
    return QuantizedLinear.from_linear(old, spec["linear"][name], spec["group_size"], spec["dynamic"])


def _empty_from(old: nn.Module, spec: dict[str, Any], name: str) -> nn.Module:
    if isinstance(old, nn.Embedding):
        return QuantizedEmbedding(old.num_embeddings, old.embedding_dim)
    assert isinstance(old, nn.Linear)
    return QuantizedLinear(old.in_features, old.out_features, old.bias is not None, spec["linear"][name],
                           spec["group_size"], spec["dynamic"])


def _swap(model: nn.Module, spec: dict[str, Any], make: Callable[[str, nn.Module], nn.Module]) -> None:
    for name in [*spec["linear"], *spec["embeddings"]]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))


def quantized_builder(model_class: Callable[[Any], nn.Module], spec: dict[str, Any]) -> Callable[[Any], nn.Module]:
    """A constructor that builds ``model_class(config)`` with the quantised modules of
    ``spec`` in place (empty), ready for the saved tensors."""

    def build(config: Any) -> nn.Module:
        model = model_class(config)
        _swap(model, spec, lambda name, old: _empty_from(old, spec, name))
        return model

    return build


def folder_megabytes(folder: Any) -> float:
    """The size of a model folder's files in MB (10^6 bytes)."""
    from pathlib import Path

    path = Path(folder)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6
