"""One mechanism for every `lmforge` command: a command is a typed function, and its
signature is its command line.

    --name VALUE / --name=VALUE     a parameter (``--max-new-tokens`` and ``--max_new_tokens`` alike;
                                    a one-letter parameter also as ``-n``)
    --flag                          a bool parameter set (``--flag false`` unsets it)
    --items a b c                   a list parameter (repeating ``--items a --items b`` adds; a JSON list works)
    VALUE                           the command's positional parameters, in order (``@command(positional=...)``)
    --section.key VALUE             collected, with every flag the signature does not name, into
                                    the parameter ``overrides`` of a command that has one (the
                                    recipes: their config loaders check and apply them)

``--help`` prints the usage, the docstring and every option with its type and default; a
mistake (an unknown option, a missing or badly typed value) is a UsageError, which the
caller prints as one line.

    COMMANDS = {"evaluate": evaluate, "app": {"support": {"ask": support_ask}}}
    run(COMMANDS, ["app", "support", "ask", "--kb", "kb", "Is it covered?"])
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from lmforge.errors import LmforgeError

OVERRIDES = "overrides"  # the parameter that takes the flags a recipe's config loader reads
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class UsageError(LmforgeError):
    """A command line the command cannot take (printed as one line, exit status 2)."""


def command(*, positional: tuple[str, ...] = (), sections: str | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Marks how a command reads bare words (``positional``: parameter names, in order; the
    last may be a list) and, for a recipe, the module whose ``SECTIONS`` its help lists."""

    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        function.__lmforge_positional__ = positional  # type: ignore[attr-defined]
        function.__lmforge_sections__ = sections  # type: ignore[attr-defined]
        return function

    return mark


def run(commands: dict[str, Any], argv: list[str]) -> Any:
    """Find the command ``argv`` names, read its arguments, call it (help: print, return None)."""
    node: Any = commands
    words: list[str] = []
    while isinstance(node, dict) and argv[len(words):len(words) + 1] and argv[len(words)] in node:
        node = node[argv[len(words)]]
        words.append(argv[len(words)])
    rest = argv[len(words):]
    if isinstance(node, dict):
        if not rest or rest[0] in ("-h", "--help"):
            print(listing(node, words))
            return None
        known = ", ".join(node)
        raise UsageError(f"unknown command {' '.join(['lmforge', *words, rest[0]])!r} (known: {known})")
    if "-h" in rest or "--help" in rest:
        print(usage(node, words))
        return None
    return node(**parse(node, words, rest))


# ---------------------------------------------------------------------- reading the arguments
def parse(function: Callable[..., Any], words: list[str], argv: list[str]) -> dict[str, Any]:
    """The keyword arguments ``argv`` gives ``function`` (values converted to its types)."""
    name = " ".join(["lmforge", *words])
    parameters = inspect.signature(function).parameters
    hints = typing.get_type_hints(function)
    options = {p for p in parameters if p != OVERRIDES}
    positional = list(getattr(function, "__lmforge_positional__", ()))
    raw: dict[str, list[str]] = {}
    overrides: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not _is_flag(token):
            if not positional:
                raise UsageError(f"{name}: unexpected argument {token!r} (options start with --; see {name} --help)")
            target = positional[0]
            raw.setdefault(target, []).append(token)
            if not _is_list(hints.get(target)):
                positional.pop(0)
            continue
        flag, _, inline = token.partition("=")
        key = _parameter(flag, options)
        if key is None:
            if OVERRIDES not in parameters:
                raise UsageError(f"{name}: unknown option {flag}{_suggestion(flag, options)} (see {name} --help)")
            overrides.append(token)
            if not inline and index < len(argv) and not _is_flag(argv[index]):
                overrides.append(argv[index])
                index += 1
            continue
        if key in positional:
            positional.remove(key)
        hint = hints.get(key)
        if inline:
            values = [inline]
        elif _is_bool(hint):
            if index < len(argv) and argv[index].lower() in TRUE + FALSE:
                values = [argv[index]]
                index += 1
            else:
                values = ["true"]  # a bare flag
        elif _is_list(hint):
            values = []
            while index < len(argv) and not _is_flag(argv[index]):
                values.append(argv[index])
                index += 1
        else:
            if index >= len(argv) or _is_flag(argv[index]):
                raise UsageError(f"{name}: {flag} needs a value (see {name} --help)")
            values = [argv[index]]
            index += 1
        if not values:
            raise UsageError(f"{name}: {flag} needs at least one value")
        raw.setdefault(key, []).extend(values)
    kwargs = {key: _convert(values, hints.get(key), f"--{key.replace('_', '-')}", name) for key, values in raw.items()}
    if OVERRIDES in parameters:
        kwargs[OVERRIDES] = overrides
    missing = [p for p, spec in parameters.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        listed = ", ".join(f"--{p.replace('_', '-')}" for p in missing)
        raise UsageError(f"{name} needs {listed} (see {name} --help)")
    return kwargs


def _is_flag(token: str) -> bool:
    return token.startswith("--") and len(token) > 2 or bool(re.fullmatch(r"-[A-Za-z]", token))


def _parameter(flag: str, options: set[str]) -> str | None:
    """The parameter ``--max-new-tokens`` / ``--max_new_tokens`` / ``-n`` names, if any."""
    key = flag.lstrip("-").replace("-", "_")
    if flag.startswith("--") or len(key) == 1:
        return key if key in options else None
    return None


def _suggestion(flag: str, options: set[str]) -> str:
    close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), sorted(options), n=1)
    return f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""


