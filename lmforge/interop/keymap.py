"""Module-path maps between another format's tensor names and lmforge's, both directions.

    layers = KeyMap({"h.{}.ln_1": "layers.{}.input_layernorm"})
    layers.rename("h.3.ln_1.weight")            # "layers.3.input_layernorm.weight"
    layers.inverse().rename("layers.3.input_layernorm.bias")  # "h.3.ln_1.bias"

``{}`` stands for a layer index; the parameter leaf (``weight``/``bias``, and the old
``gamma``/``beta`` names of LayerNorm) carries over. Hugging Face folders, GGUF files and
the peft adapter format all rename through this one class.
"""

from __future__ import annotations

import re

LEAF_ALIASES = {"gamma": "weight", "beta": "bias"}


class KeyMap:
    """A table of module paths (theirs -> ours) that renames tensor keys."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = dict(table)
        self._rules = [(re.compile("^" + re.escape(source).replace(r"\{\}", r"(\d+)") + r"\.(weight|bias|gamma|beta)$"),
                        target) for source, target in self.table.items()]

    def rename(self, key: str) -> str | None:
        """Our key for ``key`` (None when no entry matches)."""
        for pattern, target in self._rules:
            match = pattern.match(key)
            if match:
                *layer, leaf = match.groups()
                return f"{target.format(*layer)}.{LEAF_ALIASES.get(leaf, leaf)}"
        return None

    def inverse(self) -> KeyMap:
        """The same table read the other way (ours -> theirs)."""
        return KeyMap({ours: theirs for theirs, ours in self.table.items()})

    def module(self, name: str) -> str | None:
        """The renamed module path of a module (not a tensor) name."""
        renamed = self.rename(f"{name}.weight")
        return None if renamed is None else renamed[: -len(".weight")]
