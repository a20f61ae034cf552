"""The sandbox's entry point: serve the AWS Lambda Runtime API for ONE invocation, run the bundle, report.

Why a Runtime API rather than a bespoke stdin/stdout contract: standard Lambda runtime clients
(awslambdaric, the Node runtime, Rust's lambda_runtime, a `provided` bootstrap) then run unmodified.
Why exactly one invocation: every UDF invocation gets a fresh container (see DESIGN.md, "Execution").

Standard library only, imports nothing from the project: this file is copied into the runtime images.

Why it is lean: the sandbox runs under a CFS quota (0.25 vCPU = 25 ms of CPU per 100 ms period).
Starting the container already spends ~22 ms of that budget inside the container's cgroup and the
interpreter ~8 ms more; every millisecond of CPU beyond the first period's budget costs wall time
at 4x, in whole periods. So the hot path imports only C modules (``_socket``, ``select``, ``_json``,
``_signal``; not http.server, http.client, subprocess, json, signal, threading or typing: ~60 ms of CPU
between them, much of it ``enum`` and ``re``), speaks HTTP/1.1 with a small single-threaded ``poll``
loop, and does not start a second interpreter for Python handlers:

    python3.11  the built-in loop (python_loop.py) runs in a FORK of this process: no interpreter
                start and no imports to pay twice, yet still a process of its own (``os._exit``, a
                crash, signal handlers, a SIGTERM that is ignored and the process-group kill keep
                their meaning), in its own session, with stdin on /dev/null, unbuffered stdio, and
                an ``os.environ`` rebuilt from the contract below before the handler is imported. It
                is a real Runtime API client: it GETs ``next`` and POSTs its answer over loopback.
    nodejs      ``node node_loop.js`` as a child process (the Docker backend runs node_bootstrap.js
                instead: the same contract written in Node, so no Python starts in a Node sandbox).
    provided    the bundle's executable ``bootstrap`` as a child process.

Environment contract (set by the platform):
    TRACE_RUNTIME           python3.11 | nodejs | provided
    _HANDLER                e.g. ``trace.handler`` (ignored by most ``provided`` bootstraps)
    TRACE_EVENT             the event JSON inline; wins over TRACE_EVENT_FILE
    TRACE_EVENT_FILE        path of the event JSON (default /run/trace/event.json)
    TRACE_TIMEOUT_S         deadline in seconds (default 60)
    TRACE_FUNCTION_NAME     default ``trace-udf``
    TRACE_MEMORY_MB         default 512
    TRACE_REQUEST_ID        default a fresh uuid4
    TRACE_RESULT_FILE       where the one result line goes (default /run/trace/result.json)
    TRACE_TASK_ROOT         the unpacked bundle (default /var/task; tests point it elsewhere)
    TRACE_RUNTIME_API_PORT  fixed port for the Runtime API (default: a free one)
    TRACE_CAPABILITY_TOKEN  passed to the runtime process (the only credential)
    TRACE_GATEWAY           passed to the runtime process (default unix:///run/trace/gateway.sock)
    PATH                    passed to the runtime process (default the Debian one)
Everything else in this process's environment stays here.

The result document (one JSON line): status (ok | error | init_error | timeout | exited), response,
error ({errorMessage, errorType, stackTrace}), duration_ms, exit_code, and peak_memory_bytes (the
sandbox's memory high-water mark from its cgroup, v1 or v2; null where unreadable).
"""

from __future__ import annotations

import _signal
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))
if RUNTIME_DIR not in sys.path:  # loaded by path (tests) rather than run from its folder
    sys.path.insert(0, RUNTIME_DIR)
from runtime_api import (  # noqa: E402 - needs the line above
    REGION,
    Invocation,
    RuntimeAPIServer,
    _error,
    _log,
    _uuid4,
    json_dumps,
    json_loads,
)

PYTHON_LOOP = os.path.join(RUNTIME_DIR, "python_loop.py")
# deploy/images/node-libraries.txt, installed by build.sh beside the runtime dir (/opt/trace/node_modules)
VETTED_NODE_MODULES = os.path.join(os.path.dirname(RUNTIME_DIR), "node_modules")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GATEWAY = "unix:///run/trace/gateway.sock"
RESULT_MARKER = "__TRACE_RESULT__"
# The sandbox's memory high-water mark: cgroup v1 (Docker on a v1 host), then v2.
PEAK_MEMORY_FILES = ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak")


