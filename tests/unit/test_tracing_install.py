"""An install where xds-protos's copy of OpenTelemetry's protos replaced the exporter's:
`serve --otlp-endpoint` stops with one line saying how to repair it, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from controlplane.telemetry.tracing import PROTO_CLASH

# The exporter's module made unimportable, as the older common_pb2 makes it.
BROKEN = (
    "import sys\n"
    "sys.modules['opentelemetry.exporter.otlp.proto.grpc.trace_exporter'] = None\n"
    "from controlplane.cli.main import main\n"
    "sys.argv = ['controlplane', *sys.argv[1:]]\n"
    "main()\n"
)


def test_serve_with_a_broken_exporter_says_how_to_repair_it(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            BROKEN,
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--otlp-endpoint",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().endswith(PROTO_CLASH), out.stderr
    assert not (tmp_path / "data").exists(), "nothing was started"
