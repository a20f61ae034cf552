"""The Docker backend: one fresh container per invocation, locked down.

No network at all (``network_mode=none``: only the container's own loopback, where the
Runtime API listens), a read-only root with a tmpfs ``/tmp``, every capability
dropped, ``no-new-privileges``, a non-root user, and memory (no swap), CPU and pids
limits. The bundle is mounted read-only at ``/var/task``; a private folder at
``/run/trace`` carries the event in, the result out, and the task gateway's socket. That
folder is a size-capped tmpfs on the host, and the result is read from it as hostile input
(:mod:`workers.sandbox.hostile_files`).
The container is removed in every case, in the background once the outcome is known
(the attempt does not wait for clean-up; :meth:`DockerBackend.drain` does); containers of
a dead worker are found by their labels and removed by :meth:`DockerBackend.reap_orphans`.

The container's command is picked per runtime (:func:`container_command`), not the image's
CMD: under the 0.25 vCPU quota every millisecond of CPU in the container costs up to four of
wall time, so a `nodejs` sandbox runs the Node wrapper (no Python at all) and the others
import the Python wrapper from its bytecode instead of compiling it as a script.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig
from docker.utils.socket import frames_iter
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout

from . import RUNTIME_IMAGES, CappedLog, Invocation, Outcome
from .outcome import outcome as _outcome
from .outcome import pid_alive, work_area
from .outcome import prepare_work_dir as _prepare_work_dir

log = logging.getLogger(__name__)

SANDBOX_USER = "10001:10001"
LABEL = "org.trace.sandbox"
LABEL_WORKER = "org.trace.worker"
LABEL_STARTED = "org.trace.started"
# The wrapper enforces the deadline itself and reports `timeout`; this is the outer
# bound after which the container is killed from outside.
KILL_GRACE_S = 1.5
RUNTIME_DIR = "/opt/trace/runtime"  # workers/runtime/ in the images
# `python3 bootstrap.py` would compile the wrapper from source at every start (~10 ms of CPU); imported, it
# loads from the image's bytecode. sys.path[0] (the working directory, i.e. the bundle, under -c) is replaced;
# exit_now skips the interpreter's finalization (~5 ms).
PYTHON_WRAPPER = ["/usr/bin/python3", "-c",
                  f"import sys; sys.path[0] = {RUNTIME_DIR!r}; import bootstrap; bootstrap.exit_now(bootstrap.main())"]
# From the Node wrapper's startup snapshot where the image has one (~45 ms of CPU to start instead of ~100;
# deploy/images/build.sh makes it), else the same wrapper as a script. `exec`: node is the container's pid 1.
NODE_SNAPSHOT = f"{RUNTIME_DIR}/node_bootstrap.blob"
NODE_WRAPPER = ["/bin/sh", "-c", f'if [ -r {NODE_SNAPSHOT} ]; then exec /usr/bin/node --snapshot-blob {NODE_SNAPSHOT}; '
                                 f'fi; exec /usr/bin/node {RUNTIME_DIR}/node_bootstrap.js']


def container_command(runtime: str) -> list[str]:
    """The wrapper to start for a runtime: the same contract (environment in, result file out) either way."""
    return NODE_WRAPPER if runtime == "nodejs" else PYTHON_WRAPPER


class DockerBackend:
    name = "docker"

    def __init__(self, client: docker.DockerClient | None = None, *, worker: str | None = None,
                 orphan_age_s: float = 3600.0, remove_in_background: bool = True) -> None:
        self.client = client or docker.from_env(version="auto", timeout=30)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.orphan_age_s = orphan_age_s
        self.remove_in_background = remove_in_background
        self._removals: set[threading.Thread] = set()
        self._removals_lock = threading.Lock()

    def run(self, invocation: Invocation) -> Outcome:
        image = RUNTIME_IMAGES.get(invocation.runtime)
        if image is None:
            return Outcome("sandbox_error", error_type="UnknownRuntime",
                           error_message=f"no runtime image for {invocation.runtime!r}")
        # The work dir is a size-capped tmpfs until the result is read (workers/sandbox/hostile_files.py).
        with work_area(invocation):
            try:
                _prepare_work_dir(invocation)
            except OSError as exc:  # e.g. an event larger than the work dir's cap
                return Outcome("sandbox_error", error_type="WorkDirUnavailable",
                               error_message=f"cannot prepare the sandbox's folder: {exc}")
            return self._run(invocation, image)

    def _run(self, invocation: Invocation, image: str) -> Outcome:
        started = time.monotonic()
        api = self.client.api
        # The low-level API throughout: the models layer would inspect the container after creating it, and
        # again in attach() to learn whether it has a TTY (ours never has); ~2 ms per round trip.
        try:
            container = api.create_container(image, container_command(invocation.runtime),
                                             **self._create_args(invocation))["Id"]
        except ImageNotFound:
            return Outcome("sandbox_error", error_type="ImageNotFound",
                           error_message=f"image {image} is missing: run `make images`")
        except (APIError, DockerException) as exc:
            return Outcome("sandbox_error", error_type=type(exc).__name__, error_message=str(exc))
        logs = CappedLog()
        try:
            reader = self._attach(container, logs)
            api.start(container)
            killed_from_outside = False
            try:
                # types-docker says int; docker-py hands it to requests, which takes seconds as a float.
                status = api.wait(container, timeout=invocation.limits.timeout_s + KILL_GRACE_S)  # type: ignore[arg-type]
            except (ReadTimeout, RequestsConnectionError):
                killed_from_outside = True
                _quietly(lambda: api.kill(container))
                status = api.wait(container, timeout=10)
            reader.join(timeout=5)
            duration_ms = (time.monotonic() - started) * 1000
            exit_code = status.get("StatusCode")
            # The wrapper exits 0 only after writing an ok result: only another end needs the OOM flag.
            oom = exit_code != 0 and bool(api.inspect_container(container)["State"].get("OOMKilled"))
            return _outcome(invocation, exit_code, oom, killed_from_outside, logs, duration_ms)
        except (APIError, DockerException) as exc:
            return Outcome("sandbox_error", error_type=type(exc).__name__, error_message=str(exc),
                           duration_ms=(time.monotonic() - started) * 1000)
        finally:
            self._remove(container)

    def _remove(self, container: str) -> None:
        """Remove the container: in a thread of its own, so the attempt is recorded without waiting for it
        (a worker killed meanwhile leaves it to :meth:`reap_orphans`)."""
        if not self.remove_in_background:
            _quietly(lambda: self.client.api.remove_container(container, force=True))
            return

        def remove() -> None:
            try:
                _quietly(lambda: self.client.api.remove_container(container, force=True))
            finally:
                with self._removals_lock:
                    self._removals.discard(threading.current_thread())

        # Not a daemon: a worker exiting normally finishes its removals first.
        thread = threading.Thread(target=remove, name="sandbox-remove")
        with self._removals_lock:
            self._removals.add(thread)
        thread.start()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait for the background removals started so far; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._removals_lock:
            pending = list(self._removals)
        for thread in pending:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._removals_lock:
            return not any(thread.is_alive() for thread in self._removals)

    def _container_options(self, invocation: Invocation) -> dict[str, Any]:
        limits = invocation.limits
        environment = {
            **invocation.env, "TRACE_RUNTIME": invocation.runtime, "_HANDLER": invocation.handler,
            "TRACE_EVENT_FILE": "/run/trace/event.json", "TRACE_RESULT_FILE": "/run/trace/result.json",
            "TRACE_TIMEOUT_S": str(limits.timeout_s), "TRACE_FUNCTION_NAME": invocation.function_name,
            "TRACE_MEMORY_MB": str(limits.memory_mb), "TRACE_GATEWAY": "unix:///run/trace/gateway.sock",
        }
        return {
            "environment": environment, "user": SANDBOX_USER, "network_mode": "none", "read_only": True,
            "tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m,mode=1777"}, "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"], "mem_limit": f"{limits.memory_mb}m",
            "memswap_limit": f"{limits.memory_mb}m", "nano_cpus": int(limits.cpu * 1e9),
            "pids_limit": limits.pids, "ipc_mode": "private", "working_dir": "/var/task",
            "volumes": {str(invocation.bundle_dir): {"bind": "/var/task", "mode": "ro"},
                        str(invocation.work_dir): {"bind": "/run/trace", "mode": "rw"}},
            "labels": {**invocation.labels, LABEL: "1", LABEL_WORKER: self.worker,
                       LABEL_STARTED: str(int(time.time()))},
            # Output is streamed through attach and capped there; nothing piles up on disk.
            "log_config": {"type": "none"}, "detach": True, "stdin_open": False, "tty": False,
        }

    def _create_args(self, invocation: Invocation) -> dict[str, Any]:
        """:meth:`_container_options` (the models layer's words) as ``APIClient.create_container`` takes them."""
        options = self._container_options(invocation)
        binds = options["volumes"]
        host_config = self.client.api.create_host_config(
            binds=binds, log_config=LogConfig(**options["log_config"]),
            **{key: options[key] for key in ("network_mode", "read_only", "tmpfs", "cap_drop", "security_opt",
                                             "mem_limit", "memswap_limit", "nano_cpus", "pids_limit", "ipc_mode")})
        return {"environment": options["environment"], "user": options["user"], "working_dir": options["working_dir"],
                "labels": options["labels"], "volumes": [bind["bind"] for bind in binds.values()],
                "detach": options["detach"], "stdin_open": options["stdin_open"], "tty": options["tty"],
                "host_config": host_config}

    def _attach(self, container: str, logs: CappedLog) -> threading.Thread:
        """Stream the container's stdout and stderr into ``logs`` (attached before start: nothing is missed)."""
        sock = self.client.api.attach_socket(container, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0})

        def pump() -> None:
            try:
                for _, chunk in frames_iter(sock, False):  # no TTY: multiplexed frames
                    logs.feed(chunk)
            except Exception:
                pass
            finally:
                # The attach socket is the caller's to close (docker-py): the socket-like object, the socket
                # under it, then the response that still holds a file object on it; else one socket leaks
                # per invocation.
                for close in (getattr(sock, "close", None), getattr(getattr(sock, "_sock", None), "close", None),
                              getattr(getattr(sock, "_response", None), "close", None)):
                    try:
                        if close is not None:
                            close()
                    except Exception:
                        pass

        thread = threading.Thread(target=pump, name="sandbox-logs", daemon=True)
        thread.start()
        return thread

    def reap_orphans(self) -> int:
        """Remove sandbox containers whose worker process is gone, or that outlived any job."""
        removed = 0
        host = socket.gethostname()
        for container in self.client.containers.list(all=True, filters={"label": LABEL}):
            labels = container.labels
            worker_host, _, pid = labels.get(LABEL_WORKER, "").rpartition(":")
            age = time.time() - int(labels.get(LABEL_STARTED, "0") or 0)
            dead = worker_host == host and pid.isdigit() and not pid_alive(int(pid))
            if dead or age > self.orphan_age_s:
                try:
                    container.remove(force=True)
                except NotFound:
                    continue  # removed meanwhile by someone else
                except (APIError, RequestsConnectionError) as exc:
                    log.warning("could not remove orphan sandbox %s: %s", container.short_id, exc)
                    continue
                removed += 1
        return removed


def _quietly(action: Any) -> None:
    try:
        action()
    except (NotFound, APIError, DockerException, RequestsConnectionError):
        pass
