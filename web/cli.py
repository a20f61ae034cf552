"""The `trace` command: run the platform (`up`, `api`, `worker`, `beat`, `db upgrade`) and
talk to it (`apply`, `run`, `runs`, `token create`, `settings`).

Client commands speak HTTP to the API like any other client; they read the admin
token that `trace up` wrote unless ``TRACE_TOKEN`` names another.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tracecore.exceptions import TraceError
from tracecore.infra import embedded
from tracecore.settings import Settings, configure, current_settings

ADMIN_TOKEN_FILE = "admin-token"


class CliError(Exception):
    """Printed as ``trace: <message>`` with exit status 1 (2 for usage)."""


# ---------------------------------------------------------------- running the platform
# The project imports inside these functions are deliberate lazy loads: each command loads only
# its own process's stack (client commands start without Flask, SQLAlchemy or Celery; `trace worker`
# never loads the API, `trace api` never loads the worker).

def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from tracecore.db.migrate import upgrade

    settings = embedded.attach(settings)
    upgrade(settings.database_url or "")
    print("database is at the newest schema")
    return 0


def bootstrap_admin(settings: Settings) -> str:
    """On first start: org `default`, an admin user and their token in TRACE_HOME/admin-token (0600)."""
    from tracecore.appctx import create_base_app
    from tracecore.db.engine import db
    from tracecore.tenancy import orgs

    token_file = settings.home_path / ADMIN_TOKEN_FILE
    app = create_base_app(settings)
    with app.app_context():
        if token_file.exists():
            try:
                if orgs.authenticate(token_file.read_text().strip()).is_installation_admin:
                    return token_file.read_text().strip()
            except Exception:
                db.session.rollback()
        org = db.session.scalar(db.select(orgs.Org).where(orgs.Org.name == "default")) or orgs.create_org("default")
        user = orgs.get_or_create_user(settings.admin_email, installation_admin=True)
        user.is_installation_admin = True
        orgs.add_member(org, user, orgs.Role.admin)
        # Installation power is minted here, on the host, and through no API endpoint.
        _, clear = orgs.issue_token(org.id, user.id, name="admin (trace up)", installation_admin=True)
        db.session.commit()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(clear + "\n")
    os.chmod(token_file, 0o600)
    return clear


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from tracecore.db.migrate import upgrade

    services = embedded.EmbeddedServices(settings.home_path)
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        settings = services.start(settings)
        upgrade(settings.database_url or "")
        bootstrap_admin(settings)
        env = {**os.environ, "TRACE_DATABASE_URL": settings.database_url or "",
               "TRACE_BROKER_URL": settings.broker_url or "", "TRACE_HOME": str(settings.home_path)}
        for role in ("api", "worker", "beat", *(("follow",) if settings.chain_follow else ())):
            children.append(subprocess.Popen([sys.executable, "-m", "web.cli", role], env=env))
        _wait_healthy(settings, children)
        print(f"Trace is up.\n  API      {settings.resolved_api_url}  (OpenAPI: /v1/openapi.json)\n"
              f"  token    {settings.home_path / ADMIN_TOKEN_FILE}\n  database {settings.database_url}\n"
              f"  broker   {settings.broker_url}\nCtrl-C stops everything.", flush=True)
        while not stopping:
            if any(child.poll() is not None for child in children):
                print("trace: a child process exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_children(children)
        services.stop()
        print("Trace stopped.", flush=True)


def _wait_healthy(settings: Settings, children: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise CliError("a child process exited during start-up; see its output above")
        try:
            if requests.get(f"{settings.resolved_api_url}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise CliError(f"the API did not answer {settings.resolved_api_url}/healthz within {timeout:.0f} s")


def _stop_children(children: list[subprocess.Popen[bytes]], grace: float = 15) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from .server import serve

    serve(configure(embedded.attach(settings)), workers=args.workers)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.worker import run

    run(configure(embedded.attach(settings)), concurrency=args.concurrency, pool=args.pool, name=args.name)
    return 0


def cmd_beat(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.beat import run

    run(configure(embedded.attach(settings)))
    return 0


def cmd_follow(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.follow import run

    run(configure(embedded.attach(settings)))
    return 0


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    for variable, kind, default, doc in Settings.describe():
        print(f"{variable:<26} {kind:<16} {default:<20} {doc}")
    return 0


SETTINGS_DOC_HEAD = """\
# Settings

