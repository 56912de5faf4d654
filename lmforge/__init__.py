"""lmforge: pretrain, fine-tune, transfer, compress and serve Transformer language models."""

from lmforge.errors import (
    ConfigError,
    CorruptFileError,
    DataError,
    LmforgeError,
    TokenizerError,
    UnknownArchitectureError,
    WeightsError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CorruptFileError",
    "DataError",
    "LmforgeError",
    "TokenizerError",
    "UnknownArchitectureError",
    "WeightsError",
    "__version__",
]
