"""Run configuration: YAML files plus dotted command-line overrides, checked all at once.

A run config is a set of named sections, each a dataclass (its fields are the schema):

    model:     {preset: bert-mini, vocab_size: 21128}
    train:     {steps: 2000, lr: 5.0e-4}

``load_run_config(SECTIONS, "recipe.yaml", ["--train.lr", "3e-4"])`` merges the file and
the overrides, then checks everything before building anything: unknown sections or
keys (with the allowed ones), values of the wrong type, and each section's own checks
(e.g. hidden size not divisible by heads). Every problem goes into one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lmforge.errors import ConfigError


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the type ``hint`` (None when it fits)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (Union, types.UnionType):
        reasons = [_type_problem(value, arg) for arg in args]
        return None if any(r is None for r in reasons) else " or ".join(r for r in reasons if r)
    if hint is type(None):
        return None if value is None else "null"
    if origin is Literal:
        return None if value in args else f"one of {', '.join(repr(a) for a in args)}"
    if origin in (list, tuple):
        if not isinstance(value, list):
            return "a list"
        inner = args[0] if args else Any
        bad = [v for v in value if _type_problem(v, inner)]
        return f"a list of {getattr(inner, '__name__', inner)}" if bad else None
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a mapping"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def _is_list(hint: Any) -> bool:
    return list in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint)))


def _comma_list(value: Any) -> Any:
    """``"tensorboard,wandb"`` for a list field means ``["tensorboard", "wandb"]``."""
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def parse_overrides(arguments: list[str]) -> dict[str, dict[str, Any]]:
    """``--section.key value`` pairs (values read as YAML scalars: 3e-4, true, [a, b])."""
    overrides: dict[str, dict[str, Any]] = {}
    problems = []
    index = 0
    while index < len(arguments):
        flag = arguments[index]
        if "=" in flag and flag.startswith("--"):
            flag, raw = flag.split("=", 1)
            index += 1
        elif index + 1 < len(arguments):
            raw = arguments[index + 1]
            index += 2
        else:
            problems.append(f"{flag}: missing value")
            break
        if not flag.startswith("--") or "." not in flag:
            problems.append(f"{flag}: expected --section.key VALUE")
            continue
        section, key = flag[2:].split(".", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "Translate into Chinese: " is text, not a mapping
        if isinstance(value, float) or raw.strip().lower() in ("nan", "inf"):
            value = float(raw)
        elif isinstance(value, str) and _looks_numeric(raw):
            value = float(raw)
        overrides.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError(problems, where="command line")
    return overrides


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def load_run_config(
    sections: dict[str, type],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    checks: Callable[[dict[str, Any]], list[str]] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Section name -> dataclass instance, from a YAML file and ``--section.key`` overrides.

    ``checks`` looks across sections (e.g. model size against sequence length) and adds its
    problems to the same error. ``defaults`` (section -> values) sit beneath the file: a
    recipe's own defaults where they differ from the dataclass ones."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError([f"{path}: no such config file"])
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError([f"{path}: not valid YAML ({error})"]) from error
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    for section, values in (defaults or {}).items():
        if isinstance(data.get(section, {}), dict):
            data[section] = {**values, **(data.get(section) or {})}
    for section, values in parse_overrides(overrides or []).items():
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section].update(values)
    for unknown in sorted(set(data) - set(sections)):
        problems.append(f"unknown section {unknown!r} (allowed: {', '.join(sections)})")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: must be a mapping, found {values!r}")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {k: _comma_list(v) if k in hints and _is_list(hints[k]) else v for k, v in values.items()}
        section_problems = [f"{name}.{key}: unknown key (allowed: {', '.join(fields)})"
                            for key in values if key not in fields]
        for key, value in values.items():
            if key in fields:
                reason = _type_problem(value, hints[key])
                if reason:
                    section_problems.append(f"{name}.{key}={value!r}: must be {reason}")
        missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in values]  # type: ignore[misc]
        section_problems += [f"{name}.{key}: required" for key in missing]
        # build from the keys that passed, so the section's own checks still report
        usable = {k: float(v) if hints[k] is float and isinstance(v, int) else v for k, v in values.items()
                  if k in fields and not _type_problem(v, hints[k])}
        required_bad = [f.name for f in fields.values() if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING and f.name not in usable]  # type: ignore[misc]
        if not required_bad:
            try:
                built[name] = cls(**usable)
            except ConfigError as error:
                section_problems += [f"{name}: {p}" for p in error.problems]
        problems += section_problems
    if checks is not None:
        problems += checks(built)  # sees the sections that could be built
    if problems:
        raise ConfigError(problems, where=f"run config{f' {path}' if path else ''}")
    return built


def to_yaml(config: dict[str, Any]) -> str:
    """The resolved config, as YAML (saved next to each run)."""
    return yaml.safe_dump({name: dataclasses.asdict(value) for name, value in config.items()}, sort_keys=False,
                          allow_unicode=True)
