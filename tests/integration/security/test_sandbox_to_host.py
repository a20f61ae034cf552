"""Issue 11, class 2: the sandbox must not reach the host through files it controls.

The docker and process backends share a host folder with the sandbox (``/run/trace``), and the
worker reads the result from it as root. Hostile bundles (python3.11 handlers and a ``provided``
shell bootstrap) replace ``result.json`` with a symlink to a host file (a secret this test
plants, ``/etc/shadow``, the worker's ``/proc/self/environ``), with a link to ``/dev/zero`` or
``/dev/urandom``, a FIFO, a directory, a hard link, a file over the cap; fill the folder past
its size cap (bytes and inodes); try to swap the gateway socket and the event. For each
backend that runs here, every case must end with its clear code (``invalid_result``,
``result_too_large``) or fail inside the sandbox (ENOSPC, EPERM, EXDEV), the outcome must hold
no byte of the host secret, nothing must be left on the host's disk, the worker must not hang
(each run is a thread with a generous join: a hang fails, time never decides a pass), and a
benign run afterwards must still work. The same cases then run end to end through a real
worker (docker, the default backend), reading the attempt and its stored log back through the
API. Fargate reads no file of the sandbox: its result comes from CloudWatch lines, whose
parsing is bounded (last cases).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import Processes, Tenant, wait_for
from tracecore.dags.spec import Limits
from tracecore.infra.storage import object_store
from tracecore.settings import Settings
from workers.sandbox import RESULT_CAP_BYTES, Invocation, Outcome
from workers.sandbox.fargate import split_result
from workers.sandbox.hostile_files import WORK_DIR_INODES, capped_work_dir
from workers.sandbox.outcome import RESULT_MARKER

pytestmark = pytest.mark.slow

SECRET = "host-secret-planted-by-the-test-7f3a9c"
CAP = 4 << 20  # the work dir's size cap in these runs
LIMITS = Limits(timeout_s=4.0)
RUN_JOIN_S = 180.0  # far above any run: only a hang reaches it

# One handler for every case: what it does to /run/trace is the event's "case".
HANDLER = r'''
import errno, os

WORK = "/run/trace"
RESULT = WORK + "/result.json"


def name(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))


def attempt(action):
    try:
        action()
        return "done"
    except OSError as exc:
        return name(exc)


def fstype(path):
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if fields[4] == path:
                return fields[fields.index("-") + 1]
    return None


def handler(event, context):
    case = event["case"]
    if case == "benign":
        return {"ok": True, "work_dir_fstype": fstype(WORK)}
    if case == "symlink":
        os.symlink(event["target"], RESULT)
    elif case == "fifo":
        os.mkfifo(RESULT, 0o666)  # the wrapper then blocks opening it, until killed from outside
    elif case == "directory":
        os.mkdir(RESULT)
    elif case == "hard-link-inside":
        with open(WORK + "/mine", "w") as handle:
            handle.write("{}")
        os.link(WORK + "/mine", RESULT)
    elif case == "oversize":
        with open(RESULT, "w") as handle:
            handle.write('{"status": "ok", "response": "' + "x" * event["size"] + '"}')
        os.chmod(RESULT, 0o444)  # the wrapper (the same user, no capabilities) cannot overwrite it
    elif case == "hard-link-out":
        return {source: attempt(lambda: os.link(source, RESULT))
                for source in ("/var/task/trace.py", "/etc/passwd", "/usr/bin/env", "/proc/self/environ")}
    elif case == "fill":
        written, error = 0, None
        try:
            with open(WORK + "/fill", "wb") as handle:
                while written < 4 * event["cap"]:
                    handle.write(b"x" * (1 << 20))
                    handle.flush()
                    written += 1 << 20
        except OSError as exc:
            error = name(exc)
        os.unlink(WORK + "/fill")  # room again for the wrapper's result
        return {"written": written, "error": error, "fstype": fstype(WORK), "cap": event["cap"]}
    elif case == "inodes":
        count, error = 0, None
        try:
            while count < 4 * event["inodes"]:
                open(f"{WORK}/f{count}", "w").close()
                count += 1
        except OSError as exc:
            error = name(exc)
        for index in range(count):
            os.unlink(f"{WORK}/f{index}")
        return {"count": count, "error": error}
    elif case == "swap-gateway":
        sock = WORK + "/gateway.sock"
        return {"unlink": attempt(lambda: os.unlink(sock)),
                "rename": attempt(lambda: os.rename(sock, WORK + "/moved.sock")),
                "symlink_over": attempt(lambda: os.symlink("/etc/shadow", sock)),
                "replace": attempt(lambda: os.replace(WORK + "/event.json", sock)),
                "chmod_dir": attempt(lambda: os.chmod(WORK, 0o777))}
    elif case == "swap-event":
        return {"unlink": attempt(lambda: os.unlink(WORK + "/event.json")),
                "write": attempt(lambda: open(WORK + "/event.json", "w").close())}
    return "planted"
'''

# A `provided` bootstrap that never talks to the Runtime API: it plants the link and exits.
BOOTSTRAP = """#!/bin/sh
ln -s "$(cat /var/task/target)" /run/trace/result.json
exit 3
"""


@dataclasses.dataclass(frozen=True)
class Case:
    event: dict[str, Any]
    code: str  # the exit reason the attempt must end with
    check: Callable[[Any], None] | None = None  # on the response of an `ok` case


def _failed_all(response: Any) -> None:
    assert isinstance(response, dict) and response, response
    assert all(value != "done" for value in response.values()), response


def _enospc_within_cap(response: Any) -> None:
    assert response["error"] == "ENOSPC" and response["fstype"] == "tmpfs", response
    assert response["written"] <= response["cap"], response


def _inodes_capped(response: Any) -> None:
    assert response["error"] == "ENOSPC" and response["count"] <= WORK_DIR_INODES, response


def _swap_refused(response: Any) -> None:
    _failed_all(response)
    assert response["unlink"] == "EPERM" and response["rename"] == "EPERM", response


CASES: dict[str, Case] = {
    "symlink-to-planted-secret": Case({"case": "symlink", "target": "{secret}"}, "invalid_result"),
    "symlink-to-etc-shadow": Case({"case": "symlink", "target": "/etc/shadow"}, "invalid_result"),
    "symlink-to-worker-proc-environ": Case({"case": "symlink", "target": "/proc/{worker}/environ"}, "invalid_result"),
    "symlink-to-proc-self-environ": Case({"case": "symlink", "target": "/proc/self/environ"}, "invalid_result"),
    "symlink-to-dev-zero": Case({"case": "symlink", "target": "/dev/zero"}, "invalid_result"),
    "symlink-to-dev-urandom": Case({"case": "symlink", "target": "/dev/urandom"}, "invalid_result"),
    "symlink-to-host-root": Case({"case": "symlink", "target": "/"}, "invalid_result"),
    "fifo": Case({"case": "fifo"}, "invalid_result"),
    "directory": Case({"case": "directory"}, "invalid_result"),
    "hard-link-inside-the-folder": Case({"case": "hard-link-inside"}, "invalid_result"),
    "result-over-the-cap": Case({"case": "oversize", "size": 2 * RESULT_CAP_BYTES}, "result_too_large"),
    "hard-link-to-outside-files": Case({"case": "hard-link-out"}, "ok", _failed_all),
    "fill-the-work-dir": Case({"case": "fill", "cap": CAP}, "ok", _enospc_within_cap),
    "exhaust-the-work-dir-inodes": Case({"case": "inodes", "inodes": WORK_DIR_INODES}, "ok", _inodes_capped),
    "swap-the-gateway-socket": Case({"case": "swap-gateway"}, "ok", _swap_refused),
    "swap-the-event": Case({"case": "swap-event"}, "ok", _failed_all),
}


# --- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["docker", "process"])
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "docker":
        from workers.sandbox.docker import DockerBackend

        return DockerBackend(remove_in_background=False)
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is missing: apt-get install bubblewrap "
                    "(tests/integration/workers/sandbox/test_process.py installs it when run as root)")
    from workers.sandbox.process import ProcessBackend

    return ProcessBackend()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret.txt"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def host_bytes(secret: Path) -> list[str]:
    """Pieces of host files a leaked read would carry: the planted secret, /etc/shadow's lines, the
    worker's (this process's) environment entries."""
    pieces = [SECRET]
    for path in (Path("/etc/shadow"), Path("/proc/self/environ")):
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
        pieces += [piece for piece in text.replace("\0", "\n").splitlines() if len(piece) >= 12]
    return pieces


def assert_no_host_bytes(text: str, secret: Path) -> None:
    leaked = [piece[:40] for piece in host_bytes(secret) if piece in text]
    assert leaked == [], f"host bytes in what the sandbox produced: {leaked}"


def write_bundle(root: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for name, text in files.items():
        (root / name).write_text(text)
        os.chmod(root / name, 0o755 if name in executable else 0o644)
    return root


def event_for(case: Case, secret: Path) -> dict[str, Any]:
    event = dict(case.event)
    if "target" in event:
        event["target"] = event["target"].replace("{secret}", str(secret)).replace("{worker}", str(os.getpid()))
    return event


def run_in_thread(backend: Any, invocation: Invocation) -> Outcome:
    """backend.run, which must return: a hang fails the test after a join far above any run's time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["outcome"] = backend.run(invocation)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="hostile-run")
    thread.start()
    thread.join(RUN_JOIN_S)
    assert not thread.is_alive(), f"the worker hung reading what the sandbox left ({invocation.event})"
    if "error" in box:
        raise box["error"]
    return box["outcome"]


