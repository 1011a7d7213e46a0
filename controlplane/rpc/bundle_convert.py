"""Bundle records to messages and back. No logic beyond the mapping."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from controlplane.api.bundle.v1 import bundle_pb2, signing_pb2
from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive.formats import ConfigFormat
from controlplane.domain.bundles.diff import ChangeKind, FileChange
from controlplane.domain.bundles.signing import ALGORITHM
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.bundles import (
    Bundle,
    BundleState,
    KeyState,
    RevokedNode,
    RiskAssessment,
    RiskLevel,
    SigningKey,
)
from controlplane.proxies import ProxyKind
from controlplane.rpc.convert import duration_in, timestamp
from controlplane.xds.snapshot import ResourceDiff

STATE = {
    BundleState.VALID: bundle_pb2.BUNDLE_STATE_VALID,
    BundleState.FAILED: bundle_pb2.BUNDLE_STATE_FAILED,
    BundleState.REVOKED: bundle_pb2.BUNDLE_STATE_REVOKED,
}
STATE_IN = {v: k for k, v in STATE.items()}
_RISK = {
    RiskLevel.LOW: bundle_pb2.RISK_LEVEL_LOW,
    RiskLevel.MEDIUM: bundle_pb2.RISK_LEVEL_MEDIUM,
    RiskLevel.HIGH: bundle_pb2.RISK_LEVEL_HIGH,
}
_FORMAT = {
    ConfigFormat.KDL: bundle_pb2.CONFIG_FORMAT_KDL,
    ConfigFormat.JSON: bundle_pb2.CONFIG_FORMAT_JSON,
    ConfigFormat.YAML: bundle_pb2.CONFIG_FORMAT_YAML,
    ConfigFormat.ZENTINEL: bundle_pb2.CONFIG_FORMAT_ZENTINEL,
}
_FORMAT_IN = {v: k for k, v in _FORMAT.items()}
_PROXY: dict[ProxyKind, bundle_pb2.ProxyKind.ValueType] = {
    "nginx": bundle_pb2.PROXY_KIND_NGINX,
    "haproxy": bundle_pb2.PROXY_KIND_HAPROXY,
    "envoy": bundle_pb2.PROXY_KIND_ENVOY,
}
_PROXY_IN = {v: k for k, v in _PROXY.items()}
_CHANGE = {
    ChangeKind.ADDED: bundle_pb2.FILE_CHANGE_KIND_ADDED,
    ChangeKind.REMOVED: bundle_pb2.FILE_CHANGE_KIND_REMOVED,
    ChangeKind.MODIFIED: bundle_pb2.FILE_CHANGE_KIND_MODIFIED,
}
_KEY_STATE = {
    KeyState.ACTIVE: signing_pb2.SIGNING_KEY_STATE_ACTIVE,
    KeyState.RETIRED: signing_pb2.SIGNING_KEY_STATE_RETIRED,
}


def duration(value: timedelta) -> Duration:
    out = Duration()
    out.FromTimedelta(value)
    return out


def risk_out(risk: RiskAssessment) -> bundle_pb2.RiskAssessment:
    return bundle_pb2.RiskAssessment(
        level=_RISK[risk.level],
        compared_with=risk.compared_with,
        findings=[
            bundle_pb2.RiskFinding(level=_RISK[f.level], rule=f.rule, reason=f.reason) for f in risk.findings
        ],
    )


def bundle_out(bundle: Bundle) -> bundle_pb2.Bundle:
    return bundle_pb2.Bundle(
        project=bundle.project,
        digest=bundle.digest,
        version=bundle.version,
        size_bytes=bundle.size_bytes,
        file_count=bundle.file_count,
        created_at=timestamp(bundle.created_at),
        state=STATE[bundle.state],
        state_reason=bundle.state_reason,
        validation=[
            bundle_pb2.ValidationResult(
                validator=r.validator,
                ok=r.ok,
                output=r.output,
                duration=duration(r.duration),
                version=r.version,
            )
            for r in bundle.validation
        ],
        risk=risk_out(bundle.risk),
        key_id=bundle.key_id,
        signature=bundle.signature,
        total_bytes=bundle.total_bytes,
        manifest_digest=bundle.manifest_digest,
        revoked_at=timestamp(bundle.revoked_at),
        purged_at=timestamp(bundle.purged_at),
    )


def change_out(change: FileChange) -> bundle_pb2.FileChange:
    return bundle_pb2.FileChange(
        path=change.path,
        kind=_CHANGE[change.kind],
        old_size_bytes=change.old_size,
        new_size_bytes=change.new_size,
        unified_diff=change.unified_diff,
        binary=change.binary,
        diff_truncated=change.diff_truncated,
    )


def resource_changes_out(diff: ResourceDiff) -> list[bundle_pb2.ResourceChange]:
    """Added, then removed, then changed; each by type (make-before-break order) and name."""
    out = []
    for kind, changes in (
        (bundle_pb2.FILE_CHANGE_KIND_ADDED, diff.added),
        (bundle_pb2.FILE_CHANGE_KIND_REMOVED, diff.removed),
        (bundle_pb2.FILE_CHANGE_KIND_MODIFIED, diff.changed),
    ):
        out += [bundle_pb2.ResourceChange(type_url=c.type_url, name=c.name, kind=kind) for c in changes]
    return out


def revoked_node_out(node: RevokedNode) -> bundle_pb2.RevokedBundleNode:
    return bundle_pb2.RevokedBundleNode(
        node_id=node.node_id,
        name=node.name,
        digest=node.digest,
        version=node.version,
        running=node.running,
        revoke_reason=node.revoke_reason,
    )


def config_out(config: validators.ValidationConfig) -> bundle_pb2.ValidationConfig:
    return bundle_pb2.ValidationConfig(
        main=config.main,
        parsers=[
            bundle_pb2.ParserCheck(format=_FORMAT[p.format], paths=list(p.paths)) for p in config.parsers
        ],
        commands=[
            bundle_pb2.CommandCheck(name=c.name, argv=list(c.argv), timeout=duration(c.timeout))
            for c in config.commands
        ],
        proxies=[
            bundle_pb2.ProxyCheck(kind=_PROXY[x.kind], timeout=duration(x.timeout)) for x in config.proxies
        ],
    )


def config_in(message: bundle_pb2.ValidationConfig) -> validators.ValidationConfig:
    parsers = []
    for i, p in enumerate(message.parsers):
        fmt = _FORMAT_IN.get(p.format)
        if fmt is None:
            raise InvalidArgument(
                "name a format (KDL, JSON, YAML, ZENTINEL)", field=f"config.parsers[{i}].format"
            )
        parsers.append(validators.ParserCheck(fmt, tuple(p.paths)))
    commands = []
    for i, c in enumerate(message.commands):
        field = f"config.commands[{i}].timeout"
        timeout = duration_in(c.timeout, field) if c.HasField("timeout") else validators.DEFAULT_TIMEOUT
        if timeout <= timedelta(0):
            raise InvalidArgument("must be positive", field=field)
        commands.append(validators.CommandCheck(c.name, tuple(c.argv), timeout))
    proxies = []
    for i, x in enumerate(message.proxies):
        kind = _PROXY_IN.get(x.kind)
        if kind is None:
            raise InvalidArgument("name a proxy (NGINX, HAPROXY, ENVOY)", field=f"config.proxies[{i}].kind")
        field = f"config.proxies[{i}].timeout"
        timeout = duration_in(x.timeout, field) if x.HasField("timeout") else validators.DEFAULT_TIMEOUT
        if timeout <= timedelta(0):
            raise InvalidArgument("must be positive", field=field)
        proxies.append(validators.ProxyCheck(kind, timeout))
    return validators.ValidationConfig(message.main, tuple(parsers), tuple(commands), tuple(proxies))


def signing_key_out(key: SigningKey, signing_key_id: str) -> signing_pb2.SigningKey:
    return signing_pb2.SigningKey(
        key_id=key.key_id,
        public_key=key.public_key,
        state=_KEY_STATE[key.state],
        created_at=timestamp(key.created_at),
        retired_at=timestamp(key.retired_at),
        algorithm=ALGORITHM,
        signing=key.key_id == signing_key_id,
    )
