"""controlplane.proxies without processes: configurations it writes, and the proxies'
own statistics and words it reads (samples taken from nginx 1.22, HAProxy 2.6, Envoy 1.40)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from controlplane.proxies import envoy, haproxy, nginx
from controlplane.proxies.binaries import BinaryError, locate
from controlplane.proxies.http import Address
from controlplane.proxies.validate import bounded, relative
from controlplane.proxies.window import delta, quantile, ratio


def test_addresses_parse_or_name_what_is_wrong() -> None:
    assert Address.parse("127.0.0.1:9180") == Address("127.0.0.1", 9180)
    assert str(Address.parse("[::1]:80")) == "[::1]:80"
    for bad, why in [("9180", "not host:port"), ("h:0", "1 to 65535"), ("h:x", "1 to 65535"), (":80", "not")]:
        with pytest.raises(ValueError, match=why):
            Address.parse(bad)


def test_windows_over_counters() -> None:
    assert delta(10, 25) == 15
    assert delta(25, 4) == 4, "a counter that went down was reset: its value is the window"
    assert ratio(1, 4) == 0.25 and ratio(0, 0) == 0.0 and ratio(5, 4) == 1.0
    assert quantile({}, 0.99) is None
    assert quantile({1.0: 98, 50.0: 1, 900.0: 1}, 0.99) == 50.0
    assert quantile({1.0: 1}, 0.99) == 1.0


def test_reasons_are_bounded_and_paths_relative(tmp_path: Path) -> None:
    text = "start " + "x" * 10_000 + " end"
    cut = bounded(text, 100)
    assert len(cut) <= 100 and cut.startswith("start") and cut.endswith("end")
    tree = tmp_path / "bundles" / "abc"
    assert relative(f'unknown directive "x" in {tree}/conf.d/a.conf:3', tree) == (
        'unknown directive "x" in conf.d/a.conf:3'
    )


def test_nginx_main_configuration_includes_the_bundle_unchanged(tmp_path: Path) -> None:
    text = nginx.render_main(run_dir=tmp_path, status=Address("127.0.0.1", 9180), digest="sha256:ab")
    assert 'include "nginx.conf";' in text
    assert f'pid "{tmp_path}/nginx.pid";' in text
    assert "log_format controlplane_agent '$status $request_time';" in text
    assert 'return 200 "sha256:ab";' in text and "stub_status;" in text
    with pytest.raises(ValueError):
        nginx.render_main(run_dir=tmp_path / 'a"b', status=Address("127.0.0.1", 1), digest="sha256:ab")
    with pytest.raises(ValueError):
        nginx.render_main(run_dir=tmp_path, status=Address("127.0.0.1", 1), digest='x"; evil')


def test_nginx_stub_status_and_reload_words() -> None:
    page = (
        "Active connections: 3 \nserver accepts handled requests\n 10 10 42 \n"
        "Reading: 0 Writing: 1 Waiting: 2 \n"
    )
    assert nginx.parse_stub_status(page) == nginx.StubStatus(3, 10, 10, 42)
    with pytest.raises(ValueError):
        nginx.parse_stub_status("<html>404</html>")
    log = (
        "2026/12/07 10:54:29 [notice] 1#1: signal 1 (SIGHUP) received from 2, reconfiguring\n"
        "2026/12/07 10:54:29 [emerg] 1#1: bind() to 127.0.0.1:34703 failed (98: Address already in use)\n"
        "2026/12/07 10:54:29 [notice] 1#1: try again to bind() after 500ms\n"
    )
    outcome = nginx.scan_reload(log)
    assert outcome.retrying and outcome.errors == (
        "bind() to 127.0.0.1:34703 failed (98: Address already in use)",
    )
    done = nginx.scan_reload(log + "2026/12/07 10:54:31 [emerg] 1#1: still could not bind()\n")
    assert not done.retrying and len(done.errors) == 2
    assert nginx.scan_reload("2026/12/07 [notice] 1#1: reconfiguring\n").errors == ()


def test_nginx_access_log_is_read_from_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = nginx.AccessLog(path, max_bytes=1024)
    assert log.read().requests == 0, "no file yet"
    path.write_bytes(b"200 0.001\n200 0.002\n503 0.010\n200 0.00")
    first = log.read()
    assert (first.requests, first.errors) == (3, 1)
    assert first.latencies_ms == {1.0: 1, 2.0: 1, 10.0: 1}
    with path.open("ab") as f:
        f.write(b"5\n404 0.001\nnot a line\n")
    second = log.read()
    assert (second.requests, second.errors) == (2, 0), "the unfinished line is read once finished"
    assert second.latencies_ms == {5.0: 1, 1.0: 1}

    os.replace(path, tmp_path / "access.log.1")
    path.write_bytes(b"500 0.100\n")
    rotated = log.read()
    assert (rotated.requests, rotated.errors) == (1, 1), "a rotated log is read from its start"

    with path.open("ab") as f:
        f.write(b"200 0.001\n" * 500)
    capped = log.read()
    assert 0 < capped.requests <= 1024 // 10 and log.skipped_bytes > 0, "at most max_bytes per read"
    log.skip_to_end()
    with path.open("ab") as f:
        f.write(b"502 0.003\n")
    assert log.read().errors == 1


SHOW_PROC = """#<PID>          <type>          <reloads>       <uptime>        <version>
19373           master          2 [failed: 1]   0d00h10m14s     2.6.12-1+deb12u4
# workers
19446           worker          1               0d00h10m13s     2.6.12-1+deb12u4
# old workers
19383           worker          2               0d00h10m20s     2.6.12-1+deb12u4
# programs

