"""Capability tokens: signing, verification, expiry, the key file, and the claims of a lease."""

from __future__ import annotations

import base64
import dataclasses
import json
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tracecore.exceptions import Unauthenticated
from tracecore.execution import tokens
from tracecore.execution.lease import Lease
from tracecore.execution.tokens import Capability
from tracecore.settings import Settings

SECRET = b"k" * 32
NOW = 1_700_000_000


def capability(**changes: object) -> Capability:
    base = Capability(task_id=str(uuid.uuid4()), run_id=str(uuid.uuid4()), attempt=2, fence=7,
                      org_id=str(uuid.uuid4()), job="blocks",
                      inputs=({"dataset": "raw_blocks", "version": 3, "partition": "2024-01-01"},),
                      output_prefix="outputs/o/blocks/r/t/", scratch_prefix="scratch/o/t/7/",
                      issued_at=NOW, expires_at=NOW + 180)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refused(token: str, code: str, *, secret: bytes = SECRET, now: float = NOW + 1) -> None:
    with pytest.raises(Unauthenticated) as caught:
        tokens.verify(token, secret, now=now)
    assert caught.value.code == code, caught.value.message
    assert caught.value.http_status == 401


def test_round_trip_keeps_every_claim() -> None:
    cap = capability()
    token = tokens.mint(cap, SECRET)
    assert token.startswith("trc1.") and token.count(".") == 2
    assert tokens.verify(token, SECRET, now=NOW + 1) == cap
    assert Capability.from_claims(cap.to_claims()) == cap
    claims = json.loads(unb64(token.split(".")[1]))
    assert claims == cap.to_claims()
    assert set(claims) == {"task_id", "run_id", "attempt", "fence", "org_id", "job", "inputs", "output_prefix",
                           "scratch_prefix", "issued_at", "expires_at"}


def test_minting_is_deterministic_and_the_issue_time_reads_as_iso() -> None:
    cap = capability()
    assert tokens.mint(cap, SECRET) == tokens.mint(cap, SECRET)
    assert cap.issued_at_iso == "2023-11-14T22:13:20Z"


def test_a_tampered_payload_is_a_bad_signature() -> None:
    prefix, payload, signature = tokens.mint(capability(), SECRET).split(".")
    claims = json.loads(unb64(payload))
    claims["fence"] = 8  # a zombie trying to pass as its successor
    refused(f"{prefix}.{b64(json.dumps(claims).encode())}.{signature}", "bad_signature")
    claims["fence"], claims["task_id"] = 7, str(uuid.uuid4())
    refused(f"{prefix}.{b64(json.dumps(claims).encode())}.{signature}", "bad_signature")