<!-- Generated by `trace settings --markdown` from tracecore/settings.py; do not edit by hand.
     tests/unit/test_settings_doc.py fails when this file and the declarations disagree. -->

Every setting is declared once, with its type, default and doc, in `tracecore/settings.py`, and is
read from the environment variable `TRACE_<NAME>` when a process starts. `trace settings` prints
the same table in the terminal. Booleans take `1/true/yes/on` and `0/false/no/off`; lists are
comma-separated; an empty value of an optional setting means unset. A malformed value stops the
process with the variable's name (`trace: TRACE_PORT: ...`, exit status 2).

The ones an operator sets most: `TRACE_HOME`, `TRACE_DATABASE_URL`, `TRACE_BROKER_URL`,
`TRACE_PORT`, `TRACE_LEASE_TTL`, `TRACE_SANDBOX`, `TRACE_OBJECT_STORE`, `TRACE_PLUGINS`.

| variable | type | default | what it does |
| --- | --- | --- | --- |
"""


def settings_markdown() -> str:
    """docs/settings.md, whole: the declarations are the only source, so the page is printed from them."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def default_of(value: str) -> str:
        return {"None": "unset", "()": "empty", "''": "empty"}.get(value, f"`{value}`")

    rows = [f"| `{variable}` | `{cell(kind)}` | {cell(default_of(default))} | {cell(doc)} |"
            for variable, kind, default, doc in Settings.describe()]
    return SETTINGS_DOC_HEAD + "\n".join(rows) + "\n"


# ---------------------------------------------------------------- talking to the API

class Client:
    def __init__(self, settings: Settings) -> None:
        import requests

        self.base = settings.resolved_api_url.rstrip("/")
        token = settings.token
        token_file = settings.home_path / ADMIN_TOKEN_FILE
        if token is None and token_file.exists():
            token = token_file.read_text().strip()
        if not token:
            raise CliError(f"no API token: set TRACE_TOKEN or run `trace up` (it writes {token_file})")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        try:
            response = self.session.request(method, self.base + path, timeout=60, **kwargs)
        except requests.ConnectionError:
            raise CliError(f"cannot reach the API at {self.base}: is `trace up` running?") from None
        body = response.json() if response.content else {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            where = error.get("details", {}).get("path")
            raise CliError(f"{error.get('code', response.status_code)}: {error.get('message', response.text)}"
                           + (f" (at {where})" if where else ""))
        return body


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.file)
    if not path.exists():
        raise CliError(f"no such file: {path}")
    name = args.name or path.stem
    media = "application/json" if path.suffix == ".json" else "application/yaml"
    dag = Client(settings).call("PUT", f"/v1/dags/{name}", data=path.read_bytes(),
                                headers={"Content-Type": media})
    print(f"dag {dag['name']} version {dag['current_version']}: {', '.join(job['name'] for job in dag['jobs'])}")
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    client = Client(settings)
    config = _json_arg(args.config, "--config")
    created = client.call("POST", f"/v1/jobs/{args.job}/runs", json={"config": config})
    run_id = created["run_id"]
    print(f"run {run_id} queued")
    if not args.wait:
        return 0
    return _follow(client, run_id)


