"""`controlplane bundle ...`, `assign`, `unassign`."""

from __future__ import annotations

import fnmatch
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from google.protobuf.duration_pb2 import Duration

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.cli import output
from controlplane.cli.client import (
    call,
    call_pages,
    channel,
    print_message,
    project_option,
    server_option,
    unary,
)
from controlplane.cli.output import OutputCommand, OutputGroup, paged

UPLOAD_CHUNK = 1024 * 1024
# Version control metadata is never configuration.
DEFAULT_EXCLUDES = (".git", ".git/*", ".hg", ".hg/*", ".svn", ".svn/*")
_STATES = {
    "valid": bundle_pb2.BUNDLE_STATE_VALID,
    "failed": bundle_pb2.BUNDLE_STATE_FAILED,
    "revoked": bundle_pb2.BUNDLE_STATE_REVOKED,
}
_FORMATS = {
    "kdl": bundle_pb2.CONFIG_FORMAT_KDL,
    "json": bundle_pb2.CONFIG_FORMAT_JSON,
    "yaml": bundle_pb2.CONFIG_FORMAT_YAML,
    "zentinel": bundle_pb2.CONFIG_FORMAT_ZENTINEL,
}
_PROXIES = {
    "nginx": bundle_pb2.PROXY_KIND_NGINX,
    "haproxy": bundle_pb2.PROXY_KIND_HAPROXY,
    "envoy": bundle_pb2.PROXY_KIND_ENVOY,
}


def digest_of(stub: bundle_pb2_grpc.BundleServiceStub, project: str, ref: str, what: str = "bundle") -> str:
    """A digest as given, or the digest of the bundle with version label `ref`."""
    if ref.startswith("sha256:"):
        return ref
    return str(
        unary(lambda: stub.GetBundle(bundle_pb2.GetBundleRequest(project=project, version=ref))).bundle.digest
    )


@click.group(cls=OutputGroup)
def bundle() -> None:
    """Bundles: push, inspect, compare, revoke; the project's validators."""


def _files(root: Path, excludes: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """Every file and symlink under `root`, as (relative path, path), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in (*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            if not any(fnmatch.fnmatchcase(rel, p) for p in excludes):
                found.append((rel, Path(dirpath) / name))
        dirnames[:] = [d for d in dirnames if not any(fnmatch.fnmatchcase(d, p) for p in excludes)]
    yield from sorted(found)


def push_requests(
    root: Path, project: str, version: str, excludes: tuple[str, ...]
) -> Iterator[bundle_pb2.CreateBundleRequest]:
    yield bundle_pb2.CreateBundleRequest(
        header=bundle_pb2.CreateBundleHeader(project=project, version=version)
    )
    for rel, path in _files(root, excludes):
        if path.is_symlink():
            header = bundle_pb2.FileHeader(path=rel, symlink_target=os.readlink(path))
            yield bundle_pb2.CreateBundleRequest(file=header)
            continue
        stat = path.stat()
        header = bundle_pb2.FileHeader(
            path=rel, size_bytes=stat.st_size, executable=bool(stat.st_mode & 0o111)
        )
        yield bundle_pb2.CreateBundleRequest(file=header)
        with path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                yield bundle_pb2.CreateBundleRequest(chunk=chunk)


def summary(b: bundle_pb2.Bundle, created: bool) -> str:
    state = bundle_pb2.BundleState.Name(b.state).removeprefix("BUNDLE_STATE_")
    risk = bundle_pb2.RiskLevel.Name(b.risk.level).removeprefix("RISK_LEVEL_")
    lines = [
        f"{'created' if created else 'exists '} {b.digest}" + (f" ({b.version})" if b.version else ""),
        f"  state      {state}" + (f": {b.state_reason.splitlines()[0][:200]}" if b.state_reason else ""),
        f"  signed by  {b.key_id or '-'}",
        f"  risk       {risk}" + (f" (against {b.risk.compared_with})" if b.risk.compared_with else ""),
    ]
    lines += [
        f"    - [{bundle_pb2.RiskLevel.Name(f.level)[11:].lower()}] {f.reason}" for f in b.risk.findings
    ]
    lines.append(f"  files      {b.file_count}, {b.total_bytes} bytes; archive {b.size_bytes} bytes")
    for v in b.validation:
        by = f" ({v.version})" if v.version else ""
        lines.append(f"  {'ok  ' if v.ok else 'FAIL'}       {v.validator}{by}")
        if not v.ok:
            lines += [f"             {line}" for line in v.output.splitlines()[:40]]
    return "\n".join(lines)


@bundle.command("push")
@server_option
@project_option
@click.option("--version", "version_label", default="", help="Human label such as v1.4.2.")
@click.option("--exclude", multiple=True, help="Glob of paths to leave out (repeatable; .git always).")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def bundle_push(
    server: str, project: str, version_label: str, exclude: tuple[str, ...], directory: Path
) -> None:
    """Validate, pack, sign and store DIRECTORY as a bundle. Exits 1 if it fails validation."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    reply = unary(
        lambda: stub.CreateBundle(
            push_requests(directory, project, version_label, DEFAULT_EXCLUDES + exclude)
        )
    )
    _created(reply)


