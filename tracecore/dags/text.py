"""The text level of a DAG file: decoding the body (YAML or JSON) and the scalar notations
its fields use (durations, memory sizes).

Split from ``dag_spec`` (which validates the structure) so each stays small; both are pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import yaml

from tracecore.exceptions import UserError, ValidationError
from tracecore.infra import strict_json

_YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_RANK = {unit: rank for rank, unit in enumerate(_UNIT_SECONDS)}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?)?", re.IGNORECASE)
_MEMORY_MB = {None: Fraction(1), "k": Fraction(1, 1024), "m": Fraction(1), "g": Fraction(1024),
              "t": Fraction(1024 * 1024)}


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1d"`` or a bare number.

    Units must go from largest to smallest, each at most once, so ``"30s1h"`` and
    ``"1m1m"`` are rejected as the typos they most likely are. Raises ValueError.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a duration, got {type_name(text)}")
    try:
        if not isinstance(text, str):
            seconds = float(text)
        elif _NUMBER.fullmatch(s := text.strip()):
            seconds = float(s)
        else:
            seconds, pos, last = 0.0, 0, -1
            while pos < len(s):
                m = _DURATION_PART.match(s, pos)
                if m is None or _UNIT_RANK[m.group(2)] <= last:
                    raise ValueError(f"invalid duration {text!r} (examples: 500ms, 30s, 5m, 1h30m, 1d)")
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
                pos, last = m.end(), _UNIT_RANK[m.group(2)]
            if pos == 0:
                raise ValueError(f"invalid duration {text!r} (examples: 500ms, 30s, 5m, 1h30m, 1d)")
    except OverflowError:
        raise ValueError(f"duration {text!r} is too large") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {text!r} must be a finite number of seconds > 0")
    return seconds


def parse_memory_mb(value: str | int) -> int:
    """Whole megabytes (binary, as Docker counts) from ``512``, ``"512MB"``, ``"1GB"``, ``"256m"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        mb = Fraction(value)
    elif isinstance(value, str) and (m := _MEMORY.fullmatch(value.strip())):
        unit = m.group(2).lower() if m.group(2) else None
        mb = Fraction(m.group(1)) * _MEMORY_MB[unit]
    else:
        raise ValueError(f"invalid memory size {value!r} (examples: 512, '512MB', '1GB', '256m')")
    if mb.denominator != 1 or mb < 1:
        raise ValueError(f"memory {value!r} must be a whole number of megabytes >= 1")
    return int(mb)


# A DAG file is small: these bound what a hostile one costs (an alias bomb, deep nesting).
MAX_YAML_NODES = 100_000


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a silently dropped value hides a mistake),
    keeps dates as strings (a date could not be stored in the JSON config) and refuses nesting
    deeper than ``strict_json.MAX_DEPTH`` while composing (the composer recurses per level)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > strict_json.MAX_DEPTH + 1:
                raise strict_json.TooDeep(f"the DAG nests more than {strict_json.MAX_DEPTH} levels deep",
                                          details={"limit": strict_json.MAX_DEPTH})
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value != "<<"]
        if len(keys) != len(set(keys)):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {dup!r}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return dict(pairs)


def load_body(body: bytes | str, content_type: str | None) -> Any:
    """Decode raw text as JSON or YAML; YAML is the default as it is a superset of JSON."""
    media = (content_type or "").split(";")[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    if media and not is_json and media not in _YAML_TYPES and not media.endswith("+yaml"):
        raise invalid_body(f"unsupported content type {content_type!r}")
    try:
        text = body.decode("utf-8-sig") if isinstance(body, bytes) else body
        if is_json:
            return strict_json.loads(text, object_pairs_hook=_no_duplicates, what="the DAG")
        value = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: safe
        # What JSON (and PostgreSQL's jsonb) can hold: no NaN, NUL, surrogates, huge integers, binary.
        strict_json.check_value(value, max_nodes=MAX_YAML_NODES, what="the DAG")
        return value
    except UserError as exc:
        # Unparsable JSON stays ``invalid_body``; depth, size, numbers and strings keep their own codes.
        raise invalid_body(exc.message, "invalid_body" if exc.code == "invalid_json" else exc.code) from None
    except (UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as exc:
        raise invalid_body(f"cannot parse the DAG: {exc}") from None


def invalid_body(message: str, code: str = "invalid_body") -> ValidationError:
    """The body as a whole is unusable; listed in ``details["errors"]`` like any other problem."""
    return ValidationError(message, path="", code=code,
                           details={"errors": [{"code": code, "path": "", "message": message}]})


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (Mapping, "mapping"), ((list, tuple), "list")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
