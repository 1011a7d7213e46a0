"""What an xDS node's first message says of itself (`rpc.authn`, docs/xds.md): the agent
version it runs, from Envoy's build version or a gRPC client's version string, and the
labels of its `node.metadata`."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2

from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.rpc.authn import agent_version, metadata_labels


def test_envoy_says_its_build_version() -> None:
    node = base_pb2.Node(id="edge-1", user_agent_name="envoy")
    node.user_agent_build_version.version.major_number = 1
    node.user_agent_build_version.version.minor_number = 40
    node.user_agent_build_version.version.patch = 2
    assert agent_version(node) == "envoy 1.40.2"


def test_a_grpc_client_says_its_version_string_and_nothing_is_empty() -> None:
    assert agent_version(base_pb2.Node(user_agent_name="gRPC Python", user_agent_version="1.85.0")) == (
        "gRPC Python 1.85.0"
    )
    assert agent_version(base_pb2.Node(user_agent_name="envoy")) == "envoy"
    assert agent_version(base_pb2.Node()) == ""
    assert len(agent_version(base_pb2.Node(user_agent_name="x" * 100, user_agent_version="1"))) == 64


def test_metadata_labels_are_a_struct_of_strings() -> None:
    node = base_pb2.Node()
    assert metadata_labels(node) == {}
    node.metadata.update({"labels": {"tier": "edge"}})
    assert metadata_labels(node) == {"tier": "edge"}
    node.metadata.update({"labels": {"tier": 3}})
    with pytest.raises(InvalidArgument, match="'tier' must be a string"):
        metadata_labels(node)
    node.metadata.update({"labels": "tier=edge"})
    with pytest.raises(InvalidArgument, match="struct of strings"):
        metadata_labels(node)
