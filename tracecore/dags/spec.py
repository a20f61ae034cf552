"""Parse and validate a DAG definition (the YAML of seed ``002``) into frozen specs.

This module is pure (stdlib, PyYAML, croniter, and pyarrow through
``tracecore.data.schema`` for output schemas): the API, the scheduler and the CLI
all validate a DAG the same way without a database. Whatever the platform needs
from outside (the operator catalog, jobs of other DAGs) is passed in by the caller.

Every number a DAG declares has a minimum and a maximum, listed in one table
(``tracecore.dags.bounds``); a value outside is ``out_of_range``.

Every problem found is reported, not only the first, because a user fixing a DAG
file wants the whole list in one round trip: one ``ValidationError`` is raised whose
code, path and message are the first problem's and whose ``details["errors"]`` lists
them all. An explicit ``null`` means "not given" (JSON clients send it for optional
fields), so it takes the default, or is ``missing_key`` for a required field.
"""

from __future__ import annotations

import copy
import heapq
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from tracecore.dags import http_feed
from tracecore.dags.bounds import Bound, bounds
from tracecore.dags.text import invalid_body, load_body, parse_duration, parse_memory_mb, type_name
from tracecore.dags.trigger_spec import MAX_TRIGGER_NODES, Batch, TriggerRules, trigger_jobs
from tracecore.data import schema as dataset_schema
from tracecore.exceptions import ValidationError

ACTIVATIONS = ("manual", "scheduled", "reactive", "webhook")
RUNTIMES = ("lambda", "ecs_udf", "docker", "platform")
EXECUTION_STRATEGIES = ("PerUpdate", "Batched")
UPDATE_STRATEGIES = ("append", "replace", "upsert")
REFRESH_MODES = ("manual", "auto")
JOB_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
MAX_RETRIES_LIMIT = int(bounds()["max_retries"].high)
# Aliases let a few YAML lines expand into huge or self-referencing trees; these
# bounds keep validation (and later JSON encoding) linear in the document's size.
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_NODES = 100_000

_JOB_KEYS = ("name", "activation", "runtime", "operator", "execution_strategy", "idle_timeout",
             "inputs", "outputs", "update_strategy", "unique_key", "config", "udf", "schedule",
             "trigger", "max_retries", "max_concurrency", "limits", "description", "refresh", "batch")


class OperatorInfo(Protocol):
    """What this module needs to know about an operator of the caller's catalog."""

    @property
    def needs_udf(self) -> bool: ...


@dataclass(frozen=True)
class InputRef:
    """An input: output ``output`` of job ``job``, or (``dataset`` set) a dataset by name: the org's
    own, one granted to it (``<owner org>__<name>``), or a platform dataset (``anvil_logs``)."""

    job: str = ""
    output: int = 0
    dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset} if self.dataset is not None else {"job": self.job, "output": self.output}


@dataclass(frozen=True)
class UdfRef:
    bundle_id: str
    entrypoint: str


@dataclass(frozen=True)
class Schedule:
    """Exactly one of ``cron`` and ``every_s`` is set.

    A 6-field cron has its seconds LAST (croniter's own convention), so the scheduler
    can hand the string to ``croniter`` unchanged. ``catch_up`` is how many missed
    ticks to run after downtime; 0 skips them.
    """

    cron: str | None = None
    every_s: float | None = None
    timezone: str = "UTC"
    catch_up: int = 0


