"""The agent command `controlplane serve` prints on first start: driving nginx when the
machine has it (README.md's first session), else an agent that accepts every bundle."""

from __future__ import annotations

import shlex

from controlplane.firststart import agent_command, agent_proxy
from tests.support.proxies import binary


def test_the_printed_agent_drives_nginx_when_it_is_installed() -> None:
    binary("nginx")
    assert agent_proxy() == "nginx"
    argv = shlex.split(agent_command("0.0.0.0:50051", 50051, "cpe_x", proxy="nginx"))
    assert argv[argv.index("--server") + 1] == "127.0.0.1:50051"
    assert argv[argv.index("--proxy") + 1] == "nginx" and "--apply-command" not in argv


def test_without_a_proxy_the_printed_agent_accepts_bundles_with_a_command() -> None:
    argv = shlex.split(agent_command("127.0.0.1:7000", 7000, "cpe_x"))
    assert argv[argv.index("--apply-command") + 1] == "true" and "--proxy" not in argv
