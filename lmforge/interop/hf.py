"""Hugging Face folders in and out: BERT, GPT-2 and Llama.

Key maps are plain dicts from a Hugging Face *module* path to ours, with ``{}`` standing
for the layer index; the parameter leaf (``weight``/``bias``) carries over. They are used
in both directions. A tensor that maps nowhere, is missing, or has the wrong shape is an
error that names it. GPT-2 stores ``Conv1D`` weights transposed and fuses q/k/v in
``c_attn``; those two facts are the only transforms.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CorruptFileError, UnknownArchitectureError, WeightsError
from lmforge.fileio import atomic_directory, load_tensors, read_json, save_tensors, write_json
from lmforge.models import Decoder, DecoderConfig, Encoder, EncoderConfig, MaskedLM

log = logging.getLogger(__name__)

SUPPORTED = ("bert", "gpt2", "llama")

BERT_MODULES = {
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
}
BERT_MLM_MODULES = {
    "cls.predictions.transform.dense": "mlm_head.dense",
    "cls.predictions.transform.LayerNorm": "mlm_head.norm",
    "cls.predictions": "mlm_head",  # the output bias
}
GPT2_MODULES = {
    "wte": "embed_tokens",
    "wpe": "embed_positions",
    "h.{}.ln_1": "layers.{}.input_layernorm",
    "h.{}.attn.c_proj": "layers.{}.self_attn.o_proj",
    "h.{}.ln_2": "layers.{}.post_attention_layernorm",
    "h.{}.mlp.c_fc": "layers.{}.mlp.up_proj",
    "h.{}.mlp.c_proj": "layers.{}.mlp.down_proj",
    "ln_f": "norm",
    "lm_head": "lm_head",
}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out)
LLAMA_MODULES = {
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
}
BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}

# Tensors some Hugging Face files carry that are not weights of the model we build.
IGNORED = {
    "bert": [r"embeddings\.position_ids$", r"^cls\.seq_relationship\.",
             r"^cls\.predictions\.decoder\.bias$"],
    "gpt2": [r"\.attn\.(masked_)?bias$"],
    "llama": [r"rotary_emb\.inv_freq$"],
}


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for source, target in table.items():
        pattern = re.escape(source).replace(r"\{\}", r"(\d+)")
        rules.append((re.compile(rf"^{pattern}\.(weight|bias|gamma|beta)$"), target))
    return rules


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            *layer, leaf = match.groups()
            leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
            return f"{target.format(*layer)}.{leaf}"
    return None


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {ours: theirs for theirs, ours in table.items()}


@dataclass
class LoadReport:
    """What a load did beyond a one-to-one copy."""

    initialised: list[str] = field(default_factory=list)  # ours, freshly initialised
    ignored: list[str] = field(default_factory=list)  # theirs, known and not used


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> EncoderConfig | DecoderConfig:
    """Our config for a Hugging Face ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UnknownArchitectureError(
                f"{source}: position_embedding_type={hf['position_embedding_type']!r} is not "
                "supported (only 'absolute')"
            )
        return EncoderConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            initializer_range=hf.get("initializer_range", 0.02),
        )
    if model_type == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise UnknownArchitectureError(f"{source}: GPT-2 option {flag}=true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise UnknownArchitectureError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")
        hidden = hf["n_embd"]
        return DecoderConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            max_position_embeddings=hf.get("n_positions", 1024),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position="learned",
            mlp="gelu",
            hidden_act=hf.get("activation_function", "gelu_new"),
            attention_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dropout=hf.get("resid_pdrop", 0.0) or 0.0,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
        )
    if model_type == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnknownArchitectureError(
                f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE)"
            )
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        return DecoderConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            position="rope",
            rope_theta=float(theta),
            mlp="swiglu",
            hidden_act=hf.get("hidden_act", "silu"),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            dropout=hf.get("attention_dropout", 0.0) or 0.0,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
        )
    raise UnknownArchitectureError(
        f"{source}: model_type={model_type!r} is not supported "
        f"(supported: {', '.join(SUPPORTED)})"
    )


