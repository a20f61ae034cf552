"""import-linter contracts that import-linter does not ship.

``acyclic_modules``: no import cycle between two modules.

import-linter's ``acyclic_siblings`` squashes sibling packages, which is a coarser (and different)
rule. The project's rule (docs/architecture.md) is per file: no two modules may import each other,
directly or through others, counting imports inside functions too (grimp sees those: a local
import that dodges a cycle at run time is still a cycle in the design). The check finds the
strongly connected components of grimp's module graph and fails on any of more than one module.

``stdlib_only``: the files of a folder import only the standard library and each other. For
``workers/runtime``, the code that runs inside the sandbox (copied there as loose files, so it is
no package grimp can see): it must import nothing of the project, nor any third-party library.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def import_cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module among ``modules`` (Tarjan's
    algorithm, iterative: the graph may be deeper than Python's recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


class AcyclicModulesContract(Contract):
    """``type = acyclic_modules``; ``containers``: the packages whose modules may form no cycle."""

    type_name = "acyclic_modules"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        modules = {module for container in self.containers  # type: ignore[attr-defined]
                   for module in graph.find_descendants(container) | {container}}
        cycles = import_cycles(graph, modules)
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(f"{len(cycle)} modules import each other in a cycle:", bold=True)
            for module in cycle:
                output.indent_cursor()
                output.print_error(module, bold=False)
            output.new_line()


def foreign_imports(directory: Path) -> list[str]:
    """``file:line name`` for each import in ``directory``'s Python files that is neither the
    standard library nor a sibling file."""
    files = sorted(directory.glob("*.py"))
    allowed = set(sys.stdlib_module_names) | {path.stem for path in files} | {"__future__"}
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            found += [f"{path}:{node.lineno} {name}" for name in names if name.split(".")[0] not in allowed]
    return found


class StdlibOnlyContract(Contract):
    """``type = stdlib_only``; ``directories``: folders (from the working directory) to check."""

    type_name = "stdlib_only"

    directories = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        missing = [name for name in self.directories if not Path(name).is_dir()]  # type: ignore[attr-defined]
        found = [f"{name}: no such folder" for name in missing] + [
            line for name in self.directories if name not in missing  # type: ignore[attr-defined]
            for line in foreign_imports(Path(name))]
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["found"]:
            output.print_error(f"{line}: not the standard library", bold=False)
        output.new_line()
