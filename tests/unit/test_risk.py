"""Risk: each rule, with its reason, and the level as the highest finding."""

from __future__ import annotations

from pathlib import Path

from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive import kdl_config
from controlplane.domain.bundles.archive.formats import ConfigFormat, parse
from controlplane.domain.bundles.archive.manifest import Entry, Manifest, scan
from controlplane.domain.bundles.risk import Facts, assess
from controlplane.domain.model.bundles import RiskLevel

BASE = """
listeners {
    listener "https" {
        address "0.0.0.0:443"
        protocol "https"
        tls {
            cert-file "certs/site.pem"
        }
    }
}
upstreams {
    upstream "backend" {
        target "10.0.0.1:8080"
    }
    upstream "legacy" {
        target "10.0.0.9:8080"
    }
}
routes {
%ROUTES%
}
filters {
    filter "limit" {
        type "rate-limit"
        requests-per-second 100
    }
    filter "login" {
        type "jwt"
        issuer "https://id.example"
    }
}
"""


def routes(n: int, upstream: str = "backend") -> str:
    return "\n".join(f'    route "r{i}" {{\n        upstream "{upstream}"\n    }}' for i in range(n))


def facts(tmp_path: Path, text: str, files: dict[str, str] | None = None, digest: str = "sha256:x") -> Facts:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "z.kdl").write_text(text)
    parsed = parse(tmp_path, "z.kdl", ConfigFormat.KDL)
    assert parsed.ok, parsed.error
    entries = [Entry("z.kdl", len(text), str(hash(text)))]
    entries += [Entry(path, len(sha), sha) for path, sha in (files or {}).items()]
    return Facts(digest, Manifest(tuple(entries)), kdl_config.extract([("z.kdl", parsed.document)]))


def rules(assessment: object) -> dict[str, RiskLevel]:
    return {f.rule: f.level for f in assessment.findings}  # type: ignore[attr-defined]


def test_first_bundle_is_low(tmp_path: Path) -> None:
    result = assess(None, facts(tmp_path, BASE.replace("%ROUTES%", routes(3))))
    assert result.level is RiskLevel.LOW and result.compared_with == ""
    assert rules(result) == {"first-bundle": RiskLevel.LOW}


def test_identical_structure_and_files_is_low_with_no_findings(tmp_path: Path) -> None:
    text = BASE.replace("%ROUTES%", routes(3))
    old = facts(tmp_path / "a", text, digest="sha256:old")
    new = facts(tmp_path / "b", text)
    result = assess(old, new)
    assert (result.level, result.findings, result.compared_with) == (RiskLevel.LOW, (), "sha256:old")


def test_tls_and_auth_changes_are_high(tmp_path: Path) -> None:
    old = facts(tmp_path / "a", BASE.replace("%ROUTES%", routes(3)))
    tls = facts(tmp_path / "b", BASE.replace("%ROUTES%", routes(3)).replace("site.pem", "other.pem"))
    result = assess(old, tls)
    assert result.level is RiskLevel.HIGH
    assert rules(result)["tls-changed"] is RiskLevel.HIGH
    reason = next(f.reason for f in result.findings if f.rule == "tls-changed")
    assert "listener[https]/tls" in reason and "changed" in reason
    auth = facts(tmp_path / "c", BASE.replace("%ROUTES%", routes(3)).replace("id.example", "id.other"))
    assert rules(assess(old, auth)) == {"auth-changed": RiskLevel.HIGH, "files-changed": RiskLevel.LOW}


def test_removed_upstream_is_high_and_rate_limits_medium(tmp_path: Path) -> None:
    old = facts(tmp_path / "a", BASE.replace("%ROUTES%", routes(3)))
    text = BASE.replace("%ROUTES%", routes(3)).replace(
        '    upstream "legacy" {\n        target "10.0.0.9:8080"\n    }\n', ""
    )
    result = assess(old, facts(tmp_path / "b", text))
    assert rules(result) == {"upstream-removed": RiskLevel.HIGH, "files-changed": RiskLevel.LOW}
    assert "'legacy'" in result.findings[0].reason
    limits = BASE.replace("%ROUTES%", routes(3)).replace("requests-per-second 100", "requests-per-second 5")
    result = assess(old, facts(tmp_path / "c", limits))
    assert result.level is RiskLevel.MEDIUM
    assert rules(result) == {"rate-limit-changed": RiskLevel.MEDIUM, "files-changed": RiskLevel.LOW}


