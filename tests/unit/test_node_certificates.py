"""Which node a client certificate names (`authn.NodeCertificates`, docs/xds.md): issued
directly by a node CA, with exactly one URI SAN `urn:controlplane:node:<project>:<id>`."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.domain.kernel.errors import Unauthenticated
from controlplane.rpc.authn import NodeCertificates
from controlplane.xds.bootstrap import NODE_URI
from tests.support.certs import CertificateAuthority


@pytest.fixture
def node_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "nodes", "node CA")


def test_a_node_ca_certificate_names_its_project_and_node(node_ca: CertificateAuthority) -> None:
    pair = node_ca.issue("edge-1", server=False, uris=("spiffe://x/y", f"{NODE_URI}default:n-abc"))
    assert NodeCertificates(node_ca.pem.read_bytes()).claim(pair.cert.read_bytes()) == ("default", "n-abc")


def test_any_ca_of_the_file_will_do(tmp_path: Path, node_ca: CertificateAuthority) -> None:
    other = CertificateAuthority(tmp_path / "other", "other node CA")
    both = node_ca.pem.read_bytes() + other.pem.read_bytes()
    pair = other.issue("edge-2", server=False, uris=(f"{NODE_URI}prod:n-2",))
    assert NodeCertificates(both).claim(pair.cert.read_bytes()) == ("prod", "n-2")


@pytest.mark.parametrize(
    ("uris", "words"),
    [
        ((), "URI SAN"),
        ((f"{NODE_URI}default:n-1", f"{NODE_URI}default:n-2"), "names one node"),
        ((f"{NODE_URI}default",), "URI SAN"),
        ((f"{NODE_URI}:n-1",), "URI SAN"),
        ((f"{NODE_URI}default:",), "URI SAN"),
        ((f"{NODE_URI}default:n-1:extra",), "URI SAN"),
    ],
)
def test_a_certificate_that_names_no_single_node_is_refused(
    node_ca: CertificateAuthority, uris: tuple[str, ...], words: str
) -> None:
    pair = node_ca.issue("edge-1", server=False, uris=uris)
    with pytest.raises(Unauthenticated, match=words):
        NodeCertificates(node_ca.pem.read_bytes()).claim(pair.cert.read_bytes())


def test_a_certificate_of_another_ca_names_no_node(tmp_path: Path, node_ca: CertificateAuthority) -> None:
    """The operators' client CA (also trusted by the TLS handshake) cannot mint nodes."""
    operators = CertificateAuthority(tmp_path / "operators", "operator CA")
    pair = operators.issue("edge-1", server=False, uris=(f"{NODE_URI}default:n-1",))
    with pytest.raises(Unauthenticated, match="not issued by a node CA"):
        NodeCertificates(node_ca.pem.read_bytes()).claim(pair.cert.read_bytes())


def test_garbage_is_refused(node_ca: CertificateAuthority) -> None:
    with pytest.raises(Unauthenticated, match="does not parse"):
        NodeCertificates(node_ca.pem.read_bytes()).claim(b"-----BEGIN CERTIFICATE-----\nnope\n")
