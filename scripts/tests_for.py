"""Print the unit and integration test files that import a package or module directly.

    python -m scripts.tests_for controlplane/domain/bundles

`make test-for PKG=...` runs them on SQLite: the tests of what a developer touches,
without the whole suite. Direct imports only (every integration test reaches everything
through the server), so this is a first loop, not a substitute for `make test`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

TIERS = ("tests/unit", "tests/integration")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m scripts.tests_for PATH (e.g. controlplane/domain/bundles)", file=sys.stderr)
        return 2
    target = argv[0].removesuffix(".py").strip("/").replace("/", ".")
    found = [
        str(path)
        for tier in TIERS
        for path in sorted(Path(tier).glob("test_*.py"))
        if any(name == target or name.startswith(target + ".") for name in imported(path))
    ]
    if not found:
        print(f"no unit or integration test imports {target}", file=sys.stderr)
        return 1
    print(" ".join(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
