"""Read a YAML config into plain data that remembers where every key came from.

A `ConfigDocument` holds the parsed mapping plus the line of each key, so that
every later validation error can say `file:line: dotted.key: problem`.
`${VAR}` and `${VAR:-default}` are replaced from the environment here, and
`--set dotted.key=value` overrides are applied on top.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

MAPPING_SOURCE = "<dict>"  # the `path` of a config given as a mapping

Loc = tuple[str | int, ...]

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class ConfigDocument:
    """Parsed config data with the source location of each key."""

    path: Path
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)
    overrides: dict[Loc, str] = field(default_factory=dict)
    text: str = ""

    def where(self, loc: Loc) -> str:
        """`file:line` (or `--set key`) of the deepest known key along `loc`."""
        for depth in range(len(loc), -1, -1):
            prefix = tuple(loc[:depth])
            if prefix in self.overrides:
                return self.overrides[prefix]
            if prefix in self.lines:
                return f"{self.path}:{self.lines[prefix]}"
        return str(self.path)

    def source_line(self, loc: Loc) -> str:
        """The YAML line that defines `loc`, stripped, or '' if unknown."""
        for depth in range(len(loc), 0, -1):
            prefix = tuple(loc[:depth])
            if prefix in self.overrides:
                return ""
            if prefix in self.lines:
                lines = self.text.splitlines()
                number = self.lines[prefix]
                return lines[number - 1].strip() if number <= len(lines) else ""
        return ""

    def problem(self, loc: Loc, message: str) -> str:
        """One formatted problem: location, dotted key, message, offending line."""
        key = dotted(loc)
        head = f"{self.where(loc)}: {key}: {message}" if key else f"{self.where(loc)}: {message}"
        line = self.source_line(loc)
        return f"{head}\n    {line}" if line else head


def dotted(loc: Iterable[str | int]) -> str:
    """('stages', 'thumb', 'size', 0) -> 'stages.thumb.size[0]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load_document(path: str | Path, overrides: Iterable[str] = ()) -> ConfigDocument:
    """Parse `path`, interpolate the environment, apply `--set` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    return _prepared(parse_yaml(text, path), overrides)


def mapping_document(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> ConfigDocument:
    """A config given as a mapping (the Python API), interpolated and overridden like a
    file; it has no lines, so its problems say `<dict>: key`. `data` is not changed."""
    doc = ConfigDocument(path=Path(MAPPING_SOURCE), data=copy.deepcopy(dict(data)))
    return _prepared(doc, overrides)


def _prepared(doc: ConfigDocument, overrides: Iterable[str]) -> ConfigDocument:
    problems = _interpolate(doc, doc.data, ())
    for assignment in overrides:
        problems += _apply_override(doc, assignment)
    if problems:
        raise ConfigError(problems)
    return doc


def parse_yaml(text: str, path: Path) -> ConfigDocument:
    """Build a ConfigDocument from YAML text, rejecting duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: the config is empty; see configs/thumbnails.yaml")
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {exc.problem}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys (name, stages, ...)")
    doc = ConfigDocument(path=path, data=data, text=text)
    problems = _record_lines(doc, node, ())
    if problems:
        raise ConfigError(problems)
    return doc


def _record_lines(doc: ConfigDocument, node: yaml.Node, loc: Loc) -> list[str]:
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*loc, key)
            if key in seen:
                problems.append(
                    f"{doc.path}:{key_node.start_mark.line + 1}: {dotted(child)}: "
                    "duplicate key; keep only one"
                )
            seen.add(key)
            doc.lines[child] = key_node.start_mark.line + 1
            problems += _record_lines(doc, value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            doc.lines[(*loc, index)] = item.start_mark.line + 1
            problems += _record_lines(doc, item, (*loc, index))
    return problems


def _interpolate(doc: ConfigDocument, value: Any, loc: Loc) -> list[str]:
    """Replace ${VAR} and ${VAR:-default} in every string, in place."""
    problems: list[str] = []
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return problems
    for key, child in list(items):
        if isinstance(child, str):
            try:
                value[key] = interpolate_env(child, os.environ)
            except KeyError as missing:
                name = missing.args[0]
                problems.append(
                    doc.problem(
                        (*loc, key),
                        f"environment variable {name} is not set; export it, "
                        f"or give a default as ${{{name}:-value}}",
                    )
                )
        else:
            problems += _interpolate(doc, child, (*loc, key))
    return problems


def interpolate_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand ${VAR} and ${VAR:-default}; '$$' is a literal '$'. KeyError if unset."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in environ and (environ[name] or default is None):
            return environ[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _ENV_REF.sub(replace, text)


def _apply_override(doc: ConfigDocument, assignment: str) -> list[str]:
    """Apply one `dotted.key=value` (value parsed as YAML) to the document."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        return [f"--set {assignment}: expected dotted.key=value, e.g. stages.thumb.size=[128,128]"]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        return [f"--set {assignment}: the value is not valid YAML: {exc}"]
    parts = key.strip().split(".")
    target = doc.data
    for depth, part in enumerate(parts[:-1]):
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            return [f"--set {assignment}: {prefix} is not a mapping, cannot set a key inside it"]
        target = child
    target[parts[-1]] = value
    doc.overrides[tuple(parts)] = f"--set {key.strip()}"
    return []
