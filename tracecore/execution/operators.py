"""The operator catalog: which operators exist, what they need, and where their code lives.

The catalog lives in the domain so that the API can validate a DAG without importing
the workers; the implementation is a dotted path that only a worker resolves. Plugins
(``TRACE_PLUGINS``) add operators by calling :func:`register` when imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tracecore.exceptions import PlatformError


@dataclass(frozen=True)
class OperatorInfo:
    name: str
    description: str
    needs_udf: bool = False
    implementation: str | None = None  # "module:function"; None = not available in this build

    def load(self) -> Callable[..., Any]:
        if self.implementation is None:
            raise PlatformError(f"operator {self.name!r} is declared but has no implementation in this build",
                                code="operator_unavailable")
        module_name, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


CATALOG: dict[str, OperatorInfo] = {}


def register(info: OperatorInfo) -> OperatorInfo:
    CATALOG[info.name] = info
    return info


register(OperatorInfo("noop", "Does nothing and succeeds; measures the platform's own overhead.",
                      implementation="workers.operators.builtin:noop"))
register(OperatorInfo("udf", "Runs the job's UDF bundle in a sandbox.", needs_udf=True,
                      implementation="workers.operators.udf:run"))
register(OperatorInfo("alert_evaluate", "Evaluates alert conditions with a UDF bundle and emits alert_events.",
                      needs_udf=True, implementation="workers.operators.udf:run"))
register(OperatorInfo("block_follower", "Platform ingestion of new blocks at the chain tip: not a job an org "
                                        "defines, a source it reads (`trace follow` runs it)."))
register(OperatorInfo("http_ingest", "Platform ingestion of an off-chain JSON feed from an allowlisted URL "
                      "into the job's buffered dataset.", implementation="workers.operators.http_ingest:run"))

# Jobs every org can name as an input without defining them: platform sources.
# Maps the job name to its number of outputs.
PLATFORM_SOURCES: dict[str, int] = {"block_follower": 3}
# What block_follower's outputs are: the default chain's (TRACE_DEFAULT_CHAIN) datasets <chain>_<kind>.
BLOCK_FOLLOWER_OUTPUTS = ("blocks", "transactions", "logs")


def load_plugins(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)
