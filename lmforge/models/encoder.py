"""BERT-family encoder (BERT, MiniLM, RoFormer): post-LN blocks, token types, and learned
absolute positions (BERT) or rotary positions on queries and keys (RoFormer).

    tokens (B, T), token types (B, T)
      -> embeddings: word (+ position, when learned) + token_type -> norm -> dropout
      -> num_layers x EncoderBlock:
             x = attention_norm(x + attention(x))            # bidirectional, padding-masked
             x = output_norm(x + output(act(intermediate(x))))
    hidden (B, T, H);  pooled = tanh(pooler(hidden[:, 0]))   (when add_pooler)

``MaskedLMHead`` is BERT's masked-LM head (transform + vocabulary projection tied to the
word embeddings); it maps any (N, H) rows, so objectives project only the masked rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.config import EncoderConfig
from lmforge.models.layers import (
    Dropout,
    RotaryEmbedding,
    activation,
    apply_rotary,
    attention,
    attention_mask_for_sdpa,
    init_weights,
    with_prefix,
)


class Packing:
    """Moves rows between the padded (B, T, ...) grid and the (N, ...) real tokens."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.shape = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)  # (N, H)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        grid = rows.new_zeros(self.shape.numel(), rows.shape[-1])
        return grid.index_copy(0, self.index, rows).view(*self.shape, rows.shape[-1])  # (B, T, H)


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # rotary encoders have no position table: attention rotates queries and keys instead
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position == "learned" else None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
            x = x + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.num_heads = config.heads(layer_index)
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        width = self.num_heads * self.head_dim  # hidden_size unless heads were pruned
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        self.value = nn.Linear(config.hidden_size, width)
        self.output = nn.Linear(width, config.hidden_size)
        self.prefix: Any = None  # prefix tuning: a callable giving (keys, values), each (heads, P, hd)
        self.head_mask: torch.Tensor | None = None  # (nh,) multiplies each head's output (importance probes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x is (B, T, H), or (N, H) real-token rows when ``packing`` is given; ``rotary``
        (cos, sin), each (B or 1, 1, T, hd), rotates queries and keys (position="rope")."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if packing is not None:  # attention needs the padded grid; projections did not
            q, k, v = packing.pad(q), packing.pad(k), packing.pad(v)
        B, T, H = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.prefix is not None:  # prefix keys carry no position
            k, v, mask = with_prefix(k, v, mask, self.prefix(), causal_from_scratch=False)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        if self.head_mask is not None:
            y = y * self.head_mask[None, :, None, None]
        y = y.transpose(1, 2).reshape(B, T, H)
        return self.output(packing.unpad(y) if packing is not None else y)


class EncoderBlock(nn.Module):
    def __init__(self, config: EncoderConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.attention = Attention(config, layer_index)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate(layer_index))
        self.output = nn.Linear(config.intermediate(layer_index), config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = activation(config.hidden_act)
        self.dropout = Dropout(config.hidden_dropout)
        self.ffn_mask: torch.Tensor | None = None  # (intermediate,) multiplies each FFN neuron (importance probes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, mask, packing, rotary)))
        inner = self.act(self.intermediate(x))
        if self.ffn_mask is not None:
            inner = inner * self.ffn_mask
        return self.output_norm(x + self.dropout(self.output(inner)))


class Encoder(nn.Module):
    """BERT-family encoder body; ``forward`` returns the last hidden states."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderBlock(config, i) for i in range(config.num_layers))
        self.rotary = (RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
                       if config.position == "rope" else None)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.add_pooler else None
        self.prompt: nn.Module | None = None  # prompt tuning: soft embeddings put before the tokens
        init_weights(self, config.initializer_range)

    # the Backbone protocol (lmforge.models.backbone)
    causal = False

    def input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def attention(self, index: int) -> nn.Module:
        return self.layers[index].attention

    @property
    def key_value_heads(self) -> int:
        return self.config.num_heads

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H) from a batch of ``input_ids`` (and ``attention_mask``, ``token_type_ids``)."""
        return self(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, H). attention_mask (B, T): 1 on real tokens, 0 on padding.

        With padding, every row-wise layer (projections, FFN, norms) runs on the real
        tokens only; attention alone sees the padded grid. Padding positions of the
        output are zeros.
        """
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        prompt = 0
        if self.prompt is not None:  # (B, P + T, H); the soft prompt has no position or type embedding
            soft = self.prompt(x.shape[0]).to(x.dtype)
            prompt = soft.shape[1]
            x = torch.cat([soft, x], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(x.shape[0], prompt), attention_mask], dim=1)
        # a traced graph (ONNX export): no host reads, no data-dependent shapes
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
        if attention_mask is not None and not exporting and bool(attention_mask.all()):
            attention_mask = None
        mask = attention_mask_for_sdpa(attention_mask, x.shape[1], 0, causal=False)
        rotary = None
        if self.rotary is not None:  # soft-prompt rows take the first positions, tokens follow
            bound = None  # the largest position, known from the shape when positions are 0..T-1
            if position_ids is None:
                position_ids, bound = torch.arange(x.shape[1], device=x.device)[None], x.shape[1] - 1
            elif prompt:
                position_ids = torch.cat([torch.arange(prompt, device=x.device)[None].expand(position_ids.shape[0], -1),
                                          position_ids + prompt], dim=1)
            rotary = self.rotary(position_ids, bound)
        packing = Packing(attention_mask) if attention_mask is not None and not exporting else None
        if packing is not None:
            x = packing.unpad(x)  # (N, H), N = real tokens
        for block in self.layers:
            x = block(x, mask, packing, rotary)
        x = packing.pad(x) if packing is not None else x
        return x[:, prompt:] if prompt else x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT pooled output: tanh(W h_[CLS] + b), (B, H)."""
        if self.pooler is None:
            raise ValueError("this encoder was built without a pooler (add_pooler=False)")
        return torch.tanh(self.pooler(hidden[:, 0]))


class MaskedLMHead(nn.Module):
    """BERT MLM head: dense -> act -> LayerNorm -> tied vocabulary projection + bias."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = activation(config.hidden_act)
        init_weights(self, config.initializer_range)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rows (..., H) that the vocabulary projection takes."""
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) for hidden rows (..., H); ``word_embeddings`` is (V, H)."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


class MaskedLM(nn.Module):
    """Encoder plus its masked-LM head; ``forward`` still returns hidden states."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.mlm_head = MaskedLMHead(config)

    causal = False

    @property
    def backbone(self) -> Encoder:
        """The encoder body (the Backbone the tasks and adapters work on)."""
        return self.encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask, token_type_ids, position_ids)

    @classmethod
    def around(cls, encoder: Encoder) -> MaskedLM:
        """A masked LM on an existing encoder, with a freshly initialised (tied) head."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = encoder.config
        model.encoder = encoder
        model.mlm_head = MaskedLMHead(encoder.config)
        return model

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits (..., V) for (..., H) hidden rows (pass only the rows you need)."""
        return self.mlm_head(hidden, self.encoder.embeddings.word_embeddings.weight)
