"""Hugging Face folders in and out: one conversion record per model family.

A ``Family`` holds everything that differs between BERT, GPT-2, Llama and Qwen2 in a
Hugging Face folder: the module key map (a ``KeyMap``, used in both directions), the
prefix of the base model inside ``*For...`` checkpoints, the tensors that are known but not
ours, the config in and out, and the transforms a tensor needs on load and on save (GPT-2
alone has any: its ``Conv1D`` weights are stored transposed and q/k/v are fused in
``c_attn``). Adding a family is adding a record (Qwen2 is Llama's record with q/k/v biases).
A tensor that maps nowhere, is missing, or has the wrong shape is an error that names it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CorruptFileError, UnknownArchitectureError, WeightsError
from lmforge.fileio import atomic_directory, load_tensors, read_json, save_tensors, write_json
from lmforge.interop.keymap import KeyMap
from lmforge.models import Decoder, DecoderConfig, Encoder, EncoderConfig, MaskedLM
from lmforge.weights import LoadReport, build_from_state

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """How one model family is stored in a Hugging Face folder."""

    name: str  # config.json model_type
    modules: KeyMap  # theirs -> ours
    base_prefix: str  # the base model's prefix inside *For... checkpoints
    config_in: Callable[[dict[str, Any], str], EncoderConfig | DecoderConfig]
    config_out: Callable[[Any], dict[str, Any]]
    architecture: Callable[[nn.Module], str]
    ignored: tuple[str, ...] = ()  # regexes of their tensors that are not weights we build
    load_transform: Callable[[str, torch.Tensor], Tensors | None] | None = None  # their key -> our tensors
    # our state -> (tensors already under their final names, our tensors left to rename)
    save_transform: Callable[[Tensors, Any], tuple[Tensors, Tensors]] | None = None
    extra_modules: KeyMap = field(default_factory=lambda: KeyMap({}))  # heads outside the base model

    def to_ours(self, tensors: Tensors, source: str, report: LoadReport) -> Tensors:
        """Rename (and transform) every tensor; an unknown name is an error."""
        ignored = [re.compile(p) for p in self.ignored]
        rules = KeyMap({**self.modules.table, **self.extra_modules.table})
        ours: Tensors = {}
        unknown: list[str] = []
        for key, tensor in tensors.items():
            key = key[len(self.base_prefix):] if key.startswith(self.base_prefix) else key
            if any(p.search(key) for p in ignored):
                report.ignored.append(key)
                continue
            transformed = self.load_transform(key, tensor) if self.load_transform else None
            if transformed is not None:
                ours.update(transformed)
                continue
            target = rules.rename(key)
            if target is None:
                unknown.append(key)
                continue
            ours[target] = tensor
        if unknown:
            raise WeightsError(f"{source}: {len(unknown)} unexpected tensor(s) not in a {self.name} model: "
                               f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
        return ours

    def to_theirs(self, state: Tensors, config: Any, head_prefix: str = "", prefixed: bool = True) -> Tensors:
        """Their names for our ``state`` (keys under ``head_prefix`` go through
        ``extra_modules`` and keep no base prefix; ``prefixed=False`` for a bare base model)."""
        out: Tensors = {}
        if self.save_transform is not None:
            out, state = self.save_transform(state, config)
        body, head = self.modules.inverse(), self.extra_modules.inverse()
        prefix = self.base_prefix if prefixed else ""
        for key, tensor in state.items():
            is_head = bool(head_prefix) and key.startswith(head_prefix)
            name = head.rename(key) if is_head else body.rename(key)
            if name is None:
                raise WeightsError(f"no Hugging Face name for tensor {key} in a {self.name} model")
            out[name if is_head or name.startswith("lm_head") else prefix + name] = tensor
        return out


# ----------------------------------------------------------------------------- BERT
def _bert_config(hf: dict[str, Any], source: str) -> EncoderConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnknownArchitectureError(f"{source}: position_embedding_type={hf['position_embedding_type']!r} is not "
                                       "supported (only 'absolute')")
    return EncoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=hf.get("pad_token_id", 0) or 0, initializer_range=hf.get("initializer_range", 0.02),
    )


def _bert_hf_config(config: EncoderConfig) -> dict[str, Any]:
    if config.heads_per_layer or config.intermediate_per_layer:
        raise UnknownArchitectureError("a pruned encoder has layers of different sizes; transformers' BertConfig "
                                       "holds one head count and one FFN size for all layers (export it to ONNX)")
    return {
        "model_type": "bert", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act, "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout, "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range, "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def _roformer_config(hf: dict[str, Any], source: str) -> EncoderConfig:
    problems = []
    if hf.get("embedding_size") not in (None, hf["hidden_size"]):
        problems.append(f"embedding_size={hf['embedding_size']} differs from hidden_size={hf['hidden_size']}")
    if hf.get("rotary_value"):
        problems.append("rotary_value=true (values rotated too)")
    if problems:
        raise UnknownArchitectureError(f"{source}: {'; '.join(problems)}: not supported")
    return replace(_bert_config({**hf, "position_embedding_type": "absolute"}, source), position="rope")


def _roformer_hf_config(config: EncoderConfig) -> dict[str, Any]:
    values = {k: v for k, v in _bert_hf_config(config).items() if k != "position_embedding_type"}
    return {**values, "model_type": "roformer", "embedding_size": config.hidden_size, "rotary_value": False}


def rotary_pairs(state: Tensors, config: EncoderConfig, to: str) -> Tensors:
    """Query and key rows between our rotary convention (dimension i of a head pairs with
    i + hd/2) and RoFormer's (2i pairs with 2i + 1); attention scores are the same."""
    hd = config.head_dim
    half = torch.arange(hd // 2)
    interleave = torch.stack([half, half + hd // 2], dim=1).reshape(-1)  # theirs[j] = ours[interleave[j]]
    order = interleave if to == "theirs" else torch.argsort(interleave)
    out = dict(state)
    for key, tensor in state.items():
        if re.search(r"(^|\.)attention\.(query|key)\.(weight|bias)$", key):
            rows = (torch.arange(tensor.shape[0] // hd)[:, None] * hd + order[None]).reshape(-1)
            out[key] = tensor.index_select(0, rows)
    return out


def _bert_load(key: str, tensor: torch.Tensor) -> Tensors | None:
    if key == "cls.predictions.decoder.weight":
        return {}  # tied to the word embeddings (load_hf checks that they are equal)
    return None


BERT = Family(
    name="bert",
    modules=KeyMap({
        "embeddings.word_embeddings": "embeddings.word_embeddings",
        "embeddings.position_embeddings": "embeddings.position_embeddings",
        "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
        "embeddings.LayerNorm": "embeddings.norm",
        "encoder.layer.{}.attention.self.query": "layers.{}.attention.query",
        "encoder.layer.{}.attention.self.key": "layers.{}.attention.key",
        "encoder.layer.{}.attention.self.value": "layers.{}.attention.value",
        "encoder.layer.{}.attention.output.dense": "layers.{}.attention.output",
        "encoder.layer.{}.attention.output.LayerNorm": "layers.{}.attention_norm",
        "encoder.layer.{}.intermediate.dense": "layers.{}.intermediate",
        "encoder.layer.{}.output.dense": "layers.{}.output",
        "encoder.layer.{}.output.LayerNorm": "layers.{}.output_norm",
        "pooler.dense": "pooler",
    }),
    extra_modules=KeyMap({
        "cls.predictions.transform.dense": "mlm_head.dense",
        "cls.predictions.transform.LayerNorm": "mlm_head.norm",
        "cls.predictions": "mlm_head",  # the output bias
    }),
    base_prefix="bert.",
    config_in=_bert_config,
    config_out=_bert_hf_config,
    architecture=lambda model: "BertForMaskedLM" if isinstance(model, MaskedLM) else "BertModel",
    ignored=(r"embeddings\.position_ids$", r"^cls\.seq_relationship\.", r"^cls\.predictions\.decoder\.bias$"),
    load_transform=_bert_load,
)


# ----------------------------------------------------------------------------- GPT-2
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out)


def _gpt2_config(hf: dict[str, Any], source: str) -> DecoderConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UnknownArchitectureError(f"{source}: GPT-2 option {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise UnknownArchitectureError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")
    hidden = hf["n_embd"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["n_layer"], num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hidden, max_position_embeddings=hf.get("n_positions", 1024),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned", mlp="gelu",
        hidden_act=hf.get("activation_function", "gelu_new"), attention_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("resid_pdrop", 0.0) or 0.0,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def _gpt2_hf_config(config: DecoderConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2", "vocab_size": config.vocab_size, "n_embd": config.hidden_size,
        "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": config.intermediate_size,
        "n_positions": config.max_position_embeddings, "layer_norm_epsilon": config.norm_eps,
        "activation_function": config.hidden_act, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, **_decoder_common(config),
    }


def _gpt2_load(key: str, tensor: torch.Tensor) -> Tensors | None:
    """c_attn (fused q/k/v, transposed) -> q/k/v_proj; other Conv1D weights transposed."""
    if ".attn.c_attn." in key:
        layer, leaf = key.split(".")[1], key.rsplit(".", 1)[1]
        fused = tensor.t() if leaf == "weight" else tensor  # (3H, H) or (3H,)
        return {f"layers.{layer}.self_attn.{name}.{leaf}": part.contiguous()
                for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0), strict=True)}
    if key.endswith(".weight") and any(c in key for c in GPT2_CONV1D):
        target = GPT2.modules.rename(key)
        return {target: tensor.t().contiguous()} if target else None
    return None


def _gpt2_save(state: Tensors, config: DecoderConfig) -> tuple[Tensors, Tensors]:
    """q/k/v_proj -> c_attn and Conv1D weights transposed, under their final names; the
    rest is left to the key map."""
    done: Tensors = {}
    rest: Tensors = {}
    inverse = GPT2.modules.inverse()
    for key, tensor in state.items():
        if ".self_attn." in key and key.split(".")[3] in ("q_proj", "k_proj", "v_proj"):
            continue
        name = inverse.rename(key)
        if name is not None and name.endswith(".weight") and any(c in name for c in GPT2_CONV1D):
            done[f"{GPT2.base_prefix}{name}"] = tensor.t().contiguous()
        else:
            rest[key] = tensor
    for i in range(config.num_layers):
        for leaf in ("weight", "bias"):
            fused = torch.cat([state[f"layers.{i}.self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
            done[f"{GPT2.base_prefix}h.{i}.attn.c_attn.{leaf}"] = fused.t().contiguous() if leaf == "weight" else fused
    return done, rest


GPT2 = Family(
    name="gpt2",
    modules=KeyMap({
        "wte": "embed_tokens", "wpe": "embed_positions",
        "h.{}.ln_1": "layers.{}.input_layernorm", "h.{}.attn.c_proj": "layers.{}.self_attn.o_proj",
        "h.{}.ln_2": "layers.{}.post_attention_layernorm", "h.{}.mlp.c_fc": "layers.{}.mlp.up_proj",
        "h.{}.mlp.c_proj": "layers.{}.mlp.down_proj", "ln_f": "norm", "lm_head": "lm_head",
    }),
    base_prefix="transformer.",
    config_in=_gpt2_config,
    config_out=_gpt2_hf_config,
    architecture=lambda model: "GPT2LMHeadModel",
    ignored=(r"\.attn\.(masked_)?bias$",),
    load_transform=_gpt2_load,
    save_transform=_gpt2_save,
)


# ----------------------------------------------------------------------------- Llama, Qwen2
def _llama_config(hf: dict[str, Any], source: str) -> DecoderConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnknownArchitectureError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), mlp="swiglu",
        hidden_act=hf.get("hidden_act", "silu"), attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=hf.get("attention_dropout", 0.0) or 0.0, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def _qwen2_config(hf: dict[str, Any], source: str) -> DecoderConfig:
    if hf.get("use_sliding_window"):
        raise UnknownArchitectureError(f"{source}: Qwen2 sliding-window attention is not supported")
    config = _llama_config(hf, source)
    config.attention_bias, config.attention_output_bias = True, False  # q/k/v biases, none on o_proj
    return config


def _decoder_common(config: DecoderConfig) -> dict[str, Any]:
    return {"tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
            "initializer_range": config.initializer_range}


def _rope_hf_config(config: DecoderConfig, model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, "hidden_act": config.hidden_act,
        "attention_dropout": config.dropout, **_decoder_common(config),
    }


LLAMA_MODULES = KeyMap({
    "embed_tokens": "embed_tokens",
    "layers.{}.input_layernorm": "layers.{}.input_layernorm",
    "layers.{}.self_attn.q_proj": "layers.{}.self_attn.q_proj",
    "layers.{}.self_attn.k_proj": "layers.{}.self_attn.k_proj",
    "layers.{}.self_attn.v_proj": "layers.{}.self_attn.v_proj",
    "layers.{}.self_attn.o_proj": "layers.{}.self_attn.o_proj",
    "layers.{}.post_attention_layernorm": "layers.{}.post_attention_layernorm",
    "layers.{}.mlp.gate_proj": "layers.{}.mlp.gate_proj",
    "layers.{}.mlp.up_proj": "layers.{}.mlp.up_proj",
    "layers.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "norm": "norm",
    "lm_head": "lm_head",
})
LLAMA = Family(
    name="llama", modules=LLAMA_MODULES, base_prefix="model.", config_in=_llama_config,
    config_out=lambda config: {**_rope_hf_config(config, "llama"), "attention_bias": config.attention_bias,
                               "mlp_bias": config.mlp_bias},
    architecture=lambda model: "LlamaForCausalLM", ignored=(r"rotary_emb\.inv_freq$",),
)
QWEN2 = Family(
    name="qwen2", modules=LLAMA_MODULES, base_prefix="model.", config_in=_qwen2_config,
    config_out=lambda config: {**_rope_hf_config(config, "qwen2"), "use_sliding_window": False},
    architecture=lambda model: "Qwen2ForCausalLM", ignored=(r"rotary_emb\.inv_freq$",),
)

ROFORMER = Family(
    name="roformer",
    modules=KeyMap({k: v for k, v in BERT.modules.table.items() if "position_embeddings" not in k}),
    extra_modules=BERT.extra_modules,
    base_prefix="roformer.",
    config_in=_roformer_config,
    config_out=_roformer_hf_config,
    architecture=lambda model: "RoFormerForMaskedLM" if isinstance(model, MaskedLM) else "RoFormerModel",
    ignored=(*BERT.ignored, r"encoder\.embed_positions\.weight$"),  # fixed sinusoids, rebuilt from the config
    load_transform=_bert_load,
    save_transform=lambda state, config: ({}, rotary_pairs(state, config, to="theirs")),
)

FAMILIES = {family.name: family for family in (BERT, ROFORMER, GPT2, LLAMA, QWEN2)}


def family_of(model: nn.Module) -> Family:
    """The record that exports ``model``; an architecture no family holds is an error."""
    if isinstance(model, (Encoder, MaskedLM)):
        return ROFORMER if model.config.position == "rope" else BERT
    if isinstance(model, Decoder):
        config = model.config
        if config.position == "learned":
            return GPT2
        if config.attention_bias and config.attention_output_bias is False and not config.mlp_bias:
            return QWEN2
        if config.attention_output_bias is None or config.attention_output_bias == config.attention_bias:
            return LLAMA
    raise WeightsError(f"cannot export {type(model).__name__} to Hugging Face format: no model family holds it")


# ----------------------------------------------------------------------------- loading
def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> EncoderConfig | DecoderConfig:
    """Our config for a Hugging Face ``config.json`` dict."""
    family = FAMILIES.get(hf.get("model_type"))  # type: ignore[arg-type]
    if family is None:
        raise UnknownArchitectureError(f"{source}: model_type={hf.get('model_type')!r} is not supported "
                                       f"(supported: {', '.join(FAMILIES)})")
    return family.config_in(hf, source)


def hf_config(model: nn.Module) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for one of our models."""
    family = family_of(model)
    return {"architectures": [family.architecture(model)], **family.config_out(model.config)}


def read_hf_weights(folder: Path) -> Tensors:
    """All tensors of a Hugging Face folder (single or sharded safetensors, or a .bin)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.exists():
        return load_tensors(single)
    if index.exists():
        tensors: Tensors = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            tensors.update(load_tensors(folder / shard))
        return tensors
    if legacy.exists():
        return load_tensors(legacy)
    raise CorruptFileError(f"{folder}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
                           "pytorch_model.bin)")


def load_hf(folder: str | Path, with_mlm_head: bool | None = None) -> tuple[nn.Module, LoadReport]:
    """Load a local Hugging Face folder into an lmforge model.

    BERT and RoFormer folders give an ``Encoder``, or a ``MaskedLM`` when the file has an MLM head or
    ``with_mlm_head=True`` (a missing head is then initialised and reported). GPT-2, Llama
    and Qwen2 folders give a ``Decoder``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CorruptFileError(f"{folder}: not a Hugging Face folder (no config.json)")
    hf = read_json(config_path)
    config = config_from_hf(hf, source=str(config_path))
    family = FAMILIES[hf["model_type"]]
    tensors = read_hf_weights(folder)
    report = LoadReport()
    state = family.to_ours(tensors, str(folder), report)
    if family is ROFORMER:
        state = rotary_pairs(state, config, to="ours")  # type: ignore[arg-type]
    if isinstance(config, EncoderConfig):
        model = _bert_model(folder, config, tensors, state, with_mlm_head, report)
    else:
        model = _decoder_model(folder, config, state, report)
    if report.initialised:
        log.warning("%s: initialised %d tensor(s) not in the file: %s", folder, len(report.initialised),
                    ", ".join(report.initialised))
    return model, report


def _bert_model(folder: Path, config: EncoderConfig, tensors: Tensors, state: Tensors, with_mlm_head: bool | None,
                report: LoadReport) -> nn.Module:
    config.add_pooler = any(k.startswith("pooler.") for k in state)
    decoder_weight = tensors.get("cls.predictions.decoder.weight")
    if decoder_weight is not None and not torch.equal(decoder_weight, state["embeddings.word_embeddings.weight"]):
        raise WeightsError(f"{folder}: cls.predictions.decoder.weight is not tied to the word embeddings; untied MLM "
                           "decoders are not supported")
    has_head = any(k.startswith("mlm_head.") for k in state)
    if with_mlm_head or (with_mlm_head is None and has_head):
        state = {(k if k.startswith("mlm_head.") else f"encoder.{k}"): v for k, v in state.items()}
        return build_from_state(MaskedLM, config, state, str(folder), ("mlm_head.",), report)
    report.ignored.extend(k for k in state if k.startswith("mlm_head."))
    state = {k: v for k, v in state.items() if not k.startswith("mlm_head.")}
    return build_from_state(Encoder, config, state, str(folder), report=report)


def _decoder_model(folder: Path, config: DecoderConfig, state: Tensors, report: LoadReport) -> nn.Module:
    if config.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state.get("embed_tokens.weight", torch.empty(0))):
            config.tie_embeddings = False  # the file really has a separate head
        else:
            state.pop("lm_head.weight")
    if not config.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        config.tie_embeddings = True  # a headless base model: tie, as generation needs a head
    return build_from_state(Decoder, config, state, str(folder), report=report)


# ----------------------------------------------------------------------------- saving
def hf_state(model: nn.Module) -> Tensors:
    """The Hugging Face state dict of one of our models."""
    family = family_of(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, MaskedLM):
        body = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        head = {k: v for k, v in state.items() if k.startswith("mlm_head.")}
        return family.to_theirs({**body, **head}, model.config, head_prefix="mlm_head.")
    if isinstance(model, Encoder):
        return family.to_theirs(state, model.config, prefixed=False)  # BertModel: no "bert." prefix
    return family.to_theirs(state, model.config)


def save_hf(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (and its tokenizer) as a folder ``transformers`` loads. Atomic."""
    folder = Path(folder)
    tensors = hf_state(model)
    config = hf_config(model)
    with atomic_directory(folder) as tmp:
        save_tensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
    return folder
