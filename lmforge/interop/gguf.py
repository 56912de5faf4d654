"""llama.cpp GGUF files into the Llama decoder, with the tokenizer from the metadata.

Tensors are dequantised by the ``gguf`` package's own routines to fp32. llama.cpp's
converter permutes the rows of ``attn_q``/``attn_k`` so that RoPE rotates interleaved
pairs; our decoder (like transformers) rotates halves, so those rows are permuted back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer
from torch import nn

from lmforge.errors import CorruptFileError, TokenizerError, UnknownArchitectureError
from lmforge.interop.keymap import KeyMap
from lmforge.models import Decoder, DecoderConfig
from lmforge.tokenizer import Tokenizer
from lmforge.weights import build_from_state

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

LLAMA_KEYS = KeyMap({
    "token_embd": "embed_tokens",
    "blk.{}.attn_norm": "layers.{}.input_layernorm",
    "blk.{}.attn_q": "layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "layers.{}.self_attn.o_proj",
    "blk.{}.ffn_norm": "layers.{}.post_attention_layernorm",
    "blk.{}.ffn_gate": "layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "layers.{}.mlp.down_proj",
    "output_norm": "norm",
    "output": "lm_head",
})

# llama.cpp pre-tokenizer names -> the split applied before byte-level BPE
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file, with a clear error when it is not one or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: GGUF file not found")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptFileError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError/IndexError on truncation
        raise CorruptFileError(f"{path}: cannot read GGUF file (truncated or damaged): {error}") from error


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """All metadata fields as Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _config(meta: dict[str, Any], path: Path) -> DecoderConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CorruptFileError(f"{path}: GGUF metadata has no {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    return DecoderConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length", 2048)),
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        position="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        mlp="swiglu",
        hidden_act="silu",
        tie_embeddings=True,  # set from the tensors below
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        extra={"source": str(path), "gguf_file_type": meta.get("general.file_type")},
    )


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half order)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_gguf_weights(reader: GGUFReader, config: DecoderConfig, path: Path) -> dict[str, torch.Tensor]:
    """Dequantised fp32 tensors under our key names."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for tensor in reader.tensors:
        target = LLAMA_KEYS.rename(tensor.name)
        if target is None:
            unknown.append(tensor.name)
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
        array = np.asarray(values, dtype=np.float32).reshape(shape)
        if not array.flags.writeable:  # unquantised tensors come back as views of the mapped file
            array = array.copy()
        weight = torch.from_numpy(array)
        if target.endswith("q_proj.weight"):
            weight = _unpermute(weight, config.num_heads)
        elif target.endswith("k_proj.weight"):
            assert config.num_kv_heads is not None
            weight = _unpermute(weight, config.num_kv_heads)
        state[target] = weight
    if unknown:
        raise CorruptFileError(f"{path}: unexpected GGUF tensor(s): {', '.join(unknown)}")
    return state


def tokenizer_from_gguf(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Byte-level BPE tokenizer rebuilt from ``tokenizer.ggml.*`` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [tokens[i] for i, t in enumerate(types) if t == 3]  # 3 = control token in llama.cpp
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    return Tokenizer(backend, special, bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     meta.get("tokenizer.chat_template"))


def load_gguf(path: str | Path) -> tuple[Decoder, Tokenizer]:
    """The decoder and tokenizer held in a GGUF file (dequantised to fp32)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    config = _config(meta, path)
    state = read_gguf_weights(reader, config, path)
    config.tie_embeddings = "lm_head.weight" not in state
    model = build_from_state(Decoder, config, state, str(path))
    return model.eval(), tokenizer_from_gguf(meta, path)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- writing