def hf_config(config: EncoderConfig | DecoderConfig, architecture: str) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for our config."""
    if isinstance(config, EncoderConfig):
        return {
            "architectures": [architecture],
            "model_type": "bert",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": config.max_position_embeddings,
            "type_vocab_size": config.type_vocab_size,
            "layer_norm_eps": config.layer_norm_eps,
            "hidden_act": config.hidden_act,
            "hidden_dropout_prob": config.hidden_dropout,
            "attention_probs_dropout_prob": config.attention_dropout,
            "pad_token_id": config.pad_token_id,
            "initializer_range": config.initializer_range,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
        }
    if config.position == "learned":
        return {
            "architectures": [architecture],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_embd": config.hidden_size,
            "n_layer": config.num_layers,
            "n_head": config.num_heads,
            "n_inner": config.intermediate_size,
            "n_positions": config.max_position_embeddings,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": config.hidden_act,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "tie_word_embeddings": config.tie_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "initializer_range": config.initializer_range,
        }
    return {
        "architectures": [architecture],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": config.hidden_act,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
    }


# ----------------------------------------------------------------------------- weights


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (single or sharded safetensors, or a .bin)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.exists():
        return load_tensors(single)
    if index.exists():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            tensors.update(load_tensors(folder / shard))
        return tensors
    if legacy.exists():
        return load_tensors(legacy)
    raise CorruptFileError(
        f"{folder}: no weights found (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin)"
    )


def _strip_base_prefix(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    prefix = BASE_PREFIX[model_type]
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def _hf_to_ours(
    tensors: dict[str, torch.Tensor], model_type: str, source: str, report: LoadReport
) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2, transpose/split) every tensor; unknown names are an error."""
    table = {"bert": {**BERT_MODULES, **BERT_MLM_MODULES}, "gpt2": GPT2_MODULES,
             "llama": LLAMA_MODULES}[model_type]
    rules = _compile(table)
    ignored = [re.compile(p) for p in IGNORED[model_type]]
    ours: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in _strip_base_prefix(tensors, model_type).items():
        if any(p.search(key) for p in ignored):
            report.ignored.append(key)
            continue
        if model_type == "gpt2" and ".attn.c_attn." in key:
            layer = key.split(".")[1]
            leaf = key.rsplit(".", 1)[1]
            fused = tensor.t() if leaf == "weight" else tensor  # (3H, H) or (3H,)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0), strict=True):
                ours[f"layers.{layer}.self_attn.{name}.{leaf}"] = part.contiguous()
            continue
        if model_type == "bert" and key == "cls.predictions.decoder.weight":
            report.ignored.append(key)  # tied to the word embeddings; checked below
            continue
        target = _rename(key, rules)
        if target is None:
            unknown.append(key)
            continue
        if model_type == "gpt2" and key.endswith(".weight") and any(c in key for c in GPT2_CONV1D):
            tensor = tensor.t().contiguous()
        ours[target] = tensor
    if unknown:
        raise WeightsError(f"{source}: unexpected tensor(s) not in a {model_type} model: {', '.join(unknown)}")
    return ours


def build_from_state(
    model_class: Callable[[Any], nn.Module],
    config: Any,
    state: dict[str, torch.Tensor],
    source: str,
    optional_prefixes: tuple[str, ...] = (),
    report: LoadReport | None = None,
) -> nn.Module:
    """Build ``model_class(config)`` holding exactly ``state`` (checked as in ``load_into``).

    When every tensor is present the model is built on the meta device and takes the
    tensors as they are, so loading needs no second copy of the weights in memory.
    """
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    if any(k not in state for k in expected):  # some tensors will keep a fresh init
        model = model_class(config)
        load_into(model, state, source, optional_prefixes, report)
        return model
    check_state(expected, state, source, optional_prefixes)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                          assign=True)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device="cpu")
    return model


def check_state(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, optional_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """Raise one ``WeightsError`` naming the missing, unexpected or wrongly shaped tensors
    (the first few of each kind and how many in all: a wrong hidden size touches every
    tensor); return the missing keys that ``optional_prefixes`` allow."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in state
        if k in expected and expected[k].shape != state[k].shape
    ]
    allowed_missing = [k for k in missing if k.startswith(optional_prefixes)] if optional_prefixes else []
    missing = [k for k in missing if k not in allowed_missing]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_first_few(missing, ', ')}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_first_few(unexpected, ', ')}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape: {_first_few(wrong_shape, '; ')}")
    if problems:
        raise WeightsError(f"{source}: " + " | ".join(problems))
    return allowed_missing


def _first_few(items: list[str], separator: str, shown: int = 4) -> str:
    rest = len(items) - shown
    return separator.join(items[:shown]) + (f"{separator}... and {rest} more" if rest > 0 else "")


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    optional_prefixes: tuple[str, ...] = (),
    report: LoadReport | None = None,
) -> LoadReport:
    """Copy ``state`` into ``model`` strictly: every missing, unexpected or wrongly shaped
    tensor is named in one ``WeightsError``. Keys under ``optional_prefixes`` may be
    missing (they keep their fresh initialisation and are listed in the report)."""
    report = report or LoadReport()
    expected = model.state_dict()
    allowed_missing = check_state(expected, state, source, optional_prefixes)
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    report.initialised.extend(allowed_missing)
    return report


def load_hf(
    folder: str | Path, with_mlm_head: bool | None = None
) -> tuple[nn.Module, LoadReport]:
    """Load a local Hugging Face folder into an lmforge model.

    BERT folders give an ``Encoder``, or a ``MaskedLM`` when the file has an MLM head or
    ``with_mlm_head=True`` (a missing head is then initialised and reported). GPT-2 and
    Llama folders give a ``Decoder``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CorruptFileError(f"{folder}: not a Hugging Face folder (no config.json)")
    hf = read_json(config_path)
    config = config_from_hf(hf, source=str(config_path))
    model_type = hf["model_type"]
    tensors = read_hf_weights(folder)
    report = LoadReport()
    state = _hf_to_ours(tensors, model_type, str(folder), report)

    if isinstance(config, EncoderConfig):
        config.add_pooler = any(k.startswith("pooler.") for k in state)
        has_head = any(k.startswith("mlm_head.") for k in state)
        decoder_weight = _strip_base_prefix(tensors, "bert").get("cls.predictions.decoder.weight")
        if decoder_weight is not None and not torch.equal(
            decoder_weight, state["embeddings.word_embeddings.weight"]
        ):
            raise WeightsError(f"{folder}: cls.predictions.decoder.weight is not tied to the word "
                               "embeddings; untied MLM decoders are not supported")
        if with_mlm_head or (with_mlm_head is None and has_head):
            state = {(k if k.startswith("mlm_head.") else f"encoder.{k}"): v for k, v in state.items()}
            model: nn.Module = build_from_state(MaskedLM, config, state, str(folder), ("mlm_head.",), report)
        else:
            head_keys = [k for k in state if k.startswith("mlm_head.")]
            report.ignored.extend(head_keys)
            state = {k: v for k, v in state.items() if not k.startswith("mlm_head.")}
            model = build_from_state(Encoder, config, state, str(folder), report=report)
    else:
        if config.tie_embeddings and "lm_head.weight" in state:
            if not torch.equal(state["lm_head.weight"], state.get("embed_tokens.weight", torch.empty(0))):
                config.tie_embeddings = False  # the file really has a separate head
            else:
                state.pop("lm_head.weight")
        if not config.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
            config.tie_embeddings = True  # a headless base model: tie, as generation needs a head
        model = build_from_state(Decoder, config, state, str(folder), report=report)
    if report.initialised:
        log.warning("%s: initialised %d tensor(s) not in the file: %s", folder,
                    len(report.initialised), ", ".join(report.initialised))
    return model, report


def _ours_to_hf(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Hugging Face state dict and architecture name for one of our models."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, (Encoder, MaskedLM)):
        body_rules = _compile(_invert(BERT_MODULES))
        head_rules = _compile(_invert(BERT_MLM_MODULES))
        out: dict[str, torch.Tensor] = {}
        is_mlm = isinstance(model, MaskedLM)
        for key, tensor in state.items():
            if is_mlm and key.startswith("mlm_head."):
                name = _rename(key, head_rules)
            else:
                body_key = key[len("encoder."):] if is_mlm else key
                renamed = _rename(body_key, body_rules)
                name = f"bert.{renamed}" if (is_mlm and renamed) else renamed
            if name is None:
                raise WeightsError(f"no Hugging Face name for tensor {key}")
            out[name] = tensor
        if is_mlm:
            return out, "BertForMaskedLM"
        return out, "BertModel"
    if isinstance(model, Decoder):
        config = model.config
        gpt2 = config.position == "learned"
        rules = _compile(_invert(GPT2_MODULES if gpt2 else LLAMA_MODULES))
        out = {}
        prefix = "transformer." if gpt2 else "model."
        for key, tensor in state.items():
            if gpt2 and ".self_attn." in key and key.split(".")[3] in ("q_proj", "k_proj", "v_proj"):
                continue  # fused into c_attn below
            name = _rename(key, rules)
            if name is None:
                raise WeightsError(f"no Hugging Face name for tensor {key}")
            if gpt2 and name.endswith(".weight") and any(c in name for c in GPT2_CONV1D):
                tensor = tensor.t().contiguous()
            out[name if name.startswith("lm_head") else prefix + name] = tensor
        if gpt2:
            for i in range(config.num_layers):
                for leaf in ("weight", "bias"):
                    parts = [state[f"layers.{i}.self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")]
                    fused = torch.cat(parts, dim=0)
                    out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = fused.t().contiguous() if leaf == "weight" else fused
        return out, "GPT2LMHeadModel" if gpt2 else "LlamaForCausalLM"
    raise WeightsError(f"cannot export {type(model).__name__} to Hugging Face format")


def save_hf(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (and its tokenizer) as a folder ``transformers`` loads. Atomic."""
    folder = Path(folder)
    tensors, architecture = _ours_to_hf(model)
    config = hf_config(model.config, architecture)  # type: ignore[arg-type]
    with atomic_directory(folder) as tmp:
        save_tensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
    return folder
