"""Docs, docstrings and comments name only files that are in this repository: every
Python file or document (`.py`, `.md`) they name is a tracked file, found by its path
(or the end of one) or, for a bare name, by its file name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_REFERENCE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.(?:py|md))\b")
# Names that stand for another project's file, a generated one, or a placeholder.
_ELSEWHERE = ("_pb2", "path/to/", "script.py", "file.py")


def tracked() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()


def test_every_file_named_in_docs_and_code_exists() -> None:
    files = tracked()
    names = {Path(f).name for f in files}
    sources = [
        f
        for f in files
        if f.endswith((".py", ".md", ".proto", ".toml", ".yaml", ".service", ".go", "Makefile", "Dockerfile"))
        and not f.startswith("controlplane/api/")
    ]
    missing: list[str] = []
    for source in sources:
        text = (ROOT / source).read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for ref in _REFERENCE.findall(line):
                if ref.startswith(_ELSEWHERE) or any(part in ref for part in _ELSEWHERE):
                    continue
                path = ref.lstrip("./")
                found = path in files if "/" in path else path in names
                if "/" in path and not found:
                    found = any(f.endswith("/" + path) for f in files)
                if not found:
                    missing.append(f"{source}:{number}: {ref}")
    assert missing == [], "\n".join(missing)
