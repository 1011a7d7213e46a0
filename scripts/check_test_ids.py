"""Check that every test id in tests/kept.txt is still collected, or mapped to one that is.

python -m scripts.check_test_ids          # fail, naming each id that went missing
python -m scripts.check_test_ids --add    # also append ids collected but not listed
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

KEPT = Path("tests/kept.txt")


def collected() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        check=False,
    )
    ids = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    if out.returncode != 0 or not ids:
        sys.exit(f"collecting the tests failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return ids


def main(argv: list[str]) -> int:
    lines = KEPT.read_text().splitlines()
    now = collected()
    listed: set[str] = set()
    missing: list[str] = []
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        old, _, new = (part.strip() for part in line.partition("->"))
        listed.add(old)
        if new:
            listed.add(new)
        if (new or old) not in now:
            missing.append(f"{old} -> {new}" if new else old)
    if missing:
        print(
            f"{len(missing)} kept test id(s) are not collected any more; map each to the test",
            "that covers it now in tests/kept.txt (OLD -> NEW):",
            file=sys.stderr,
        )
        for item in missing:
            print(f"  {item}", file=sys.stderr)
        return 1
    new_ids = sorted(now - listed)
    if "--add" in argv and new_ids:
        with KEPT.open("a") as f:
            f.writelines(f"{i}\n" for i in new_ids)
        print(f"added {len(new_ids)} new test id(s) to {KEPT}")
        listed.update(new_ids)
    print(f"{len(listed)} kept test ids, all collected ({len(now)} tests in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