def test_many_routes_changed_is_high_a_few_is_low(tmp_path: Path) -> None:
    old = facts(tmp_path / "a", BASE.replace("%ROUTES%", routes(40)))
    few = facts(tmp_path / "b", BASE.replace("%ROUTES%", routes(42)))
    result = assess(old, few)
    assert rules(result) == {"routes-changed": RiskLevel.LOW, "files-changed": RiskLevel.LOW}
    assert "2 added, 0 removed, 0 changed of 40" in result.findings[0].reason
    many = facts(tmp_path / "c", BASE.replace("%ROUTES%", routes(40, upstream="legacy")))
    result = assess(old, many)
    assert rules(result) == {"routes-changed": RiskLevel.HIGH, "files-changed": RiskLevel.LOW}
    assert "40 changed of 40" in result.findings[0].reason


def test_file_changes(tmp_path: Path) -> None:
    text = BASE.replace("%ROUTES%", routes(3))
    old = facts(tmp_path / "a", text, {"certs/site.pem": "aa", "lua/x.lua": "bb", "gone.txt": "cc"})
    new = facts(tmp_path / "b", text, {"certs/site.pem": "AA", "lua/x.lua": "BB"})
    result = assess(old, new)
    assert result.level is RiskLevel.MEDIUM
    assert rules(result) == {
        "certificates-changed": RiskLevel.MEDIUM,
        "files-removed": RiskLevel.MEDIUM,
        "files-changed": RiskLevel.LOW,
    }


def test_listener_removed_is_high_and_re_addressed_or_added_is_medium(tmp_path: Path) -> None:
    base = BASE.replace("%ROUTES%", routes(3))
    old = facts(tmp_path / "a", base)
    no_listener = base.replace('    listener "https" {', '    xlistener "https" {')
    assert rules(assess(old, facts(tmp_path / "b", no_listener)))["listener-removed"] is RiskLevel.HIGH
    moved = facts(tmp_path / "c", base.replace("0.0.0.0:443", "0.0.0.0:8443"))
    result = assess(old, moved)
    assert rules(result) == {"listener-changed": RiskLevel.MEDIUM, "files-changed": RiskLevel.LOW}
    assert "'https'" in result.findings[0].reason and result.level is RiskLevel.MEDIUM
    extra = base.replace(
        "listeners {\n", 'listeners {\n    listener "admin" {\n        address "127.0.0.1:9000"\n    }\n'
    )
    result = assess(old, facts(tmp_path / "d", extra))
    assert rules(result) == {"listener-changed": RiskLevel.MEDIUM, "files-changed": RiskLevel.LOW}
    assert "'admin'" in result.findings[0].reason


def test_upstream_targets_changed_is_medium_and_added_is_low(tmp_path: Path) -> None:
    base = BASE.replace("%ROUTES%", routes(3))
    old = facts(tmp_path / "a", base)
    retargeted = facts(tmp_path / "b", base.replace("10.0.0.9:8080", "10.0.0.10:8080"))
    result = assess(old, retargeted)
    assert rules(result) == {"upstream-changed": RiskLevel.MEDIUM, "files-changed": RiskLevel.LOW}
    assert "'legacy'" in result.findings[0].reason
    added = base.replace(
        "upstreams {\n", 'upstreams {\n    upstream "new" {\n        target "10.0.1.1:80"\n    }\n'
    )
    result = assess(old, facts(tmp_path / "c", added))
    assert rules(result) == {"upstream-added": RiskLevel.LOW, "files-changed": RiskLevel.LOW}
    assert result.level is RiskLevel.LOW and "'new'" in result.findings[0].reason


def test_one_route_of_a_few_is_not_many(tmp_path: Path) -> None:
    """A quarter of three routes is under one: the share alone must not make it HIGH."""
    old = facts(tmp_path / "a", BASE.replace("%ROUTES%", routes(3)))
    one = BASE.replace("%ROUTES%", routes(3)).replace(
        'route "r2" {\n        upstream "backend"', 'route "r2" {\n        upstream "legacy"'
    )
    result = assess(old, facts(tmp_path / "b", one))
    assert rules(result) == {"routes-changed": RiskLevel.LOW, "files-changed": RiskLevel.LOW}
    assert "0 added, 0 removed, 1 changed of 3" in result.findings[0].reason
    # Three of eight: past the absolute minimum and over a quarter.
    old = facts(tmp_path / "c", BASE.replace("%ROUTES%", routes(8)))
    result = assess(old, facts(tmp_path / "d", BASE.replace("%ROUTES%", routes(11))))
    assert rules(result)["routes-changed"] is RiskLevel.HIGH


