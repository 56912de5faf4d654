"""GPT-2 and Llama-family decoder-only transformer, one config-driven file.

    tokens (B, T)
      -> embed_tokens (+ embed_positions when position="learned")
      -> num_layers x DecoderBlock:
             x = x + self_attn(input_layernorm(x))        # causal, RoPE or none, GQA
             x = x + mlp(post_attention_layernorm(x))     # SwiGLU or GELU MLP
      -> norm
    hidden (B, T, H);  logits = hidden @ output_weight.T  (tied to embed_tokens or lm_head)

Module names follow Hugging Face Llama, so Llama key maps are the identity minus the
``model.`` prefix; GPT-2 maps its fused Conv1D ``c_attn`` onto q/k/v here.
``forward`` returns hidden states; losses live in objectives and tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.models.config import DecoderConfig
from lmforge.models.layers import (
    Dropout,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    activation,
    apply_rotary,
    attention,
    attention_mask_for_sdpa,
    decode_linear,
    dense_forward,
    fuse_linears,
    fused_is_current,
    init_weights,
    is_dense_linear,
    with_prefix,
)


def _norm(config: DecoderConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class SelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int) -> None:
        super().__init__()
        assert config.head_dim is not None and config.num_kv_heads is not None
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index
        self.dropout = config.dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        output_bias = bias if config.attention_output_bias is None else config.attention_output_bias
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=output_bias)
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see Decoder.use_decoding_layout
        self.few_rows = False  # decode_linear's few-row path, see Decoder.use_decoding_layout
        self.prefix: Any = None  # prefix tuning: a callable giving (keys, values), each (kv heads, P, hd)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused_qkv is not None and fused_is_current(self.fused_qkv[0], [self.q_proj, self.k_proj, self.v_proj]):
            qkv = decode_linear(x, *self.fused_qkv, few_rows=self.few_rows)  # (B, T, (nh + 2 nkv) hd)
            heads = qkv.view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
            qk, v = heads.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
            if rotary is not None:
                qk = apply_rotary(qk, *rotary)  # q and k rotated in one pass
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
            k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
            v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_index, k, v)  # (B, nkv, S, hd)
        if self.prefix is not None:
            k, v, mask = with_prefix(k, v, mask, self.prefix(), causal_from_scratch=mask is None and past == 0 and T > 1)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0, is_causal=mask is None and past == 0 and T > 1,
                      enable_gqa=self.num_kv_heads != self.num_heads)  # (B, nh, T, hd)
        return dense_forward(self.o_proj, y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim), self.few_rows)


class MLP(nn.Module):
    """SwiGLU (down(act(gate(x)) * up(x))) or the plain GPT-2 MLP (down(act(up(x))))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)
        self.fused_gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.few_rows = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            if self.fused_gate_up is not None and fused_is_current(self.fused_gate_up[0], [self.gate_proj, self.up_proj]):
                gate, up = decode_linear(x, *self.fused_gate_up, few_rows=self.few_rows).chunk(2, dim=-1)
                return dense_forward(self.down_proj, self.act(gate) * up, self.few_rows)
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class DecoderBlock(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = SelfAttention(config, layer_index)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rotary, mask, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """Decoder-only language model body plus its output projection (``logits``)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.rotary = None
        else:
            assert config.head_dim is not None
            self.rotary = RotaryEmbedding(
                config.head_dim, config.max_position_embeddings, config.rope_theta
            )
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_layers))
        self.norm = _norm(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.prompt: nn.Module | None = None  # prompt tuning: soft embeddings put before the tokens
        self.few_rows = False  # decode_linear's few-row path (use_decoding_layout(column_major=False))
        init_weights(self, config.initializer_range, config.num_layers)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, H) matrix of the vocabulary projection: tied or separate."""
        if self.config.tie_embeddings:
            return self.embed_tokens.weight
        return self.lm_head.weight

    @torch.no_grad()
    def use_decoding_layout(self, column_major: bool | None = None) -> None:
        """Lay out the weights for one-token-at-a-time decoding (same values, shapes, keys).

        q/k/v and gate/up become row blocks of one matrix each, so one product serves them
        (``fuse_linears``). In fp32, wide matrices are stored column-major: a one-row
        product then streams them from memory up to 1.9x faster on AVX-512 CPUs; in bf16
        row-major is faster (both measured, see docs/benchmarks.md). ``column_major=False``
        keeps fp32 matrices row-major, for a continuous batch of a few rows (``decode_linear``
        then computes them as ``weight @ x.T``; ``few_rows_layout`` measures which wins). Idempotent;
        checkpoints are unchanged (tensors are saved contiguous); a module swapped later
        (e.g. by LoRA) falls back to the plain path.
        """
        fp32 = self.embed_tokens.weight.dtype == torch.float32
        few_rows = column_major is False and fp32  # asked for row-major fp32: the few-row path
        if column_major is None:
            column_major = fp32
        self.few_rows = few_rows
        fused: set[int] = set()  # ids of Linear layers now viewing a fused matrix

        def laid_out(current: tuple[torch.Tensor, torch.Tensor | None] | None, linears: list[nn.Module]) -> bool:
            return current is not None and fused_is_current(current[0], linears) and \
                (current[0].stride(0) == 1 and current[0].shape[1] > 1) == column_major

        for block in self.layers:
            attention, mlp = block.self_attn, block.mlp
            attention.few_rows = mlp.few_rows = few_rows
            qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
            if all(is_dense_linear(m) for m in qkv):
                if not laid_out(attention.fused_qkv, qkv):
                    attention.fused_qkv = fuse_linears(qkv, column_major)
                fused.update(map(id, qkv))
            gate_up = [mlp.gate_proj, mlp.up_proj] if mlp.gated else []
            if gate_up and all(is_dense_linear(m) for m in gate_up):
                if not laid_out(mlp.fused_gate_up, gate_up):
                    mlp.fused_gate_up = fuse_linears(gate_up, column_major)
                fused.update(map(id, gate_up))
        for module in self.modules():
            if (isinstance(module, nn.Linear) or is_dense_linear(module) or module is self.embed_tokens) \
                    and id(module) not in fused:
                weight = module.weight
                out_features, in_features = weight.shape
                wants_columns = column_major and out_features >= in_features
                if wants_columns and weight.stride(0) != 1:
                    weight.data = weight.data.t().contiguous().t()
                elif not wants_columns and weight.stride(1) != 1:
                    weight.data = weight.data.contiguous()

    @torch.no_grad()
    def use_training_layout(self) -> None:
        """Undo ``use_decoding_layout``: plain contiguous weights (normal tensors even if the
        layout was made under inference mode), no fused views; values unchanged."""
        for block in self.layers:
            block.self_attn.fused_qkv = None
            block.mlp.fused_gate_up = None
            block.self_attn.few_rows = block.mlp.few_rows = False
        self.few_rows = False
        for parameter in self.parameters():
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)

    # the Backbone protocol (lmforge.models.backbone)
    causal = True

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def attention(self, index: int) -> nn.Module:
        return self.layers[index].self_attn

    @property
    def key_value_heads(self) -> int:
        assert self.config.num_kv_heads is not None
        return self.config.num_kv_heads

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H) from a batch of ``input_ids`` (and ``attention_mask``)."""
        return self(batch["input_ids"], batch.get("attention_mask"))

    def new_cache(
        self, batch_size: int, max_length: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache sized for ``max_length`` token positions (plus the soft prompt
        of prompt tuning, which the cache holds too)."""
        assert self.config.head_dim is not None and self.config.num_kv_heads is not None
        weight = self.embed_tokens.weight
        prompt = self.prompt.length if self.prompt is not None else 0  # type: ignore[union-attr]
        return KVCache(
            self.config.num_layers,
            batch_size,
            self.config.num_kv_heads,
            self.config.head_dim,
            max_length + prompt,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, H) for ``input_ids`` (B, T).

        attention_mask: (B, past + T), 1 on real tokens, 0 on padding (left or right).
        position_ids: (B, T); by default counted over real tokens, so left padding works.
        cache: when given, new keys/values are appended and attention sees the past.
        document_ids: (B, T) for packed training sequences: attention stays inside each
            document and positions restart at each document (unless position_ids given).
        """
        x = self.embed_tokens(input_ids)  # (B, T, H)
        prompt = 0
        if self.prompt is not None:  # soft prompt before the tokens; once in the cache, it stays there
            size = self.prompt.length  # type: ignore[union-attr]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], size), attention_mask], 1)
            if cache is None or cache.length == 0:
                x = torch.cat([self.prompt(x.shape[0]).to(x.dtype), x], dim=1)
                prompt = size
                if position_ids is not None:
                    prompt_positions = torch.arange(size, device=x.device).expand(x.shape[0], size)
                    position_ids = torch.cat([prompt_positions, position_ids + size], 1)
        if prompt and document_ids is not None:
            raise ValueError("prompt tuning does not combine with packed document masks")
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()  # traced: no host reads
        if attention_mask is not None and not exporting and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the fast causal path
        counted_positions = position_ids is None  # then no position exceeds past + T - 1
        if position_ids is None and document_ids is not None:
            steps = torch.arange(T, device=x.device).expand(B, T)
            starts = torch.where(torch.cat([torch.ones_like(document_ids[:, :1], dtype=torch.bool),
                                            document_ids[:, 1:] != document_ids[:, :-1]], 1), steps, 0)
            position_ids = steps - starts.cummax(1).values
        elif position_ids is None:
            if attention_mask is not None:
                counted = attention_mask.long().cumsum(-1) - 1  # (B, past + T)
                position_ids = counted[:, past : past + T].clamp(min=0)
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(position_ids, past + T - 1 if counted_positions else None)
        else:
            x = x + self.embed_positions(position_ids)
        x = self.dropout(x)
        mask = attention_mask_for_sdpa(attention_mask, T, past, causal=True, document_ids=document_ids)
        for block in self.layers:
            x = block(x, rotary, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return x[:, prompt:] if prompt else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) for hidden states (..., H)."""
        return decode_linear(hidden, self.output_weight, few_rows=self.few_rows)
