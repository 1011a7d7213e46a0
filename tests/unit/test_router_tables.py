"""A routing table as a driver applies it (controlplane/proxies/routes.py,
haproxy_routes.py): addresses, the diff from what the proxy runs, HAProxy's commands."""

from __future__ import annotations

import pytest

from controlplane.proxies import haproxy_routes, routes
from controlplane.proxies.http import Address

# `show servers state app` from HAProxy 2.6.12: a server of the configuration, one the
# driver added and enabled, one it added that is still in maintenance, one by host name.
HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
    "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl "
    "srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)
STATE = f"""1
{HEADER}
3 app 1 static 127.0.0.1 2 0 1 1 5 1 0 0 0 0 0 0 - 9000 - 0 0 - - 0
3 app 2 cp-n-a 127.0.0.1 2 0 256 256 5 1 0 0 0 0 0 0 - 8001 - 0 0 - - 0
3 app 3 cp-n-b ::1 0 1 28 28 0 1 0 0 0 0 0 0 - 8002 - 0 0 - - 0
3 app 4 cp-n-c - 0 1 1 1 0 1 0 0 0 0 0 0 web.internal 8003 - 0 0 - - 0
"""


def test_the_servers_state_is_read_by_its_header() -> None:
    servers, maint = haproxy_routes.parse_servers_state(STATE, "app")
    assert servers == {
        "static": routes.Server("static", Address("127.0.0.1", 9000), 1),
        "cp-n-a": routes.Server("cp-n-a", Address("127.0.0.1", 8001), 256),
        "cp-n-b": routes.Server("cp-n-b", Address("::1", 8002), 28),
        "cp-n-c": routes.Server("cp-n-c", Address("web.internal", 8003), 1),
    }
    assert maint == {"cp-n-b", "cp-n-c"}
    with pytest.raises(haproxy_routes.NoBackend):
        haproxy_routes.parse_servers_state("Can't find backend.\n", "nope")
    with pytest.raises(ValueError, match="not a `show servers state` answer"):
        haproxy_routes.parse_servers_state("Unknown command\n", "app")


def test_the_diff_touches_only_the_drivers_servers_and_the_commands_carry_it_out() -> None:
    running, maint = haproxy_routes.parse_servers_state(STATE, "app")
    want = routes.table(
        7, "app", [("n-a", "127.0.0.1:8001", 128), ("n-b", "[::1]:8009", 28), ("n-d", "10.0.0.4:80", 256)]
    )
    changes = routes.diff(running, want.servers)
    assert [s.name for s in changes.add] == ["cp-n-d"]
    assert [s.name for s in changes.move] == ["cp-n-b"]
    assert [s.name for s in changes.reweight] == ["cp-n-a"]
    assert changes.remove == ("cp-n-c",), "the configuration's own server is never removed"
    assert haproxy_routes.commands("app", changes, maint, want.servers) == [
        "set server app/cp-n-c state maint",
        "shutdown sessions server app/cp-n-c",
        "del server app/cp-n-c",
        "add server app/cp-n-d 10.0.0.4:80 weight 256",
        "set server app/cp-n-b addr ::1 port 8009",
        "set server app/cp-n-b weight 28",
        "set server app/cp-n-a weight 128",
        "enable server app/cp-n-b",
        "enable server app/cp-n-d",
    ]
    assert routes.diff(running, {n: s for n, s in running.items() if n.startswith("cp-")}).empty


def test_haproxys_answers_are_told_apart() -> None:
    assert haproxy_routes.refusal("add server app/x 1.2.3.4:80", "New server registered.\n") is None
    assert haproxy_routes.refusal("del server app/x", "Server deleted.\n") is None
    assert haproxy_routes.refusal("set server app/x weight 3", "\n") is None
    assert (
        haproxy_routes.refusal(
            "set server app/x addr 1.2.3.4 port 80",
            "IP changed from '1.2.3.5' to '1.2.3.4', port changed from '81' to '80' "
            "by 'stats socket command'\n",
        )
        is None
    )
    assert haproxy_routes.refusal(
        "set server app/x weight 300", "Absolute weight can only be between 0 and 256 inclusive.\n"
    ) == ("Absolute weight can only be between 0 and 256 inclusive.")
    assert haproxy_routes.refusal("set server app/zz weight 3", "No such server.\n") == "No such server."


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("localhost", "is not host:port"),
        ("host:0", "port must be a number"),
        ("0.0.0.0:80", "not an address a router can send requests to"),
        ("[ff02::1]:80", "not an address a router can send requests to"),
        ("::1:80", "in brackets"),
        ("a_b:80", "neither an IP address nor a DNS name"),
        ("x" * 301, "at most 300 characters"),
    ],
)
def test_a_backend_address_is_checked(text: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(")):
        routes.backend_address(text)


def test_good_backend_addresses() -> None:
    assert str(routes.backend_address("127.0.0.1:8080")) == "127.0.0.1:8080"
    assert str(routes.backend_address("[::1]:8080")) == "[::1]:8080"
    assert str(routes.backend_address("web-1.prod.internal:443")) == "web-1.prod.internal:443"


def test_a_table_with_a_bad_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="weight 300 is outside 0-256"):
        routes.table(1, "app", [("n-a", "127.0.0.1:80", 300)])
    with pytest.raises(ValueError, match="backend name"):
        routes.table(1, "a b", [])
    with pytest.raises(ValueError, match="cannot name a server"):
        routes.table(1, "app", [("n a", "127.0.0.1:80", 1)])
    table = routes.table(3, "app", [("n-a", "[::1]:80", 5)])
    assert routes.Table.from_json(table.to_json()) == table
