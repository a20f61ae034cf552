"""Redaction of credentials from text the platform stores or answers (issue 11: tokens end with their attempt).

A sandbox holds its capability token in its environment; whatever it prints, returns, raises or
publishes may carry it, and attempts, logs and dead letters are readable by every reader of the
org. So every piece of sandbox-derived text goes through :func:`redact` (strings) or
:func:`redact_value` (JSON values, keys included) before it is stored. Two nets:

- by shape, always: anything that looks like a capability token (``trc1.<claims>.<signature>``)
  or an API token (``trc_`` + 20 or more base64url characters);
- literally, when the caller knows them: the attempt's own token, its signature part (the only
  part that is secret: the claims are what ``/v1/task/whoami`` answers anyway), and configured
  secrets (``TRACE_REDACT``, the signing key, the database and broker URLs).

Deliberately not attempted: re-encodings of a secret (base64 of the token, a token cut in two).
A token found anywhere is also worthless once its attempt ends (``task_api.authenticate``).

This module imports nothing of the platform so that any layer (tokens, lease, publish, workers)
can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
CAPABILITY_PREFIX = "trc1"  # tracecore.execution.tokens.PREFIX (tests assert they agree)
API_TOKEN_PREFIX = "trc_"  # tracecore.tenancy.orgs.TOKEN_PREFIX
# Shorter secrets are not replaced literally: "abc" would eat ordinary words.
MIN_SECRET_CHARS = 6

_SHAPES = re.compile(r"(trc1\.)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+|(trc_)[A-Za-z0-9_-]{20,}")
# A shape keeps its prefix, so that a reader sees which kind of credential was there.
_SHAPE_MARK = r"\1\2" + REDACTED


def token_secrets(token: str) -> tuple[str, ...]:
    """What to replace literally for one capability token: the token and its signature part."""
    if not token:
        return ()
    signature = token.rsplit(".", 1)[-1] if token.count(".") == 2 else ""
    return tuple(part for part in (token, signature) if len(part) >= MIN_SECRET_CHARS)


def _literal(secrets: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret (longest first), then every token-shaped string, replaced by a marker
    (``[REDACTED]``; ``trc1.[REDACTED]`` or ``trc_[REDACTED]`` for a shape)."""
    return _redact(text, _literal(secrets))


def _redact(text: str, literal: tuple[str, ...]) -> str:
    for secret in literal:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "trc" in text:  # the cheap test first: most text holds no token shape at all
        text = _SHAPES.sub(_SHAPE_MARK, text)
    return text


def redact_value(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A JSON value with :func:`redact` applied to every string in it, dict keys included.

    Tuples come back as lists (JSON has only arrays); other scalars are returned as they are.
    """
    return _walk(value, _literal(secrets))


def _walk(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return _redact(value, secrets)
    if isinstance(value, dict):
        return {(_redact(key, secrets) if isinstance(key, str) else key): _walk(item, secrets)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(item, secrets) for item in value]
    return value


def redact_optional(text: str | None, secrets: Iterable[str] = ()) -> str | None:
    """:func:`redact` that lets None through (an attempt's error fields are often empty)."""
    return None if text is None else redact(text, secrets)
