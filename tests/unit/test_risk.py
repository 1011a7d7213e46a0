"""Risk: each rule, with its reason, and the level as the highest finding."""

from __future__ import annotations

from pathlib import Path

from controlplane.archives import kdl_config
from controlplane.archives.formats import ConfigFormat, parse
from controlplane.archives.manifest import Entry, Manifest
from controlplane.domain.bundle_records import RiskLevel
from controlplane.domain.risk import Facts, assess

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
