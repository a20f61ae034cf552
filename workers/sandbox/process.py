"""The process backend (``TRACE_SANDBOX=process``): bubblewrap namespaces and rlimits, for machines
with no Docker engine.

Each invocation is a fresh ``bwrap`` sandbox running the same wrapper as the images
(``workers/runtime/bootstrap.py`` at ``/opt/trace/runtime``) with the host's python3:

* **Namespaces**: new network (only a fresh, empty loopback: no route out, and the host's
  loopback services are not reachable), pid, ipc, uts and cgroup namespaces;
  ``--new-session`` (no TIOCSTI into the worker's terminal), ``--die-with-parent``.
* **File system**: a fresh tmpfs root holding only read-only binds of ``/usr`` (and the
  merged-usr links ``/bin``, ``/lib``...), the few ``/etc`` entries the dynamic loader and
  python need (not the whole ``/etc``: no ``passwd``, ``hosts``, secrets), the runtime dir at
  ``/opt/trace/runtime``, the bundle at ``/var/task``; the invocation's work dir read-write at
  ``/run/trace`` (event in, result out, gateway socket; a size-capped tmpfs on the host, its
  result read as hostile input: :mod:`workers.sandbox.hostile_files`); a 64 MB tmpfs ``/tmp``;
  ``/proc``; a minimal ``/dev``.
* **User**: uid/gid 10001, no capabilities, an empty bounding set, ``no_new_privs``. As root
  (the usual worker) the drop is a real one: ``setpriv`` switches to host uid 10001 inside the
  sandbox. Why not ``bwrap --unshare-all --uid 10001``: as root that puts the sandbox in a user
  namespace where uid 10001 maps to *host uid 0*: its processes are host root (an escape from
  the namespaces would be a root escape) and ``RLIMIT_NPROC`` never applies to uid 0. Run as
  an unprivileged user, the backend uses ``--unshare-all --uid 10001 --cap-drop ALL`` (the user
  namespace is then the only way to get the others).
* **Environment**: exactly the wrapper's (the same contract as the docker backend). It is
  handed to ``bwrap`` as its process environment, not as ``--setenv`` arguments, so the
  capability token never shows in a command line (``ps``).
* **Limits** (``prlimit``, inherited by everything in the sandbox; per process, not per sandbox):
  memory as ``RLIMIT_AS`` (``RLIMIT_DATA`` for ``nodejs``: V8 reserves gigabytes of address
  space at start and dies under ``RLIMIT_AS``), ``RLIMIT_NPROC`` for pids (counted for host uid
  10001, so concurrent sandboxes share it), ``RLIMIT_CPU`` (a bound on CPU seconds, above the
  wall clock so a busy loop still ends as ``timeout``), ``RLIMIT_FSIZE`` 64 MB (per file: what
  bounds writes where the work dir cannot be a capped tmpfs), no core files; and a wall-clock
  deadline (the wrapper's own, then SIGKILL to the sandbox from outside after a grace).

Weaker than docker, and it says so when constructed: the kernel is shared with no seccomp
filter, there is no cgroup, so no memory accounting for the sandbox as a whole and no CPU
share (0.25 vCPU is not enforced). ``oom`` is best effort: there is no OOM killer event to
read, so an invocation is ``oom`` when the runtime failed with an allocation error
(Python's ``MemoryError``, V8's heap or array-buffer allocation failure, ``bad_alloc``...),
in its error document or its logs.

Sandboxes are started in their own process group and recorded in
``<work dirs' parent>/.process-pids/``; :meth:`ProcessBackend.reap_orphans` kills those whose
worker is gone (``--die-with-parent`` normally does it already) or that outlived any job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tracecore.exceptions import PlatformError
from tracecore.settings import current_settings

from . import CappedLog, Invocation, Outcome
from .outcome import outcome, pid_alive, prepare_work_dir, read_result_file, work_area

log = logging.getLogger(__name__)

WARNING = ("process sandbox: weaker isolation than docker (shared kernel, no cgroup memory accounting); "
           "use TRACE_SANDBOX=docker where possible")
MISSING_BWRAP = "install bubblewrap (apt-get install bubblewrap): the process sandbox needs bwrap"
SANDBOX_UID = 10001
SANDBOX_GID = 10001
RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"
RUNTIME_MOUNT = "/opt/trace/runtime"
TASK_MOUNT = "/var/task"
WORK_MOUNT = "/run/trace"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TMP_SIZE_BYTES = 64 << 20
FSIZE_LIMIT_BYTES = 64 << 20
# The wrapper enforces the deadline itself and reports `timeout`; this is the outer bound
# after which the sandbox is killed from outside (the same grace as the docker backend).
KILL_GRACE_S = 1.5
PID_DIR = ".process-pids"
# Top-level links or folders of a merged-usr (or not) Debian root, bound when present.
ROOT_ENTRIES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Only what the loader, python3 and node read from /etc.
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "ssl",
               f"python3.{sys.version_info.minor}", "python3")
# Allocation failures, as the runtimes word them (Python, V8, C++, Rust, glibc).
OOM_SIGNS = ("MemoryError", "JavaScript heap out of memory", "Array buffer allocation failed", "Fatal process OOM",
             "std::bad_alloc", "memory allocation of", "Cannot allocate memory")


class ProcessBackend:
    name = "process"

    def __init__(self, *, worker: str | None = None, orphan_age_s: float = 3600.0, state_dir: Path | None = None,
                 python: str | None = None) -> None:
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise PlatformError(MISSING_BWRAP, code="sandbox_unavailable")
        self.as_root = os.geteuid() == 0
        self.prlimit = _require("prlimit", "util-linux")
        self.setpriv = _require("setpriv", "util-linux") if self.as_root else None
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.orphan_age_s = orphan_age_s
        self._state_dirs: set[Path] = {Path(state_dir)} if state_dir is not None else set()
        self._lock = threading.Lock()
        self.python, self._python_prefix = self._find_python(python)
        log.warning(WARNING)

    # -- running -----------------------------------------------------------------------------

    def run(self, invocation: Invocation) -> Outcome:
        # The work dir is a size-capped tmpfs until the result is read (workers/sandbox/hostile_files.py).
        with work_area(invocation):
            try:
                prepare_work_dir(invocation)
            except OSError as exc:  # e.g. an event larger than the work dir's cap
                return Outcome("sandbox_error", error_type="WorkDirUnavailable",
                               error_message=f"cannot prepare the sandbox's folder: {exc}")
            return self._run(invocation)

    def _run(self, invocation: Invocation) -> Outcome:
        limits = invocation.limits
        logs = CappedLog()
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                self._argv(invocation), env=self._environment(invocation), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            return Outcome("sandbox_error", error_type=type(exc).__name__, error_message=str(exc))
        record = self._record(invocation.work_dir.parent, process.pid)
        try:
            assert process.stdout is not None
            reader = _pump(process.stdout.fileno(), logs)
            killed_from_outside = False
            try:
                returncode = process.wait(timeout=limits.timeout_s + KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                killed_from_outside = True
                _kill_group(process.pid)
                returncode = process.wait()
            # Every process of the sandbox dies with its pid namespace, so the pipe closes.
            reader.join(timeout=5)
            process.stdout.close()
        finally:
            if process.poll() is None:  # the worker itself is being interrupted
                _kill_group(process.pid)
                process.wait()
            _quietly_unlink(record)
        duration_ms = (time.monotonic() - started) * 1000
        exit_code = 128 - returncode if returncode < 0 else returncode  # docker's convention: 128 + signal
        result = read_result_file(invocation.work_dir / "result.json")
        if _cpu_exhausted(result):
            text, truncated = logs.text(invocation.secrets)
            return Outcome("timeout", error_type="Timeout", duration_ms=duration_ms, logs=text,
                           logs_truncated=truncated, exit_code=exit_code,
                           error_message=f"the handler used up its CPU time ({_cpu_seconds(invocation):g} s)")
        oom = _looks_oom(result, bytes(logs.kept))
        return outcome(invocation, exit_code, oom, killed_from_outside, logs, duration_ms, result=result)

    def _environment(self, invocation: Invocation) -> dict[str, str]:
        """The wrapper's whole environment (the docker backend's contract plus what its image sets)."""
        limits = invocation.limits
        return {
            **invocation.env, "TRACE_RUNTIME": invocation.runtime, "_HANDLER": invocation.handler,
            "TRACE_EVENT_FILE": f"{WORK_MOUNT}/event.json", "TRACE_RESULT_FILE": f"{WORK_MOUNT}/result.json",
            "TRACE_TIMEOUT_S": str(limits.timeout_s), "TRACE_FUNCTION_NAME": invocation.function_name,
            "TRACE_MEMORY_MB": str(limits.memory_mb), "TRACE_GATEWAY": f"unix://{WORK_MOUNT}/gateway.sock",
            "PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "TZ": "UTC", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
        }

    def _argv(self, invocation: Invocation) -> list[str]:
        limits = invocation.limits
        memory = int(limits.memory_mb) << 20
        memory_kind = "data" if invocation.runtime == "nodejs" else "as"
        rlimits = [self.prlimit or "prlimit", f"--{memory_kind}={memory}", f"--nproc={int(limits.pids)}",
                   f"--cpu={_cpu_seconds(invocation)}", f"--fsize={FSIZE_LIMIT_BYTES}", "--core=0", "--"]
        mounts = [("--ro-bind", str(RUNTIME_DIR), RUNTIME_MOUNT),
                  ("--ro-bind", str(invocation.bundle_dir), TASK_MOUNT),
                  ("--bind", str(invocation.work_dir), WORK_MOUNT)]
        command = [self.python, f"{RUNTIME_MOUNT}/bootstrap.py"]
        return [*rlimits, *self._bwrap(mounts, chdir=TASK_MOUNT), *command]

    def _bwrap(self, mounts: list[tuple[str, str, str]], chdir: str = "/") -> list[str]:
        """bwrap and its options up to the ``--`` before the sandboxed command (and the uid drop)."""
        argv = [self.bwrap or "bwrap"]
        if self.as_root:
            argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        else:
            argv += ["--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
                     "--cap-drop", "ALL"]
        argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        binds: list[tuple[str, str, str]] = [("--ro-bind", "/usr", "/usr")]
        for entry in ROOT_ENTRIES:
            path = Path("/") / entry
            if path.is_symlink():
                argv += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                binds.append(("--ro-bind", str(path), str(path)))
        for entry in ETC_ENTRIES:
            path = Path("/etc") / entry
            if path.exists():
                binds.append(("--ro-bind", str(path), str(path)))
        if self._python_prefix:
            binds.append(("--ro-bind", self._python_prefix, self._python_prefix))
        binds += mounts
        made: set[str] = {"/"}
        for kind, source, dest in binds:
            # bwrap makes missing parents mode 0700 (owned by root): uid 10001 could not walk them.
            for parent in reversed(Path(dest).parents):
                if str(parent) not in made:
                    made.add(str(parent))
                    argv += ["--perms", "0755", "--dir", str(parent)]
            made.add(dest)
            argv += [kind, source, dest]
        argv += ["--size", str(TMP_SIZE_BYTES), "--perms", "1777", "--tmpfs", "/tmp",
                 "--proc", "/proc", "--dev", "/dev", "--chdir", chdir, "--"]
        if self.as_root:
            argv += [self.setpriv or "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        return argv

    def _find_python(self, wanted: str | None) -> tuple[str, str | None]:
        """A python3 >= 3.11 that starts inside the sandbox: /usr/bin/python3 first, else the one
        this venv was made from (its prefix is then bound read-only at the same path)."""
        candidates = [wanted] if wanted else [
            "/usr/bin/python3", os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
            os.path.realpath(sys.executable)]
        problems: list[str] = []
        for candidate in dict.fromkeys(candidates):
            if not os.path.isfile(candidate) or not os.access(candidate, os.X_OK):
                problems.append(f"{candidate}: missing")
                continue
            try:
                probe = subprocess.run([candidate, "-I", "-c", "import sys; print(sys.base_prefix)"],
                                       capture_output=True, text=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"{candidate}: {exc}")
                continue
            prefix = probe.stdout.strip()
            # /usr (and /usr/local) is bound anyway; a pyenv or /opt interpreter needs its prefix.
            self._python_prefix = None if prefix == "/usr" or prefix.startswith("/usr/") else prefix
            self.python = candidate
            problem = self._probe_sandbox()
            if problem is None:
                return candidate, self._python_prefix
            problems.append(f"{candidate}: {problem}")
        raise PlatformError("process sandbox: no python3 >= 3.11 starts inside bubblewrap: " + "; ".join(problems),
                            code="sandbox_unavailable")

    def _probe_sandbox(self) -> str | None:
        """Run the real sandbox once with a no-op program: a broken bwrap or interpreter fails here,
        at start, with its own message, rather than as every invocation's sandbox_error."""
        check = ("import sys, json, http.server, zipfile; assert sys.version_info >= (3, 11), sys.version; "
                 f"import os; assert os.getuid() == {SANDBOX_UID}, os.getuid()")
        with tempfile.TemporaryDirectory(prefix="trace-bwrap-probe-") as scratch:
            os.chmod(scratch, 0o755)
            argv = [*self._bwrap([("--ro-bind", str(RUNTIME_DIR), RUNTIME_MOUNT),
                                  ("--ro-bind", scratch, TASK_MOUNT)]), self.python, "-I", "-c", check]
            try:
                done = subprocess.run(argv, env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as exc:
                return str(exc)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-500:] or f"exit {done.returncode}"
        return None

    # -- orphans -----------------------------------------------------------------------------

    def _record(self, parent: Path, pid: int) -> Path | None:
        """Note a running sandbox (its process group) so a later worker can reap it."""
        folder = parent / PID_DIR
        with self._lock:
            self._state_dirs.add(parent)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = folder / f"{pid}.json"
            host, _, worker_pid = self.worker.rpartition(":")
            path.write_text(json.dumps({"pid": pid, "start_ticks": _start_ticks(pid), "worker_host": host,
                                        "worker_pid": int(worker_pid) if worker_pid.isdigit() else None,
                                        "started": time.time()}))
            return path
        except OSError as exc:
            log.warning("process sandbox: cannot record pid %s under %s: %s", pid, folder, exc)
            return None

    def reap_orphans(self) -> int:
        """Kill sandboxes whose worker process is gone, or that outlived any job; answers how many."""
        killed = 0
        host = socket.gethostname()
        for folder in self._pid_dirs():
            for path in sorted(folder.glob("*.json")):
                try:
                    record = json.loads(path.read_text())
                    pid = int(record["pid"])
                except (OSError, ValueError, KeyError, TypeError):
                    _quietly_unlink(path)
                    continue
                if _start_ticks(pid) != record.get("start_ticks") or record.get("start_ticks") is None:
                    _quietly_unlink(path)  # already gone (or the pid now belongs to someone else)
                    continue
                worker_pid = record.get("worker_pid")
                worker_dead = (record.get("worker_host") == host and isinstance(worker_pid, int)
                               and not pid_alive(worker_pid))
                too_old = time.time() - float(record.get("started") or 0) > self.orphan_age_s
                if worker_dead or too_old:
                    _kill_group(pid)
                    _quietly_unlink(path)
                    killed += 1
        return killed

    def _pid_dirs(self) -> list[Path]:
        parents = set(self._state_dirs)
        try:
            parents.add(current_settings().home_path / "sandboxes")  # where the udf operator makes work dirs
        except Exception as exc:  # settings that do not parse must not stop the reaper
            log.debug("process sandbox: no default sandboxes dir: %s", exc)
        return [parent / PID_DIR for parent in sorted(parents) if (parent / PID_DIR).is_dir()]