GGUF_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotate-half -> interleaved pairs); ``_unpermute`` undoes it."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    import json

    ours = json.dumps(json.loads(tokenizer.backend.to_str()).get("pre_tokenizer"), sort_keys=True)
    for name, make in PRE_TOKENIZERS.items():
        probe = RustTokenizer(models.BPE())
        probe.pre_tokenizer = make()
        if json.dumps(json.loads(probe.to_str())["pre_tokenizer"], sort_keys=True) == ours:
            return name
    raise UnknownArchitectureError("GGUF holds byte-level BPE tokenizers with a gpt2 or smollm pre-tokenizer; this "
                                   "tokenizer's pre-tokenizer is neither")


def _check_gguf_model(model: nn.Module, tokenizer: Tokenizer | None) -> None:
    config = getattr(model, "config", None)
    problems = []
    if not isinstance(model, Decoder) or not isinstance(config, DecoderConfig):
        problems.append(f"a {type(model).__name__} (GGUF export holds Llama-family decoders)")
    else:
        if config.position != "rope" or config.norm != "rmsnorm" or config.mlp != "swiglu":
            problems.append("a GPT-2-style decoder (learned positions / LayerNorm / GELU MLP)")
        if config.attention_bias or config.mlp_bias or config.attention_output_bias:
            problems.append("a decoder with linear biases (Qwen2-style); the llama architecture has none")
    if tokenizer is None:
        problems.append("no tokenizer (a GGUF file carries its tokenizer)")
    elif tokenizer.backend.model.__class__.__name__ != "BPE":
        problems.append(f"a {tokenizer.backend.model.__class__.__name__} tokenizer (GGUF export holds byte-level BPE)")
    if problems:
        raise UnknownArchitectureError("cannot export to GGUF: " + "; ".join(problems))


def save_gguf(model: nn.Module, tokenizer: Tokenizer | None, path: str | Path, tensor_type: str = "f16",
              name: str = "lmforge") -> Path:
    """Write a Llama-family decoder (LoRA already merged) and its tokenizer as a GGUF file that
    llama.cpp reads; 1-D tensors (norms) stay f32, as llama.cpp's converter keeps them."""
    import json
    import os

    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize

    _check_gguf_model(model, tokenizer)
    if tensor_type not in GGUF_TYPES:
        raise UnknownArchitectureError(f"GGUF tensor type {tensor_type!r} is not one of {', '.join(GGUF_TYPES)}")
    assert isinstance(model, Decoder) and tokenizer is not None
    config = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(int(config.num_kv_heads or config.num_heads))
    writer.add_key_length(int(config.head_dim or 0))
    writer.add_value_length(int(config.head_dim or 0))
    writer.add_rope_dimension_count(int(config.head_dim or 0))
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[tensor_type])
    backend = json.loads(tokenizer.backend.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    for added in backend.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [""] * config.vocab_size
    for token, index in vocab.items():
        if index < config.vocab_size:
            tokens[index] = token
    special = {added["content"] for added in backend.get("added_tokens", []) if added.get("special")}
    tokens = [token or f"[PAD{i}]" for i, token in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    theirs = LLAMA_KEYS.inverse()
    for key, tensor in model.state_dict().items():
        if "lora_" in key:
            continue  # merged into the weights
        target = theirs.rename(key)
        if target is None:
            raise UnknownArchitectureError(f"cannot export to GGUF: tensor {key} has no llama.cpp name")
        weight = tensor.detach().float()
        if key.endswith("q_proj.weight"):
            weight = _permute(weight, config.num_heads)
        elif key.endswith("k_proj.weight"):
            weight = _permute(weight, int(config.num_kv_heads or config.num_heads))
        array = weight.contiguous().numpy()
        kind = GGUF_TYPES[tensor_type] if array.ndim == 2 else "F32"
        if kind == "F32":
            writer.add_tensor(target, array)
        elif kind == "F16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            quant = getattr(GGMLQuantizationType, kind)
            if array.shape[-1] % 32:
                writer.add_tensor(target, array.astype(np.float16))  # blocks need 32 columns; keep f16
            else:
                writer.add_tensor(target, quantize(array, quant), raw_dtype=quant)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
