"""The agent's proxy flags: every inconsistency stops it with exit 2 and one line naming
the cause, before it touches its state directory or the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_stub.cli import build_parser, main, proxy_from

BASE = ["--server", "127.0.0.1:9", "--project", "p", "--token", "t"]


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main([*BASE, "--state-dir", str(tmp_path / "state"), *flags])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("agent-stub: error: "), err
    assert not (tmp_path / "state").exists(), "refused before anything was written"
    return err


@pytest.mark.parametrize(
    ("flags", "cause"),
    [
        (["--proxy", "traefik"], "--proxy 'traefik' is not one of nginx, haproxy, envoy, command"),
        ([], "--proxy is required"),
        (["--proxy", "command"], "--proxy command needs --apply-command"),
        (["--proxy", "nginx", "--apply-command", "true"], "--apply-command is for --proxy command"),
        (["--proxy", "haproxy", "--health-url", "http://x/"], "are for --proxy command"),
        (["--proxy", "envoy", "--proxy-run", "attach"], "attach is not available for envoy"),
        (["--proxy", "nginx", "--proxy-run", "daemon"], "--proxy-run 'daemon' is not supervise or attach"),
        (["--proxy", "nginx", "--proxy-status", "9180"], "--proxy-status '9180' is not host:port"),
        (["--apply-command", "true", "--health-url", "https://x/"], "only http://host[:port]/path"),
        (
            ["--proxy", "nginx", "--proxy-binary", "/nonexistent/nginx"],
            "nginx binary /nonexistent/nginx does not exist",
        ),
    ],
)
def test_bad_proxy_flags_stop_the_agent_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], cause: str
) -> None:
    assert cause in refused(tmp_path, capsys, *flags)


def test_a_proxy_binary_that_is_not_executable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "nginx"
    fake.write_text("not a program\n")
    assert "is not an executable file" in refused(
        tmp_path, capsys, "--proxy", "nginx", "--proxy-binary", str(fake)
    )


def test_the_proxy_version_goes_with_the_node() -> None:
    parser = build_parser()
    args = parser.parse_args([*BASE, "--state-dir", "s", "--proxy", "nginx"])
    proxy, version = proxy_from(args, parser)
    assert proxy.kind == "nginx" and proxy.binary is not None and version.startswith("nginx/1.")
    args = parser.parse_args([*BASE, "--state-dir", "s", "--apply-command", "true"])
    proxy, version = proxy_from(args, parser)
    assert proxy.kind == "command" and version == ""
