"""What `lmforge serve` serves, as one picklable value, and the app built from it.

``AppSpec`` holds the command's choices (models, adapters, applications, keys, limits). The
same spec builds the app in this process for uvicorn, or on each Ray Serve replica
(``lmforge.serve.ray_serve``), so a replica serves exactly what a single process would.
Paths are made absolute when the spec is made: a replica may start in another directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.serve.app import ServeSettings, create_app
from lmforge.serve.auth import ApiKeys

APPLICATIONS = ("support", "recommend", "monitor")


def _absolute(spec: str) -> str:
    """``PATH`` or ``NAME=PATH`` with PATH made absolute where it exists here."""
    name, sep, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    if Path(path).exists():
        path = str(Path(path).resolve())
    return f"{name}{sep}{path}"


def name_value_pairs(items: list[str]) -> list[str]:
    """``NAME=VALUE`` items, also accepting ``NAME VALUE`` given as two list items."""
    out: list[str] = []
    index = 0
    while index < len(items):
        if "=" in items[index] or index + 1 >= len(items):
            out.append(items[index])
            index += 1
        else:
            out.append(f"{items[index]}={items[index + 1]}")
            index += 2
    return out


@dataclass
class AppSpec:
    models: list[str] = field(default_factory=list)  # PATH or NAME=PATH
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> folder
    apps: list[str] = field(default_factory=list)  # support=KB, recommend=DIR, monitor=DB
    generator: str | None = None  # the support app's answer writer
    keys: ApiKeys | None = None
    settings: ServeSettings = field(default_factory=ServeSettings)

    @classmethod
    def from_command(cls, models: list[str] | None, adapters: list[str] | None, apps: list[str] | None,
                     generator: str | None, keys: ApiKeys | None, settings: ServeSettings) -> AppSpec:
        """Check the command's values (clear errors before anything loads) and fix the paths."""
        named: dict[str, str] = {}
        for item in adapters or []:
            if "=" not in item:
                raise LmforgeError(f"--adapters {item}: expected NAME=DIR")
            name, folder = item.split("=", 1)
            named[name] = _absolute(folder)
        pairs = []
        for item in name_value_pairs(apps or []):
            name, _, folder = item.partition("=")
            if name not in APPLICATIONS or not folder:
                raise LmforgeError(f"--app {item}: expected support=KB_FOLDER, recommend=REC_FOLDER or monitor=DB")
            pairs.append(f"{name}={_absolute(folder)}")
        if not models and not pairs:
            raise LmforgeError("nothing to serve: give model folders and/or --app support KB")
        return cls([_absolute(m) for m in models or []], named, pairs, _absolute(generator) if generator else None,
                   keys, settings)

    def extensions(self) -> list[Any]:
        out: list[Any] = []
        for item in self.apps:
            name, _, folder = item.partition("=")
            if name == "monitor":
                from lmforge.apps.monitor_http import MonitorApp

                out.append(MonitorApp(folder))
            elif name == "support":
                from lmforge.apps.support_http import SupportApp

                out.append(SupportApp(folder, self.generator))
            else:
                from lmforge.apps.recommend_http import RecommendApp

                out.append(RecommendApp(folder))
        return out

    def build(self) -> Any:
        """The FastAPI app (models load in its lifespan start-up)."""
        return create_app(list(self.models), self.keys, self.settings, self.adapters, self.extensions())
