"""Sandbox overhead: a trivial UDF end to end, beside a bare `docker run` of the same image.

Trace: a `udf` job (a real bundle stored with ``tracecore.execution.bundles.save_bundle``, a DAG saved with
``tracecore.dags.catalog.save_dag``: ``runtime: lambda, operator: udf``) gets a run row per iteration, outside
the timed span; then ``workers.dispatcher.execute(app, task_id, enqueue)`` is timed in this process,
inside an app context as a Celery worker runs it: lease -> bundle check -> token -> gateway ->
container -> response -> attempt recorded. The attempt must succeed.

Baseline, interleaved with it in the same run: the docker SDK's ``client.containers.run(image, cmd,
remove=True)`` of the same runtime image with the isolation flags and default limits the Docker backend
gives a sandbox (no network, read-only root, tmpfs /tmp, no capabilities, no-new-privileges, user 10001,
memory and swap, 0.25 vCPU, pids), running ``python3 -c pass`` (python3.11) or ``node -e 0`` (nodejs).

``--libraries`` adds handlers that import one of the image's vetted libraries (numpy, pandas, Polars;
deploy/images/python-libraries.txt) beside the trivial one, each with the same bare baseline, in the same run:
what importing a library costs a handler that asks for it (and that one that does not is not charged).

    python benchmarks/sandbox.py [--runs 50] [--warmup 5] [--runtime python3.11] [--runtime nodejs] [--libraries]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import docker

from tracecore.db.migrate import upgrade
from tracecore.infra.embedded import EmbeddedServices, free_port
from tracecore.settings import Settings

GOAL_P50_MS, GOAL_P95_MS, GOAL_RATIO = 200.0, 300.0, 1.15
BUNDLES = {  # case: (runtime, handler, files, bare command)
    "python3.11": ("python3.11", "trace.handler",
                   {"trace.py": "def handler(event, context):\n    return {'ok': True}\n"}, ["python3", "-c", "pass"]),
    "nodejs": ("nodejs", "trace.handler", {"trace.js": "exports.handler = async () => ({ ok: true });\n"},
               ["node", "-e", "0"]),
}
LIBRARY_CASES = {  # --libraries: a handler importing one vetted library, at module level as a handler would
    f"python3.11+{module}": ("python3.11", "trace.handler",
                             {"trace.py": f"import {module}\n\n\ndef handler(event, context):\n"
                                          f"    return {{'version': {module}.__version__}}\n"},
                             ["python3", "-c", "pass"])
    for module in ("numpy", "pandas", "polars")
}
# The Docker backend's options that isolate and limit a sandbox (the baseline gets exactly these).
ISOLATION = ("user", "network_mode", "read_only", "tmpfs", "cap_drop", "security_opt", "mem_limit", "memswap_limit",
             "nano_cpus", "pids_limit")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def job_name(case: str) -> str:
    return "bench_" + "".join(c if c.isalnum() else "_" for c in case)


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = action()
    return (time.perf_counter() - start) * 1000, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runtime", action="append", choices=sorted(BUNDLES), help="default: both")
    parser.add_argument("--libraries", action="store_true",
                        help="also handlers importing numpy, pandas and Polars (python3.11)")
    args = parser.parse_args()
    runtimes = args.runtime or ["python3.11", "nodejs"]
    if args.libraries:
        BUNDLES.update(LIBRARY_CASES)
        runtimes += list(LIBRARY_CASES)

    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")  # XDG_RUNTIME_DIR unset
    home = Path(tempfile.mkdtemp(prefix="trace-bench-sandbox-", dir="/tmp"))
    services = EmbeddedServices(home)
    settings = services.start(Settings(home=str(home), port=free_port(), sandbox="docker"))
    client = docker.from_env(version="auto", timeout=60)
    try:
        upgrade(settings.database_url or "")
        from tracecore.appctx import create_base_app
        from tracecore.dags import catalog as dags
        from tracecore.db.engine import db
        from tracecore.execution import bundles, runs
        from tracecore.infra.storage import object_store
        from tracecore.tenancy import orgs
        from workers.dispatcher import execute
        from workers.sandbox import RUNTIME_IMAGES, Invocation
        from workers.sandbox.docker import DockerBackend
        from workers.sandbox.select import backend_for

        app = create_base_app(settings)
        with app.app_context():
            org = orgs.create_org(f"bench-{uuid.uuid4().hex[:8]}")
            org_id = org.id
            jobs = []
            for case in runtimes:
                runtime, handler, files, _ = BUNDLES[case]
                bundle = bundles.save_bundle(org_id, zipped(files), runtime, handler, user_id=None,
                                             store=object_store(settings))
                job = job_name(case)
                jobs.append(f"- name: {job}\n  runtime: lambda\n  operator: udf\n  max_retries: 0\n"
                            f"  udf: {{bundle_id: '{bundle.id}', entrypoint: {handler}}}\n")
            dags.save_dag(org_id, "bench-sandbox", "".join(jobs), content_type="application/yaml", user_id=None)
            db.session.commit()

        backend = backend_for(settings)  # the worker's own backend: time its share of each attempt
        assert isinstance(backend, DockerBackend)  # sandbox="docker" above
        backend_ms: list[float] = []
        run_backend = backend.run

        def timed_backend_run(invocation: Invocation) -> Any:
            spent, outcome = timed(lambda: run_backend(invocation))
            backend_ms.append(spent)
            return outcome

        backend.run = timed_backend_run  # type: ignore[method-assign]
        retried: list[str] = []

        def trace_once(runtime: str) -> float:
            job = job_name(runtime)
            with app.app_context():
                _, task_id = runs.create_run(org_id=org_id, job_name=job, cause="manual", triggered_by=None)
                db.session.commit()

            def attempt() -> str:
                with app.app_context():
                    return execute(app, str(task_id), lambda task, delay: retried.append(task))

            spent, answer = timed(attempt)
            if answer != "succeeded":
                raise SystemExit(f"{job}: the attempt ended {answer!r}, not succeeded")
            return spent

        probe = Invocation(bundle_dir=home, runtime="python3.11", handler="x.y", event={}, work_dir=home)
        flags = {key: value for key, value in backend._container_options(probe).items() if key in ISOLATION}

        def bare_once(runtime: str) -> float:
            image, command = RUNTIME_IMAGES[BUNDLES[runtime][0]], BUNDLES[runtime][3]
            return timed(lambda: client.containers.run(image, command, remove=True, **flags))[0]

        results: dict[str, tuple[list[float], list[float], list[float]]] = {}
        for runtime in runtimes:
            for _ in range(args.warmup):
                bare_once(runtime)
                trace_once(runtime)
            backend_ms.clear()
            bare: list[float] = []
            trace: list[float] = []
            for _ in range(args.runs):  # interleaved, so drift hits both equally
                bare.append(bare_once(runtime))
                trace.append(trace_once(runtime))
            results[runtime] = (bare, trace, list(backend_ms))
        backend.drain()

        print(f"sandbox overhead: a trivial UDF, {args.runs} runs each, interleaved (ms)")
        print(f"{'':66} {'p50':>8} {'p95':>8} {'mean':>8}")
        verdicts = []
        for runtime, (bare, trace, in_backend) in results.items():
            command = " ".join(BUNDLES[runtime][3])
            rows = [(f"{runtime}: bare containers.run `{command}` (baseline)", bare),
                    (f"{runtime}: Trace execute() lease -> attempt recorded", trace),
                    ("  of which DockerBackend.run", in_backend)]
            for label, values in rows:
                print(f"{label:66} {percentile(values, .5):8.1f} {percentile(values, .95):8.1f} "
                      f"{statistics.fmean(values):8.1f}")
            p50, p95 = percentile(trace, .5), percentile(trace, .95)
            p50_ratio, p95_ratio = p50 / percentile(bare, .5), p95 / percentile(bare, .95)
            print(f"{runtime}: ratio Trace / bare: p50 {p50_ratio:.2f}x, p95 {p95_ratio:.2f}x")
            if runtime in LIBRARY_CASES:
                continue  # the goals are the platform's overhead; a library's import is the handler's own cost
            verdicts.append(
                f"{runtime}: goal p50 <= {GOAL_P50_MS:g} ms: {'met' if p50 <= GOAL_P50_MS else 'NOT met'}; "
                f"p95 <= {GOAL_P95_MS:g} ms: {'met' if p95 <= GOAL_P95_MS else 'NOT met'}; "
                f"ratio <= {GOAL_RATIO:g}x: {'met' if max(p50_ratio, p95_ratio) <= GOAL_RATIO else 'NOT met'}")
        print("\n".join(verdicts))
        if retried:
            print(f"warning: {len(retried)} attempts asked for a retry")
    finally:
        client.close()
        services.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
