"""Capability tokens: the only credential a sandbox ever holds (DESIGN.md, execution step 3).

A worker that wins a lease mints one token for that attempt. The token names exactly what
the attempt may touch (its task, the fence it was leased with, the pinned input dataset
versions, its output and scratch prefixes) and when it stops being valid. The task API
(``tracecore.taskapi.calls``) trusts nothing else a sandbox says.

Format: ``trc1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, "trc1.<claims part>"))>``,
unpadded base64url. It is a deliberately small cousin of a JWT: one algorithm, fixed by the
``trc1`` prefix, so there is no ``alg`` header to confuse and no library to misconfigure.
Verification checks the signature (in constant time) before it parses any JSON, then the expiry.

The key is ``TRACE_SECRET_KEY`` when set; otherwise a random key is created once under
``TRACE_HOME/secret-key`` so that every process sharing the home (API, workers, beat) verifies
what any of them minted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tracecore.dags.spec import Limits
from tracecore.exceptions import Unauthenticated
from tracecore.execution import redaction
from tracecore.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "trc1"
# Far above any real token (claims are a few hundred bytes plus the pinned inputs); bounds the
# work an attacker can make the verifier do.
MAX_TOKEN_CHARS = 64 * 1024
SECRET_FILE = "secret-key"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Capability:
    """What one attempt of one task may do; the claims of a capability token.

    Ids are strings because the claims are JSON; ``issued_at`` and ``expires_at`` are Unix
    seconds (integers, as in JWT) so that a token's text does not depend on float printing.
    """

    task_id: str
    run_id: str
    attempt: int
    fence: int
    org_id: str
    job: str
    inputs: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    output_prefix: str = ""
    scratch_prefix: str = ""
    issued_at: int = 0
    expires_at: int = 0

    def to_claims(self) -> dict[str, Any]:
        """The JSON object signed into the token (and answered by ``/v1/task/whoami``)."""
        return {"task_id": self.task_id, "run_id": self.run_id, "attempt": self.attempt, "fence": self.fence,
                "org_id": self.org_id, "job": self.job, "inputs": [dict(item) for item in self.inputs],
                "output_prefix": self.output_prefix, "scratch_prefix": self.scratch_prefix,
                "issued_at": self.issued_at, "expires_at": self.expires_at}

    @classmethod
    def from_claims(cls, claims: Any) -> Capability:
        """Rebuild from signed claims; anything missing or of the wrong type is an invalid token.

        Even signed claims are checked: a key shared with an older or buggy minter must not
        make a handler trip over a ``None`` fence.
        """
        if not isinstance(claims, dict):
            raise _invalid("the token's claims are not a JSON object")
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name not in claims:
                raise _invalid(f"the token lacks the claim {spec.name!r}")
            value = claims[spec.name]
            kind = _CLAIM_KINDS[spec.name]
            if kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind is list:
                ok = isinstance(value, list) and all(isinstance(item, dict) for item in value)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise _invalid(f"the token's claim {spec.name!r} has the wrong type")
            values[spec.name] = tuple(dict(item) for item in value) if kind is list else value
        return cls(**values)

    @property
    def issued_at_iso(self) -> str:
        """Issue time as ISO 8601 UTC: the ``params.now`` a UDF sees, fixed per attempt."""
        return datetime.fromtimestamp(self.issued_at, tz=UTC).isoformat().replace("+00:00", "Z")

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


_CLAIM_KINDS: dict[str, type] = {"task_id": str, "run_id": str, "attempt": int, "fence": int, "org_id": str,
                                 "job": str, "inputs": list, "output_prefix": str, "scratch_prefix": str,
                                 "issued_at": int, "expires_at": int}


def _invalid(message: str) -> Unauthenticated:
    return Unauthenticated(message, code="invalid_token")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict unpadded base64url: only the alphabet, and only the canonical spelling.

    Python's decoder skips foreign characters and ignores the spare bits of the last
    character; both would let two different strings carry the same signature.
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise _invalid("the token is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise _invalid("the token is not base64url") from None
    if _b64encode(data) != text:
        raise _invalid("the token is not canonical base64url")
    return data


def _signature(signed_part: str, secret: bytes) -> bytes:
    return hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()


def mint(capability: Capability, secret: bytes) -> str:
    """Sign the capability's claims; the answer is the bearer token handed to the sandbox."""
    if not secret:
        raise ValueError("refusing to sign with an empty key")
    payload = json.dumps(capability.to_claims(), separators=(",", ":"), sort_keys=True, default=str)
    signed_part = f"{PREFIX}.{_b64encode(payload.encode())}"
    return f"{signed_part}.{_b64encode(_signature(signed_part, secret))}"


