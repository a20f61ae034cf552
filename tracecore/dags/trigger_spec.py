"""The trigger half of DAG validation: ``trigger`` trees, ``when`` conditions, ``batch`` and the
rules tying them to ``activation``, ``refresh`` and ``inputs`` (a mixin of the DAG parser).

Kept apart from ``dag_spec`` because it is the part the triggers issue grew, and it needs
the Query Service's SQL policy (a ``when`` is judged at save time, not at its first update).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tracecore.exceptions import UserError
from tracecore.query.policy import check_statement

# Aliases let a few YAML lines expand into huge or self-referencing trees; these
# bounds keep validation (and later JSON encoding) linear in the document's size.
MAX_TRIGGER_DEPTH = 32
MAX_TRIGGER_NODES = 1000


@dataclass(frozen=True)
class Batch:
    """How ``execution_strategy: Batched`` coalesces updates: one run for the updates that arrive
    within ``window_s`` of the first one waiting, or as soon as ``max_updates`` are waiting."""

    window_s: float = 60.0
    max_updates: int = 1000


def _has_when(node: Mapping[str, Any] | None) -> bool:
    if not node:
        return False
    return "when" in node or any(_has_when(child) for child in node.get("all_of", ()) or node.get("any_of", ()))


def trigger_jobs(node: Mapping[str, Any] | None) -> Iterator[str]:
    if not node:
        return
    if "job" in node:
        yield node["job"]
    for child in node.get("all_of", ()) or node.get("any_of", ()):
        yield from trigger_jobs(child)



class TriggerRules:
    """Methods of the DAG parser (``dag_spec._Parser``) for the trigger keys of a job."""

    error: Any
    mapping: Any
    check: Any
    duration: Any
    integer: Any
    resolve: Any
    first_index: dict[str, int]
    edges: list[tuple[str, int, str]]

    def check_data_triggers(self, job: Mapping[str, Any], out: Mapping[str, Any], path: str) -> None:
        """The rules that tie ``trigger``, ``refresh``, ``batch`` and ``activation`` together."""
        reactive, trigger = out.get("activation") == "reactive", out.get("trigger")
        if "batch" in job and out.get("execution_strategy") != "Batched":
            self.error("invalid_value", f"{path}.batch", "'batch' goes with execution_strategy: Batched")
        if out.get("refresh") == "auto" and reactive:
            self.error("invalid_value", f"{path}.refresh", "a reactive job already runs on every update; "
                                                           "refresh: auto is for jobs with other activations")
        if (out.get("refresh") == "auto" or reactive) and not job.get("inputs"):
            key = "refresh" if out.get("refresh") == "auto" else "activation"
            self.error("missing_key", f"{path}.inputs", f"{key} {job.get(key)!r} needs 'inputs' to watch")
        if trigger and _has_when(trigger) and not job.get("inputs"):
            self.error("missing_key", f"{path}.inputs", "a 'when' condition is evaluated over the job's inputs")
        if trigger and reactive and any(True for _ in trigger_jobs(trigger)):
            self.error("invalid_value", f"{path}.trigger", "a reactive job's trigger is a condition on each "
                                                           "update: 'when' nodes (in all_of / any_of) only")

    def job_batch(self, value: Any, path: str, i: int) -> Batch | None:
        spec = self.mapping(value, path, ("window", "max_updates"))
        if spec is None:
            return None
        window = self.duration(spec["window"], f"{path}.window", "batch.window") if "window" in spec \
            else Batch.window_s
        most = self.integer(spec["max_updates"], f"{path}.max_updates", "batch.max_updates") \
            if "max_updates" in spec else Batch.max_updates
        return Batch(window_s=window or Batch.window_s, max_updates=most or Batch.max_updates)

    def trigger(self, node: Any, path: str, i: int, depth: int, budget: list[int]) -> dict[str, Any] | None:
        """Normalize one trigger node; job names become ``{"job": name}`` leaves."""
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_TRIGGER_DEPTH:
            if budget[0] == -1 or depth == MAX_TRIGGER_DEPTH + 1:
                self.error("invalid_value", path, "trigger is too large or nested too deeply")
            return None
        if isinstance(node, str):
            return self.trigger_job(node, path, i)
        spec = self.mapping(node, path, ("all_of", "any_of", "when", "job", "timeout"),
                            "job name or mapping with all_of, any_of or when")
        if spec is None:
            return None
        kinds = [k for k in ("all_of", "any_of", "when", "job") if k in spec]
        if "timeout" in spec and kinds != ["any_of"]:
            self.error("unknown_key", f"{path}.timeout", "only any_of takes a timeout")
        if not kinds:
            self.error("missing_key", path, "a trigger node needs one of all_of, any_of, when")
            return None
        if len(kinds) > 1:
            self.error("invalid_value", path, f"a trigger node takes exactly one of {', '.join(kinds)}")
            return None
        kind = kinds[0]
        value, at = spec[kind], f"{path}.{kind}"
        if kind == "job":
            return self.trigger_job(value, at, i) if self.check(value, "string", at) else None
        if kind == "when":
            if self.check(value, "string", at):
                self.when_sql(value, at)
            return {"when": value}
        if not self.check(value, "list", at):
            return None
        if not value:
            self.error("invalid_value", at, f"{kind} needs at least one node")
        children = [self.trigger(child, f"{at}[{k}]", i, depth + 1, budget) for k, child in enumerate(value)]
        if kind == "all_of":
            return {"all_of": children}
        timeout = self.duration(spec["timeout"], f"{path}.timeout", "trigger.timeout") if "timeout" in spec else None
        return {"any_of": children, "timeout_s": timeout}

    def when_sql(self, sql: str, path: str) -> None:
        """One SELECT, judged by the Query Service's own policy before it is ever run."""
        if not sql.strip():
            self.error("invalid_value", path, "'when' needs a SQL condition")
            return
        try:
            check_statement(sql)
        except UserError as exc:
            self.error("invalid_when", path, f"'when' must be one SELECT returning a boolean: {exc}")

    def trigger_job(self, name: str, path: str, i: int) -> dict[str, Any]:
        if not self.resolve(name)[0]:
            self.error("unknown_trigger_job", path, f"no job {name!r} in this DAG or elsewhere in the organization")
        elif name in self.first_index:
            self.edges.append((name, i, path))
        return {"job": name}
