"""Whether a set of wheels plus what a node already has satisfies a set of requirements.

``pip install --no-deps`` on the node checks nothing, and the node has no index to
fetch a forgotten package from: this walks the requirements here instead, from the
roots through every carried wheel's ``Requires-Dist`` (markers evaluated for the
node's Python), and says which requirement is met by neither.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


@dataclass(frozen=True)
class Wheel:
    """One carried wheel: its normalised name, version and ``Requires-Dist`` lines."""

    name: str
    version: Version
    requires: tuple[Requirement, ...]

    @classmethod
    def read(cls, path: Path) -> "Wheel":
        """Reads name and version from the file name, requirements from ``*.dist-info/METADATA``."""
        name, version, _build, _tags = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as archive:
            metadata = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            headers = HeaderParser().parsestr(archive.read(metadata).decode())
        return cls(canonicalize_name(name), version, tuple(Requirement(r) for r in headers.get_all("Requires-Dist", [])))


@dataclass
class Closure:
    """What :func:`resolve` found.

    Attributes:
        problems: One line per requirement that nothing meets, per carried wheel whose
            version a requirement excludes, per carried wheel that nothing needs.
        on_node: ``(name + specifier, needed_by)`` for each requirement (its marker
            already evaluated) the node's own packages are to meet; their versions
            are checked on the node itself.
    """

    problems: list[str] = field(default_factory=list)
    on_node: list[tuple[str, str]] = field(default_factory=list)


def marker_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython ``python_version`` (``"3.12"``) on Linux x86_64."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "platform_release": "", "platform_version": "", "implementation_version": f"{python_version}.0"}


def applies(marker: Marker | None, environment: dict[str, str], extras: frozenset[str]) -> bool:
    """Whether a requirement with ``marker`` holds for a package installed with ``extras``."""
    if marker is None:
        return True
    return any(marker.evaluate({**environment, "extra": extra}) for extra in extras | {""})


def resolve(roots: list[tuple[Requirement, str]], wheels: list[Wheel], node: dict[str, Version | None],
            python_version: str) -> Closure:
    """Walks ``roots`` through ``wheels``; what no wheel carries must be on ``node``.

    Args:
        roots: ``(requirement, who needs it)`` pairs to start from.
        wheels: The carried wheels (one version each).
        node: The node's packages by normalised name, with the version where it is known.
        python_version: The node's ``X.Y``.
    """
    environment = marker_environment(python_version)
    carried = {wheel.name: wheel for wheel in wheels}
    closure, used, seen = Closure(), set(), set()
    todo = [(requirement, needed_by) for requirement, needed_by in roots
            if applies(requirement.marker, environment, frozenset())]
    while todo:
        requirement, needed_by = todo.pop()
        name = canonicalize_name(requirement.name)
        wanted = f"{name}{requirement.specifier}"  # its marker, if any, already holds
        wheel = carried.get(name)
        if wheel is not None:
            used.add(name)
            if not requirement.specifier.contains(wheel.version, prereleases=True):
                closure.problems.append(f"{name} {wheel.version} is carried, but {needed_by} needs {wanted}")
            extras = frozenset(requirement.extras)
            if (name, extras) in seen:
                continue
            seen.add((name, extras))
            todo.extend((needed, f"{name}{'[' + ','.join(sorted(extras)) + ']' if extras else ''}")
                        for needed in wheel.requires if applies(needed.marker, environment, extras))
        elif name in node:
            known = node[name]
            if known is not None and not requirement.specifier.contains(known, prereleases=True):
                closure.problems.append(f"the node has {name} {known}, but {needed_by} needs {wanted}")
            closure.on_node.append((wanted, needed_by))
        else:
            closure.problems.append(f"{wanted} (needed by {needed_by}) is neither carried nor on the node")
    closure.problems += [f"{name} is carried but nothing needs it" for name in sorted(set(carried) - used)]
    closure.on_node = sorted(set(closure.on_node))
    return closure


def read_package_list(path: Path) -> dict[str, Version | None]:
    """Reads ``name`` or ``name==version`` lines (``#`` starts a comment) into ``{normalised name: version}``."""
    packages: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name.strip())] = Version(version.strip()) if version.strip() else None
    return packages