def _arguments(hint: Any) -> tuple[Any, ...]:
    """The non-None members of an optional or union hint (the hint itself otherwise)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _is_bool(hint: Any) -> bool:
    return bool in _arguments(hint)


def _is_list(hint: Any) -> bool:
    return any(typing.get_origin(a) is list or a is list for a in _arguments(hint))


def _convert(values: list[str], hint: Any, flag: str, name: str) -> Any:
    if _is_list(hint):
        inner = next((typing.get_args(a)[0] for a in _arguments(hint) if typing.get_args(a)), str)
        items: list[str] = []
        for value in values:
            if value.startswith("["):
                try:
                    items += [v if isinstance(v, str) else json.dumps(v) for v in json.loads(value)]
                except json.JSONDecodeError:
                    raise UsageError(f"{name}: {flag} {value}: not a JSON list") from None
            else:
                items.append(value)
        return [_one(item, inner, flag, name) for item in items]
    if len(values) > 1:
        raise UsageError(f"{name}: {flag} was given more than once ({', '.join(values)})")
    return _one(values[0], hint, flag, name)


def _one(value: str, hint: Any, flag: str, name: str) -> Any:
    """``value`` as ``hint`` says (int, float, bool, a Literal's choices, a JSON mapping, str)."""
    members = _arguments(hint)
    if len(members) < len(typing.get_args(hint)) and value.lower() in ("null", "none"):
        return None
    problems = []
    for member in members:
        try:
            return _as(value, member)
        except ValueError as error:
            problems.append(str(error))
    raise UsageError(f"{name}: {flag} {value!r}: expected {' or '.join(problems)}")


def _as(value: str, hint: Any) -> Any:
    if hint in (Any, str, None) or hint is inspect.Parameter.empty:
        return value
    if typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if str(choice) == value:
                return choice
        raise ValueError("one of " + ", ".join(str(c) for c in typing.get_args(hint)))
    if hint is bool:
        if value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        raise ValueError("true or false")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError("an integer") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError("a number") from None
    if hint is dict or typing.get_origin(hint) is dict:
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError:
            mapping = None
        if not isinstance(mapping, dict):
            raise ValueError("a JSON object")
        return mapping
    return value


# ---------------------------------------------------------------------- help
def usage(function: Callable[..., Any], words: list[str]) -> str:
    """``lmforge WORDS --help``: the usage line, the description and every option."""
    name = " ".join(["lmforge", *words])
    parameters = inspect.signature(function).parameters
    hints = typing.get_type_hints(function)
    description, documented = _docstring(function)
    positional = getattr(function, "__lmforge_positional__", ())
    shown = [p.upper() + (" ..." if _is_list(hints.get(p)) else "") for p in positional]
    required = [f"--{p.replace('_', '-')} {p.upper()}" for p, spec in parameters.items()
                if spec.default is inspect.Parameter.empty and p not in positional and p != OVERRIDES]
    lines = [f"usage: {' '.join([name, *shown, *required, '[options]'])}"
             + (" [--section.key VALUE ...]" if OVERRIDES in parameters else ""), "", description, "", "options:"]
    for key, spec in parameters.items():
        if key == OVERRIDES:
            continue
        flag = f"--{key.replace('_', '-')}" + ("" if _is_bool(hints.get(key)) else f" {_type_name(hints.get(key))}")
        default = "required" if spec.default is inspect.Parameter.empty else f"default: {spec.default!r}"
        lines.append(f"  {flag}  ({default})")
        if documented.get(key):
            lines.append(f"      {documented[key]}")
    sections = getattr(function, "__lmforge_sections__", None)
    if sections:
        lines += ["", "config sections (YAML, or --section.key VALUE; flat flags set the first section):",
                  *_sections(sections)]
    return "\n".join(lines)


def listing(node: dict[str, Any], words: list[str]) -> str:
    """``lmforge --help`` (or a command group's): every command with its first docstring line."""
    lines = [f"usage: {' '.join(['lmforge', *words])} COMMAND [options]   (COMMAND --help for its options)", "",
             "commands:"]

    def walk(branch: dict[str, Any], prefix: list[str]) -> None:
        for word, item in branch.items():
            if isinstance(item, dict):
                walk(item, [*prefix, word])
            else:
                first = (_docstring(item)[0].splitlines() or [""])[0]
                lines.append(f"  {' '.join([*prefix, word]):26} {first}")

    walk(node, [])
    return "\n".join(lines)


def _docstring(function: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(the description, each parameter's text from the Google-style ``Args:`` block)."""
    text = inspect.getdoc(function) or ""
    description, _, block = text.partition("\nArgs:\n")
    documented: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"\s{4}(\w+):\s*(.*)", line)
        if match:
            current = match.group(1)
            documented[current] = match.group(2).strip()
        elif current and line.strip():
            documented[current] += " " + line.strip()
    return description.strip(), documented


def _type_name(hint: Any) -> str:
    names = []
    for member in _arguments(hint):
        if typing.get_origin(member) is Literal:
            names.append("{" + ",".join(str(c) for c in typing.get_args(member)) + "}")
        elif typing.get_origin(member) is list:
            names.append(_type_name(typing.get_args(member)[0]) + " ...")
        else:
            names.append({int: "INT", float: "FLOAT", str: "TEXT", dict: "JSON"}.get(member, "JSON"
                         if typing.get_origin(member) is dict else "VALUE"))
    return "|".join(names)


def _sections(module: str) -> list[str]:
    import dataclasses
    import importlib

    recipe = importlib.import_module(module)
    out = []
    for section_name, section in recipe.SECTIONS.items():
        overridden = getattr(recipe, "DEFAULTS", {}).get(section_name, {})  # the recipe's own defaults
        fields = ", ".join(f"{f.name}={overridden.get(f.name, f.default)!r}" if f.default is not dataclasses.MISSING
                           else f.name for f in dataclasses.fields(section))
        out.append(f"  {section_name}: {fields}")
    return out