def test_removing_every_route_upstream_or_listener_is_high_however_few(tmp_path: Path) -> None:
    """Two routes removed are "a few" to the share rules; none left means nothing served."""
    old = facts(tmp_path / "a", BASE.replace("%ROUTES%", routes(2)), digest="sha256:old")
    result = assess(old, facts(tmp_path / "b", BASE.replace("%ROUTES%", "")))
    assert result.level is RiskLevel.HIGH
    assert rules(result) == {
        "all-routes-removed": RiskLevel.HIGH,
        "routes-changed": RiskLevel.LOW,
        "files-changed": RiskLevel.LOW,
    }
    (gone,) = [f for f in result.findings if f.rule == "all-routes-removed"]
    assert gone.reason == "no route is declared any more; the previous bundle had 2: 'r0', 'r1'"
    # Every upstream and listener too (the routes stay).
    bare = "routes {\n" + routes(2) + "\n}\n"
    result = assess(old, facts(tmp_path / "c", bare))
    assert result.level is RiskLevel.HIGH
    found = rules(result)
    assert (
        found["all-upstreams-removed"] is RiskLevel.HIGH and found["all-listeners-removed"] is RiskLevel.HIGH
    )
    reasons = {f.rule: f.reason for f in result.findings}
    assert reasons["all-upstreams-removed"].endswith("had 2: 'backend', 'legacy'")
    assert reasons["all-listeners-removed"].endswith("had 1: 'https'")
    # One route left: not "all removed".
    assert "all-routes-removed" not in rules(
        assess(old, facts(tmp_path / "d", BASE.replace("%ROUTES%", routes(1))))
    )


def test_routes_gone_with_an_unreadable_file_say_so(tmp_path: Path) -> None:
    old = tree_facts(tmp_path / "a", {"zentinel.kdl": BASE.replace("%ROUTES%", routes(2))})
    new = tree_facts(tmp_path / "b", {"zentinel.kdl": BASE.replace("%ROUTES%", routes(2)) + "route } {\n"})
    result = assess(old, new)
    reasons = {f.rule: f.reason for f in result.findings}
    assert result.level is RiskLevel.HIGH and "structure-unknown" in reasons
    assert reasons["all-routes-removed"].startswith(
        "no route is declared any more in the files that could be read;"
    )


def tree_facts(root: Path, files: dict[str, str], digest: str = "sha256:x") -> Facts:
    """Facts as the pipeline builds them: the manifest and structure of a real tree."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    manifest = scan(root)
    return Facts(digest, manifest, validators.structure(manifest, validators.ParseCache(root)))


KDL2_TLS = """
listeners {
    listener https {
        address "0.0.0.0:443"
        protocol https
        tls { cert-file "certs/site.pem"; min-version "1.2"; session-tickets #false }
    }
}
"""


def test_kdl_2_tls_change_is_high(tmp_path: Path) -> None:
    old = tree_facts(tmp_path / "a", {"zentinel.kdl": KDL2_TLS})
    new = tree_facts(tmp_path / "b", {"zentinel.kdl": KDL2_TLS.replace('"1.2"', '"1.0"')})
    result = assess(old, new)
    assert result.level is RiskLevel.HIGH and rules(result)["tls-changed"] is RiskLevel.HIGH


def test_an_unreadable_kdl_file_is_never_low_by_omission(tmp_path: Path) -> None:
    broken = KDL2_TLS + "route / -> {\n"
    first = tree_facts(tmp_path / "a", {"zentinel.kdl": broken})
    result = assess(None, first)
    assert result.level is RiskLevel.MEDIUM
    assert rules(result) == {"first-bundle": RiskLevel.LOW, "structure-unknown": RiskLevel.MEDIUM}
    # Changed and still unreadable: a TLS change inside cannot be ruled out.
    changed = tree_facts(tmp_path / "b", {"zentinel.kdl": broken.replace('"1.2"', '"1.0"')})
    result = assess(first, changed)
    assert result.level is RiskLevel.HIGH and rules(result)["structure-unknown"] is RiskLevel.HIGH
    reason = next(f.reason for f in result.findings if f.rule == "structure-unknown")
    assert "'zentinel.kdl'" in reason and "zentinel.kdl:" in reason
    # Readable before, unreadable now: named too (its listeners did not just vanish).
    readable = tree_facts(tmp_path / "c", {"zentinel.kdl": KDL2_TLS})
    assert rules(assess(readable, first))["structure-unknown"] is RiskLevel.HIGH
    # Unchanged and unreadable before as well: nothing in it changed.
    other = tree_facts(tmp_path / "d", {"zentinel.kdl": broken, "extra.yaml": "a: 1\n"})
    assert "structure-unknown" not in rules(assess(first, other))
