"""The credential broker: a task's capability token exchanged for storage access limited to its prefixes.

Seed 000 (Credential Broker): a UDF never holds broad infrastructure credentials. It holds one
capability token, and ``POST /v1/task/credentials`` turns that token into access to exactly the
object-store prefixes the token names:

- reading: the input prefixes (each ``inputs`` entry of the capability that carries a
  ``prefix``; see below), and
- writing: the task's ``output_prefix`` and ``scratch_prefix``.

How, depends on the store (``TRACE_OBJECT_STORE``):

- **S3**: STS ``AssumeRole`` on ``TRACE_CREDENTIALS_ROLE_ARN`` with an inline session policy
  (:func:`session_policy`). A session policy can only narrow the role's own permissions, so the
  answer's credentials allow ``s3:GetObject`` under the input prefixes, ``s3:PutObject`` under
  the output and scratch prefixes, ``s3:ListBucket`` restricted by ``s3:prefix`` to those
  prefixes, and nothing else, for ``DurationSeconds = min(3600, max(900, token lifetime left))``
  (900 s is STS's floor: credentials for a token with less than 15 minutes left outlive it by
  the difference, which is why every write the platform accepts is also fenced).
- **Local folder**: there are no credentials to hand out; the gateway itself serves
  ``GET`` / ``PUT /v1/task/objects/<key>`` under exactly those prefixes (GET also under the
  output and scratch prefixes: reading back one's own output is harmless). Both answer JSON
  because both transports of the task API answer JSON only: PUT takes the object's raw bytes as
  the body (bounded by the task API's body limit); GET answers ``data_base64`` in chunks of at
  most :data:`MAX_CHUNK_BYTES` (``?offset=&length=``, follow ``next_offset``), so that no answer
  exceeds the same limit whatever the object's size. These routes read and write through
  :func:`tracecore.infra.storage.object_store`, so they answer the same for an S3 store.

Input prefixes: the capability's ``inputs`` entries are ``{dataset, version, prefix?}``. The
version manifests are the datasets module's (it decides where a version's files live); until it
pins a ``prefix`` in each entry, entries without one grant no object access here (such an input
is read through the Query Service only). A prefix is a key prefix of the store, a folder: it is
checked like a key and always ends in ``/``, so ``v1/`` never grants ``v10/``. IAM wildcards and
policy variables (``*``, ``?``, ``$``) are refused in prefixes: the policy must match literally.

A token whose attempt has ended gets nothing, not even a read (401 ``token_attempt_ended``, at
authentication: ``task_api.authenticate_token``); one whose fence moves during the call gets 409
``stale_fence``, and neither does a PUT made with it: a zombie attempt must not be able to write
into the task's output prefix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

from tracecore.db.engine import db
from tracecore.exceptions import PermissionDenied, PlatformError, UserError
from tracecore.execution import lease
from tracecore.execution.tokens import Capability
from tracecore.infra.storage import S3ObjectStore, aws_client, check_key, object_store
from tracecore.settings import Settings, current_settings
from tracecore.taskapi.calls import MAX_BODY_BYTES, RawRequest, register, register_prefix

log = logging.getLogger(__name__)

OBJECTS_PREFIX = "/v1/task/objects/"
MIN_DURATION_S = 900  # STS refuses shorter sessions
MAX_DURATION_S = 3600  # and the broker hands out nothing longer than an hour
# STS: "The plaintext that you use for both inline and managed session policies can't exceed 2,048 characters."
MAX_POLICY_CHARS = 2048
# The largest chunk a GET answers: its base64 (4/3 of it) plus the JSON around it stays within the
# task API's body limit, the bound every answer of the gateway keeps.
MAX_CHUNK_BYTES = (MAX_BODY_BYTES - 4096) // 4 * 3
_NOT_LITERAL = frozenset("*?$")  # IAM wildcards and ${policy variables}
_SESSION_NAME_UNSAFE = re.compile(r"[^\w+=,.@-]")


class BrokerNotConfigured(PlatformError):
    code = "broker_not_configured"
    http_status = 503


class StsFailed(PlatformError):
    code = "sts_failed"
    http_status = 502


class SessionPolicyTooLarge(UserError):
    """More input prefixes than one STS session policy can name (a job with very many inputs)."""

    code = "session_policy_too_large"
    http_status = 422


@dataclass(frozen=True)
class Prefixes:
    """The store key prefixes a capability opens, each a folder ending in ``/``."""

    inputs: tuple[str, ...]
    output: str | None
    scratch: str | None

    @property
    def writable(self) -> tuple[str, ...]:
        return tuple(prefix for prefix in (self.output, self.scratch) if prefix)

    @property
    def readable(self) -> tuple[str, ...]:
        return _unique((*self.inputs, *self.writable))

    def to_json(self, base: str = "") -> dict[str, Any]:
        """As answered to the task; ``base`` (an S3 store's own prefix) makes them bucket keys."""
        return {"inputs": [_under(base, prefix) for prefix in self.inputs],
                "output": _under(base, self.output) if self.output else None,
                "scratch": _under(base, self.scratch) if self.scratch else None}


def _unique(items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _under(base: str, key: str) -> str:
    return f"{base}/{key}" if base else key


def _folder(prefix: str, claim: str) -> str:
    """A claimed prefix as a folder of the store, or a platform error: claims are signed by the platform."""
    body = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        check_key(body)
    except ValueError:
        raise PlatformError(f"the capability's {claim} is not a usable prefix: {prefix!r}", code="bad_prefix") from None
    if _NOT_LITERAL & set(body):
        raise PlatformError(f"the capability's {claim} holds a wildcard or a policy variable: {prefix!r}",
                            code="bad_prefix")
    return body + "/"


def prefixes_of(capability: Capability) -> Prefixes:
    """The prefixes a capability opens: inputs that carry a ``prefix``, then output and scratch."""
    inputs: list[str] = []
    for index, item in enumerate(capability.inputs):
        prefix = item.get("prefix")
        if prefix is None:
            continue  # read through the Query Service only (see the module's docstring)
        if not isinstance(prefix, str):
            raise PlatformError(f"the capability's inputs[{index}].prefix is not a string", code="bad_prefix")
        inputs.append(_folder(prefix, f"inputs[{index}].prefix"))
    return Prefixes(
        inputs=_unique(inputs),
        output=_folder(capability.output_prefix, "output_prefix") if capability.output_prefix else None,
        scratch=_folder(capability.scratch_prefix, "scratch_prefix") if capability.scratch_prefix else None)


def session_policy(bucket: str, store_prefix: str, capability: Capability, *, partition: str = "aws") -> dict[str, Any]:
    """The inline session policy of a task's STS credentials: its prefixes, and nothing else.

    Statements (each present only when it has a prefix to name):

    - ``ReadInputs``: ``s3:GetObject`` on ``arn:aws:s3:::<bucket>/<store prefix>/<input prefix>*``
    - ``WriteOutputs``: ``s3:PutObject`` on the output and scratch prefixes, the same way
    - ``ListPrefixes``: ``s3:ListBucket`` on the bucket, with ``StringLike`` ``s3:prefix`` on every
      prefix above (listing is how a reader finds a version's part files)

    No ``Deny`` is needed: whatever a session policy does not allow is denied, even if the
    role's own policy would allow it.
    """
    prefixes = prefixes_of(capability)
    base = store_prefix.strip("/")
    bucket_arn = f"arn:{partition}:s3:::{bucket}"

    def objects(folders: tuple[str, ...]) -> list[str]:
        return [f"{bucket_arn}/{_under(base, folder)}*" for folder in folders]

    statements: list[dict[str, Any]] = []
    if prefixes.inputs:
        statements.append({"Sid": "ReadInputs", "Effect": "Allow", "Action": ["s3:GetObject"],
                           "Resource": objects(prefixes.inputs)})
    if prefixes.writable:
        statements.append({"Sid": "WriteOutputs", "Effect": "Allow", "Action": ["s3:PutObject"],
                           "Resource": objects(prefixes.writable)})
    listable = _unique((*prefixes.inputs, *prefixes.writable))
    if listable:
        statements.append({"Sid": "ListPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"],
                           "Resource": [bucket_arn],
                           "Condition": {"StringLike": {"s3:prefix": [f"{_under(base, folder)}*"
                                                                      for folder in listable]}}})
    return {"Version": "2012-10-17", "Statement": statements}


def session_duration(capability: Capability, now: float | None = None) -> int:
    """Seconds the STS credentials last: the token's remaining life, within STS's 900..3600."""
    remaining = capability.expires_at - (time.time() if now is None else now)
    return int(min(MAX_DURATION_S, max(MIN_DURATION_S, remaining)))


def session_name(capability: Capability) -> str:
    """The STS RoleSessionName: task and fence, so that CloudTrail names the attempt that acted."""
    return _SESSION_NAME_UNSAFE.sub("-", f"trace-{capability.task_id}-{capability.fence}")[:64]


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _iso(moment: datetime | float) -> str:
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _assert_fence(capability: Capability) -> None:
    """409 ``stale_fence`` unless the token's fence holds a live lease (records the attempt as fenced)."""
    lease.assert_current(uuid.UUID(capability.task_id), capability.fence)


def s3_credentials(settings: Settings, store: S3ObjectStore, capability: Capability) -> dict[str, Any]:
    """Assume the broker's role with the task's session policy; the answer a sandbox's S3 client needs."""
    role_arn = settings.credentials_role_arn
    if not role_arn:
        raise BrokerNotConfigured("the credential broker has no role to assume: set TRACE_CREDENTIALS_ROLE_ARN")
    policy = session_policy(store.bucket, store.prefix, capability, partition=_partition(settings.s3_region))
    if not policy["Statement"]:
        raise PermissionDenied("the capability names no prefix to grant", code="no_prefixes")
    text = json.dumps(policy, separators=(",", ":"))
    if len(text) > MAX_POLICY_CHARS:
        raise SessionPolicyTooLarge(f"the session policy has {len(text)} characters; STS allows {MAX_POLICY_CHARS}",
                                    details={"inputs": len(capability.inputs)})
    sts = aws_client("sts", endpoint_url=settings.sts_endpoint, region=settings.s3_region)
    try:
        answer = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name(capability), Policy=text,
                                 DurationSeconds=session_duration(capability))
    except Exception as exc:  # botocore's ClientError, connection and credential errors alike
        response = getattr(exc, "response", None) or {}
        reason = response.get("Error", {}).get("Code") or type(exc).__name__
        log.error("credential broker: AssumeRole of %s for task %s failed: %s", role_arn, capability.task_id, exc)
        raise StsFailed(f"STS AssumeRole failed ({reason})") from None
    credentials = answer["Credentials"]
    return {"provider": "s3", "access_key_id": credentials["AccessKeyId"],
            "secret_access_key": credentials["SecretAccessKey"], "session_token": credentials["SessionToken"],
            "expiration": _iso(credentials["Expiration"]), "bucket": store.bucket, "region": settings.s3_region,
            "endpoint_url": settings.s3_endpoint, "prefixes": prefixes_of(capability).to_json(store.prefix)}


