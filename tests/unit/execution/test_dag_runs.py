"""Unit tests of tracecore.execution.dag_runs.shape: how a DAG run is laid out as a canvas."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.unit.dags.test_spec import parse
from tracecore.dags.spec import DagSpec
from tracecore.execution.dag_runs import MAX_NESTING, Parallel, Series, Shape, shape


def dag(edges: str, *lonely: str) -> DagSpec:
    """``"a>b a>c"``: b and c read a's output; jobs are declared in order of first mention."""
    upstream: dict[str, list[str]] = {}
    for edge in edges.split():
        up, down = edge.split(">")
        upstream.setdefault(up, [])
        upstream.setdefault(down, []).append(up)
    for name in lonely:
        upstream.setdefault(name, [])
    return parse([{"name": name, "runtime": "platform", "operator": "transform", "outputs": 1,
                   "inputs": [{"from": {"job": up, "output": 0}} for up in ups]}
                  for name, ups in upstream.items()])


def s(*steps: Shape) -> Series:
    return Series(steps)


def p(*steps: Shape) -> Parallel:
    return Parallel(steps)


@pytest.mark.parametrize(("edges", "lonely", "expected"), [
    ("", ("a",), "a"),
    ("a>b b>c", (), s("a", "b", "c")),
    ("", ("a", "b"), p("a", "b")),
    # the diamond: d is the callback of a chord over b and c
    ("a>b a>c b>d c>d", (), s("a", p("b", "c"), "d")),
    # independent pipelines do not wait for each other (levels would make d wait for a)
    ("a>b c>d", (), p(s("a", "b"), s("c", "d"))),
    # a fan-in over a chain and a single job: d waits for b and c, b alone waits for a
    ("a>b b>d c>d", (), s(p(s("a", "b"), "c"), "d")),
    # a fan-out then two separate fan-ins
    ("a>b a>c a>d b>e c>e d>f", (), s("a", p(s(p("b", "c"), "e"), s("d", "f")))),
    # nested: a chord whose header holds a chord
    ("a>b a>c b>d c>d d>f e>f", (), s(p(s("a", p("b", "c"), "d"), "e"), "f")),
])
def test_series_parallel_dags_are_laid_out_exactly(edges: str, lonely: tuple[str, ...], expected: Shape) -> None:
    spec = dag(edges, *lonely)
    assert shape(spec, spec.topological_order()) == expected


def test_a_part_with_no_exact_layout_runs_level_by_level() -> None:
    """a -> c, b -> c, b -> d: no canvas lets d wait for b alone and c for both; levels keep order."""
    spec = dag("a>c b>c b>d")
    assert shape(spec, spec.topological_order()) == s(p("a", "b"), p("c", "d"))


def test_only_the_jobs_of_the_run_are_laid_out() -> None:
    """A re-run of b's downstream: a (not in the run) is ignored, so b starts at once."""
    spec = dag("a>b b>c b>d")
    assert shape(spec, ["b", "c", "d"]) == s("b", p("c", "d"))


def waits_for(step: Shape, before: frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
    """For each job, the jobs the canvas makes it wait for."""
    if isinstance(step, str):
        return {step: before}
    out: dict[str, frozenset[str]] = {}
    for inner in step.steps:
        inner_waits = waits_for(inner, before)
        out.update(inner_waits)
        if isinstance(step, Series):
            before = before | frozenset(inner_waits)
    return out


def ancestors_of(spec: DagSpec) -> dict[str, set[str]]:
    ancestors: dict[str, set[str]] = {}
    for name in spec.topological_order():
        ancestors[name] = set(spec.upstream(name)).union(*(ancestors[up] for up in spec.upstream(name)))
    return ancestors


def has_an_n(names: list[str], ancestors: dict[str, set[str]]) -> bool:
    """Whether the DAG's order holds an N (a < c > b < d, nothing else between them): exactly the
    orders that are not series-parallel, so no canvas makes every job wait for its ancestors alone."""
    def below(x: str, y: str) -> bool:
        return x in ancestors[y]

    def apart(x: str, y: str) -> bool:
        return not below(x, y) and not below(y, x)

    return any(below(a, c) and below(b, c) and below(b, d) and apart(a, b) and apart(a, d) and apart(c, d)
               for a, b, c, d in itertools.permutations(names, 4))


def test_random_dags_wait_for_their_ancestors_and_exactly_those_when_series_parallel() -> None:
    generator = random.Random(7)
    exact = inexact = 0
    for _ in range(250):
        names = [f"j{i}" for i in range(generator.randint(1, 8))]
        edges = [f"{up}>{down}" for up, down in itertools.combinations(names, 2) if generator.random() < 0.3]
        spec = dag(" ".join(edges), *names)
        laid_out = shape(spec, spec.topological_order())
        waits = waits_for(laid_out)
        assert sorted(waits) == sorted(names), laid_out  # every job exactly once
        ancestors = ancestors_of(spec)
        for name in names:
            assert ancestors[name] <= waits[name], (edges, laid_out)  # never before an upstream
        if has_an_n(names, ancestors):
            inexact += 1
            assert any(waits[name] != ancestors[name] for name in names)
        else:
            exact += 1
            assert all(waits[name] == ancestors[name] for name in names), (edges, laid_out)
    assert exact > 50 and inexact > 20  # both kinds were drawn


def test_a_long_chain_is_one_flat_series() -> None:
    names = [f"s{i:04d}" for i in range(3000)]
    spec = dag(" ".join(f"{up}>{down}" for up, down in itertools.pairwise(names)))
    assert shape(spec, names) == Series(tuple(names))


def test_nesting_past_the_limit_is_laid_out_level_by_level_and_stays_ordered() -> None:
    """a0 -> a1 -> ... with a side job s_i below each a_i, all joined by z: each a_i nests the
    next one step deeper; past MAX_NESTING the rest runs level by level."""
    n = MAX_NESTING
    edges = [f"a{i}>a{i + 1}" for i in range(n - 1)] + [f"a{i}>s{i}" for i in range(n)] \
        + [f"s{i}>z" for i in range(n)] + [f"a{n - 1}>z"]
    spec = dag(" ".join(edges))
    laid_out = shape(spec, spec.topological_order())
    waits, ancestors = waits_for(laid_out), ancestors_of(spec)
    assert sorted(waits) == sorted(ancestors)
    assert all(ancestors[name] <= waits[name] for name in ancestors)
    assert any(ancestors[name] != waits[name] for name in ancestors)  # the levels part over-waits
    assert waits["s0"] == {"a0"} and waits["z"] == set(ancestors) - {"z"}  # the nested part is exact