def invoke(backend: Any, tmp_path: Path, bundle: Path, event: dict[str, Any], *, runtime: str = "python3.11",
           handler: str = "trace.handler", work: Path | None = None) -> Outcome:
    invocation = Invocation(bundle_dir=bundle, runtime=runtime, handler=handler, event=event,
                            work_dir=work or tmp_path / f"work-{uuid.uuid4().hex[:8]}", limits=LIMITS,
                            work_dir_max_bytes=CAP)
    return run_in_thread(backend, invocation)


def assert_benign_run_works(backend: Any, tmp_path: Path, bundle: Path) -> None:
    outcome = invoke(backend, tmp_path, bundle, {"case": "benign"})
    assert outcome.exit_reason == "ok", outcome
    assert outcome.response == {"ok": True, "work_dir_fstype": "tmpfs"}


# --- every backend that shares a folder ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_work_dir_contents(backend: Any, tmp_path: Path, secret: Path, case: Case) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": HANDLER})
    work = tmp_path / "work"
    gateway_inode = None
    with capped_work_dir(work, CAP):  # as the udf operator does: the tmpfs first, then the gateway's socket in it
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(work / "gateway.sock"))
        os.chmod(work / "gateway.sock", 0o666)
        server.listen(1)
        gateway_inode = os.lstat(work / "gateway.sock").st_ino
        try:
            outcome = invoke(backend, tmp_path, bundle, event_for(case, secret), work=work)
            # The socket the worker bound is still there, the same inode, still a socket, still answering.
            info = os.lstat(work / "gateway.sock")
            assert info.st_ino == gateway_inode and (info.st_mode & 0o170000) == 0o140000
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(work / "gateway.sock"))
        finally:
            server.close()
    assert outcome.exit_reason == case.code, (outcome.exit_reason, outcome.error_type, outcome.error_message,
                                               outcome.logs[-2000:])
    if case.code == "invalid_result":
        assert outcome.error_type == "InvalidResult" and "not read" in (outcome.error_message or "")
    if case.check is not None:
        case.check(outcome.response)
    assert_no_host_bytes(json.dumps(dataclasses.asdict(outcome), default=str), secret)
    assert not os.path.ismount(work) and list(work.iterdir()) == [], "the sandbox's files outlived its tmpfs"
    assert_benign_run_works(backend, tmp_path, bundle)