@register("POST", "/v1/task/credentials")
def credentials(capability: Capability, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Exchange the token for access to its prefixes: STS credentials (S3) or the gateway's object routes."""
    settings = current_settings()
    store = object_store(settings)
    prefixes = prefixes_of(capability)
    _assert_fence(capability)
    db.session.rollback()  # release the share lock before any network call
    if isinstance(store, S3ObjectStore):
        return 200, s3_credentials(settings, store, capability)
    return 200, {"provider": "local", "prefixes": prefixes.to_json(), "objects_path": OBJECTS_PREFIX,
                 "expiration": _iso(capability.expires_at)}


def _object_key(rest: str) -> str:
    """The key named by the path after ``/v1/task/objects/``: percent-decoded once, then checked.

    The gateway passes the path as sent and Flask passes it decoded; a ``%`` left after one
    decoding is refused, so both transports resolve every accepted path to the same key.
    """
    try:
        key = unquote(rest, errors="strict")
        if "%" in key:
            raise ValueError("a key holds no '%'")
        return check_key(key)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"not an object key: {rest!r} (a relative path without '.', '..' or empty parts)",
                        code="invalid_key") from None


def _require_under(key: str, allowed: tuple[str, ...], verb: str) -> None:
    if not any(key.startswith(prefix) for prefix in allowed):
        raise PermissionDenied(f"{key!r} is not under a prefix this task may {verb}", code="prefix_denied",
                               details={"key": key, "allowed": list(allowed)})


