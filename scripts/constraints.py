"""Pin every distribution Chorus installs, to the versions installed now: ``constraints.txt``.

    .venv/bin/python scripts/constraints.py --write   # after changing a dependency (in the test venv)
    .venv/bin/python scripts/constraints.py --check   # exit 1 when one is not pinned (test_packaging)

``./chorus.sh`` installs with ``-c constraints.txt``, so a fresh install gets exactly the tested
versions, and a new release of a dependency cannot break it silently. The tree is walked from
``chorus[test]`` (which takes in ``dev`` and ``load``) and ``chorus-client``, evaluating markers for
this interpreter, so it is exact for the Python and platform it is written on (CI's: Debian 12, 3.11).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
ROOTS = [("chorus", {"test"}), ("chorus-client", set())]
OWN = {"chorus", "chorus-client"}  # installed editable from the checkout, never pinned
HEADER = "# Every distribution ./chorus.sh installs, pinned: scripts/constraints.py --write regenerates it.\n"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tree() -> dict[str, str]:
    """Distribution name -> installed version, for everything the roots require."""
    found: dict[str, str] = {}
    todo = list(ROOTS)
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonical(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        if canonical(name) not in OWN:
            found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((req.name, set(req.extras)))
    return found


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def pinned(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    installed = tree()
    if args.write:
        CONSTRAINTS.write_text(render(installed))
        print(f"{CONSTRAINTS.name}: {len(installed)} pins")
        return 0
    pins = pinned(CONSTRAINTS.read_text())
    missing = sorted(set(installed) - set(pins))
    differ = sorted(n for n in set(installed) & set(pins) if installed[n] != pins[n])
    for name in missing:
        print(f"not pinned: {name} (installed {installed[name]})", file=sys.stderr)
    for name in differ:
        print(f"installed {name} {installed[name]}, pinned {pins[name]}", file=sys.stderr)
    return 1 if missing or differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
