"""Strict YAML reading with file:line errors.

Owns: turning a YAML document into validated Python values while keeping the
position of every node, so that a mistake in a config or policy file is
reported as ``file:line: message``. Unknown keys are errors, never ignored.

Must not: know anything about pgvouch's settings or policies; callers
describe what they expect with the small helpers below.
"""

from __future__ import annotations

import builtins
import fnmatch
import math
import re
from collections.abc import Iterator
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration or policy file is invalid; the message says where."""


class Node:
    """A YAML node plus the file it came from."""

    __slots__ = ("file", "node")

    def __init__(self, node: yaml.Node, file: str) -> None:
        self.node = node
        self.file = file

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where()}: {message}")

    # -- scalars -----------------------------------------------------------
    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:null"

    def _scalar(self, what: builtins.str) -> builtins.str:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected {what}")
        return builtins.str(self.node.value)

    def str(self, *, allow_empty: builtins.bool = False) -> builtins.str:
        value = self._scalar("a string")
        if self.node.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int"):
            raise self.error(f"expected a string, got {value!r}")
        if not allow_empty and not value.strip():
            raise self.error("must not be empty")
        return value

    def int(
        self, *, minimum: builtins.int | None = None, maximum: builtins.int | None = None
    ) -> builtins.int:
        value = self._scalar("an integer")
        if self.node.tag != "tag:yaml.org,2002:int":
            raise self.error(f"expected an integer, got {value!r}")
        try:
            number = int(value.replace("_", ""), 0)
        except ValueError:
            raise self.error(f"expected a plain integer, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise self.error(f"must be at least {minimum}")
        if maximum is not None and number > maximum:
            raise self.error(f"must be at most {maximum}")
        return number

    def bool(self) -> builtins.bool:
        value = self._scalar("true or false")
        if self.node.tag != "tag:yaml.org,2002:bool":
            raise self.error(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "yes", "on")

    def choice(self, options: tuple[builtins.str, ...]) -> builtins.str:
        value = self.str()
        if value not in options:
            raise self.error(f"must be one of {', '.join(options)} (got {value!r})")
        return value

    def duration(self) -> float:
        """Seconds from ``30s``, ``10m``, ``8h``, ``2d``, ``1h30m`` or a bare number."""
        value = self._scalar("a duration such as 30s, 10m or 8h")
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    # -- collections ---------------------------------------------------------
    def items(self) -> list[Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error("expected a list")
        return [Node(child, self.file) for child in self.node.value]

    def str_list(self, *, allow_scalar: builtins.bool = False) -> list[builtins.str]:
        if allow_scalar and isinstance(self.node, yaml.ScalarNode):
            return [self.str()]
        return [item.str() for item in self.items()]

    def mapping(self, allowed: tuple[builtins.str, ...], required: tuple[builtins.str, ...] = ()) -> Mapping:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error("expected a mapping (key: value)")
        entries: dict[str, Node] = {}
        for key_node, value_node in self.node.value:
            key = Node(key_node, self.file)
            name = key.str()
            if name not in allowed:
                hint = ", ".join(allowed)
                raise key.error(f"unknown key {name!r} (expected one of: {hint})")
            if name in entries:
                raise key.error(f"duplicate key {name!r}")
            entries[name] = Node(value_node, self.file)
        for name in required:
            if name not in entries:
                raise self.error(f"missing required key {name!r}")
        return Mapping(self, entries)


class Mapping:
    """The checked keys of a YAML mapping."""

    __slots__ = ("entries", "node")

    def __init__(self, node: Node, entries: dict[str, Node]) -> None:
        self.node = node
        self.entries = entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries and not self.entries[key].is_null()

    def __getitem__(self, key: str) -> Node:
        return self.entries[key]

    def get(self, key: str) -> Node | None:
        entry = self.entries.get(key)
        if entry is None or entry.is_null():
            return None
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def error(self, message: str) -> ConfigError:
        return self.node.error(message)


def load_file(path: str | Path) -> Node:
    """Parse one YAML file into a root :class:`Node` (syntax errors carry file:line)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return load_text(text, name)


def load_text(text: str, name: str) -> Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"{name}:{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    if root is None:
        raise ConfigError(f"{name}:1: the file is empty")
    return Node(root, name)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds from ``30s``, ``10m``, ``8h``, ``2d``, ``1h30m``, ``250ms`` or a number."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"invalid duration {text!r}: must be a finite, non-negative number")
        return seconds
    pos = 0
    total = 0.0
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    while pos < len(value):
        match = _DURATION.match(value, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (use forms like 30s, 10m, 8h, 1h30m)")
        total += float(match.group(1)) * scale[match.group(2)]
        pos = match.end()
    if not value:
        raise ValueError("empty duration")
    return total


def check_glob(node: Node) -> str:
    """A glob pattern (fnmatch syntax) that compiles; unbalanced brackets are errors."""
    pattern = node.str()
    if pattern.count("[") != pattern.count("]"):
        raise node.error(f"invalid glob {pattern!r}: unbalanced brackets")
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as exc:
        raise node.error(f"invalid glob {pattern!r}: {exc}") from None
    return pattern