def _follow(client: Client, run_id: str) -> int:
    """Show the run's state as it changes until it finishes; exit 0 only if it succeeded."""
    live = sys.stdout.isatty()
    last = ""
    started = time.monotonic()
    while True:
        run = client.call("GET", f"/v1/runs/{run_id}", params={"wait": 1})
        line = _status_line(run, time.monotonic() - started)
        if live:
            print("\r\033[K" + line, end="", flush=True)
        elif line.split(" (")[0] != last:
            print(line, flush=True)
        last = line.split(" (")[0]
        if run["status"] in ("succeeded", "failed", "canceled"):
            if live:
                print()
            for task in run["tasks"]:
                for attempt in task["attempts"]:
                    if attempt["status"] != "succeeded" and attempt.get("error_message"):
                        print(f"  attempt {attempt['number']} ({attempt['exit_reason']}): "
                              f"{attempt['error_type']}: {attempt['error_message']}")
            return 0 if run["status"] == "succeeded" else 1


def _status_line(run: dict, elapsed: float) -> str:
    tasks = run.get("tasks", [])
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task["status"]] = counts.get(task["status"], 0) + 1
    attempts = sum(task["attempts_count"] for task in tasks)
    detail = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    return f"{run['status']}: tasks {detail or 'none'}; attempts {attempts} ({elapsed:.1f} s)"


def cmd_chains(args: argparse.Namespace, settings: Settings) -> int:
    client = Client(settings)
    if args.name:
        chain = client.call("GET", f"/v1/chains/{args.name}")
        for key in ("name", "chain_id", "state", "stopped_reason", "head", "ingested_block", "lag_blocks", "lag_ms",
                    "finalized_block", "cold_boundary", "start_block", "finality"):
            print(f"{key:<16} {chain[key]}")
        for endpoint in chain["rpc_health"]:
            print(f"rpc              {endpoint['url']}  {'ok' if endpoint['ok'] else 'failing'}  "
                  f"{endpoint.get('last_error') or ''}".rstrip())
        for reorg in client.call("GET", f"/v1/chains/{args.name}/reorgs", params={"limit": 5}):
            print(f"reorg            at {reorg['fork_block']} depth {reorg['depth']} {reorg['detected_at']}"
                  + ("  PAST FINALITY" if reorg["beyond_finality"] else ""))
        return 0
    found = client.call("GET", "/v1/chains")
    for chain in found:
        print(f"{chain['name']:<12} {chain['state']:<10} head {chain['head']}  ingested {chain['ingested_block']}  "
              f"lag {chain['lag_blocks']} blocks  final {chain['finalized_block']}  cold <= {chain['cold_boundary']}")
    if not found:
        print("no chains")
    return 0


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    """Start a backfill and show its progress until it ends (exit 0 only when it is done)."""
    client = Client(settings)
    body: dict[str, Any] = {"from_block": args.from_block, "to_block": args.to_block}
    if args.datasets:
        body["datasets"] = args.datasets.split(",")
    backfill = client.call("POST", f"/v1/chains/{args.chain}/backfills", json=body)
    print(f"backfill {backfill['id']}: blocks {backfill['from_block']}..{backfill['to_block']}, "
          f"{backfill['chunks_total']} chunk(s)", flush=True)
    if args.no_wait:
        return 0
    live = sys.stdout.isatty()
    while True:
        backfill = client.call("GET", f"/v1/backfills/{backfill['id']}")
        eta = f" ETA {backfill['eta_s']:.0f}s" if backfill["eta_s"] is not None else ""
        line = (f"{_bar(backfill['chunks_done'], backfill['chunks_total'])} {backfill['chunks_done']}/"
                f"{backfill['chunks_total']} chunks, {backfill['blocks_per_s']:.0f} blocks/s{eta}")
        print(("\r\033[K" if live else "") + line, end="" if live else "\n", flush=True)
        if backfill["state"] != "running":
            if live:
                print()
            if backfill["state"] == "failed":
                print(f"trace: backfill failed: {backfill['error']}", file=sys.stderr)
                return 1
            return 0
        time.sleep(0.5)


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    params = {key: value for key, value in (("job", args.job), ("status", args.status)) if value}
    found = Client(settings).call("GET", "/v1/runs", params=params)
    for run in found:
        print(f"{run['id']}  {run['status']:<10} {run['job'] or '-':<24} {run['cause']:<10} {run['created_at']}")
    if not found:
        print("no runs")
    return 0


