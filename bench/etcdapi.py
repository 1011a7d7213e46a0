"""etcd's v3 API for the benchmark, generated from etcd's own .proto files at run time.

Debian's `golang-etcd-server-dev` ships etcd 3.4's `.proto` files under
`/usr/share/gocode/src/go.etcd.io/etcd` (override with `ETCD_PROTO_ROOT`). They import
gogoproto and Google's HTTP annotations, which only steer Go code generation and the REST
gateway; those imports and options are stripped here, so nothing else has to be installed
and the wire format (messages, field numbers, services) is untouched. The result is
generated with grpcio-tools into `.bench-out/etcd-api/`, never committed.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import OUT

DEFAULT_ROOT = Path("/usr/share/gocode/src/go.etcd.io/etcd")
# Import path as the files spell it ("etcd/mvcc/mvccpb/kv.proto") → path under the root.
FILES = {
    "etcd/mvcc/mvccpb/kv.proto": "mvcc/mvccpb/kv.proto",
    "etcd/auth/authpb/auth.proto": "auth/authpb/auth.proto",
    "etcd/etcdserver/etcdserverpb/rpc.proto": "etcdserver/etcdserverpb/rpc.proto",
}
_DROP_IMPORT = re.compile(r'^\s*import\s+"(gogoproto/gogo|google/api/annotations)\.proto";\s*$', re.M)
_FILE_OPTION = re.compile(r"^\s*option\s+\(gogoproto\.[^;]*;\s*$", re.M)
_FIELD_OPTIONS = re.compile(r"\s*\[\s*\(gogoproto\.[^\]]*\]")
_HTTP_OPTION = re.compile(r"option\s+\(google\.api\.http\)\s*=\s*\{")


def proto_root() -> Path:
    root = Path(os.environ.get("ETCD_PROTO_ROOT", DEFAULT_ROOT))
    missing = [rel for rel in FILES.values() if not (root / rel).is_file()]
    if missing:
        raise SystemExit(
            f"etcd .proto files not found under {root} (missing {', '.join(missing)}): "
            "install Debian's golang-etcd-server-dev or set ETCD_PROTO_ROOT"
        )
    return root


def strip(text: str) -> str:
    """The .proto text without gogoproto and google.api options (brace-matched)."""
    text = _DROP_IMPORT.sub("", text)
    text = _FILE_OPTION.sub("", text)
    text = _FIELD_OPTIONS.sub("", text)
    out: list[str] = []
    pos = 0
    for m in _HTTP_OPTION.finditer(text):
        if m.start() < pos:
            continue
        out.append(text[pos : m.start()])
        depth, i = 1, m.end()
        while depth:
            if i >= len(text):
                raise ValueError("unbalanced google.api.http option")
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        semi = re.compile(r"\s*;").match(text, i)
        pos = semi.end() if semi else i
    out.append(text[pos:])
    return "".join(out)


def generate(root: Path | None = None) -> Path:
    """Generate (once per content) and return the directory to put on sys.path."""
    root = root or proto_root()
    texts = {name: strip((root / rel).read_text()) for name, rel in FILES.items()}
    digest = hashlib.sha256("".join(texts[k] for k in sorted(texts)).encode()).hexdigest()[:12]
    dest = OUT / "etcd-api" / digest
    if (dest / "etcd/etcdserver/etcdserverpb/rpc_pb2_grpc.py").exists():
        return dest
    src = OUT / "etcd-api" / f"src-{digest}"
    for name, text in texts.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    dest.mkdir(parents=True, exist_ok=True)
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{include}"]
    cmd += [f"--python_out={dest}", f"--grpc_python_out={dest}", *sorted(texts)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"generating etcd's API failed:\n{result.stdout}{result.stderr}")
    return dest


class EtcdApi:
    """The generated modules: `rpc` (messages), `grpc` (stubs), `kv` (mvccpb)."""

    def __init__(self, rpc: ModuleType, grpc_mod: ModuleType, kv: ModuleType):
        self.rpc = rpc
        self.grpc = grpc_mod
        self.kv = kv

    def field_numbers(self) -> dict[str, int]:
        """`Message.field` → number for the fields the Go load generator encodes and decodes
        by hand, read from the generated descriptors so they follow the .proto files."""
        wanted: dict[Any, tuple[str, ...]] = {
            self.rpc.WatchRequest: ("create_request",),
            self.rpc.WatchCreateRequest: ("key", "start_revision"),
            self.rpc.WatchResponse: (
                "header",
                "watch_id",
                "created",
                "canceled",
                "compact_revision",
                "events",
            ),
            self.rpc.ResponseHeader: ("revision",),
            self.kv.Event: ("kv",),
            self.kv.KeyValue: ("mod_revision",),
        }
        return {
            f"{msg.DESCRIPTOR.name}.{f}": msg.DESCRIPTOR.fields_by_name[f].number
            for msg, fields in wanted.items()
            for f in fields
        }


def load() -> EtcdApi:
    path = str(generate())
    if path not in sys.path:
        sys.path.insert(0, path)
    return EtcdApi(
        importlib.import_module("etcd.etcdserver.etcdserverpb.rpc_pb2"),
        importlib.import_module("etcd.etcdserver.etcdserverpb.rpc_pb2_grpc"),
        importlib.import_module("etcd.mvcc.mvccpb.kv_pb2"),
    )