def _require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise PlatformError(f"process sandbox: {program} is missing (apt-get install {package})",
                            code="sandbox_unavailable")
    return path


def _cpu_seconds(invocation: Invocation) -> int:
    """RLIMIT_CPU, per process: above the wall clock, so a single busy thread meets the deadline first."""
    return math.ceil(invocation.limits.timeout_s + KILL_GRACE_S) + 1


def _cpu_exhausted(result: Any) -> bool:
    return (isinstance(result, dict) and result.get("status") == "exited"
            and result.get("exit_code") == -int(signal.SIGXCPU))


def _looks_oom(result: Any, kept: bytes) -> bool:
    """Best effort (no cgroup, no OOM killer event): the runtime failed to allocate."""
    if isinstance(result, dict):
        if result.get("status") not in ("error", "init_error", "exited"):
            return False
        error = result.get("error") or {}
        if isinstance(error, dict):
            if str(error.get("errorType")) == "MemoryError":
                return True
            message = str(error.get("errorMessage") or "")
            if any(sign in message for sign in OOM_SIGNS):
                return True
    text = kept.decode("utf-8", errors="replace")
    return any(sign in text for sign in OOM_SIGNS)


def _pump(fd: int, logs: CappedLog) -> threading.Thread:
    def pump() -> None:
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return
                logs.feed(chunk)
        except OSError:
            return

    thread = threading.Thread(target=pump, name="sandbox-logs", daemon=True)
    thread.start()
    return thread


def _kill_group(pid: int) -> None:
    """SIGKILL the sandbox's process group: bwrap dies, and with its pid-1 the whole pid namespace."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rpartition(")")[2].split()[19])
    except (IndexError, ValueError):
        return None


def _quietly_unlink(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass
