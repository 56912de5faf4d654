"""Generation fine-tuning (decoders): (prompt, target) pairs and multi-turn dialogues.

The loss covers the target tokens only (prompt positions are -100). A pair's prompt is
``instruction + prompt``, wrapped as a user turn of the tokenizer's chat template when it
has one (``--chat``, on by default for chat models); the target follows, closed by the
end-of-sequence token. A dialogue (``messages``: [{role, content}]) is rendered with the
chat template once; the loss covers every assistant turn (its content and end-of-turn
marks), located by rendering the conversation prefix by prefix.

Evaluation always reports target-token loss and perplexity (cheap: used to pick the best
checkpoint); the final evaluation also generates greedily for the first
``eval_generate`` examples and scores them: sacrebleu BLEU and chrF (translation),
ROUGE-L (summaries).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lmforge.data.loader import IGNORE_INDEX, BucketedLoader
from lmforge.errors import DataError
from lmforge.eval import metrics as M
from lmforge.generation import GenerationConfig, generate
from lmforge.hardware import autocast_context, module_device, to_device
from lmforge.models import Decoder
from lmforge.objectives import CausalLMObjective
from lmforge.objectives.base import Objective
from lmforge.tasks.base import Task

log = logging.getLogger(__name__)


class GenerateTask(Task):
    name = "generate"
    main_metric = "perplexity"
    fields = {"prompt": "prompt", "target": "target", "messages": "messages"}
    defaults = {"chat": None, "instruction": "", "max_length": 256, "truncate": False, "max_new_tokens": 64,
                "eval_generate": 100, "generate_batch": 8}

    def label_fields(self) -> tuple[str, ...]:
        return ("target",)

    @property
    def chat(self) -> bool:
        value = self.options["chat"]
        return bool(self.tokenizer.chat_template) if value is None else bool(value)

    def read(self, sources: Sequence[str], split: str, labeled: bool = True, fmt: str | None = None
             ) -> list[dict[str, Any]]:
        examples = super().read(sources, split, labeled, fmt)
        for example in examples:
            source = example["_source"]
            messages = example.get("messages")
            if messages is not None:
                if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                             for m in messages):
                    raise DataError(f"{source}: messages must be a list of {{role, content}}")
                if not any(m["role"] == "assistant" for m in messages):
                    raise DataError(f"{source}: the dialogue has no assistant turn to learn")
                if not self.tokenizer.chat_template:
                    raise DataError(f"{source}: dialogues need a tokenizer with a chat template")
            elif not isinstance(example.get("prompt"), str) or not example["prompt"].strip():
                raise DataError(f"{source}: field {self.spec.fields['prompt']!r} (or {self.spec.fields['messages']!r}) "
                                "is missing or empty")
            elif labeled and (not isinstance(example.get("target"), str) or not example["target"].strip()):
                raise DataError(f"{source}: field {self.spec.fields['target']!r} is missing or empty")
        return examples

    # ------------------------------------------------------------------ encoding
    def prompt_text(self, example: dict[str, Any]) -> str:
        """What the model is given to continue."""
        if example.get("messages") is not None:
            messages = example["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            return self.tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True)
        text = str(self.options["instruction"]) + str(example["prompt"])
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return text

    def reference(self, example: dict[str, Any]) -> str:
        if example.get("messages") is not None:
            return str([m for m in example["messages"] if m["role"] == "assistant"][-1]["content"])
        return str(example["target"])

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        if example.get("messages") is not None:
            ids, labels = self._encode_dialogue(example)
        else:
            ids = self.tokenizer.encode(self.prompt_text(example))
            labels = [IGNORE_INDEX] * len(ids)
            if labeled:
                target = self.tokenizer.encode(str(example["target"]), add_special_tokens=False)
                eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
                ids, labels = ids + target + eos, labels + target + eos
        if self.check_length(ids, example):
            limit = int(self.options["max_length"])
            ids, labels = ids[:limit], labels[:limit]
            if labeled and all(label == IGNORE_INDEX for label in labels[1:]):
                log.warning("%s: nothing of the target starts within max_length=%d; the example is left out",
                            example["_source"], limit)
                return []
        return [{"input_ids": ids, "labels": labels}]

    def _encode_dialogue(self, example: dict[str, Any]) -> tuple[list[int], list[int]]:
        messages = example["messages"]
        full = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
            through = self.tokenizer.apply_chat_template(messages[: index + 1], add_generation_prompt=False)
            if not full.startswith(before) or not full.startswith(through):
                raise DataError(f"{example['_source']}: the chat template does not render this dialogue turn by turn; "
                                "pass it as prompt/target pairs instead")
            spans.append((len(before), len(through)))
        encoded = self.tokenizer.encode_full(full)
        # a token that overlaps an assistant turn is learned (a BPE token may carry the space before it)
        labels = [token if any(start < e and end > s for s, e in spans) else IGNORE_INDEX
                  for token, (start, end) in zip(encoded.ids, encoded.offsets, strict=True)]
        return encoded.ids, labels

    # ------------------------------------------------------------------ model
    def objective(self, model: nn.Module) -> Objective:
        if not model.causal:
            raise DataError("the generate task needs a decoder (GPT-2 / Llama family) model")
        return CausalLMObjective(model)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        objective: Objective,
        examples: Sequence[dict[str, Any]],
        features: Sequence[dict[str, Any]],
        batch_size: int = 64,
        labeled: bool = True,
        autocast: torch.dtype | None = None,
        progress: bool = False,
        final: bool = False,
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        objective.eval()
        metrics: dict[str, float] = {}
        if labeled:
            pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
            loss, count, correct = 0.0, 0, 0.0
            device = module_device(objective)
            for batch in BucketedLoader(features, batch_size, pad, shuffle=False):
                prepared, counts = objective.prepare(batch, [])
                prepared = to_device(prepared, device)
                with autocast_context(autocast, device):
                    out = objective(prepared)
                loss += float(out.loss_sums["clm"])
                correct += out.stats.get("clm_correct", 0.0)
                count += counts["clm"]
            metrics = {"loss": loss / max(count, 1), "perplexity": math.exp(min(loss / max(count, 1), 50.0)),
                       "token_accuracy": correct / max(count, 1)}
        predictions: list[dict[str, Any]] = [{} for _ in examples]
        wanted = len(examples) if not labeled else (int(self.options["eval_generate"]) if final else 0)
        chosen = list(range(min(wanted, len(examples))))
        if chosen:
            texts = self.generate(objective.model, [examples[i] for i in chosen], progress)  # type: ignore[arg-type]
            for index, text in zip(chosen, texts, strict=True):
                predictions[index] = {"generated": text}
            if labeled:
                references = [self.reference(examples[i]) for i in chosen]
                metrics.update(M.generation_metrics(texts, references))
                metrics["generated"] = float(len(chosen))
        return metrics, predictions

    def generate(self, model: Decoder, examples: Sequence[dict[str, Any]], progress: bool = False) -> list[str]:
        config = GenerationConfig(max_new_tokens=int(self.options["max_new_tokens"]))
        size = int(self.options["generate_batch"])
        texts: list[str] = []
        for start in tqdm(range(0, len(examples), size), disable=not progress, desc="generate", unit="batch",
                          leave=False):
            prompts = [self.prompt_text(e) for e in examples[start : start + size]]
            texts.extend(t.strip() for t in generate(model, self.tokenizer, prompts, config))
        model.use_training_layout()  # generation re-laid the weights out for decoding; training may follow
        return texts