def cmd_firings(args: argparse.Namespace, settings: Settings) -> int:
    found = Client(settings).call("GET", f"/v1/jobs/{args.job}/firings", params={"limit": args.limit})
    for firing in found:
        print(f"{firing['created_at']}  {firing['outcome']:<8} {firing['key']:<48} {firing['run_id'] or '-':<36} "
              f"{firing['detail'] or ''}")
    if not found:
        print("no firings")
    return 0


def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    body = {"name": args.name or ""}
    if args.email:
        body["email"] = args.email
    if args.role:
        body["role"] = args.role
    if args.org:
        body["org"] = args.org
    created = Client(settings).call("POST", "/v1/tokens", json=body)
    print(created["token"])
    print(f"for {created['email']} as {created['role']} in org {created['org']}; shown once", file=sys.stderr)
    return 0


def _json_arg(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the whole platform on this machine").set_defaults(func=cmd_up)
    api = commands.add_parser("api", help="serve the API")
    api.add_argument("--workers", type=int, default=2)
    api.set_defaults(func=cmd_api)
    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    worker.add_argument("--name")
    worker.set_defaults(func=cmd_worker)
    commands.add_parser("beat", help="run Celery beat").set_defaults(func=cmd_beat)
    commands.add_parser("follow", help="follow the registered chains' tips (one writer per chain)"
                        ).set_defaults(func=cmd_follow)
    database = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    database.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)
    apply = commands.add_parser("apply", help="save a DAG file (YAML or JSON) as the DAG's next version")
    apply.add_argument("file")
    apply.add_argument("--name", help="DAG name (default: the file name without extension)")
    apply.set_defaults(func=cmd_apply)
    run = commands.add_parser("run", help="trigger a job")
    run.add_argument("job")
    run.add_argument("--wait", action="store_true", help="follow the run until it finishes")
    run.add_argument("--config", help="JSON object overriding the job's config")
    run.set_defaults(func=cmd_run)
    chains = commands.add_parser("chains", help="the chains Trace follows: tip, lag, finality, reorgs")
    chains.add_argument("name", nargs="?")
    chains.set_defaults(func=cmd_chains)
    backfill = commands.add_parser("backfill", help="write a chain's history to cold chunks, with progress")
    backfill.add_argument("chain")
    backfill.add_argument("from_block", type=int)
    backfill.add_argument("to_block", type=int)
    backfill.add_argument("--datasets", help="comma-separated: blocks,transactions,logs (default all)")
    backfill.add_argument("--no-wait", action="store_true", help="start it and return")
    backfill.set_defaults(func=cmd_backfill)
    runs = commands.add_parser("runs", help="list recent runs")
    runs.add_argument("--job")
    runs.add_argument("--status")
    runs.set_defaults(func=cmd_runs)
    firings = commands.add_parser("firings", help="what a job's data, idle and composite triggers did, and why")
    firings.add_argument("job")
    firings.add_argument("--limit", type=int, default=20)
    firings.set_defaults(func=cmd_firings)
    token = commands.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="issue a token (shown once)")
    create.add_argument("--name")
    create.add_argument("--email", help="admins: issue for this member (added if new)")
    create.add_argument("--role", choices=["reader", "writer", "admin"])
    create.add_argument("--org", help="your own token for another org you are a member of")
    create.set_defaults(func=cmd_token_create)
    settings_command = commands.add_parser("settings", help="list every TRACE_* setting")
    settings_command.add_argument("--markdown", action="store_true", help="print docs/settings.md (the whole page)")
    settings_command.set_defaults(func=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = current_settings()
        return args.func(args, settings)
    except CliError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # malformed TRACE_* settings
        print(f"trace: {exc}", file=sys.stderr)
        return 2
    except TraceError as exc:
        print(f"trace: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
