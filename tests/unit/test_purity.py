"""The purity guard of tests/unit (tests/unit/conftest.py): each way out of a pure test is refused.

Each test below does, inside a unit test, one thing a unit test must not do, and asserts that the
guard stopped it (``guard.expected()`` takes the violation back so that this test itself passes).
Nothing here reaches anything: every attempt is refused before the system call.
"""

from __future__ import annotations

import _socket
import ctypes
import os
import socket
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine

from tests.unit.conftest import Guard, _guarded, forbidden


def test_a_loopback_connect_is_refused(guard: Guard) -> None:
    with guard.expected() as caught, socket.socket() as sock:
        sock.connect(("127.0.0.1", 9))
    assert caught == ["uses the network (socket.connect ('127.0.0.1', 9))"]


def test_a_listening_server_is_refused(guard: Guard) -> None:
    with guard.expected() as caught, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
    assert caught[0].startswith("uses the network (socket.bind")


def test_a_unix_socket_is_a_socket_too(guard: Guard, tmp_path: Path) -> None:
    with guard.expected() as caught, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(tmp_path / "gateway.sock"))
    assert "socket.connect" in caught[0]


def test_the_c_socket_module_below_socket_socket_is_seen(guard: Guard) -> None:
    sock = _socket.socket()
    try:
        with guard.expected() as caught:
            sock.connect(("127.0.0.1", 9))
    finally:
        sock.close()
    assert "socket.connect" in caught[0]


def test_a_name_lookup_is_refused(guard: Guard) -> None:
    with guard.expected() as caught:
        socket.getaddrinfo("localhost", 80)
    assert caught == ["uses the network (socket.getaddrinfo 'localhost')"]


@pytest.mark.parametrize("start", [
    lambda: subprocess.run(["true"], check=False),
    lambda: os.system("true"),
    os.fork,
    lambda: os.posix_spawn("/bin/true", ["true"], {}),
], ids=["subprocess", "os.system", "os.fork", "posix_spawn"])
def test_starting_a_process_is_refused(guard: Guard, start: Any) -> None:
    with guard.expected() as caught:
        start()
    assert caught[0].startswith("starts a process")


def test_a_mount_through_ctypes_is_refused(guard: Guard) -> None:
    with guard.expected() as caught:
        ctypes.CDLL(None, use_errno=True).mount  # noqa: B018 (looking the symbol up is the act)
    assert caught == ["mounts (ctypes mount)"]


def test_a_database_connection_is_refused(guard: Guard) -> None:
    with guard.expected() as caught:
        psycopg.connect("host=127.0.0.1 port=1 dbname=none")
    assert caught == ["connects to a database (psycopg)"]


def test_sqlalchemy_reaches_the_database_through_the_same_refusal(guard: Guard) -> None:
    engine = create_engine("postgresql+psycopg://trace@127.0.0.1:1/none")
    with guard.expected() as caught:
        engine.connect()
    engine.dispose()
    assert caught == ["connects to a database (psycopg)"]


def test_code_that_swallows_the_error_does_not_hide_the_violation(guard: Guard) -> None:
    with guard.expected() as caught:
        try:
            socket.create_connection(("127.0.0.1", 9))
        except BaseException:  # a library's broadest handler
            pass
    assert caught and caught[0].startswith("uses the network")


def test_a_swallowed_violation_fails_the_test_when_the_phase_ends() -> None:
    phase = _guarded(SimpleNamespace(nodeid="tests/unit/test_x.py::test_x"))  # type: ignore[arg-type]
    next(phase)
    with pytest.raises(pytest.fail.Exception, match="caught the error"), socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", 9))
        except BaseException:
            pass
        phase.send(None)


def test_a_thread_the_test_starts_is_guarded(guard: Guard) -> None:
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            with socket.socket() as sock:
                sock.connect(("127.0.0.1", 9))
        except BaseException as exc:
            errors.append(exc)

    with guard.expected() as caught:
        thread = threading.Thread(target=connect)
        thread.start()
        thread.join()
    assert "socket.connect" in caught[0] and isinstance(errors[0], pytest.fail.Exception)


@pytest.mark.parametrize("fixture", ["services", "s3_server"])
def test_the_fixtures_that_start_servers_fail_here(request: pytest.FixtureRequest, fixture: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="tests/unit is pure"):
        request.getfixturevalue(fixture)


def test_what_a_unit_test_may_do_is_not_a_violation() -> None:
    assert forbidden("open", ("/tmp/x", "r", 0)) is None
    assert forbidden("socket.__new__", (None, 1, 1, 0)) is None  # a socket object alone reaches nothing
    assert forbidden("ctypes.dlsym", (None, "getpid")) is None
    assert forbidden("os.listdir", (".",)) is None
