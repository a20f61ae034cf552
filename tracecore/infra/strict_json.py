"""Strict decoding of JSON (and of decoded YAML) that comes from outside the platform.

Every body a caller sends (the API's JSON bodies, the task API over the gateway socket and
``/v1/task/``, signed webhooks, DAG files) is decoded here, so that one set of rules decides
what a value from outside may be, before any of it reaches a handler, PostgreSQL or DuckDB:

- nesting at most ``MAX_DEPTH`` levels (``too_deep``): a deep document would otherwise exhaust
  Python's recursion in the decoder, in ``json.dumps`` when it is stored, or in a validator;
- no ``NaN``, ``Infinity``, ``-Infinity``, nor a number that overflows to infinity
  (``invalid_json``): PostgreSQL's ``jsonb`` refuses them, and they are not JSON (RFC 8259);
- integers of at most ``MAX_INT_DIGITS`` digits (``number_too_large``): a uint256 has 78;
  longer ones cost quadratic time to convert and serve no purpose;
- strings without NUL or lone surrogates (``invalid_string``): PostgreSQL text cannot hold
  NUL, and a lone surrogate cannot be encoded as UTF-8 at all;
- the body is UTF-8 (``invalid_json``).

The depth is measured on the text before it is decoded (``nesting_depth``), so the decoder
never recurses deeper than allowed. Pure: no I/O, imports nothing of the platform but its errors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from tracecore.exceptions import UserError

MAX_DEPTH = 64
MAX_INT_DIGITS = 256
_MAX_INT_BITS = int(MAX_INT_DIGITS * math.log2(10))  # 10**256 has 851 bits
# The depth scan's tables: every byte but brackets and quotes; a string once escapes are gone;
# brackets as +1 / -1 (int8).
_NOT_BRACKET = bytes(c for c in range(256) if c not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_LONG_DIGITS = re.compile(rf"\d{{{MAX_INT_DIGITS + 1},}}")
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class InvalidJson(UserError):
    """The body is not strict JSON: syntax, encoding, NaN or Infinity, a non-finite number."""

    code = "invalid_json"


class TooDeep(UserError):
    """Arrays and objects nested more than ``MAX_DEPTH`` levels."""

    code = "too_deep"


class NumberTooLarge(UserError):
    """An integer with more than ``MAX_INT_DIGITS`` digits."""

    code = "number_too_large"


class InvalidString(UserError):
    """A string (or key) holding NUL or a lone UTF-16 surrogate."""

    code = "invalid_string"


def nesting_depth(data: bytes, limit: int) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``data`` (brackets inside strings do not count).

    Zero without scanning when there are fewer brackets than ``limit``. Otherwise, in C-speed
    passes: drop escaped backslashes and quotes, keep only brackets and quotes, drop strings,
    then the running sum of +1 (open) / -1 (close); an 8 MB body costs tens of milliseconds.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return 0
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_BRACKET).replace(b'""', b"")
    if b'"' in kept:
        kept = _STRING.sub(b"", kept)
    steps = pa.Array.from_buffers(pa.int8(), len(kept), [None, pa.py_buffer(kept.translate(_STEP))])
    deepest = pc.max(pc.cumulative_sum(pc.cast(steps, pa.int32()))).as_py()
    return int(deepest or 0)


def _constant(name: str) -> Any:
    raise InvalidJson(f"{name} is not a JSON number; send a finite number or null", details={"value": name})


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJson("a number is too large to represent (it would be infinite)", details={"value": text[:40]})
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise NumberTooLarge(f"an integer has more than {MAX_INT_DIGITS} digits",
                             details={"digits": len(text.lstrip("-")), "limit": MAX_INT_DIGITS})
    return int(text)


def loads(data: bytes | bytearray | str, *, max_depth: int = MAX_DEPTH, what: str = "the body",
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Decode strict JSON; raises a ``UserError`` (400) naming what is wrong, never anything else."""
    if isinstance(data, (bytes, bytearray)):
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(f"{what} is not UTF-8 (byte {exc.start})") from None
        raw_surrogates = False  # valid UTF-8 holds none
    else:
        text, raw = data, data.encode("utf-8", "surrogatepass")
        raw_surrogates = True
    deepest = nesting_depth(raw, max_depth)
    if deepest > max_depth:
        raise TooDeep(f"{what} nests arrays and objects more than {max_depth} levels deep",
                      details={"limit": max_depth})
    hooks: dict[str, Any] = {"parse_constant": _constant, "parse_float": _finite_float,
                             "object_pairs_hook": object_pairs_hook}
    if _LONG_DIGITS.search(text):  # only then can an integer be too long: the fast path keeps int()
        hooks["parse_int"] = _bounded_int
    try:
        value = json.loads(text, **hooks)
    except RecursionError:  # the scan above makes this unreachable; kept as a backstop
        raise TooDeep(f"{what} nests too deeply", details={"limit": max_depth}) from None
    except ValueError as exc:  # JSONDecodeError, or int()'s own digit limit
        raise InvalidJson(f"{what} is not valid JSON: {_short(exc)}") from None
    if raw_surrogates or "\\u" in text:  # NUL and surrogates only get into strings through escapes
        check_value(value, max_depth=max_depth, what=what)
    return value


