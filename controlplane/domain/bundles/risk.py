"""How risky is moving from one bundle to the next, judged from what changed.

Each rule looks at the parsed structure (listeners, routes, upstreams, TLS, auth and
rate-limit blocks, see `archives.kdl_config`) or at the file list, and explains itself
in one finding. The bundle's level is the highest of its findings' levels.

| rule | level |
| --- | --- |
| tls-changed (a TLS block added, removed or changed) | high |
| auth-changed (an auth/JWT/WAF block added, removed or changed) | high |
| upstream-removed | high |
| listener-removed | high |
| all-routes-removed, all-upstreams-removed, all-listeners-removed (none left) | high |
| structure-unknown (a .kdl file added or changed that could not be parsed) | high |
| routes-changed, many (more than 10, or at least 3 and more than a quarter) | high |
| routes-changed, a few | low |
| rate-limit-changed | medium |
| upstream-changed (targets) | medium |
| listener-changed / listener-added | medium |
| certificates-changed (.pem, .crt, .key, ...) | medium |
| files-removed | medium |
| files-changed (other files) | low |

A first bundle is LOW ("first-bundle"), unless some of its .kdl files could not be
parsed: then MEDIUM (structure-unknown), since nothing about them could be read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.domain.bundles.archive.kdl_config import Structure
from controlplane.domain.bundles.archive.manifest import Manifest
from controlplane.domain.model.bundles import RiskAssessment, RiskFinding, RiskLevel

HIGH, MEDIUM, LOW = RiskLevel.HIGH, RiskLevel.MEDIUM, RiskLevel.LOW
# "Many routes": more than this many, or more than this share of the previous routes
# when at least MANY_ROUTES_MIN changed (in a config of three routes, one changed route
# is a third of them, yet a small change).
MANY_ROUTES = 10
MANY_ROUTES_SHARE = 0.25
MANY_ROUTES_MIN = 3
KEY_MATERIAL = (".pem", ".crt", ".cer", ".key", ".p12", ".pfx", ".jks")
_LISTED = 5


@dataclass(frozen=True)
class Facts:
    """What risk is computed from, for one bundle."""

    digest: str
    manifest: Manifest
    structure: Structure


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in sorted(items)[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _delta(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    added = [k for k in new if k not in old]
    removed = [k for k in old if k not in new]
    changed = [k for k in new if k in old and new[k] != old[k]]
    return added, removed, changed


def _blocks(
    kind: str, noun: str, rule: str, level: RiskLevel, old: Structure, new: Structure
) -> list[RiskFinding]:
    added, removed, changed = _delta(old.get(kind, {}), new.get(kind, {}))
    findings = []
    for verb, items in (("added", added), ("removed", removed), ("changed", changed)):
        if items:
            findings.append(RiskFinding(level, rule, f"{noun} block(s) {verb}: {_names(items)}"))
    return findings


def _unparsed(previous: Facts | None, current: Facts) -> list[RiskFinding]:
    """Files whose structure could not be read are named, never judged unchanged."""
    unparsed: dict[str, str] = current.structure.get("unparsed", {})
    if previous is None:
        unknown = sorted(unparsed)
    else:
        before, after = previous.manifest.by_path(), current.manifest.by_path()
        was_unparsed = previous.structure.get("unparsed", {})
        # Unchanged and unreadable before too: nothing in it changed.
        unknown = sorted(p for p in unparsed if before.get(p) != after.get(p) or p not in was_unparsed)
    if not unknown:
        return []
    return [
        RiskFinding(
            MEDIUM if previous is None else HIGH,
            "structure-unknown",
            f"cannot read the structure of {_names(unknown)}, so TLS, auth, listener, route and upstream "
            f"changes in it are not judged: {unparsed[unknown[0]]}",
        )
    ]


def assess(previous: Facts | None, current: Facts) -> RiskAssessment:
    if previous is None:
        findings = [RiskFinding(LOW, "first-bundle", "the project's first bundle"), *_unparsed(None, current)]
        level = max((f.level for f in findings), key=lambda lv: lv.rank)
        return RiskAssessment(level, "", tuple(findings))
    old, new = previous.structure, current.structure
    findings = _unparsed(previous, current)
    findings += _blocks("tls", "TLS", "tls-changed", HIGH, old, new)
    findings += _blocks("auth", "auth", "auth-changed", HIGH, old, new)
    findings += _blocks("rate_limits", "rate-limit", "rate-limit-changed", MEDIUM, old, new)

    added, removed, changed = _delta(old.get("upstreams", {}), new.get("upstreams", {}))
    if removed:
        findings.append(RiskFinding(HIGH, "upstream-removed", f"upstream(s) removed: {_names(removed)}"))
    if changed:
        findings.append(RiskFinding(MEDIUM, "upstream-changed", f"upstream(s) changed: {_names(changed)}"))
    if added:
        findings.append(RiskFinding(LOW, "upstream-added", f"upstream(s) added: {_names(added)}"))

    old_listeners, new_listeners = old.get("listeners", {}), new.get("listeners", {})
    added, removed, changed = _delta(old_listeners, new_listeners)
    if removed:
        findings.append(RiskFinding(HIGH, "listener-removed", f"listener(s) removed: {_names(removed)}"))
    moved = [k for k in changed if old_listeners[k].get("address") != new_listeners[k].get("address")]
    if moved or added:
        findings.append(
            RiskFinding(
                MEDIUM, "listener-changed", f"listener(s) added or re-addressed: {_names(moved + added)}"
            )
        )

    findings += _all_removed(old, new)
    old_routes = old.get("routes", {})
    added, removed, changed = _delta(old_routes, new.get("routes", {}))
    touched = len(added) + len(removed) + len(changed)
    if touched:
        many = touched > MANY_ROUTES or (
            touched >= MANY_ROUTES_MIN and touched > MANY_ROUTES_SHARE * max(len(old_routes), 1)
        )
        detail = f"{len(added)} added, {len(removed)} removed, {len(changed)} changed of {len(old_routes)}"
        findings.append(RiskFinding(HIGH if many else LOW, "routes-changed", f"routes changed: {detail}"))

    findings += _file_findings(previous.manifest, current.manifest)
    level = max((f.level for f in findings), key=lambda lv: lv.rank, default=LOW)
    return RiskAssessment(level, previous.digest, tuple(findings))


def _all_removed(old: Structure, new: Structure) -> list[RiskFinding]:
    """A bundle that declares no route (upstream, listener) where the last one had some
    serves nothing: HIGH however few there were, which the share rules alone miss (two
    routes removed are "a few")."""
    findings = []
    unreadable = " in the files that could be read" if new.get("unparsed") else ""
    for kind, noun in (("routes", "route"), ("upstreams", "upstream"), ("listeners", "listener")):
        before = list(old.get(kind, {}))
        if before and not new.get(kind):
            findings.append(
                RiskFinding(
                    HIGH,
                    f"all-{kind}-removed",
                    f"no {noun} is declared any more{unreadable}; the previous bundle had "
                    f"{len(before)}: {_names(before)}",
                )
            )
    return findings


def _file_findings(old: Manifest, new: Manifest) -> list[RiskFinding]:
    before, after = old.by_path(), new.by_path()
    added, removed, changed = _delta(before, after)
    findings = []
    material = [p for p in added + removed + changed if p.lower().endswith(KEY_MATERIAL)]
    if material:
        findings.append(
            RiskFinding(MEDIUM, "certificates-changed", f"key material changed: {_names(material)}")
        )
    if removed:
        findings.append(RiskFinding(MEDIUM, "files-removed", f"file(s) removed: {_names(removed)}"))
    other = [p for p in added + changed if p not in material]
    if other:
        findings.append(RiskFinding(LOW, "files-changed", f"file(s) added or changed: {_names(other)}"))
    return findings