def verify(token: str, secret: bytes, *, now: float | None = None) -> Capability:
    """Answer the token's capability, or raise :class:`Unauthenticated` saying why not.

    Codes: ``invalid_token`` (not a Trace capability token at all, or its claims are
    malformed), ``bad_signature`` (tampered, or signed with another key), ``token_expired``.
    """
    if not secret:
        raise ValueError("refusing to verify with an empty key")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise _invalid("not a capability token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        raise _invalid(f"not a capability token (expected {PREFIX}.<claims>.<signature>)")
    claims_bytes, signature = _b64decode(parts[1]), _b64decode(parts[2])
    if not hmac.compare_digest(signature, _signature(f"{parts[0]}.{parts[1]}", secret)):
        raise Unauthenticated("the capability token's signature does not match", code="bad_signature")
    try:
        claims = json.loads(claims_bytes)
    except ValueError:
        raise _invalid("the token's claims are not JSON") from None
    capability = Capability.from_claims(claims)
    if capability.expired(now):
        raise Unauthenticated("the capability token has expired", code="token_expired")
    return capability


def redact_tokens(text: str) -> str:
    """Hide anything shaped like a capability or API token (for log lines built from client input)."""
    return redaction.redact(text)


def secret_key(settings: Settings) -> bytes:
    """The signing key: ``TRACE_SECRET_KEY``, else the key file under ``TRACE_HOME``.

    The file holds 32 random bytes as 64 hex characters and is used exactly like a
    ``TRACE_SECRET_KEY`` of that text, so an operator can move a single-machine install to
    several machines by copying the file's content into the setting.
    """
    if settings.secret_key:
        return settings.secret_key.encode()
    path = settings.home_path / SECRET_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    _create_key(path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); it should be 600", path, mode)
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"{path} holds no usable key; delete it to have a new one made")
    return key.encode()


def _create_key(path: Path) -> None:
    """Create the key file once, atomically, even with many processes racing.

    The key is written in full to a private temporary file, then hard-linked to its final
    name: ``link`` fails if the name exists, so exactly one process wins and no process ever
    reads a half-written key. The losers read the winner's key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".secret-key-", dir=path.parent)  # mode 600
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)


def job_timeout(job_spec: Mapping[str, Any]) -> float:
    """The job's sandbox timeout in seconds (the default limits when the spec names none)."""
    limits = job_spec.get("limits") or {}
    value = limits.get("timeout_s") if isinstance(limits, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else Limits.timeout_s


def for_lease(lease: Any, settings: Settings, *, inputs: Iterable[Mapping[str, Any]] = (),
              ttl: float | None = None, now: float | None = None) -> Capability:
    """The capability of the attempt that holds ``lease`` (a :class:`tracecore.execution.lease.Lease`).

    It lives as long as the attempt can: the job's timeout plus one lease TTL (the lease
    bounds how long a stuck worker keeps the task anyway), unless ``ttl`` says otherwise.
    The fence in the claims is what makes the token worthless once the task moves on.
    """
    issued = time.time() if now is None else now
    lifetime = ttl if ttl is not None else job_timeout(lease.job_spec) + settings.lease_ttl
    org, task, run = str(lease.org_id), str(lease.task_id), str(lease.run_id)
    return Capability(
        task_id=task, run_id=run, attempt=int(lease.attempt_number), fence=int(lease.fence), org_id=org,
        job=lease.job_name, inputs=tuple(dict(item) for item in inputs),
        output_prefix=f"outputs/{org}/{lease.job_name}/{run}/{task}/",
        scratch_prefix=f"scratch/{org}/{task}/{lease.fence}/",
        issued_at=math.floor(issued), expires_at=math.ceil(issued + lifetime))