@pytest.mark.parametrize("case", ["symlink-to-planted-secret", "fifo", "result-over-the-cap", "fill-the-work-dir"])
def test_the_backend_caps_a_work_dir_it_is_handed_empty(backend: Any, tmp_path: Path, secret: Path,
                                                         case: str) -> None:
    """Called without the operator's mount (the folder does not exist yet): the backend mounts it itself."""
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": HANDLER})
    work = tmp_path / "fresh-work"
    outcome = invoke(backend, tmp_path, bundle, event_for(CASES[case], secret), work=work)
    assert outcome.exit_reason == CASES[case].code, outcome
    if CASES[case].check is not None:
        CASES[case].check(outcome.response)  # type: ignore[misc]
    assert_no_host_bytes(json.dumps(dataclasses.asdict(outcome), default=str), secret)
    assert not os.path.ismount(work) and list(work.iterdir()) == []


@pytest.mark.parametrize("target", ["{secret}", "/etc/shadow", "/dev/zero"])
def test_a_provided_bootstrap_that_plants_a_link_and_exits(backend: Any, tmp_path: Path, secret: Path,
                                                           target: str) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"bootstrap": BOOTSTRAP,
                                                "target": target.replace("{secret}", str(secret))},
                          executable=("bootstrap",))
    outcome = invoke(backend, tmp_path, bundle, {"case": "none"}, runtime="provided", handler="bootstrap")
    assert outcome.exit_reason == "invalid_result", outcome
    assert_no_host_bytes(json.dumps(dataclasses.asdict(outcome), default=str), secret)
    benign = write_bundle(tmp_path / "benign", {"trace.py": HANDLER})
    assert_benign_run_works(backend, tmp_path, benign)


