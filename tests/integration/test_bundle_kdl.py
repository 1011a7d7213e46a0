"""KDL files the database cannot store, through CreateBundle on SQLite and PostgreSQL:
a validation failure or an unreadable file naming them, never INTERNAL. The server's
KDL worker processes do the parsing."""

from __future__ import annotations

import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from tests.integration.test_bundle_pipeline import CONFIG, check_kdl
from tests.support.bundles import create
from tests.support.harness import Harness

BAD = {
    "nul-name": (
        b'listeners {\n    "list\\u{0}ener" "x"\n}\n',
        "conf/bad.kdl: the name 'list\\x00ener' of node 'listeners/list\\x00ener' holds U+0000 (NUL)",
    ),
    "nul-string": (
        b'routes {\n    route "a\\u{0}b" {\n        upstream "backend"\n    }\n}\n',
        "conf/bad.kdl: the argument 'a\\x00b' of node 'routes/route' holds U+0000 (NUL)",
    ),
    "surrogate": (
        b'routes {\n    route "\\u{D800}"\n}\n',
        "conf/bad.kdl:2: Error parsing property or argument (as KDL 2.0); line 2: a string escape "
        "is not a Unicode character (a lone surrogate?) (as KDL 1.0)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_unstorable_kdl_fails_validation_naming_the_file(harness: Harness, case: str) -> None:
    text, error = BAD[case]
    files = {**CONFIG, "conf/bad.kdl": text}
    # A project that does not validate KDL: stored valid, the file named as unreadable by risk.
    plain = [bpb.ParserCheck(format=f) for f in (bpb.CONFIG_FORMAT_JSON, bpb.CONFIG_FORMAT_YAML)]
    await harness.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig(parsers=plain))
    )
    unchecked = (await create(harness.bundles, files)).bundle
    assert unchecked.state == bpb.BUNDLE_STATE_VALID, unchecked.state_reason
    (unknown,) = [f for f in unchecked.risk.findings if f.rule == "structure-unknown"]
    assert "'conf/bad.kdl'" in unknown.reason and error in unknown.reason, unknown.reason
    await check_kdl(harness)
    # Other content: the same would give back the valid bundle.
    reply = await create(harness.bundles, {**files, "conf/more.yaml": b"a: 1\n"})
    assert reply.bundle.state == bpb.BUNDLE_STATE_FAILED
    assert reply.bundle.state_reason.startswith(f"kdl:*.kdl: {error}"), reply.bundle.state_reason
    # Parsed by the server's worker processes, not in its own.
    assert harness.app.kdl.pids
    got = await harness.bundles.GetBundle(bpb.GetBundleRequest(project="default", digest=reply.bundle.digest))
    assert got.bundle.state_reason == reply.bundle.state_reason