def test_a_tampered_signature_is_refused() -> None:
    prefix, payload, signature = tokens.mint(capability(), SECRET).split(".")
    raw = bytearray(unb64(signature))
    for index in (0, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        refused(f"{prefix}.{payload}.{b64(bytes(flipped))}", "bad_signature")
    refused(f"{prefix}.{payload}.{b64(bytes(raw[:-1]))}", "bad_signature")  # truncated


def test_a_non_canonical_signature_spelling_is_refused() -> None:
    """43 base64 characters carry 258 bits for 256: the spare bits must not give a second valid token."""
    prefix, payload, signature = tokens.mint(capability(), SECRET).split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    twin = signature[:-1] + alphabet[last ^ 0x01]
    assert unb64(twin) == unb64(signature)
    refused(f"{prefix}.{payload}.{twin}", "invalid_token")


def test_another_key_is_a_bad_signature() -> None:
    token = tokens.mint(capability(), SECRET)
    refused(token, "bad_signature", secret=b"x" * 32)


def test_an_expired_token_is_refused_with_its_own_code() -> None:
    token = tokens.mint(capability(expires_at=NOW + 10), SECRET)
    assert tokens.verify(token, SECRET, now=NOW + 9.9).fence == 7
    refused(token, "token_expired", now=NOW + 10)
    refused(token, "token_expired", now=NOW + 3600)


def test_the_clock_defaults_to_now() -> None:
    live = tokens.mint(capability(issued_at=int(time.time()), expires_at=int(time.time()) + 60), SECRET)
    assert tokens.verify(live, SECRET).job == "blocks"
    with pytest.raises(Unauthenticated) as caught:
        tokens.verify(tokens.mint(capability(expires_at=int(time.time()) - 1), SECRET), SECRET)
    assert caught.value.code == "token_expired"


@pytest.mark.parametrize("token", [
    "", "trc1", "trc1..", "trc1.abc", "trc1.abc.def.ghi", "trc2.eyJ9.c2ln", "Bearer trc1.a.b",
    "trc1.not base64!.c2ln", "trc1.eyJ9=.c2ln", "trc1.a+b/.c2ln", "trc1.é.c2ln", "x" * 70_000,
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc",  # a JWT is not a capability token
])
def test_malformed_strings_are_invalid_tokens(token: str) -> None:
    refused(token, "invalid_token")


def test_well_signed_but_malformed_claims_are_invalid_tokens() -> None:
    def signed(payload: bytes) -> str:
        part = f"trc1.{b64(payload)}"
        return f"{part}.{b64(tokens._signature(part, SECRET))}"

    claims = capability().to_claims()
    refused(signed(b"not json"), "invalid_token")
    refused(signed(b"[1, 2]"), "invalid_token")
    refused(signed(json.dumps({k: v for k, v in claims.items() if k != "fence"}).encode()), "invalid_token")
    refused(signed(json.dumps({**claims, "fence": "7"}).encode()), "invalid_token")
    refused(signed(json.dumps({**claims, "fence": True}).encode()), "invalid_token")
    refused(signed(json.dumps({**claims, "inputs": ["raw_blocks"]}).encode()), "invalid_token")


def test_an_empty_key_is_never_used() -> None:
    with pytest.raises(ValueError):
        tokens.mint(capability(), b"")
    with pytest.raises(ValueError):
        tokens.verify(tokens.mint(capability(), SECRET), b"")


def test_the_setting_is_the_key_when_set(tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path / "home"), secret_key="from-the-environment-0123456789abcdef")
    assert tokens.secret_key(settings) == b"from-the-environment-0123456789abcdef"
    assert not (tmp_path / "home" / "secret-key").exists()


def test_the_key_file_is_created_once_with_mode_600_and_reused(tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path / "home"))
    path = tmp_path / "home" / "secret-key"
    with ThreadPoolExecutor(16) as pool:  # racing creators all end up with the one key
        keys = set(pool.map(lambda _: tokens.secret_key(settings), range(64)))
    assert len(keys) == 1
    key = keys.pop()
    assert len(bytes.fromhex(key.decode())) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret-key"]  # no temporary left behind
    inode = path.stat().st_ino

    assert tokens.secret_key(settings) == key
    assert path.stat().st_ino == inode  # read again, not rewritten
    # Another process on the same home verifies what this one minted:
    # tests/integration/execution/test_tokens.py (a subprocess is not a unit test).


def test_a_lease_gives_its_prefixes_and_an_expiry_of_timeout_plus_lease_ttl() -> None:
    task, org, run = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    lease = Lease(task_id=task, org_id=org, run_id=run, job_id=uuid.uuid4(), job_name="blocks", fence=4,
                  attempt_id=uuid.uuid4(), attempt_number=3, max_retries=3, worker="w", operator="udf",
                  job_spec={"limits": {"timeout_s": 90.0}}, config_overrides={}, parameters={}, window={})
    settings = Settings(lease_ttl=120.0)
    inputs = [{"dataset": "raw_blocks", "version": 5, "partition": None}]
    cap = tokens.for_lease(lease, settings, inputs=inputs, now=NOW + 0.5)
    assert (cap.task_id, cap.run_id, cap.org_id, cap.attempt, cap.fence, cap.job) == (
        str(task), str(run), str(org), 3, 4, "blocks")
    assert cap.inputs == tuple(inputs)
    assert cap.output_prefix == f"outputs/{org}/blocks/{run}/{task}/"
    assert cap.scratch_prefix == f"scratch/{org}/{task}/4/"
    assert (cap.issued_at, cap.expires_at) == (NOW, NOW + 211)

    default = tokens.for_lease(dataclasses.replace(lease, job_spec={}), settings, now=NOW)
    assert default.expires_at == NOW + 60 + 120 and default.inputs == ()
    short = tokens.for_lease(lease, settings, ttl=5, now=NOW)
    assert short.expires_at == NOW + 5
    assert tokens.verify(tokens.mint(cap, SECRET), SECRET, now=NOW + 1) == cap


def test_redaction_hides_tokens_in_text() -> None:
    token = tokens.mint(capability(), SECRET)
    assert token not in tokens.redact_tokens(f"GET /v1/task/whoami?t={token} HTTP/1.1")
