"""The exceptions lmforge raises.

Every error a user can cause derives from ``LmforgeError`` so that the CLI can print it
as one clear message instead of a traceback::

    LmforgeError
     ├── ConfigError              a config value is wrong; lists every bad field at once
     ├── UnknownArchitectureError a weights folder or file holds a model family we do not build
     ├── WeightsError             a tensor is missing, unexpected or of the wrong shape
     │    └── CorruptFileError    a weights/GGUF file cannot be read (truncated, wrong format)
     ├── TokenizerError           a tokenizer file is missing or malformed
     ├── DataError                an input file is malformed; names file and line
     └── DiskFullError            a write ran out of space; names the folder and the space needed
"""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class of every error lmforge raises on bad input."""


class ConfigError(LmforgeError, ValueError):
    """One or more configuration values are invalid.

    ``problems`` holds one line per bad field, so all of them are reported together.
    """

    def __init__(self, problems: list[str], where: str = "config") -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:  # one problem, one line
            super().__init__(f"{where}: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where} has {len(self.problems)} problem(s):\n{lines}")


class UnknownArchitectureError(LmforgeError):
    """The weights describe a model family lmforge does not implement."""


class WeightsError(LmforgeError):
    """A weight tensor is missing, unexpected, or has the wrong shape."""


class CorruptFileError(WeightsError):
    """A weights file could not be read: truncated, not the claimed format, or damaged."""


class TokenizerError(LmforgeError):
    """A tokenizer could not be loaded or built."""


class DataError(LmforgeError):
    """An input data file is malformed (the message names the file and line)."""


class DiskFullError(LmforgeError, OSError):
    """A write ran out of disk space; what was there before is kept."""
