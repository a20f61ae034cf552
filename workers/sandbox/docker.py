"""The Docker backend: one fresh container per invocation, locked down.

No network at all (``network_mode=none``: only the container's own loopback, where the
Runtime API listens), a read-only root with a tmpfs ``/tmp``, every capability
dropped, ``no-new-privileges``, a non-root user, and memory (no swap), CPU and pids
limits. The bundle is mounted read-only at ``/var/task``; a private folder at
``/run/trace`` carries the event in, the result out, and the task gateway's socket.
The container is removed in every case; containers of a dead worker are found by
their labels and removed by :meth:`DockerBackend.reap_orphans`.
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
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout

from . import RUNTIME_IMAGES, CappedLog, Invocation, Outcome
from .outcome import outcome as _outcome
from .outcome import prepare_work_dir as _prepare_work_dir

log = logging.getLogger(__name__)

SANDBOX_USER = "10001:10001"
LABEL = "org.trace.sandbox"
LABEL_WORKER = "org.trace.worker"
LABEL_STARTED = "org.trace.started"
# The wrapper enforces the deadline itself and reports `timeout`; this is the outer
# bound after which the container is killed from outside.
KILL_GRACE_S = 1.5


class DockerBackend:
    name = "docker"

    def __init__(self, client: docker.DockerClient | None = None, *, worker: str | None = None,
                 orphan_age_s: float = 3600.0) -> None:
        self.client = client or docker.from_env(version="auto", timeout=30)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.orphan_age_s = orphan_age_s

    def run(self, invocation: Invocation) -> Outcome:
        image = RUNTIME_IMAGES.get(invocation.runtime)
        if image is None:
            return Outcome("sandbox_error", error_type="UnknownRuntime",
                           error_message=f"no runtime image for {invocation.runtime!r}")
        _prepare_work_dir(invocation)
        started = time.monotonic()
        try:
            container = self.client.containers.create(image, **self._container_options(invocation))
        except ImageNotFound:
            return Outcome("sandbox_error", error_type="ImageNotFound",
                           error_message=f"image {image} is missing: run `make images`")
        except (APIError, DockerException) as exc:
            return Outcome("sandbox_error", error_type=type(exc).__name__, error_message=str(exc))
        logs = CappedLog()
        try:
            reader = self._attach(container, logs)
            container.start()
            killed_from_outside = False
            try:
                status = container.wait(timeout=invocation.limits.timeout_s + KILL_GRACE_S)
            except (ReadTimeout, RequestsConnectionError):
                killed_from_outside = True
                _quietly(container.kill)
                status = container.wait(timeout=10)
            reader.join(timeout=5)
            duration_ms = (time.monotonic() - started) * 1000
            state = self.client.api.inspect_container(container.id)["State"]
            return _outcome(invocation, status.get("StatusCode"), bool(state.get("OOMKilled")), killed_from_outside,
                            logs, duration_ms)
        except (APIError, DockerException) as exc:
            return Outcome("sandbox_error", error_type=type(exc).__name__, error_message=str(exc),
                           duration_ms=(time.monotonic() - started) * 1000)
        finally:
            _quietly(lambda: container.remove(force=True))

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

    def _attach(self, container: Any, logs: CappedLog) -> threading.Thread:
        stream = container.attach(stdout=True, stderr=True, stream=True, logs=False)

        def pump() -> None:
            try:
                for chunk in stream:
                    logs.feed(chunk)
            except Exception:
                pass
            finally:
                # The attach socket is the caller's to close (docker-py): shut it down, then release the
                # response that still holds a file object on it; else one socket leaks per invocation.
                for close in (stream.close, getattr(getattr(stream, "_response", None), "close", None)):
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
            dead = worker_host == host and pid.isdigit() and not _pid_alive(int(pid))
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


def _pid_alive(pid: int) -> bool:
    """A zombie counts as dead: a SIGKILLed worker's children linger as zombies until reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _quietly(action: Any) -> None:
    try:
        action()
    except (NotFound, APIError, DockerException, RequestsConnectionError):
        pass
