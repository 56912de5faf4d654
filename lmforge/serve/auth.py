"""API keys: read from a file, kept only as SHA-256 digests, compared in constant time.

The file holds one key per line, optionally named (``NAME KEY`` or ``NAME:KEY``); blank
lines and ``#`` comments are skipped. Clients send ``Authorization: Bearer KEY`` or
``X-Api-Key: KEY``. The key itself is never stored or logged; the name of the key that
matched is (for access logs and per-key limits).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from lmforge.errors import ConfigError


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys (digests) and their names."""

    def __init__(self, named: dict[str, str]) -> None:
        self._digests = [(name, digest(key)) for name, key in named.items()]

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"api_keys={path}: no such file"])
        named: dict[str, str] = {}
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(":", " ", 1).split() if ":" in line.split()[0] else line.split()
            name, key = (parts[0], parts[1]) if len(parts) == 2 else (f"key{number}", parts[0])
            if len(parts) > 2 or len(key) < 16:
                raise ConfigError([f"{path}:{number}: expected 'KEY' or 'NAME KEY' with a key of 16+ characters"])
            named[name] = key
        if not named:
            raise ConfigError([f"{path}: holds no key"])
        return cls(named)

    def check(self, presented: str | None) -> str | None:
        """The name of the matching key, or None; every digest is compared (no early exit)."""
        if not presented:
            return None
        wanted = digest(presented)
        found = None
        for name, known in self._digests:
            if hmac.compare_digest(known, wanted) and found is None:
                found = name
        return found


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