def child_environment(runtime: str, handler: str, task_root: str, port: int, env: dict[str, str]) -> dict[str, str]:
    """The Lambda environment for the runtime process, built from scratch so nothing else leaks in."""
    name = env.get("TRACE_FUNCTION_NAME") or "trace-udf"
    request_id = env.get("TRACE_REQUEST_ID") or ""
    # The SDK importable without vendoring it; for node, the image's vetted libraries after the bundle's own
    # node_modules (python's are in dist-packages, after the task root on sys.path).
    search_path = f"{task_root}:{RUNTIME_DIR}"
    node_path = f"{search_path}:{VETTED_NODE_MODULES}"
    child = {
        "_HANDLER": handler,
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": RUNTIME_DIR,
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{port}",
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": env.get("TRACE_MEMORY_MB") or "512",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": f"{time.strftime('%Y/%m/%d', time.gmtime())}/[$LATEST]{request_id}",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "TZ": "UTC",
        "LANG": "C.UTF-8",
        "PATH": env.get("PATH") or DEFAULT_PATH,
        "HOME": "/tmp",
        "TRACE_GATEWAY": env.get("TRACE_GATEWAY") or DEFAULT_GATEWAY,
        "PYTHONPATH": search_path,
        "NODE_PATH": node_path,
    }
    if runtime == "python3.11":
        child["PYTHONUNBUFFERED"] = "1"  # logs reach the platform in order, even if the process is killed
        child["PYTHONDONTWRITEBYTECODE"] = "1"  # the task root is read-only
    if "TRACE_CAPABILITY_TOKEN" in env:
        child["TRACE_CAPABILITY_TOKEN"] = env["TRACE_CAPABILITY_TOKEN"]
    return child


def runtime_command(runtime: str, task_root: str) -> list[str] | None:
    """The runtime process for a runtime name (None: the forked Python loop); raises ValueError with the
    Lambda error type as its first arg."""
    if runtime == "python3.11":
        return None
    if runtime == "nodejs":
        return ["node", os.path.join(RUNTIME_DIR, "node_loop.js")]
    if runtime == "provided":
        path = os.path.join(task_root, "bootstrap")
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ValueError("Runtime.InvalidEntrypoint", f"{path} is missing or not executable")
        return [path]
    raise ValueError("Runtime.InvalidRuntime", f"unknown runtime {runtime!r} (python3.11 | nodejs | provided)")


def load_event(env: dict[str, str]) -> bytes:
    """The event bytes, checked to be JSON so a platform bug shows up as one clear error."""
    if env.get("TRACE_EVENT") is not None:
        raw = env["TRACE_EVENT"].encode()
    else:
        with open(env.get("TRACE_EVENT_FILE") or "/run/trace/event.json", "rb") as handle:
            raw = handle.read()
    json_loads(raw)
    return raw


class Child:
    """The runtime process: its pid, a pidfd to wait on where the kernel has them, its exit code once reaped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.fd = None

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal) if it ended; reaps it."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.close()
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.fd is not None:
                waiter = select.poll()
                waiter.register(self.fd, select.POLLIN)
                waiter.poll(int(left * 1000) + 1)
            else:
                time.sleep(min(0.005, left))
        return self.returncode

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def terminate(child: Child) -> None:
    """SIGTERM then SIGKILL after 1 s, to the child's whole process group (a bootstrap script's children too)."""
    for sig, grace in ((_signal.SIGTERM, 1.0), (_signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if child.returncode is None:
            try:
                os.kill(child.pid, sig)  # also before it made its own session (a kill right after the fork)
            except (ProcessLookupError, PermissionError):
                pass
        if child.wait(grace) is not None:
            break


def _signal_name(number: int) -> str:
    """SIGKILL for 9 (the `signal` module would cost its enum import on every start)."""
    for name in dir(_signal):
        if name.startswith("SIG") and not name.startswith(("SIG_", "SIGRT")) and getattr(_signal, name) == number:
            return name
    return str(number)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _detach_child(cwd: str) -> None:
    """In a fresh child: its own session (so the process-group kill reaches everything it starts), stdin
    on /dev/null, stderr on stdout's pipe (one log stream in write order, as Lambda's log stream: two
    pipes would let the engine interleave them mid-line), the task root as working directory."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(1, 2)
    os.chdir(cwd)


