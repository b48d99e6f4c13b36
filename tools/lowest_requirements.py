"""Print pip constraints pinning every dependency of pyproject.toml to its lowest claimed version.

`make test-oldest` installs with them, so the lower bounds in pyproject.toml are tested, not hoped:
a bound that pip cannot satisfy together with the others, or that fails the tests, must be raised.
"""

import re
import sys
import tomllib
from pathlib import Path


def lowest_pins(pyproject: Path, extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """`name==lowest` for every requirement with a `>=` lower bound (the main list and `extras`)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    pins = []
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", requirement)
        name, spec = match.group(1).split("[")[0], match.group(2)
        lower = re.search(r">=\s*([^,;\s]+)", spec)
        if lower is None:
            sys.exit(f"{pyproject}: {requirement!r} has no lower bound (>=); every dependency must claim one")
        pins.append(f"{name}=={lower.group(1)}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    print("\n".join(lowest_pins(root / "pyproject.toml")))
