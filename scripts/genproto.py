"""Generate Python code and typed stubs from proto/ into controlplane/api/.

    python scripts/genproto.py          # regenerate
    python scripts/genproto.py --check  # fail if controlplane/api/ is stale

protoc names generated modules after the proto package (`controlplane.node.v1`), which
would collide with our own `controlplane` package, so the output is moved under
`controlplane.api` and its imports rewritten to match.

`proto/third_party/` holds messages named by other projects (Envoy's metrics service,
Prometheus' data model; see its README). They go to `controlplane/api/third_party/`,
since their own package names (`envoy`, `io`) belong to xds-protos and to the standard
library. They import Envoy's `Node` from xds-protos: protoc reads it from the installed
package's descriptors, so the generated code uses that very message.
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
from typing import Any

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
THIRD_PARTY = PROTO / "third_party"
OUT = ROOT / "controlplane" / "api"
_IMPORT = re.compile(r"^(from|import) controlplane\.", re.MULTILINE)
_QUALIFIED = re.compile(r"(?<![\w.])controlplane\.(?=\w+\.v\d)")


def _protoc(proto_root: Path, protos: list[str], out: str, extra: list[str]) -> None:
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        *extra,
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        # The plugins live beside this interpreter, whether or not its bin is on PATH.
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    result = subprocess.run(cmd, check=False, cwd=proto_root, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(result.returncode)


def generate(dest: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto") if THIRD_PARTY not in p.parents)
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(PROTO, protos, tmp, [])
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
    generate_third_party(dest / "third_party")


def _envoy_dependencies(path: Path) -> None:
    """The descriptors of Envoy's base.proto and all it imports, from xds-protos."""
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import descriptor_pb2

    files: dict[str, Any] = {}
    stack = [base_pb2.DESCRIPTOR]
    while stack:
        fd = stack.pop()
        if fd.name not in files:
            files[fd.name] = fd
            stack.extend(fd.dependencies)
    out = descriptor_pb2.FileDescriptorSet()
    for name in sorted(files):
        proto = out.file.add()
        files[name].CopyToProto(proto)
    path.write_bytes(out.SerializeToString(deterministic=True))


def generate_third_party(dest: Path) -> None:
    protos = sorted(str(p.relative_to(THIRD_PARTY)) for p in THIRD_PARTY.rglob("*.proto"))
    # Python packages generated here, which their importers must find under dest.
    ours = sorted({str(Path(p).parent).replace("/", ".") for p in protos}, key=len, reverse=True)
    prefix = "controlplane.api.third_party."
    imports = re.compile(rf"^(from|import) ({'|'.join(re.escape(o) for o in ours)})\b", re.MULTILINE)
    qualified = re.compile(rf"(?<![\w.])(?=(?:{'|'.join(re.escape(o) for o in ours)})\.\w+_pb2\b)")
    with tempfile.TemporaryDirectory() as tmp:
        deps = Path(tmp) / "envoy-deps.pb"
        _envoy_dependencies(deps)
        out = Path(tmp) / "out"
        out.mkdir()
        _protoc(THIRD_PARTY, protos, str(out), [f"--descriptor_set_in={deps}"])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "__init__.py").write_text(
            '"""Generated from proto/third_party/ by scripts/genproto.py. Do not edit."""\n'
        )
        for path in sorted(out.rglob("*")):
            target = dest / path.relative_to(out)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                (target / "__init__.py").touch()
                continue
            text = imports.sub(lambda m: f"{m.group(1)} {prefix}{m.group(2)}", path.read_text())
            if path.suffix == ".pyi":
                text = qualified.sub(prefix, text)
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
