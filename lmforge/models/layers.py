"""Building blocks shared by the encoder and the decoder.

Shapes: B batch, T query length, S key length (past + T), H hidden, nh heads,
nkv key/value heads, hd head size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for a config's ``hidden_act``."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}")


class Dropout(nn.Dropout):
    """Inverted dropout from 16 random bits an element: one 64-bit draw decides four
    elements, and an element is dropped when its bits fall below ``round(p * 65536)``; the
    kept ones are scaled by 1 / (1 - that rate), so the expectation is exact and the rate is
    ``p`` to within 1/65536. ``nn.Dropout``'s Bernoulli sampler took 12% of a BERT-mini
    training step on the 2-core CPUs here, a float draw per element about 60% of that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        return dropout_bits(x, self.p)


def dropout_bits(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with elements zeroed at rate ``p`` (0 < p < 1) and the rest scaled up (see Dropout)."""
    dropped = max(1, min(65535, round(p * 65536)))
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
    return torch.where(keep, x * (65536 / (65536 - dropped)), 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except with dropout on a CPU: no fused CPU kernel
    takes dropout, and SDPA's own fallback draws its mask with the Bernoulli sampler (a
    third of an attention layer's time in a BERT-mini step); this is the same maths with
    ``dropout_bits``. q (B, nh, T, hd); k, v (B, nkv, S, hd); mask bool (True attends) or additive."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              enable_gqa=enable_gqa)
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # top-left aligned, as SDPA
    if mask is None:
        return dropout_bits(scores.softmax(-1), dropout_p) @ v
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return dropout_bits(scores.softmax(-1).nan_to_num(0.0), dropout_p) @ v  # a row seeing no key gives zeros, as SDPA


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the input dtype (as Llama does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)  # one fused op
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (the half-split "rotate_half" convention)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables; also used after building a model on the meta device."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                         / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(self.max_positions)

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(positions, self.inv_freq)  # (P, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (P, hd)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, hd) for integer positions (B, T).

        ``max_position`` (an upper bound on the positions, when the caller knows it) saves
        reading the tensor back.
        """
        if max_position is None:
            max_position = int(position_ids.max()) if position_ids.numel() else 0
        if max_position + 1 > self.cos.shape[0]:
            needed = max_position + 1
            self._build(max(needed, 2 * self.cos.shape[0]))
            self.cos = self.cos.to(position_ids.device)
            self.sin = self.sin.to(position_ids.device)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, n, T, hd) by the angles in cos/sin (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    # x * cos + rotate_half(x) * sin, with the rotated half added in place by fused
    # multiply-adds: three passes over x instead of five (neg, cat, two products, a sum),
    # half the time of the plain form on a CPU
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out.to(x.dtype)


class KVCache:
    """Preallocated key/value cache for incremental decoding.

    One (B, nkv, max_len, hd) buffer pair per layer, written in place; ``length`` counts
    the positions already stored. Nothing is reallocated while decoding.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nkv, T, hd) at the current end; return all keys/values so far."""
        start, end = self.length, self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Called once per forward pass, after every layer has stored its keys/values."""
        self.length += steps


def is_dense_linear(module: nn.Module) -> bool:
    """A plain Linear, or a layer that computes exactly ``F.linear(x, weight, bias)`` with a
    dense ``weight`` tensor it says it has (``dense_weight``: a quantised layer whose weights
    were dequantised at load), so its weight may be re-laid out or fused."""
    return type(module) is nn.Linear or bool(getattr(module, "dense_weight", False))


FEW_ROWS = (2, 8)  # row counts that go through ``weight @ x.T`` (measured, see few_rows_layout)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  few_rows: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with ``few_rows`` (a model laid out for a continuous batch,
    where ``few_rows_layout`` measured it faster on this CPU), a few rows (2-8: a decode step) in
    fp32 inference against a row-major weight are computed as ``weight @ x.T``: on an AVX-512
    CPU up to 3x faster than ``x @ weight.T`` for 2-4 rows (docs/benchmarks.md)."""
    rows = x.numel() // x.shape[-1] if few_rows and x.shape[-1] else 0
    if (FEW_ROWS[0] <= rows <= FEW_ROWS[1] and x.dtype == torch.float32 and weight.is_contiguous()
            and not torch.is_grad_enabled()):
        y = torch.mm(weight, x.reshape(rows, -1).t()).t()
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def dense_forward(module: nn.Module, x: torch.Tensor, few_rows: bool = False) -> torch.Tensor:
    """``module(x)`` through ``decode_linear`` when the module is a dense linear layer without
    hooks (a hook, an adapter or a quantised kernel keeps its own forward)."""
    if (few_rows and is_dense_linear(module) and not module._forward_hooks and not module._forward_pre_hooks
            and not torch.is_grad_enabled()):
        return decode_linear(x, module.weight, module.bias, few_rows=True)  # type: ignore[arg-type]
    return module(x)


@functools.cache
def few_rows_layout(hidden: int, intermediate: int, budget_mb: int = 48) -> bool:
    """Whether row-major weights (with ``decode_linear``) beat column-major ones for a decode
    step of 1 and of 4 rows together on this CPU: a probe of a few tens of milliseconds on
    matrices larger than the caches, shaped like the model's gate/up projection."""
    import time

    per = 2 * intermediate * hidden * 4
    count = max(1, budget_mb * 2**20 // per)
    generator = torch.Generator().manual_seed(0)
    rows_major = [torch.randn(2 * intermediate, hidden, generator=generator) for _ in range(count)]
    column_major = [w.t().contiguous().t() for w in rows_major]
    inputs = {rows: torch.randn(rows, hidden, generator=generator) for rows in (1, 4)}

    def seconds(weights: list[torch.Tensor], rows: int, few: bool) -> float:
        best = float("inf")
        with torch.inference_mode():
            for _ in range(3):
                start = time.perf_counter()
                for w in weights:
                    decode_linear(inputs[rows], w, few_rows=few)
                best = min(best, time.perf_counter() - start)
        return best

    rows_cost = seconds(rows_major, 1, True) + seconds(rows_major, 4, True)
    column_cost = seconds(column_major, 1, False) + seconds(column_major, 4, False)
    return rows_cost < column_cost


def fuse_linears(linears: list[nn.Linear], column_major: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-store several Linear layers that read the same input as row blocks of one
    (sum(out), in) matrix, so one product computes all of them.

    Each ``weight`` becomes a view into the fused matrix: values, shapes and state-dict
    keys are unchanged, and in-place updates (optimizer steps, ``load_state_dict``) keep
    the two consistent. ``column_major`` stores the fused matrix as (in, sum(out)) in
    memory. Returns the fused weight (out_total, in) and fused bias.
    """
    with torch.no_grad():
        if column_major:
            fused = torch.cat([layer.weight.t() for layer in linears], dim=1).contiguous().t()
        else:
            fused = torch.cat([layer.weight for layer in linears], dim=0).contiguous()
        has_bias = all(layer.bias is not None for layer in linears)
        bias = torch.cat([layer.bias for layer in linears]).contiguous() if has_bias else None  # type: ignore[misc]
        start = 0
        for layer in linears:
            width = layer.weight.shape[0]
            layer.weight.data = fused[start : start + width]
            if bias is not None:
                layer.bias.data = bias[start : start + width]  # type: ignore[union-attr]
            start += width
    return fused, bias


def fused_is_current(fused: torch.Tensor | None, linears: list[nn.Module]) -> bool:
    """True when ``linears`` are still plain Linear layers viewing ``fused`` (nothing has
    swapped a module or assigned a new weight since ``fuse_linears``) and no gradient is
    being recorded for them: the fused tensor is not a parameter, so training always takes
    the per-layer path that autograd sees."""
    if fused is None:
        return False
    if torch.is_grad_enabled() and any(layer.weight.requires_grad for layer in linears):  # type: ignore[union-attr]
        return False
    row = 0
    for layer in linears:
        if not is_dense_linear(layer):
            return False
        if layer.weight.data_ptr() != fused.data_ptr() + row * fused.stride(0) * fused.element_size():
            return False
        row += layer.weight.shape[0]
    return True


def attention_mask_for_sdpa(
    padding_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    causal: bool,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, S) for ``scaled_dot_product_attention``, or None when plain.

    ``padding_mask`` is (B, S) with 1 for real tokens over past + new positions. A query on
    a padding position would see no key at all (NaN in softmax); it is allowed to see
    itself so outputs stay finite — those rows are padding and are never read.
    ``document_ids`` (B, T), for packed sequences without a cache: a token attends only
    within its own document.
    """
    key_length = past_length + query_length
    if document_ids is not None:
        same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
        rest = attention_mask_for_sdpa(padding_mask, query_length, past_length, causal)
        if rest is None and causal:
            rest = torch.ones(query_length, query_length, dtype=torch.bool, device=document_ids.device).tril()[None, None]
        return same if rest is None else same & rest
    if padding_mask is None:
        if not causal or query_length == 1 or past_length == 0:
            return None  # the caller uses is_causal when past_length == 0
    keys = torch.arange(key_length, device=_device(padding_mask))
    queries = torch.arange(past_length, key_length, device=keys.device)
    if causal:
        allowed = keys[None, :] <= queries[:, None]  # (T, S)
    else:
        allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=keys.device)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if padding_mask is not None:
        real = padding_mask[:, None, None, :key_length].bool()  # (B, 1, 1, S)
        diagonal = keys[None, :] == queries[:, None]
        allowed = allowed & (real | diagonal[None, None])
    return allowed


def _device(tensor: torch.Tensor | None) -> torch.device | None:
    return tensor.device if tensor is not None else None


@torch.no_grad()
def init_weights(module: nn.Module, std: float, num_layers: int | None = None) -> None:
    """All weight initialisation in one place: normal(0, std) for Linear and Embedding
    weights, zeros for biases, ones for norm scales. Output projections of residual
    branches (``o_proj``, ``down_proj``, attention ``output``/block ``output``) are scaled by
    1/sqrt(2 * num_layers) when ``num_layers`` is given, as GPT-2 does."""
    residual_std = std / math.sqrt(2 * num_layers) if num_layers else std
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            is_residual_out = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(child.weight, mean=0.0, std=residual_std if is_residual_out else std)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.Embedding):
            nn.init.normal_(child.weight, mean=0.0, std=std)
        elif isinstance(child, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(child.weight)
            if getattr(child, "bias", None) is not None:
                nn.init.zeros_(child.bias)


def with_prefix(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, prefix: tuple[torch.Tensor, torch.Tensor],
    causal_from_scratch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prepend learned key/value prefixes (heads, P, hd) to k, v (B, heads, S, hd); every
    query sees every prefix position. ``causal_from_scratch``: the caller would have used
    ``is_causal`` (no mask, no past), so the causal mask is built here, shifted by P."""
    pk, pv = prefix
    B, P, T = k.shape[0], pk.shape[1], k.shape[2]
    k = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
    v = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
    if mask is not None:
        visible = torch.ones(*mask.shape[:-1], P, dtype=torch.bool, device=mask.device)
        mask = torch.cat([visible, mask.bool()], dim=-1)
    elif causal_from_scratch:
        mask = torch.ones(T, P + T, dtype=torch.bool, device=k.device).tril(diagonal=P)[None, None]
    return k, v, mask