def _range(query: str) -> tuple[int, int]:
    """``offset`` (default 0) and ``length`` (default and maximum :data:`MAX_CHUNK_BYTES`) of a GET."""
    values = parse_qs(query, keep_blank_values=True)
    try:
        offset = int(values.get("offset", ["0"])[-1])
        length = int(values.get("length", [str(MAX_CHUNK_BYTES)])[-1])
    except ValueError:
        raise UserError("offset and length are byte counts", code="invalid_range") from None
    if offset < 0 or not 0 < length <= MAX_CHUNK_BYTES:
        raise UserError(f"offset >= 0 and 0 < length <= {MAX_CHUNK_BYTES}", code="invalid_range",
                        details={"max_length": MAX_CHUNK_BYTES})
    return offset, length


@register_prefix("GET", OBJECTS_PREFIX)
def get_object(capability: Capability, request: RawRequest) -> tuple[int, dict[str, Any]]:
    """A chunk of an object under the task's input, output or scratch prefixes, base64 in JSON."""
    key = _object_key(request.rest)
    _require_under(key, prefixes_of(capability).readable, "read")
    offset, length = _range(request.query)
    with object_store(current_settings()).open_read(key) as handle:  # NotFound: 404
        if handle.seekable():
            handle.seek(offset)
        else:
            skip = offset
            while skip > 0 and (chunk := handle.read(min(skip, 1 << 20))):
                skip -= len(chunk)
        data = handle.read(length)
        more = len(data) == length and bool(handle.read(1))
    return 200, {"key": key, "offset": offset, "length": len(data),
                 "data_base64": base64.b64encode(data).decode("ascii"),
                 "next_offset": offset + len(data) if more else None}


@register_prefix("PUT", OBJECTS_PREFIX)
def put_object(capability: Capability, request: RawRequest) -> tuple[int, dict[str, Any]]:
    """Store the raw body as an object under the task's output or scratch prefix, while its fence holds."""
    key = _object_key(request.rest)
    _require_under(key, prefixes_of(capability).writable, "write")
    _assert_fence(capability)
    try:
        object_store(current_settings()).put(key, request.body)
    finally:
        db.session.rollback()  # the share lock kept the lease from moving during the write
    return 201, {"key": key, "size": len(request.body), "sha256": hashlib.sha256(request.body).hexdigest()}
