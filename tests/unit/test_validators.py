"""Validation: the built-in parsers and external commands, each with a clear result."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive.formats import ConfigFormat
from controlplane.domain.bundles.archive.manifest import scan
from controlplane.domain.bundles.validators import (
    CommandCheck,
    ParseCache,
    ParserCheck,
    ProxyCheck,
    ValidationConfig,
)
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.bundles import ValidationResult
from tests.support.bundles import bundle_dir

GOOD_ZENTINEL = b"""
listeners {
    listener "http" {
        address "0.0.0.0:8080"
        protocol "http"
    }
}
upstreams {
    upstream "backend" {
        target "127.0.0.1:3000"
    }
}
routes {
    route "api" {
        upstream "backend"
    }
}
"""


def run_parser(root: Path, check: ParserCheck, main: str = "") -> ValidationResult:
    return validators.run_parser(check, main, scan(root), ParseCache(root))


def test_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    root = bundle_dir(
        tmp_path,
        {
            "ok.kdl": b'a "b"\n',
            "conf/bad.kdl": b'listeners {\n    listener "x" {\n',
            "bad.json": b'{"a": 1,\n "b": }',
            "bad.yaml": b"a: [1, 2\nb: c\n",
            "ok.yml": b"a: 1\n---\nb: 2\n",
        },
    )
    kdl = run_parser(root, ParserCheck(ConfigFormat.KDL))
    assert not kdl.ok and kdl.validator == "kdl:*.kdl"
    assert kdl.output.startswith("conf/bad.kdl:2: Unexpected end of data"), kdl.output
    js = run_parser(root, ParserCheck(ConfigFormat.JSON))
    assert not js.ok and js.output.startswith("bad.json:2:7: Expecting value")
    yml = run_parser(root, ParserCheck(ConfigFormat.YAML))
    assert not yml.ok and yml.output.startswith("bad.yaml:") and "ok.yml" not in yml.output
    only_good = run_parser(root, ParserCheck(ConfigFormat.YAML, ("*.yml",)))
    assert only_good.ok and only_good.output == "1 file(s) parsed"


def test_hostile_texts_are_errors_not_crashes(tmp_path: Path) -> None:
    root = bundle_dir(
        tmp_path,
        {
            "deep.kdl": b"a {\n" * 5000 + b"}\n" * 5000,
            "deep.json": b"[" * 100_000 + b"]" * 100_000,
            "binary.kdl": b"\xff\xfe\x00",
        },
    )
    kdl = run_parser(root, ParserCheck(ConfigFormat.KDL))
    assert not kdl.ok
    assert "deep.kdl: nested too deeply to parse" in kdl.output
    assert "binary.kdl: not UTF-8 text" in kdl.output
    js = run_parser(root, ParserCheck(ConfigFormat.JSON))
    assert not js.ok and "deep.json: nested too deeply" in js.output


def test_zentinel_checks_the_structure(tmp_path: Path) -> None:
    good = bundle_dir(tmp_path / "good", {"zentinel.kdl": GOOD_ZENTINEL})
    assert run_parser(good, ParserCheck(ConfigFormat.ZENTINEL), "zentinel.kdl").ok
    bad_text = (
        GOOD_ZENTINEL.replace(b'"0.0.0.0:8080"', b'"nowhere"')
        .replace(b'upstream "backend"\n    }', b'upstream "missing"\n    }')
        .replace(b'protocol "http"', b'protocol "https"')
    )
    bad = bundle_dir(tmp_path / "bad", {"zentinel.kdl": bad_text})
    result = run_parser(bad, ParserCheck(ConfigFormat.ZENTINEL), "zentinel.kdl")
    assert not result.ok
    assert "listener 'http' needs an address of the form host:port, got 'nowhere'" in result.output
    assert "listener 'http' uses https but has no tls block" in result.output
    assert "route 'api' names upstream 'missing', which is not declared" in result.output
    none = bundle_dir(tmp_path / "none", {"other.kdl": b"x 1\n"})
    assert (
        "no file matches zentinel.kdl"
        in run_parser(none, ParserCheck(ConfigFormat.ZENTINEL), "zentinel.kdl").output
    )


# The same configuration in KDL 2.0: bare-word strings, #true, a type annotation.
GOOD_ZENTINEL_V2 = b"""
listeners {
    listener http {
        address "0.0.0.0:8080"
        protocol http
        keepalive #true
    }
}
upstreams {
    upstream backend {
        target "127.0.0.1:3000"
        timeout (duration)"5s"
    }
}
routes {
    route api {
        upstream backend
    }
}
"""


def test_kdl_2_and_kdl_1_both_parse_validate_and_give_the_same_structure(tmp_path: Path) -> None:
    # `true` (not `#true`) is KDL 1.0 only.
    v1_only = GOOD_ZENTINEL.replace(b'protocol "http"', b'protocol "http"\n        keepalive true')
    v1 = bundle_dir(tmp_path / "v1", {"zentinel.kdl": v1_only})
    v2 = bundle_dir(tmp_path / "v2", {"zentinel.kdl": GOOD_ZENTINEL_V2})
    for root in (v1, v2):
        for fmt in (ConfigFormat.KDL, ConfigFormat.ZENTINEL):
            result = run_parser(root, ParserCheck(fmt), "zentinel.kdl")
            assert result.ok, result.output
    s1 = validators.structure(scan(v1), ParseCache(v1))
    s2 = validators.structure(scan(v2), ParseCache(v2))
    for s in (s1, s2):
        assert s["unparsed"] == {}
        assert s["listeners"]["http"]["address"] == "0.0.0.0:8080"
        assert s["routes"]["api"]["upstream"] == "backend"
        assert s["upstreams"]["backend"]["targets"] == ["127.0.0.1:3000"]
    assert ParseCache(v2).get("zentinel.kdl", ConfigFormat.KDL).document.version == 2
    assert ParseCache(v1).get("zentinel.kdl", ConfigFormat.KDL).document.version == 1


def test_the_version_marker_picks_the_kdl_version(tmp_path: Path) -> None:
    root = bundle_dir(
        tmp_path,
        {
            "v1.kdl": b"/- kdl-version 1\nlistener http\n",  # a bare word is not KDL 1.0
            "v2.kdl": b'/- kdl-version 2\nlistener "http" flag=true\n',  # `true` is not KDL 2.0
            "ok.kdl": b"/- kdl-version 2\nlistener http flag=#true\n",
            "v3.kdl": b"/- kdl-version 3\na 1\n",
        },
    )
    result = run_parser(root, ParserCheck(ConfigFormat.KDL))
    errors = dict(line.split(":", 1) for line in result.output.splitlines())
    assert set(errors) == {"v1.kdl", "v2.kdl", "v3.kdl"}, result.output
    assert errors["v1.kdl"].startswith("2: ") and "(as KDL 1.0)" in errors["v1.kdl"]
    assert "KDL 2.0" not in errors["v1.kdl"]
    assert errors["v2.kdl"].startswith("2: ") and "(as KDL 2.0)" in errors["v2.kdl"]
    assert "KDL 1.0" not in errors["v2.kdl"]
    assert "kdl-version 3 is not a KDL version" in errors["v3.kdl"]


def test_a_kdl_error_names_its_line_in_each_version(tmp_path: Path) -> None:
    text = b'a "x"\nb 1\nc }\nd 2\n'
    root = bundle_dir(tmp_path, {"bad.kdl": text})
    result = run_parser(root, ParserCheck(ConfigFormat.KDL))
    assert result.output.startswith("bad.kdl:3: Unexpected '}' (as KDL 2.0); line 3: "), result.output
    assert result.output.endswith("(as KDL 1.0)")


def test_structure_lists_kdl_files_it_cannot_read(tmp_path: Path) -> None:
    """Whatever the validators, an unreadable .kdl file is named, never just skipped."""
    root = bundle_dir(tmp_path, {"zentinel.kdl": GOOD_ZENTINEL_V2, "conf/broken.kdl": b"route / -> x {\n"})
    found = validators.structure(scan(root), ParseCache(root))
    assert set(found["unparsed"]) == {"conf/broken.kdl"}
    assert found["unparsed"]["conf/broken.kdl"].startswith("conf/broken.kdl:")
    assert "http" in found["listeners"]


async def run(
    root: Path, argv: list[str], timeout: float = 10.0, allowed: set[str] | None = None
) -> ValidationResult:
    check = CommandCheck("check", tuple(argv), timedelta(seconds=timeout))
    return await validators.run_command(check, root, "main.conf", allowed or {sys.executable})


async def test_command_success_sees_the_files_and_placeholders(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"main.conf": b"listen 80;\n"})
    script = (
        "import os,sys; "
        "print(open(sys.argv[1]).read().strip(), os.getcwd() == sys.argv[2], sorted(os.environ))"
    )
    result = await run(root, [sys.executable, "-c", script, "{main}", "{path}"])
    assert result.ok, result.output
    assert result.output.startswith("listen 80; True")
    # The server's environment (its keys) never reaches the command.
    assert "'BUNDLE_DIR', 'BUNDLE_MAIN', 'HOME', 'LANG', 'PATH'" in result.output


def from_here(path: Path) -> Path:
    """`path` relative to the working directory."""
    return Path(os.path.relpath(path))


async def test_a_command_gets_absolute_paths_from_a_relative_tree(tmp_path: Path) -> None:
    """A server run with `--data-dir data` hands the pipeline a relative tree; the command
    runs inside the tree, where that relative path would name nothing."""
    root = bundle_dir(tmp_path, {"main.conf": b"listen 80;\n"})
    relative = from_here(root)
    assert not relative.is_absolute()
    script = "import os,sys; print(all(os.path.isabs(a) and os.path.exists(a) for a in sys.argv[1:]))"
    result = await run(relative, [sys.executable, "-c", script, "{main}", "{path}"])
    assert result.ok and result.output == "True", result.output


async def test_a_command_whose_input_is_missing_fails_without_running(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"other.conf": b""})
    ran = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(ran)!r}, 'w')", "{main}"]
    missing = await run(root, argv)
    assert not missing.ok and "the main file 'main.conf' is not in the bundle" in missing.output
    check = CommandCheck("check", tuple(argv))
    unset = await validators.run_command(check, root, "", {sys.executable})
    assert not unset.ok and "names {main}, and the project's validation sets no main file" in unset.output
    gone = await run(tmp_path / "nowhere", [sys.executable, "-c", "pass"])
    assert not gone.ok and "cannot find its input" in gone.output
    assert not ran.exists()


async def test_command_failure_returns_its_output(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"main.conf": b"bad"})
    script = "import sys; print('main.conf:1: unknown directive bad', file=sys.stderr); sys.exit(3)"
    result = await run(root, [sys.executable, "-c", script])
    assert not result.ok
    assert "exited with code 3" in result.output
    assert "main.conf:1: unknown directive bad" in result.output


async def test_command_timeout_kills_it(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"main.conf": b""})
    script = "import time; print('starting', flush=True); time.sleep(60)"
    result = await run(root, [sys.executable, "-c", script], timeout=0.5)
    assert not result.ok
    assert "timed out after 0.5s and was killed" in result.output
    assert "starting" in result.output
    assert result.duration < timedelta(seconds=30)


async def test_missing_binary_and_programs_off_the_allow_list(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"main.conf": b""})
    missing = await run(root, ["zentinel-not-installed", "validate"], allowed={"zentinel-not-installed"})
    assert not missing.ok
    assert "command not found: 'zentinel-not-installed' is not installed" in missing.output
    refused = await run(root, ["/bin/sh", "-c", "true"], allowed=set())
    assert not refused.ok and "not on this server's allow-list" in refused.output


async def test_command_output_is_bounded(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"main.conf": b""})
    script = "import sys; sys.stdout.write('x' * 5_000_000); sys.stdout.write('THE END'); sys.exit(1)"
    result = await run(root, [sys.executable, "-c", script])
    assert not result.ok and result.output.endswith("THE END")
    assert len(result.output) <= validators.MAX_OUTPUT + 200


def test_config_checks_name_the_field() -> None:
    ok = ValidationConfig(
        main="nginx.conf", commands=(CommandCheck("nginx", ("nginx", "-t", "-c", "{main}")),)
    )
    assert validators.check_config(ok, {"nginx"}) is ok
    with_proxy = ValidationConfig(proxies=(ProxyCheck("nginx"),))
    assert validators.check_config(with_proxy, {"nginx"}) is with_proxy
    cases = [
        (ValidationConfig(main="../x"), "config.main"),
        (ValidationConfig(commands=(CommandCheck("x", ()),)), "config.commands[0].argv"),
        (ValidationConfig(commands=(CommandCheck("x", ("rm", "-rf", "/")),)), "config.commands[0].argv"),
        (
            ValidationConfig(commands=(CommandCheck("x", ("nginx",), timedelta(hours=1)),)),
            "config.commands[0].timeout",
        ),
        (ValidationConfig(parsers=(ParserCheck(ConfigFormat.KDL, ("",)),)), "config.parsers[0].paths"),
        (ValidationConfig(proxies=(ProxyCheck("nginx"), ProxyCheck("nginx"))), "config.proxies"),
        (ValidationConfig(proxies=(ProxyCheck("haproxy"),)), "config.proxies[0].kind"),
        (ValidationConfig(proxies=(ProxyCheck("nginx", timedelta(0)),)), "config.proxies[0].timeout"),
    ]
    for config, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            validators.check_config(config, {"nginx"})
        assert caught.value.field == field, caught.value


def test_config_round_trips_through_json() -> None:
    config = ValidationConfig(
        main="zentinel.kdl",
        parsers=(ParserCheck(ConfigFormat.ZENTINEL), ParserCheck(ConfigFormat.YAML, ("conf/*.yaml",))),
        commands=(
            CommandCheck("zentinel", ("zentinel", "validate", "--config", "{main}"), timedelta(seconds=12)),
        ),
        proxies=(ProxyCheck("envoy", timedelta(seconds=7)),),
    )
    assert ValidationConfig.from_json(config.to_json()) == config
    # Configurations stored before proxies existed read as none.
    assert "proxies" not in ValidationConfig().to_json()
    with pytest.raises(ValueError, match="unknown proxy 'apache'"):
        ValidationConfig.from_json({"proxies": [{"kind": "apache", "timeout": 1}]})


def test_every_configuration_format_is_parsed_by_default(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"bad.kdl": b"listener {\n", "ok.json": b"{}", "ok.yaml": b"a: 1\n"})
    cache = ParseCache(root)
    results = [validators.run_parser(c, "", scan(root), cache) for c in validators.DEFAULT.parsers]
    assert [(r.validator, r.ok) for r in results] == [
        ("kdl:*.kdl", False),
        ("json:*.json", True),
        ("yaml:*.yaml,*.yml", True),
    ]