def _created(reply: bundle_pb2.CreateBundleResponse | bundle_pb2.UploadBundleResponse) -> None:
    """push and upload print the same: a summary, or the answer with -o json|yaml."""
    if output.current_format() == "table":
        click.echo(summary(reply.bundle, reply.created))
    else:
        print_message(reply)
    if reply.bundle.state == bundle_pb2.BUNDLE_STATE_FAILED:
        raise SystemExit(1)


@bundle.command("upload")
@server_option
@project_option
@click.option("--version", "version_label", default="", help="Human label such as v1.4.2.")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def bundle_upload(server: str, project: str, version_label: str, archive: Path) -> None:
    """Send a tar archive (plain, .tar.gz, .tar.zst) through the same pipeline as push."""

    def requests() -> Iterator[bundle_pb2.UploadBundleRequest]:
        header = bundle_pb2.UploadBundleHeader(project=project, version=version_label)
        with archive.open("rb") as f:
            first = True
            while chunk := f.read(UPLOAD_CHUNK):
                yield bundle_pb2.UploadBundleRequest(header=header if first else None, chunk=chunk)
                first = False

    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    _created(unary(lambda: stub.UploadBundle(requests())))


@bundle.command("get")
@server_option
@project_option
@click.argument("digest_or_version")
def bundle_get(server: str, project: str, digest_or_version: str) -> None:
    """One bundle, by digest (sha256:...) or version label."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    request = (
        bundle_pb2.GetBundleRequest(project=project, digest=digest_or_version)
        if digest_or_version.startswith("sha256:")
        else bundle_pb2.GetBundleRequest(project=project, version=digest_or_version)
    )
    call(lambda: stub.GetBundle(request))


@bundle.command("list")
@server_option
@project_option
@click.option("--state", type=click.Choice(sorted(_STATES)), default=None)
@click.option("--version-prefix", default="", help="Only versions starting with this.")
@paged
def bundle_list(
    server: str, project: str, state: str | None, version_prefix: str, limit: int, all_pages: bool
) -> None:
    """Bundles, newest first."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))

    def page(token: str, size: int) -> Any:
        request = bundle_pb2.ListBundlesRequest(
            project=project,
            page_size=size,
            page_token=token,
            state=_STATES[state] if state else bundle_pb2.BUNDLE_STATE_UNSPECIFIED,
            version_prefix=version_prefix,
        )
        return stub.ListBundles(request)

    call_pages(page, "bundles", limit, all_pages, "bundles")


