"""Requirements from pyproject.toml, for .ci/run.

    python3 .ci/deps.py lowest [EXTRA ...]   constraints pinning every dependency
                                             (and those of the extras) to the lower
                                             bound it states: "name==min", one a line
    python3 .ci/deps.py specs EXTRA          the extra's requirements as written
    python3 .ci/deps.py check FILE           exit 1 unless every pin in FILE is what
                                             the running Python has installed

Every runtime and test dependency must state a lower bound (">=X"): the
oldest end CI proves. A requirement without one is an error here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def requirements(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def lowest(extras: list[str]) -> list[str]:
    pins = []
    for req in requirements(extras):
        m = REQ.match(req)
        if m is None:
            raise SystemExit(f"deps.py: cannot read requirement {req!r}")
        name, spec = m.group(1), m.group(2)
        low = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        if low is None:
            raise SystemExit(f"deps.py: {req!r} states no lower bound (>=): CI cannot prove it")
        pins.append(f"{name}=={low.group(1)}")
    return pins


def same_release(a: str, b: str) -> bool:
    """``0.23`` and ``0.23.0`` are one release (PEP 440: trailing zeros)."""

    def key(v: str) -> list[str]:
        parts = v.split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return parts

    return key(a) == key(b)


def check(path: str) -> int:
    bad = 0
    for line in Path(path).read_text("utf-8").split():
        name, want = line.split("==")
        have = metadata.version(name)
        ok = same_release(have, want)
        print(f"  {name} {have}" + ("" if ok else f"  (pinned {want}: NOT the lower bound)"))
        bad += not ok
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    match argv:
        case ["lowest", *extras]:
            print("\n".join(lowest(extras)))
        case ["specs", extra]:
            print("\n".join(requirements([extra])[len(requirements([])) :]))
        case ["check", path]:
            return check(path)
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