def spawn(command: list[str], env: dict[str, str], cwd: str) -> int:
    """fork + exec ``command`` (PATH looked up in ``env``) in its own session; OSError if it cannot start."""
    read_end, write_end = os.pipe()  # close-on-exec: EOF tells the exec worked
    _flush_stdio()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _detach_child(cwd)
            for name in ("SIGPIPE", "SIGXFSZ"):  # what Python ignores, a runtime gets back (as subprocess does)
                if hasattr(_signal, name):
                    _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
            os.execvpe(command[0], command, env)
        except BaseException as exc:
            try:
                os.write(write_end, f"{getattr(exc, 'errno', None) or 0}:{exc}".encode(errors="replace"))
            finally:
                os._exit(127)
    os.close(write_end)
    chunks = []
    while True:
        data = os.read(read_end, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(read_end)
    if chunks:
        os.waitpid(pid, 0)
        number, _, message = b"".join(chunks).decode(errors="replace").partition(":")
        raise OSError(int(number or 0), message)
    return pid


_kept_streams: list[Any] = []  # the replaced stdio objects: never finalized, so fds 1 and 2 stay open


def _unbuffered_stdio() -> None:
    """What PYTHONUNBUFFERED gives a fresh interpreter: unbuffered binary layer, write-through text layer."""
    import io

    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        if old is None:
            continue
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=old.encoding, errors=old.errors,
                                  newline="\n", line_buffering=False, write_through=True)
        stream.mode = "w"  # type: ignore[misc]  # typeshed: read-only; a TextIOWrapper takes it, as io.open sets it
        _kept_streams.append(old)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _python_child(env: dict[str, str], task_root: str) -> int:
    """The forked runtime process: become what ``python3 python_loop.py`` with ``env`` would be, then loop."""
    _detach_child(task_root)
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    sys.argv = [PYTHON_LOOP]
    sys.dont_write_bytecode = True
    _unbuffered_stdio()
    if RUNTIME_DIR not in sys.path:
        sys.path.insert(0, RUNTIME_DIR)
    import python_loop

    python_loop.use_json(json_loads, json_dumps)
    # The search path of `python3 python_loop.py` under PYTHONPATH=<task root>:<runtime dir>; and our own
    # modules out of sys.modules, so a bundle's module named like one of them is importable.
    sys.path[:] = [task_root, RUNTIME_DIR, *(entry for entry in sys.path if entry not in ("", task_root, RUNTIME_DIR))]
    for name in ("bootstrap", "runtime_api", "python_loop"):
        sys.modules.pop(name, None)
    sys.modules["__main__"] = python_loop
    return python_loop.main()


def _exit_code(exc: SystemExit) -> int:
    """The process exit code a fresh interpreter gives ``sys.exit(value)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _finish_child(code: int) -> None:
    """Exit like an interpreter would (non-daemon threads joined, atexit run, stdio flushed), never
    unwinding into the wrapper's frames."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # nothing may stop the exit
        pass
    _flush_stdio()
    os._exit(code)


def fork_python_loop(env: dict[str, str], task_root: str, server: RuntimeAPIServer) -> int:
    """Fork the Python runtime process (see the module docstring); the child never returns."""
    _flush_stdio()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        server.close()
        code = _python_child(env, task_root)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        code = 1
    finally:
        _finish_child(code)
    return 0  # not reached


def peak_memory_bytes() -> int | None:
    """The sandbox's memory high-water mark (its cgroup's, so the runtime and everything it started); None
    when there is no cgroup file to read."""
    for path in PEAK_MEMORY_FILES:
        try:
            with open(path, "rb") as handle:
                return int(handle.read().strip())
        except (OSError, ValueError):
            continue
    return None


def write_result(result: dict[str, Any], env: dict[str, str]) -> None:
    """One JSON line to the result file; stdout after a marker line if the file cannot be written."""
    line = json_dumps(result, default=str) + "\n"
    try:
        with open(env.get("TRACE_RESULT_FILE") or "/run/trace/result.json", "w", encoding="utf-8") as handle:
            handle.write(line)
    except OSError as exc:
        _log(f"cannot write the result file ({exc}); printing it to stdout")
        sys.stdout.write(f"{RESULT_MARKER}\n{line}")
        sys.stdout.flush()