def check_value(value: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int | None = None,
                what: str = "the body") -> None:
    """Check a decoded document (JSON, or YAML after its constructor) against the rules above,
    without recursion. ``max_nodes`` bounds the values visited (counting a shared value each time
    it is reached), which is what stops a YAML alias bomb before anything expands it."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    visited = 0
    while stack:
        item, depth = stack.pop()
        visited += 1
        if max_nodes is not None and visited > max_nodes:
            raise TooDeep(f"{what} has more than {max_nodes} values (aliases count each time they are used)",
                          code="too_large", details={"limit": max_nodes})
        if isinstance(item, str):
            _check_string(item, what)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if item.bit_length() > _MAX_INT_BITS:
                raise NumberTooLarge(f"an integer in {what} has more than {MAX_INT_DIGITS} digits",
                                     details={"limit": MAX_INT_DIGITS})
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidJson(f"{what} holds {item!r}, which is not a JSON number")
        elif isinstance(item, (dict, list, tuple)):
            if depth >= max_depth:
                raise TooDeep(f"{what} nests arrays and objects more than {max_depth} levels deep",
                              details={"limit": max_depth})
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, (str, int, float, bool)) and key is not None:
                        raise InvalidJson(f"{what} has a key of type {type(key).__name__}; keys are strings")
                    stack.append((key, depth + 1))
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        else:
            raise InvalidJson(f"{what} holds a value of type {type(item).__name__}, which JSON cannot carry")


def check_text(value: str, what: str = "a value") -> None:
    """Refuse NUL and lone surrogates in one string (a header, a path, a query parameter)."""
    _check_string(value, what)


def _check_string(value: str, what: str) -> None:
    found = _BAD_CHARACTER.search(value)
    if found is not None:
        kind = "NUL" if found.group() == "\x00" else "a lone surrogate"
        raise InvalidString(f"a string in {what} holds {kind} (U+{ord(found.group()):04X}), which is not allowed",
                            details={"position": found.start()})


def _short(exc: ValueError) -> str:
    return str(exc)[:200]


def as_bad_input(exc: BaseException) -> UserError | None:
    """The backstop behind validation: the 400 that an exception raised by bad input deserves,
    or None for anything else (a bug stays a 500).

    Input is validated at the edge first; this catches what slipped past it: recursion and
    encoding errors, numbers out of range, PostgreSQL's data exceptions (SQLSTATE class 22:
    NUL in text, a value too long or out of range, bad syntax for a type).
    """
    import psycopg
    from sqlalchemy.exc import DataError, StatementError

    if isinstance(exc, StatementError) and not isinstance(exc, DataError) and exc.orig is not None:
        return as_bad_input(exc.orig)  # a bind parameter failed to convert, or the driver refused it
    if isinstance(exc, RecursionError):
        return TooDeep("the request nests too deeply to process")
    if isinstance(exc, UnicodeError):
        return InvalidString("the request holds text that cannot be encoded as UTF-8 (a lone surrogate?)")
    if isinstance(exc, OverflowError):
        return NumberTooLarge("a number in the request is out of range")
    if isinstance(exc, (DataError, psycopg.DataError)):
        return UserError("a value in the request is malformed or out of range for its field", code="invalid_value")
    if isinstance(exc, ValueError) and ("NUL" in str(exc) or "integer string conversion" in str(exc)):
        return UserError(f"a value in the request is not acceptable: {_short(exc)}", code="invalid_value")
    return None