# --- end to end: a real worker, the attempt and its stored log read back -------------------------------------


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def _job(client: FlaskClient, tenant: Tenant, name: str, event_config: dict[str, Any]) -> None:
    source = HANDLER.replace('case = event["case"]', 'event = event["config"]\n    case = event["case"]')
    data = _zip({"trace.py": source})
    upload = client.post("/v1/bundles", headers=tenant.headers("writer"), content_type="multipart/form-data",
                         data={"file": (io.BytesIO(data), "bundle.zip"), "runtime": "python3.11",
                               "handler": "trace.handler"})
    assert upload.status_code in (200, 201), upload.json
    dag = (f"- name: {name}\n  runtime: lambda\n  operator: udf\n  max_retries: 0\n"
           f"  config: {json.dumps(event_config)}\n  limits: {{timeout: 4s}}\n"
           f"  udf: {{bundle_id: '{upload.json['id']}', entrypoint: trace.handler}}\n")
    put = client.put(f"/v1/dags/{name}", data=dag,
                     headers={**tenant.headers("writer"), "Content-Type": "application/yaml"})
    assert put.status_code == 200, put.json


def _run(client: FlaskClient, tenant: Tenant, job: str) -> dict[str, Any]:
    run_id = client.post(f"/v1/jobs/{job}/runs", json={}, headers=tenant.headers("writer")).json["run_id"]

    def finished() -> dict[str, Any] | None:
        run = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader")).json
        return run if run["status"] in ("succeeded", "failed") else None

    return wait_for(finished, timeout=RUN_JOIN_S, message=f"the run of {job} to finish")  # type: ignore[return-value]


E2E = ["symlink-to-planted-secret", "symlink-to-etc-shadow", "symlink-to-dev-zero", "fifo", "result-over-the-cap",
       "fill-the-work-dir"]