"""

SHOW_STAT = (
    "# pxname,svname,qcur,req_tot,hrsp_5xx,other\n"
    "controlplane_agent,FRONTEND,,7,0,\n"
    "web,FRONTEND,,100,4,\n"
    "web2,FRONTEND,,50,1,\n"
    "app,app,0,,3,\n"
    "app,BACKEND,0,,4,\n"
)


def test_haproxy_master_cli_and_stats() -> None:
    procs = haproxy.parse_show_proc(SHOW_PROC)
    assert (procs.master_pid, procs.reloads, procs.failed_reloads, procs.workers) == (19373, 2, 1, (19446,))
    with pytest.raises(ValueError):
        haproxy.parse_show_proc("Unknown command")
    assert haproxy.parse_show_stat(SHOW_STAT) == haproxy.FrontendTotals(150, 5), "frontends but the driver's"
    with pytest.raises(ValueError):
        haproxy.parse_show_stat("Permission denied\n")


def test_haproxy_main_configuration(tmp_path: Path) -> None:
    text = haproxy.render_main(run_dir=tmp_path, status=Address("127.0.0.1", 9181), digest="sha256:ab")
    assert f"stats socket {tmp_path}/stats.sock" in text and "bind 127.0.0.1:9181" in text
    assert 'string "sha256:ab" if { path /agent/bundle }' in text
    with pytest.raises(ValueError):
        haproxy.render_main(run_dir=tmp_path / "a b", status=Address("127.0.0.1", 1), digest="sha256:ab")


ENVOY_STATS = """http.admin.downstream_rq_5xx: 9
http.admin.downstream_rq_completed: 99
http.admin.downstream_rq_time:
  totals=1,0.1:99
  intervals=1,0.1:99
  summary=P0(1,1) P99(1,1)
http.web.downstream_rq_5xx: 2
http.web.downstream_rq_completed: 40
http.web.downstream_rq_time:
  totals=0,0:30, 1,0.1:8, 12,1:2
  intervals=0,0:18, 12,1:2
  summary=P0(0,0) P99(13,13)
server.hot_restart_epoch: 3
server.state: 0
"""


def test_envoy_stats_leave_the_admin_out() -> None:
    stats = envoy.parse_stats(ENVOY_STATS)
    assert (stats.epoch, stats.state, stats.completed, stats.errors) == (3, 0, 40, 2)
    assert stats.latency == {0.0: 18, 13.0: 2}, "the last flush interval's buckets, by upper bound"
    assert quantile(stats.latency, 0.99) == 13.0


def test_envoy_overlay_and_words() -> None:
    overlay = json.loads(envoy.overlay(admin=Address("127.0.0.1", 9901), node_id="n-1", digest="sha256:ab"))
    assert overlay["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    assert overlay["node"] == {"id": "n-1", "metadata": {"controlplane.bundle": "sha256:ab"}}
    info = json.dumps(
        {"state": "LIVE", "node": overlay["node"], "command_line_options": {"restart_epoch": 2}}
    )
    assert envoy.served_digest(info) == ("sha256:ab", "LIVE", 2)
    assert envoy.served_digest(json.dumps({"state": "LIVE", "command_line_options": {}})) == ("", "LIVE", 0)
    line = (
        "envoy exited with code 1: [2026-12-07 11:35:45.295][22190][critical][main] "
        "[source/server/config_validation/server.cc:76] error initializing configuration"
    )
    assert envoy.words(line) == "envoy exited with code 1: [critical] error initializing configuration"


def test_a_binary_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    with pytest.raises(BinaryError, match="does not exist"):
        locate("nginx", tmp_path / "nginx")
    plain = tmp_path / "haproxy"
    plain.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(BinaryError, match="not an executable file"):
        locate("haproxy", plain)
    plain.chmod(0o755)
    with pytest.raises(BinaryError, match="does not look like haproxy"):
        locate("haproxy", plain)