@bundle.command("diff")
@server_option
@project_option
@click.option("--context", "context_lines", type=click.IntRange(1, 50), default=3, show_default=True)
@click.argument("from_bundle")
@click.argument("to_bundle")
def bundle_diff(server: str, project: str, context_lines: int, from_bundle: str, to_bundle: str) -> None:
    """Files added, removed and changed from FROM to TO (digests or version labels),
    with unified diffs and risk; for two xDS bundles, their Envoy resources too."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    request = bundle_pb2.DiffBundlesRequest(
        project=project,
        from_digest=digest_of(stub, project, from_bundle),
        to_digest=digest_of(stub, project, to_bundle),
        context_lines=context_lines,
    )
    reply = unary(lambda: stub.DiffBundles(request))
    if output.current_format() != "table":
        print_message(reply)
        return
    for change in reply.changes:
        kind = bundle_pb2.FileChangeKind.Name(change.kind).removeprefix("FILE_CHANGE_KIND_").lower()
        click.echo(f"{kind:8} {change.path}" + (" (binary)" if change.binary else ""))
    if reply.resource_changes:
        click.echo("resources:")
    for resource in reply.resource_changes:
        kind = bundle_pb2.FileChangeKind.Name(resource.kind).removeprefix("FILE_CHANGE_KIND_").lower()
        rtype = resource.type_url.rsplit(".", 1)[-1]
        click.echo(f"  {kind:8} {rtype} {resource.name}")
    for change in reply.changes:
        if change.unified_diff:
            click.echo(change.unified_diff, nl=False)
    level = bundle_pb2.RiskLevel.Name(reply.risk.level).removeprefix("RISK_LEVEL_")
    click.echo(f"risk: {level}")
    for finding in reply.risk.findings:
        click.echo(f"  - {finding.reason}")
    if reply.truncated:
        click.echo("(some diffs were left out: the answer reached its size limit)")


@bundle.command("revoke")
@server_option
@project_option
@click.option("--reason", required=True, help="Why; shown to operators and on nodes.")
@click.argument("bundle_ref", metavar="BUNDLE")
def bundle_revoke(server: str, project: str, reason: str, bundle_ref: str) -> None:
    """Withdraw BUNDLE (digest or version label): it can never be assigned again. Lists
    the nodes on it."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    digest = digest_of(stub, project, bundle_ref)
    call(
        lambda: stub.RevokeBundle(
            bundle_pb2.RevokeBundleRequest(project=project, digest=digest, reason=reason)
        )
    )


@bundle.command("revoked-nodes")
@server_option
@project_option
def bundle_revoked_nodes(server: str, project: str) -> None:
    """Nodes running, or assigned, a revoked bundle."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    call(lambda: stub.ListRevokedBundleNodes(bundle_pb2.ListRevokedBundleNodesRequest(project=project)))


@bundle.group("validation")
def validation() -> None:
    """The validators a project's bundles go through."""


@validation.command("get")
@server_option
@project_option
def validation_get(server: str, project: str) -> None:
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    call(lambda: stub.GetValidationConfig(bundle_pb2.GetValidationConfigRequest(project=project)))


def _parser(spec: str) -> bundle_pb2.ParserCheck:
    fmt, _, paths = spec.partition(":")
    if fmt not in _FORMATS:
        raise click.BadParameter(
            f"{spec!r}: format must be one of {', '.join(_FORMATS)}", param_hint="--parser"
        )
    return bundle_pb2.ParserCheck(format=_FORMATS[fmt], paths=[p for p in paths.split(",") if p])