@pytest.fixture
def worker_secret(settings: Settings) -> Iterator[Path]:
    """A secret file on the worker's host (beside its TRACE_HOME), readable by root only."""
    path = Path(settings.home).parent / "worker-host-secret.txt"
    path.write_text(SECRET)
    path.chmod(0o600)
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("case", E2E)
def test_through_a_real_worker(client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings,
                               worker_secret: Path, case: str) -> None:
    config = dict(CASES[case].event)
    if "target" in config:
        config["target"] = config["target"].replace("{secret}", str(worker_secret))
    if "cap" in config:
        config["cap"] = settings.sandbox_work_dir_max_bytes  # the worker's own cap (its default)
    _job(client, tenant, "hostile", config)
    _job(client, tenant, "benign", {"case": "benign"})
    worker = processes.worker()
    run = _run(client, tenant, "hostile")
    attempt = run["tasks"][0]["attempts"][0]
    assert attempt["exit_reason"] == CASES[case].code, (attempt, processes.log(worker)[-3000:])
    if CASES[case].check is not None:
        CASES[case].check(attempt["result"])  # type: ignore[misc]
    else:
        assert run["status"] == "failed" and run["tasks"][0]["status"] == "dead_letter"  # not retried
    stored = json.dumps(run)
    if attempt.get("log_location"):
        stored += object_store(settings).get(attempt["log_location"]).decode("utf-8", errors="replace")
    assert_no_host_bytes(stored, worker_secret)
    # Nothing of the sandbox is left on the host: its work dir was a tmpfs, unmounted and removed.
    sandboxes = settings.home_path / "sandboxes"
    assert [entry.name for entry in sandboxes.iterdir() if not entry.name.startswith(".")] == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(sandboxes) not in mounts
    benign = _run(client, tenant, "benign")
    assert benign["status"] == "succeeded", (benign, processes.log(worker)[-3000:])
    assert benign["tasks"][0]["attempts"][0]["result"] == {"ok": True, "work_dir_fstype": "tmpfs"}


# --- fargate: no shared folder; the result comes from log lines the sandbox prints ---------------------------


def _document(response: Any = "fine") -> str:
    return json.dumps({"status": "ok", "response": response, "error": None, "duration_ms": 1.0, "exit_code": None})


FARGATE_LINES: dict[str, tuple[list[str], Any]] = {
    "result-over-the-cap-in-one-line": ([RESULT_MARKER, _document("x" * (2 * RESULT_CAP_BYTES))], "too_large"),
    "result-over-the-cap-split": ([RESULT_MARKER, *[("x" * 1000) for _ in range(400)]], "too_large"),
    "many-crafted-closing-lines": ([RESULT_MARKER, '{"a": "', *(["x}"] * 20000)], None),
    "a-forged-marker-before-the-real-one": ([RESULT_MARKER, _document("forged"), "log", RESULT_MARKER, _document()],
                                            "fine"),
    "a-marker-and-nothing": ([RESULT_MARKER], None),
}


@pytest.mark.parametrize("lines,expected", FARGATE_LINES.values(), ids=FARGATE_LINES.keys())
def test_fargate_result_lines_are_parsed_within_bounds(lines: list[str], expected: Any) -> None:
    result, _ = split_result(lines)
    if isinstance(result, dict):
        assert result["response"] == expected
    else:
        assert result == expected


def test_the_hosts_free_space_is_not_what_a_full_work_dir_consumes(tmp_path: Path) -> None:
    """The cap holds on the host's side too: a writer in the work dir stops at the tmpfs, not the disk."""
    work = tmp_path / "work"
    with capped_work_dir(work, CAP) as capped:
        assert capped, "the worker runs as root here: the work dir must be a capped tmpfs"
        done = subprocess.run(["dd", "if=/dev/zero", f"of={work / 'fill'}", "bs=1M", f"count={4 * (CAP >> 20)}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "No space left on device" in done.stderr
        assert os.stat(work).st_dev != os.stat(tmp_path).st_dev
        assert (work / "fill").stat().st_size <= CAP
    assert list(work.iterdir()) == []
