"""The bundle runtimes and the vetted libraries each one's image carries (GET /v1/runtimes).

One source: the pinned lists the images are built from, ``deploy/images/python-libraries.txt`` and
``node-libraries.txt`` (this package's ``*-libraries.txt`` are symlinks to them, shipped as package data,
so the API and the images cannot disagree). A line is ``name==version  # reason`` (Python) or
``name@version  # reason`` (Node); a reason starting with "dependency of" marks a library that is there
for another one (importable all the same).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
_LINE = re.compile(r"^(?P<name>@?[A-Za-z0-9][A-Za-z0-9._/-]*)(?:==|@)(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)"
                   r"\s*(?:#\s*(?P<reason>.*))?$")


@dataclass(frozen=True)
class Library:
    name: str
    version: str
    reason: str
    dependency: bool  # there because another vetted library needs it


@dataclass(frozen=True)
class Runtime:
    name: str  # the bundle's runtime field
    image: str
    language: str
    libraries: tuple[Library, ...]
    import_note: str


def parse_libraries(text: str) -> tuple[Library, ...]:
    """The entries of a library list; a line that is neither blank, a comment nor ``name==version`` raises."""
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"line {number}: not 'name==version  # reason' or 'name@version  # reason': {raw!r}")
        reason = (match["reason"] or "").strip()
        found.append(Library(match["name"], match["version"], reason, reason.startswith("dependency of")))
    return tuple(found)


@functools.cache
def runtimes() -> tuple[Runtime, ...]:
    """Every bundle runtime, with its image's vetted libraries (read once per process)."""
    python = parse_libraries((HERE / "python-libraries.txt").read_text())
    node = parse_libraries((HERE / "node-libraries.txt").read_text())
    return (
        Runtime("python3.11", "trace-runtime-python", "Python 3.11", python,
                "import them as installed packages; a copy vendored at the bundle's root wins"),
        Runtime("nodejs", "trace-runtime-node", "Node.js 18", node,
                "require() them (CommonJS; NODE_PATH); the bundle's own node_modules wins"),
        Runtime("provided", "trace-runtime-python", "any: an executable 'bootstrap' speaking the Lambda Runtime API",
                (), "none: a provided bundle brings everything it needs"),
    )


def vetted_libraries(runtime: str) -> dict[str, str]:
    """name -> pinned version of the libraries ``runtime``'s image carries."""
    for entry in runtimes():
        if entry.name == runtime:
            return {library.name: library.version for library in entry.libraries}
    raise KeyError(runtime)