@validation.command("set")
@server_option
@project_option
@click.option("--main", default="", help="The entry point, e.g. zentinel.kdl (the {main} placeholder).")
@click.option(
    "--parser", "parsers", multiple=True, help="FORMAT[:GLOB,...], e.g. zentinel or yaml:conf/*.yaml"
)
@click.option(
    "--command", "commands", multiple=True, help="Command line, e.g. 'zentinel validate --config {main}'"
)
@click.option(
    "--proxy",
    "proxies",
    multiple=True,
    type=click.Choice(list(_PROXIES)),
    help="The proxy's own binary checks each bundle as the agent's driver runs it (repeatable).",
)
@click.option(
    "--timeout", type=click.FloatRange(0.1, 600), default=30.0, show_default=True, help="Seconds per check."
)
def validation_set(
    server: str,
    project: str,
    main: str,
    parsers: tuple[str, ...],
    commands: tuple[str, ...],
    proxies: tuple[str, ...],
    timeout: float,
) -> None:
    """Replace the project's validators (no --parser, --proxy or --command: none at all)."""
    duration = Duration()
    duration.FromMilliseconds(int(timeout * 1000))
    checks = []
    for line in commands:
        argv = shlex.split(line)
        if not argv:
            raise click.BadParameter("empty command", param_hint="--command")
        checks.append(bundle_pb2.CommandCheck(name=Path(argv[0]).name, argv=argv, timeout=duration))
    config = bundle_pb2.ValidationConfig(
        main=main,
        parsers=[_parser(p) for p in parsers],
        commands=checks,
        proxies=[bundle_pb2.ProxyCheck(kind=_PROXIES[p], timeout=duration) for p in proxies],
    )
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    call(
        lambda: stub.SetValidationConfig(
            bundle_pb2.SetValidationConfigRequest(project=project, config=config)
        )
    )


def _target(selector: str | None, node_ids: tuple[str, ...]) -> bundle_pb2.Target:
    if (selector is None) == (not node_ids):
        raise click.UsageError("give exactly one of --selector or --node")
    if selector is not None:
        return bundle_pb2.Target(selector=selector)
    return bundle_pb2.Target(nodes=bundle_pb2.NodeList(node_ids=list(node_ids)))


@click.command(cls=OutputCommand)
@server_option
@project_option
@click.option("--selector", default=None, help="env=prod,region=eu or '*'")
@click.option("--node", "node_ids", multiple=True, help="Node id (repeatable).")
@click.option("--weight", type=click.IntRange(0, 100), default=0, help="Traffic weight 1-100.")
@click.option("--pin", is_flag=True, help="Pin the listed nodes to this bundle.")
@click.option("--override-freeze", default="", help="Assign during a freeze window, for this reason.")
@click.option(
    "--break-glass",
    default="",
    help="Admins: assign a bundle the nodes do not run in a project that requires approvals, "
    "for this reason (audited as desired.break_glass).",
)
@click.argument("bundle_ref", metavar="BUNDLE")
def assign(
    server: str,
    project: str,
    selector: str | None,
    node_ids: tuple[str, ...],
    weight: int,
    pin: bool,
    override_freeze: str,
    break_glass: str,
    bundle_ref: str,
) -> None:
    """Set the desired bundle (a digest or a version label) of a selector's nodes or of
    listed nodes."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    target = _target(selector, node_ids)
    request = bundle_pb2.AssignBundleRequest(
        project=project,
        target=target,
        digest=digest_of(stub, project, bundle_ref),
        traffic_weight=weight,
        pin=pin,
        freeze_override_reason=override_freeze,
        break_glass_reason=break_glass,
    )
    call(lambda: stub.AssignBundle(request))


@click.command(cls=OutputCommand)
@server_option
@project_option
@click.option("--selector", default=None)
@click.option("--node", "node_ids", multiple=True)
@click.option("--override-freeze", default="", help="Unassign during a freeze window, for this reason.")
def unassign(
    server: str, project: str, selector: str | None, node_ids: tuple[str, ...], override_freeze: str
) -> None:
    """Remove an assignment."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    request = bundle_pb2.UnassignBundleRequest(
        project=project, target=_target(selector, node_ids), freeze_override_reason=override_freeze
    )
    call(lambda: stub.UnassignBundle(request))
