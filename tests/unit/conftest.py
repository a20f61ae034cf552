"""tests/unit is pure: no database, no network (loopback and unix sockets included), no process, no mount.

Why a guard: a unit test that quietly starts PostgreSQL or a subprocess is slow, order-dependent and
needs the machine; the split between tests/unit and tests/integration only means something if it
is kept. Tests that need any of these belong in tests/integration.

How, and why that way:
- A Python audit hook (``sys.addaudithook``) sees the operation itself, below any library: socket
  connect/bind/sendto/name lookups (also through ``_socket`` or a library's own socket), every way
  to start a process (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.fork``) and
  the ``mount`` family looked up through ctypes. It cannot be removed, so it is installed once and
  acts only while a unit test runs (setup, call and teardown, so session fixtures count too), and
  only in the test's own thread and the threads started meanwhile: a server thread an integration
  fixture left running earlier in the same session is not the unit test's doing.
- The hook raises ``pytest.fail.Exception`` (a BaseException, so ``except Exception`` in the code
  under test does not swallow it) and also records the violation: a test that swallows even that
  still fails when it ends.
- libpq connects in C, where no audit event is raised: ``psycopg.generators.connect`` (the step
  every psycopg connection, SQLAlchemy's included, goes through) is replaced while a unit test runs,
  and the fixtures that start services (``services``, hence ``settings``, ``app``, ``client``,
  ``tenant``, ``processes``; ``s3_server``) fail here with a pointer to tests/integration.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, NoReturn

import psycopg
import psycopg.generators
import pytest

PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                            "os.forkpty"})
SOCKET_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                           "socket.gethostbyname", "socket.gethostbyaddr"})
MOUNT_SYMBOLS = frozenset({"mount", "umount", "umount2", "unshare", "setns", "pivot_root", "fsopen", "fsmount",
                           "move_mount", "open_tree"})


def forbidden(event: str, args: tuple[Any, ...]) -> str | None:
    """Why an audited operation is not allowed in a unit test, or None when it is."""
    if event in PROCESS_EVENTS:
        return f"starts a process ({event})"
    if event in SOCKET_EVENTS:  # (socket, address) for connect/bind/send*; (host, ...) for lookups
        where = args[1] if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") else args[0]
        return f"uses the network ({event} {where!r})"
    if event == "ctypes.dlsym" and len(args) > 1 and args[1] in MOUNT_SYMBOLS:
        return f"mounts (ctypes {args[1]})"
    return None


@dataclass
class Guard:
    """The state of the guard: which test runs, from which threads, and what it did that it must not."""

    test: str | None = None
    outside: set[threading.Thread] = field(default_factory=set)  # threads that were running before it
    violations: list[str] = field(default_factory=list)

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if self.test is None:
            return
        reason = forbidden(event, args)
        if reason is None or threading.current_thread() in self.outside:
            return
        self.violations.append(reason)
        if event in ("socket.connect", "socket.bind"):  # closed now, not left to a ResourceWarning in another test
            with suppress(Exception):
                args[0].close()
        pytest.fail(f"{self.test} {reason}: tests/unit is pure; move it to tests/integration", pytrace=False)

    @contextmanager
    def active(self, test: str) -> Iterator[None]:
        current = threading.current_thread()
        before = self.test, self.outside
        self.test, self.outside = test, {t for t in threading.enumerate() if t is not current}
        patch = pytest.MonkeyPatch()
        patch.setattr(psycopg.generators, "connect", _no_database)  # what every psycopg connection goes through
        try:
            yield
        finally:
            patch.undo()
            self.test, self.outside = before

    @contextmanager
    def expected(self) -> Iterator[list[str]]:
        """For the guard's own tests: the block must break the rule; what it broke is handed back."""
        start = len(self.violations)
        caught: list[str] = []
        try:
            yield caught
        except pytest.fail.Exception:
            pass
        caught.extend(self.violations[start:])
        del self.violations[start:]
        if not caught:
            pytest.fail("the guard let an impure operation through")


def _no_database(*args: object, **kwargs: object) -> NoReturn:
    GUARD.violations.append("connects to a database (psycopg)")
    pytest.fail(f"{GUARD.test} connects to a database: tests/unit is pure; move it to tests/integration",
                pytrace=False)


GUARD = Guard()
sys.addaudithook(GUARD.audit)


def _guarded(item: pytest.Item) -> Generator[None, Any, Any]:
    """Runs one phase (setup, call, teardown) of a unit test under the guard."""
    with GUARD.active(item.nodeid):
        start = len(GUARD.violations)
        try:
            result = yield
        finally:
            broke = GUARD.violations[start:]
            del GUARD.violations[start:]
    if broke:  # the code under test caught the guard's error and went on
        pytest.fail(f"{item.nodeid} {broke[0]} (and caught the error): tests/unit is pure; move it to "
                    "tests/integration", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    if nextitem is None:  # the session's end: integration's session fixtures (PostgreSQL...) stop here too
        return (yield)
    return (yield from _guarded(item))


@pytest.fixture
def guard() -> Guard:
    """The purity guard, for its own tests."""
    return GUARD


@pytest.fixture(scope="session")
def services() -> NoReturn:
    pytest.fail("tests/unit is pure: `services` (PostgreSQL, Redis) and the fixtures over it (settings, app, "
                "client, tenant, processes) belong to tests/integration", pytrace=False)


@pytest.fixture(scope="session")
def s3_server() -> NoReturn:
    pytest.fail("tests/unit is pure: `s3_server` starts a server; the test belongs to tests/integration",
                pytrace=False)
