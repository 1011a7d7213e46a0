"""Generate Python code and typed stubs from proto/ into controlplane/api/.

    python scripts/genproto.py          # regenerate
    python scripts/genproto.py --check  # fail if controlplane/api/ is stale

protoc names generated modules after the proto package (`controlplane.node.v1`), which
would collide with our own `controlplane` package, so the output is moved under
`controlplane.api` and its imports rewritten to match.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "controlplane" / "api"
_IMPORT = re.compile(r"^(from|import) controlplane\.", re.MULTILINE)
_QUALIFIED = re.compile(r"(?<![\w.])controlplane\.(?=\w+\.v\d)")


def generate(dest: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            # The plugins live beside this interpreter, whether or not its bin is on PATH.
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        result = subprocess.run(cmd, check=False, cwd=PROTO, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit(result.returncode)
        src = Path(tmp) / "controlplane"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        (dest / "__init__.py").write_text(
            '"""Generated from proto/ by scripts/genproto.py. Do not edit."""\n'
        )
        for path in sorted(src.rglob("*")):
            target = dest / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                (target / "__init__.py").touch()
                continue
            text = _IMPORT.sub(lambda m: f"{m.group(1)} controlplane.api.", path.read_text())
            if path.suffix == ".pyi":
                text = _QUALIFIED.sub("controlplane.api.", text)
            target.write_text(text)


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs if d != "__pycache__")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "api"
        generate(fresh)
        if not same_tree(fresh, OUT):
            print("controlplane/api is stale: run `python scripts/genproto.py`", file=sys.stderr)
            return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