@dataclass(frozen=True)
class Limits:
    """Sandbox limits; the defaults are seed 000's (0.25 vCPU, 512 MB, 60 s)."""

    cpu: float = 0.25
    memory_mb: int = 512
    timeout_s: float = 60.0
    pids: int = 128


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One job, normalized: defaults filled in, durations in seconds, memory in MB.

    ``trigger`` is a tree of ``{"job": name}``, ``{"all_of": [...]}``,
    ``{"any_of": [...], "timeout_s": float | None}`` and ``{"when": sql}`` nodes.

    ``outputs`` stays the number of outputs (inputs name them by index); ``output_datasets``
    declares the dataset behind each, one per output: ``{"dataset", "kind", "schema", "pii",
    "description"}``. The int form of ``outputs`` declares derived datasets named ``<job>``
    then ``<job>_1``, ``<job>_2`` ...; they are filled in here when not given, so a spec built
    from an int ``outputs`` (or stored before declarations existed) has them too.
    """

    name: str
    activation: str = "manual"
    runtime: str
    operator: str
    execution_strategy: str | None = None
    idle_timeout_s: float | None = None
    inputs: tuple[InputRef, ...] = ()
    outputs: int = 0
    output_datasets: tuple[dict[str, Any], ...] = ()
    update_strategy: str | None = None
    unique_key: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    udf: UdfRef | None = None
    schedule: Schedule | None = None
    trigger: dict[str, Any] | None = None
    max_retries: int = 3
    max_concurrency: int | None = None  # most running tasks of this job at once; None: unlimited
    limits: Limits = field(default_factory=Limits)
    description: str = ""
    refresh: str = "manual"  # auto: a new version of an input dataset re-runs this job
    batch: Batch | None = None  # execution_strategy Batched only; None there means Batch()

    def __post_init__(self) -> None:
        if not self.output_datasets and self.outputs > 0:
            object.__setattr__(self, "output_datasets", default_output_datasets(self.name, self.outputs))
        if len(self.output_datasets) != self.outputs:
            raise ValueError(f"job {self.name!r}: {self.outputs} output(s) but {len(self.output_datasets)} "
                             "dataset declaration(s)")

    def dependencies(self) -> list[str]:
        """Jobs this one reads from or is triggered by (in this DAG or not), deduplicated."""
        names = [ref.job for ref in self.inputs if ref.dataset is None] + list(trigger_jobs(self.trigger))
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """The normalized form as plain JSON values (what the database stores)."""
        out = asdict(self)
        out["inputs"] = [ref.to_dict() for ref in self.inputs]
        out["unique_key"] = list(self.unique_key)
        out["output_datasets"] = [copy.deepcopy(dict(item)) for item in self.output_datasets]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec from ``to_dict()``'s output; trusts it, validates nothing."""
        d = copy.deepcopy(dict(data))
        d["inputs"] = tuple(InputRef(**ref) for ref in d.get("inputs", ()))
        d["unique_key"] = tuple(d.get("unique_key", ()))
        d["output_datasets"] = tuple(dict(item) for item in d.get("output_datasets", ()))
        d["udf"] = UdfRef(**d["udf"]) if d.get("udf") else None
        d["schedule"] = Schedule(**d["schedule"]) if d.get("schedule") else None
        d["limits"] = Limits(**d["limits"]) if d.get("limits") else Limits()
        d["batch"] = Batch(**d["batch"]) if d.get("batch") else None
        return cls(**d)