def run(env: dict[str, str]) -> dict[str, Any]:
    """Run one invocation end to end and return the result document."""
    started = time.monotonic()
    timeout_s = float(env.get("TRACE_TIMEOUT_S") or 60)
    deadline = started + timeout_s

    outcome_at: list[float] = []  # when the outcome was known: clean-up (the kill grace) is not the UDF's time

    def result(status: str, error: dict[str, Any] | None = None, response: Any = None,
               exit_code: int | None = None) -> dict[str, Any]:
        ended = outcome_at[0] if outcome_at else time.monotonic()
        return {"status": status, "response": response, "error": error,
                "duration_ms": round((ended - started) * 1000, 3), "exit_code": exit_code,
                "peak_memory_bytes": peak_memory_bytes()}

    runtime = env.get("TRACE_RUNTIME") or "python3.11"
    task_root = env.get("TRACE_TASK_ROOT") or "/var/task"
    try:
        event = load_event(env)
    except (OSError, ValueError) as exc:
        return result("error", _error(f"cannot read the event: {exc}", "Trace.InvalidEvent"))
    try:
        command = runtime_command(runtime, task_root)
    except ValueError as exc:
        return result("init_error", _error(exc.args[1], exc.args[0]))

    request_id = env.get("TRACE_REQUEST_ID") or _uuid4()
    env = {**env, "TRACE_REQUEST_ID": request_id}
    invocation = Invocation(request_id, event, int((time.time() + timeout_s) * 1000),
                            env.get("TRACE_FUNCTION_NAME") or "trace-udf")
    server = RuntimeAPIServer(invocation, int(env.get("TRACE_RUNTIME_API_PORT") or 0))
    child_env = child_environment(runtime, env.get("_HANDLER", ""), task_root, server.server_address[1], env)
    try:
        if command is None:
            pid = fork_python_loop(child_env, task_root, server)
        else:
            pid = spawn(command, child_env, task_root)
    except OSError as exc:
        server.stop()
        what = command[0] if command else "the python loop"
        return result("init_error", _error(f"cannot start {what}: {exc}", "Runtime.InvalidEntrypoint"))
    child = Child(pid)

    # SIGTERM (the platform stopping us) ends the wait; the wakeup fd makes poll() return at once.
    terminated: list[bool] = []
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    previous_wakeup = _signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    previous_handler = _signal.signal(_signal.SIGTERM, lambda *_: terminated.append(True))
    server.watch(wake_read, lambda: os.read(wake_read, 512))
    if child.fd is not None:
        pidfd = child.fd

        def child_exited() -> None:
            server.unwatch(pidfd)  # poll() closes the pidfd once it reaped the child
            child.poll()

        server.watch(pidfd, child_exited)
    try:
        while invocation.status is None and not terminated:
            if child.returncode is not None or (child.fd is None and child.poll() is not None):
                server.drain()  # an answer it sent just before exiting
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            server.poll_once(left if child.fd is not None else min(left, 0.02))
        outcome_at.append(time.monotonic())
        exit_code = child.poll()  # read before we stop it: only a code of its own making is reported
        terminate(child)
        server.stop()
    finally:
        _signal.signal(_signal.SIGTERM, previous_handler)
        _signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)
        child.close()
    status, response, error = invocation.status, invocation.response, invocation.error
    if status is not None:
        return result(status, error, response, exit_code)
    if exit_code is not None:
        how = f"exit status {exit_code}" if exit_code >= 0 else f"signal {_signal_name(-exit_code)}"
        return result("exited", _error(f"Runtime exited without answering: {how}", "Runtime.ExitError"),
                      exit_code=exit_code)
    if time.monotonic() >= deadline:
        return result("timeout", _error(f"Task timed out after {timeout_s:.2f} seconds", "Sandbox.Timedout"))
    return result("error", _error("the wrapper was terminated", "Sandbox.Terminated"))


def main() -> int:
    """Entry point: exit 0 only for an ok outcome, so `docker wait` alone tells success."""
    env = dict(os.environ)
    try:
        outcome = run(env)
    except Exception as exc:  # the platform must always get a result line
        outcome = {"status": "error", "response": None, "error": _error(repr(exc), "Trace.WrapperError"),
                   "duration_ms": 0.0, "exit_code": None, "peak_memory_bytes": peak_memory_bytes()}
    write_result(outcome, env)
    return 0 if outcome["status"] == "ok" else 1


def exit_now(code: int) -> None:
    """Exit without the interpreter's finalization (~5 ms of the sandbox's CPU, tearing down every module):
    once the result is written and the runtime stopped, nothing is left to clean up. The Docker backend's
    command ends with this; run as a script, the wrapper exits the ordinary way."""
    _flush_stdio()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
