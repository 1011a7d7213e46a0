"""KDL inputs that once escaped as INTERNAL: escapes the database cannot store (U+0000,
lone surrogates) and errors whose line is searched for. Each is an error naming the
file, in validation and in the structure risk reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.domain.bundles import validators
from controlplane.domain.bundles.archive import formats
from controlplane.domain.bundles.archive.formats import ConfigFormat
from controlplane.domain.bundles.archive.manifest import scan
from controlplane.domain.bundles.validators import ParseCache, ParserCheck
from tests.support.bundles import bundle_dir

LISTENER = 'listeners {\n    listener "http" {\n        address "0.0.0.0:8080"\n    }\n}\n'


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('node "a\\u{0}b"\n', "the argument 'a\\x00b' of node 'node'"),
        ('"no\\u{0}de" 1\n', "the name 'no\\x00de' of node 'no\\x00de'"),
        ('outer {\n    inner key="v\\u{0}"\n}\n', "the property 'key' 'v\\x00' of node 'outer/inner'"),
        ('node "k\\u{0}"=1\n', "the property name 'k\\x00' of node 'node'"),
        ('node ("t\\u{0}")1\n', "the type annotation 't\\x00' of node 'node'"),
        ('/- kdl-version 1\nnode "a\x00b"\n', "the argument 'a\\x00b' of node 'node'"),  # a raw NUL, KDL 1.0
    ],
)
def test_nul_anywhere_fails_the_file_naming_it(tmp_path: Path, text: str, where: str) -> None:
    root = bundle_dir(tmp_path, {"zentinel.kdl": LISTENER, "conf/nul.kdl": text})
    result = validators.run_parser(ParserCheck(ConfigFormat.KDL), "", scan(root), ParseCache(root))
    assert not result.ok
    assert result.output == (
        f"conf/nul.kdl: {where} holds U+0000 (NUL) or a lone surrogate, "
        "which the control plane does not store"
    )
    found = validators.structure(scan(root), ParseCache(root))
    assert set(found["unparsed"]) == {"conf/nul.kdl"} and "\x00" not in repr(found)
    assert set(found["listeners"]) == {"http"}


def test_a_listener_named_with_nul_fails_zentinel_before_its_checks(tmp_path: Path) -> None:
    root = bundle_dir(tmp_path, {"zentinel.kdl": LISTENER.replace('"http"', '"ht\\u{0}tp"')})
    check = ParserCheck(ConfigFormat.ZENTINEL)
    result = validators.run_parser(check, "zentinel.kdl", scan(root), ParseCache(root))
    assert not result.ok
    assert result.output.startswith("zentinel.kdl: the argument 'ht\\x00tp' of node"), result.output


@pytest.mark.parametrize("escape", ["\\u{D800}", "\\u{DFFF}", "\\u{dbff}"])
def test_a_lone_surrogate_escape_fails_the_file_in_both_versions(tmp_path: Path, escape: str) -> None:
    root = bundle_dir(tmp_path, {"zentinel.kdl": LISTENER, "s.kdl": f'a 1\nnode "x{escape}"\n'})
    result = validators.run_parser(ParserCheck(ConfigFormat.KDL), "", scan(root), ParseCache(root))
    assert not result.ok and result.output.startswith("s.kdl:2: "), result.output
    assert "(as KDL 2.0)" in result.output
    surrogate = "line 2: a string escape is not a Unicode character (a lone surrogate?) (as KDL 1.0)"
    assert surrogate in result.output
    assert set(validators.structure(scan(root), ParseCache(root))["unparsed"]) == {"s.kdl"}


def test_the_error_line_is_found_in_a_long_file_and_left_out_past_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [f'route "r{i}" {{ upstream "u" }}\n' for i in range(3000)]
    lines[2499] = "route } {\n"
    root = bundle_dir(tmp_path, {"long.kdl": "".join(lines)})
    parsed = formats.parse(root, "long.kdl", ConfigFormat.KDL)
    assert parsed.error.startswith("long.kdl:2500: ") and "; line 2500: " in parsed.error, parsed.error
    # Within a budget too small for even one prefix: the message, without a line.
    monkeypatch.setattr(formats, "_LOCATE_BUDGET", 1000)
    parsed = formats.parse(root, "long.kdl", ConfigFormat.KDL)
    assert parsed.error.startswith("long.kdl: ") and "line 2500" not in parsed.error, parsed.error