@dataclass(frozen=True)
class DagSpec:
    """A validated DAG. Graph queries name only jobs of this DAG, never external ones."""

    jobs: tuple[JobSpec, ...]
    description: str = ""

    @cached_property
    def _by_name(self) -> dict[str, JobSpec]:
        return {job.name: job for job in self.jobs}

    @cached_property
    def _upstream(self) -> dict[str, list[str]]:
        return {job.name: [d for d in job.dependencies() if d in self._by_name] for job in self.jobs}

    def job(self, name: str) -> JobSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no job named {name!r} in this DAG") from None

    def upstream(self, name: str) -> list[str]:
        """Jobs of this DAG that ``name`` reads from or is triggered by."""
        self.job(name)
        return list(self._upstream[name])

    def downstream(self, name: str) -> list[str]:
        """Jobs of this DAG that read from or are triggered by ``name``, in declaration order."""
        self.job(name)
        return [job.name for job in self.jobs if name in self._upstream[job.name]]

    def topological_order(self) -> list[str]:
        """Upstream before downstream; ties keep declaration order, so the result is stable."""
        index = {job.name: i for i, job in enumerate(self.jobs)}
        waiting = {name: len(ups) for name, ups in self._upstream.items()}
        ready = [i for i, job in enumerate(self.jobs) if waiting[job.name] == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            name = self.jobs[heapq.heappop(ready)].name
            order.append(name)
            for child in self.downstream(name):
                waiting[child] -= 1
                if waiting[child] == 0:
                    heapq.heappush(ready, index[child])
        if len(order) != len(self.jobs):
            raise ValueError("the DAG has a cycle")
        return order

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "jobs": [job.to_dict() for job in self.jobs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DagSpec:
        return cls(jobs=tuple(JobSpec.from_dict(j) for j in data["jobs"]),
                   description=data.get("description", ""))


def default_output_datasets(job: str, count: int) -> tuple[dict[str, Any], ...]:
    """The declarations of ``outputs: <count>``: derived datasets ``<job>``, ``<job>_1`` ..."""
    return tuple(dataset_schema.output_declaration(job if index == 0 else f"{job}_{index}") for index in range(count))


_KINDS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "mapping": lambda v: isinstance(v, Mapping),
    "list": lambda v: isinstance(v, (list, tuple)),
}


class _Parser(TriggerRules):
    """One validation pass; accumulates errors instead of raising at the first one."""

    def __init__(self, operators: Mapping[str, OperatorInfo],
                 external_outputs: Callable[[str], int | None], limits: Mapping[str, Bound],
                 dataset_exists: Callable[[str], bool] = lambda name: True) -> None:
        self.operators = operators
        self.bounds = limits
        self.external_outputs = external_outputs
        self.dataset_exists = dataset_exists
        self.errors: list[dict[str, str]] = []
        self.first_details: dict[str, Any] = {}
        self.first_index: dict[str, int] = {}  # job name -> index of its first definition
        self.outputs: dict[str, int | None] = {}  # None: this job's own `outputs` is invalid
        self.external: dict[str, int | None] = {}
        self.edges: list[tuple[str, int, str]] = []  # (upstream job, consumer index, path)
        self.datasets: dict[str, str] = {}  # dataset name -> path of its first declaration

    def error(self, code: str, path: str, message: str, **details: Any) -> None:
        if not self.errors:
            self.first_details = details
        self.errors.append({"code": code, "path": path, "message": message})

    def check(self, value: Any, kind: str, path: str, expected: str | None = None) -> bool:
        if _KINDS[kind](value):
            return True
        self.error("invalid_type", path, f"expected {expected or kind}, got {type_name(value)}")
        return False

    def mapping(self, value: Any, path: str, keys: tuple[str, ...],
                expected: str = "mapping") -> Mapping[str, Any] | None:
        """The mapping with its keys checked, or None; null values count as absent."""
        if not self.check(value, "mapping", path, expected):
            return None
        for key in value:
            if key not in keys:
                self.error("unknown_key", f"{path}.{key}" if path else str(key),
                           f"unknown key {key!r} (known: {', '.join(keys)})")
        return {k: v for k, v in value.items() if k in keys and v is not None}

    def enum(self, value: Any, path: str, choices: tuple[str, ...], code: str) -> str | None:
        if self.check(value, "string", path):
            if value in choices:
                return value
            self.error(code, path, f"{value!r} is not one of {', '.join(choices)}", known=list(choices))
        return None

    def integer(self, value: Any, path: str, bound: str) -> int | None:
        """An int within ``self.bounds[bound]`` (``out_of_range`` outside it)."""
        if self.check(value, "integer", path) and self.bounded(value, path, bound):
            return value
        return None

    def bounded(self, value: float, path: str, bound: str) -> bool:
        """Whether ``value`` lies within the documented bounds of its field (``tracecore.dags.bounds``)."""
        limits = self.bounds[bound]
        if limits.holds(value):
            return True
        got = f"{value:g}" if isinstance(value, float) else _short(value)
        self.error("out_of_range", path, f"{path.rsplit('.', 1)[-1]} must be {limits.describe()}, got {got}",
                   minimum=limits.low, maximum=limits.high)
        return False

    def duration(self, value: Any, path: str, bound: str) -> float | None:
        """Seconds (``parse_duration``: finite, > 0) within the field's bounds."""
        if self.check(value, "string" if isinstance(value, str) else "number", path,
                      "duration (like '5m') or number of seconds"):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                self.error("invalid_duration", path, str(exc))
                return None
            if self.bounded(seconds, path, bound):
                return seconds
        return None

    def resolve(self, name: str) -> tuple[bool, int | None]:
        """(exists, number of outputs or None if unknown) for a job of this DAG or outside."""
        if name in self.first_index:
            return True, self.outputs[name]
        if name not in self.external:
            self.external[name] = self.external_outputs(name)
        count = self.external[name]
        return count is not None, count

    # -- the DAG ---------------------------------------------------------------

    def parse(self, data: Any) -> DagSpec:
        description = ""
        if isinstance(data, (list, tuple)):
            jobs: Any = data
        elif isinstance(data, Mapping):
            top = self.mapping(data, "", ("jobs", "description"))
            assert top is not None
            if "description" in top and self.check(top["description"], "string", "description"):
                description = top["description"]
            if "jobs" not in top:
                self.error("missing_key", "jobs", "a DAG needs a 'jobs' list")
            jobs = top.get("jobs", [])
            if not self.check(jobs, "list", "jobs"):
                jobs = []
        else:
            raise invalid_body(f"a DAG is a list of jobs or a mapping with 'jobs', got {type_name(data)}")
        for i, raw in enumerate(jobs):  # names and outputs first: inputs may point forward
            if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
                self.first_index.setdefault(raw["name"], i)
                if self.first_index[raw["name"]] == i:
                    outputs: Any = 0 if raw.get("outputs") is None else raw["outputs"]  # not checked yet
                    if _KINDS["list"](outputs):
                        outputs = len(outputs)
                    valid = _KINDS["integer"](outputs) and outputs >= 0
                    self.outputs[raw["name"]] = outputs if valid else None
        if not jobs and not self.errors:
            self.error("invalid_value", "jobs", "a DAG needs at least one job")
        fields = [self.job(i, raw) for i, raw in enumerate(jobs)]
        self.find_cycles(jobs)
        if self.errors:
            first = self.errors[0]
            raise ValidationError(first["message"], path=first["path"], code=first["code"],
                                  details={**self.first_details, "errors": self.errors})
        return DagSpec(jobs=tuple(JobSpec(**f) for f in fields if f is not None), description=description)

    def find_cycles(self, jobs: Any) -> None:
        """Depth-first in the direction data flows; each back edge closes one cycle."""
        adjacency: dict[str, list[tuple[str, str]]] = {name: [] for name in self.first_index}
        for upstream, consumer, path in self.edges:
            name = jobs[consumer].get("name")
            if isinstance(name, str) and self.first_index.get(name) == consumer:  # else it has no edges
                adjacency[upstream].append((name, path))
        state: dict[str, str] = {}
        reported: set[tuple[str, ...]] = set()
        for root in self.first_index:
            if root in state:
                continue
            stack, trail = [iter(adjacency[root])], [root]
            state[root] = "open"
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    state[trail.pop()] = "done"
                    stack.pop()
                elif nxt[0] not in state:
                    state[nxt[0]] = "open"
                    stack.append(iter(adjacency[nxt[0]]))
                    trail.append(nxt[0])
                elif state[nxt[0]] == "open":
                    cycle = [*trail[trail.index(nxt[0]):], nxt[0]]
                    if tuple(cycle) not in reported:
                        reported.add(tuple(cycle))
                        self.error("cycle", nxt[1], f"cycle: {' -> '.join(cycle)}", cycle=cycle)

    # -- one job ---------------------------------------------------------------

    def job(self, i: int, raw: Any) -> dict[str, Any] | None:
        path = f"jobs[{i}]"
        job = self.mapping(raw, path, _JOB_KEYS)
        if job is None:
            return None
        fields: dict[str, Callable[[Any, str, int], Any]] = {
            "activation": lambda v, p, i: self.enum(v, p, ACTIVATIONS, "unknown_activation"),
            "runtime": lambda v, p, i: self.enum(v, p, RUNTIMES, "unknown_runtime"),
            "operator": lambda v, p, i: self.enum(v, p, tuple(sorted(self.operators)), "unknown_operator"),
            "execution_strategy": lambda v, p, i: self.enum(v, p, EXECUTION_STRATEGIES,
                                                            "unknown_execution_strategy"),
            "update_strategy": lambda v, p, i: self.enum(v, p, UPDATE_STRATEGIES, "unknown_update_strategy"),
            "idle_timeout": lambda v, p, i: self.duration(v, p, "idle_timeout"),
            "outputs": lambda v, p, i: self.job_outputs(v, p, i),
            "max_retries": lambda v, p, i: self.integer(v, p, "max_retries"),
            "max_concurrency": lambda v, p, i: self.integer(v, p, "max_concurrency"),
            "description": lambda v, p, i: v if self.check(v, "string", p) else None,
            "trigger": lambda v, p, i: self.trigger(v, p, i, 0, [MAX_TRIGGER_NODES]),
            "refresh": lambda v, p, i: self.enum(v, p, REFRESH_MODES, "invalid_value"),
        }
        out: dict[str, Any] = {}
        for key, value in job.items():
            parse = fields.get(key) or getattr(self, f"job_{key}")
            out["idle_timeout_s" if key == "idle_timeout" else key] = parse(value, f"{path}.{key}", i)
        if isinstance(out.get("outputs"), tuple):
            out["outputs"], out["output_datasets"] = len(out["outputs"]), out["outputs"]
        elif isinstance(out.get("outputs"), int) and isinstance(out.get("name"), str) \
                and self.first_index.get(out["name"]) == i:
            for k, declared in enumerate(default_output_datasets(out["name"], out["outputs"])):
                self.claim_dataset(declared["dataset"], f"{path}.outputs", k)
        self.check_unique_key_columns(out, path)
        for key in ("name", "runtime", "operator"):
            if key not in job:
                self.error("missing_key", f"{path}.{key}", f"job needs {key!r}")
        if out.get("activation") == "scheduled" and "schedule" not in job:
            self.error("missing_key", f"{path}.schedule", "a scheduled job needs 'schedule'")
        if out.get("update_strategy") == "upsert" and "unique_key" not in job:
            self.error("missing_key", f"{path}.unique_key", "update_strategy upsert needs 'unique_key'")
        operator = out.get("operator")
        if operator is not None and self.operators[operator].needs_udf and "udf" not in job:
            self.error("missing_key", f"{path}.udf", f"operator {operator!r} runs user code and needs 'udf'")
        if operator == "http_ingest":
            for code, problem_path, message in http_feed.check_job(job, out, path):
                self.error(code, problem_path, message)
        self.check_data_triggers(job, out, path)
        return out

    def job_outputs(self, value: Any, path: str, i: int) -> int | tuple[dict[str, Any], ...] | None:
        """A count (int form) or one declaration per output (list form)."""
        if not _KINDS["list"](value):
            return self.integer(value, path, "outputs")
        if not self.bounded(len(value), path, "outputs"):
            return None
        declarations = []
        for k, item in enumerate(value):
            declared, problems = dataset_schema.check_output_declaration(item, f"{path}[{k}]")
            for code, problem_path, message in problems:
                self.error(code, problem_path, message)
            if declared is not None:
                self.claim_dataset(declared["dataset"], f"{path}[{k}].dataset")
                declarations.append(declared)
        return tuple(declarations) if len(declarations) == len(value) else None

    def claim_dataset(self, name: str, path: str, index: int | None = None) -> None:
        """A dataset has one producer: a second declaration in the DAG is ``duplicate_dataset``."""
        where = path if index is None else f"{path} (output {index})"
        if name in self.datasets:
            self.error("duplicate_dataset", path, f"dataset {name!r} is already declared at {self.datasets[name]}")
        else:
            self.datasets[name] = where

    def check_unique_key_columns(self, out: Mapping[str, Any], path: str) -> None:
        """The job's unique key must name columns of every output schema it declares."""
        keys = out.get("unique_key") or ()
        for declared in out.get("output_datasets") or ():
            if declared["schema"] is None:
                continue
            columns = {column["name"] for column in declared["schema"]}
            for k, key in enumerate(keys):
                if isinstance(key, str) and key and key not in columns:
                    self.error("unknown_column", f"{path}.unique_key[{k}]",
                               f"unique key column {key!r} is not in the schema of dataset {declared['dataset']!r}")

    def job_name(self, value: Any, path: str, i: int) -> str | None:
        if not self.check(value, "string", path):
            return None
        if not JOB_NAME_RE.fullmatch(value):
            self.error("invalid_value", path, f"job name {value!r} must match ^[a-z][a-z0-9_-]{{0,62}}$")
        elif self.first_index[value] != i:
            self.error("duplicate_job", path, f"job {value!r} is already defined at jobs[{self.first_index[value]}]")
        return value

    def job_limits(self, value: Any, path: str, i: int) -> Limits | None:
        spec = self.mapping(value, path, ("cpu", "memory", "timeout", "pids"))
        if spec is None:
            return None
        cpu, memory, timeout = spec.get("cpu", Limits.cpu), Limits.memory_mb, Limits.timeout_s
        valid_cpu = False
        if self.check(cpu, "number", f"{path}.cpu"):
            if isinstance(cpu, float) and not math.isfinite(cpu):  # an int is finite, however large
                self.error("invalid_value", f"{path}.cpu", f"cpu must be a finite number, got {cpu}")
            else:
                valid_cpu = self.bounded(cpu, f"{path}.cpu", "limits.cpu")
        if "memory" in spec and self.check(spec["memory"], "string" if isinstance(spec["memory"], str)
                                           else "integer", f"{path}.memory", "integer MB or size like '1GB'"):
            try:
                memory = parse_memory_mb(spec["memory"])
            except ValueError as exc:
                self.error("invalid_value", f"{path}.memory", str(exc))
            else:
                self.bounded(memory, f"{path}.memory", "limits.memory")
        if "timeout" in spec:
            timeout = self.duration(spec["timeout"], f"{path}.timeout", "limits.timeout") or timeout
        pids = self.integer(spec.get("pids", Limits.pids), f"{path}.pids", "limits.pids")
        return Limits(float(cpu) if valid_cpu else Limits.cpu, memory, timeout, pids or Limits.pids)

    def job_inputs(self, value: Any, path: str, i: int) -> tuple[InputRef, ...] | None:
        if not self.check(value, "list", path):
            return None
        refs = []
        for k, item in enumerate(value):
            item_path = f"{path}[{k}]"
            entry = self.mapping(item, item_path, ("from",))
            if entry is None:
                continue
            if "from" not in entry:
                self.error("missing_key", f"{item_path}.from",
                           "an input needs 'from: {job, output}' or 'from: {dataset}'")
                continue
            source = self.mapping(entry["from"], f"{item_path}.from", ("job", "output", "dataset"))
            if source is None:
                continue
            if "dataset" in source:
                ref = self.dataset_input(source, f"{item_path}.from")
                if ref is not None:
                    refs.append(ref)
                continue
            for key in ("job", "output"):
                if key not in source:
                    self.error("missing_key", f"{item_path}.from.{key}", f"an input needs 'from.{key}'")
            job, output = source.get("job"), source.get("output")
            exists, count = False, None
            if job is not None and self.check(job, "string", f"{item_path}.from.job"):
                exists, count = self.resolve(job)
                if not exists:
                    self.error("unknown_input_job", f"{item_path}.from.job",
                               f"no job {job!r} in this DAG or elsewhere in the organization")
                elif job in self.first_index:
                    self.edges.append((job, i, f"{item_path}.from.job"))
            if output is not None and (output := self.integer(output, f"{item_path}.from.output",
                                                              "inputs.output")) is not None:
                if exists and count is not None and output >= count:
                    self.error("unknown_output", f"{item_path}.from.output",
                               f"job {job!r} has {count} output(s); output {output} does not exist")
                if isinstance(job, str):  # else an error is already recorded
                    refs.append(InputRef(job, output))
        return tuple(refs)

    def dataset_input(self, source: Mapping[str, Any], path: str) -> InputRef | None:
        if set(source) != {"dataset"}:
            self.error("invalid_value", path, "'from: {dataset}' takes no 'job' or 'output'")
            return None
        name = source["dataset"]
        if not self.check(name, "string", f"{path}.dataset"):
            return None
        own_name = name.rpartition("__")[2]
        if not dataset_schema.DATASET_NAME_RE.fullmatch(own_name) or len(name) > 200:
            self.error("invalid_value", f"{path}.dataset", f"{_short(name)!r} is not a dataset name")
            return None
        if not self.dataset_exists(name):
            self.error("unknown_input_dataset", f"{path}.dataset",
                       f"no dataset {name!r} this organization can read (its own, granted, or a chain's)")
            return None
        return InputRef(dataset=name)

    def job_unique_key(self, value: Any, path: str, i: int) -> tuple[str, ...] | None:
        keys = [value] if isinstance(value, str) else value
        if not self.check(keys, "list", path, "string or list of strings"):
            return None
        if not keys:
            self.error("invalid_value", path, "unique_key must name at least one column")
        for k, key in enumerate(keys):
            if self.check(key, "string", f"{path}[{k}]") and not key:
                self.error("invalid_value", f"{path}[{k}]", "a column name cannot be empty")
        return tuple(keys)

    def job_config(self, value: Any, path: str, i: int) -> dict[str, Any] | None:
        """The config reaches the sandbox as JSON, so it must hold plain JSON values only."""
        if not self.check(value, "mapping", path):
            return None
        budget, todo = MAX_CONFIG_NODES, [(value, path, 0)]
        while todo:
            item, at, depth = todo.pop()
            budget -= 1
            if budget < 0 or depth > MAX_CONFIG_DEPTH:
                self.error("invalid_value", at, "config is too large or nested too deeply")
                return None
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not isinstance(key, str):
                        self.error("invalid_type", f"{at}.{key}", f"expected string key, got {type_name(key)}")
                    todo.append((child, f"{at}.{key}", depth + 1))
            elif isinstance(item, (list, tuple)):
                todo.extend((child, f"{at}[{k}]", depth + 1) for k, child in enumerate(item))
            elif not (item is None or isinstance(item, (str, int, bool))
                      or (isinstance(item, float) and math.isfinite(item))):
                self.error("invalid_type", at, f"expected a JSON value, got {type_name(item)}")
        return copy.deepcopy(dict(value))

    def job_udf(self, value: Any, path: str, i: int) -> UdfRef | None:
        udf = self.mapping(value, path, ("bundle_id", "entrypoint"))
        if udf is None:
            return None
        parts = []
        for key in ("bundle_id", "entrypoint"):
            if key not in udf:
                self.error("missing_key", f"{path}.{key}", f"udf needs {key!r}")
            elif self.check(udf[key], "string", f"{path}.{key}"):
                if not udf[key].strip():
                    self.error("invalid_value", f"{path}.{key}", f"{key} cannot be empty")
                parts.append(udf[key])
        return UdfRef(*parts) if len(parts) == 2 else None

    def job_schedule(self, value: Any, path: str, i: int) -> Schedule | None:
        if isinstance(value, str):
            cron = self.cron(value, path)
            return Schedule(cron=cron) if cron else None
        spec = self.mapping(value, path, ("cron", "every", "timezone", "catch_up"), "cron string or mapping")
        if spec is None:
            return None
        kinds = [k for k in ("cron", "every") if k in spec]
        if not kinds:
            self.error("missing_key", path, "schedule needs 'cron' or 'every'")
        elif len(kinds) == 2:
            self.error("invalid_value", path, "schedule takes exactly one of 'cron' and 'every'")
        cron = self.cron(spec["cron"], f"{path}.cron") if "cron" in spec else None
        every = self.duration(spec["every"], f"{path}.every", "schedule.every") if "every" in spec else None
        timezone = spec.get("timezone", "UTC")
        if self.check(timezone, "string", f"{path}.timezone"):
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                self.error("invalid_value", f"{path}.timezone", f"unknown time zone {timezone!r} (IANA names)")
        catch_up = self.integer(spec.get("catch_up", 0), f"{path}.catch_up", "schedule.catch_up")
        return Schedule(cron, every, timezone, catch_up or 0)

    def cron(self, value: Any, path: str) -> str | None:
        if not self.check(value, "string", path, "cron string"):
            return None
        fields = value.split()
        if len(fields) not in (5, 6):
            self.error("invalid_cron", path, f"cron {value!r} needs 5 fields (6 with seconds), has {len(fields)}")
        elif not croniter.is_valid(" ".join(fields), strict=True):
            self.error("invalid_cron", path, f"invalid cron expression {value!r}")
        else:
            return " ".join(fields)
        return None

def parse_dag(body: bytes | str | object, *, content_type: str | None = None,
              external_outputs: Callable[[str], int | None] = lambda name: None,
              operators: Mapping[str, OperatorInfo], limits: Mapping[str, Bound] | None = None,
              dataset_exists: Callable[[str], bool] = lambda name: True) -> DagSpec:
    """Parse raw YAML/JSON text or an already-parsed object into a validated DagSpec.

    ``external_outputs(name)`` tells how many outputs a job outside this DAG has
    (another DAG of the org, or a platform source such as ``block_follower``), or
    None if there is no such job; a job of this DAG wins over an external one.
    ``dataset_exists(name)`` tells whether a ``from: {dataset}`` input names a dataset the org
    can read (default: any name is taken). ``limits`` are the numeric bounds
    (``tracecore.dags.bounds.bounds(settings)``; default: the settings' defaults). Raises
    ValidationError listing every problem in ``details["errors"]``.
    """
    data = load_body(body, content_type) if isinstance(body, (bytes, str)) else body
    return _Parser(operators, external_outputs, limits or bounds(), dataset_exists).parse(data)


def _short(value: Any) -> str:
    """A number for a message: a 400-digit int is not echoed whole."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"
