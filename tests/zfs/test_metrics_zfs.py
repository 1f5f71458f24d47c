"""Metrics on real OpenZFS, both outlets checked by the real `promtool check metrics` (the host's
binary, shared with the guest by tests/vm/run-in-guest): the textfile a push `run` writes carries
what ZFS says (snapshot creation times, stream sizes, zfs command runtimes), and so do the daemon's
HTTP /metrics and its textfile after a pass; the freshness checks judge the real creation times."""
from __future__ import annotations

import re
import socket

from daemontest import WAIT, DaemonProcess, daemon_state, free_port, live, live_job, wait_until
from repltest import push_sink
from support import promtool_check, status, write_config
from zfstest import get, zfs

import zrepl


def metric(text: str, name: str, labels: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(m[1]) if m else None


def metric_sum(text: str, name: str, label: str) -> float:
    """The sum of a metric's series that carry the label (e.g. 'zfsverb="recv"'), whatever the others."""
    return sum(float(m[1]) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*{re.escape(label)}[^}}]*\}} (\S+)$",
                                                text, re.MULTILINE))


def scrape(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b"".join(iter(lambda: conn.recv(65536), b"")).decode()
    head, _, body = reply.partition("\r\n\r\n")
    assert " 200 " in head.splitlines()[0], head
    return body


def test_a_push_run_writes_the_textfile_with_real_creation_times_and_bytes(make_pool, zfs_tree, run_zrepl, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    textfile = tmp_path / "zrepl.prom"
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True}),
                       global_={"monitoring": [{"type": "textfile", "path": str(textfile)}],
                                "status": {"crit_snapshot_older_than": "1d", "crit_received_older_than": "1d"}})
    proc = run_zrepl("--config", cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    text = textfile.read_text()
    promtool_check(text)
    fs = f'zrepl_job="push",filesystem="{src}/data"'
    created = float(get(f"{src}/data@a", "creation"))
    assert metric(text, "zrepl_replication_last_replicated_timestamp_seconds", fs) == created
    assert metric(text, "zrepl_snapshot_newest_timestamp_seconds", fs) == created
    assert metric(text, "zrepl_replication_lag_seconds", fs) == 0
    report = status(cfg)["jobs"]["push"]["replication"]["filesystems"][f"{src}/data"]
    assert metric(text, "zrepl_replication_bytes_replicated", fs) == report["bytes_total"] > 0
    for verb in ("list", "send", "recv"):  # the streams too, as zrepl's zfscmd times every command
        assert metric(text, "zrepl_zfscmd_runtime_count", f'jobid="push",zfsbinary="zfs",zfsverb="{verb}"') >= 1
    assert run_zrepl("--config", cfg, "status").returncode == 0  # fresh on both sides
    zfs("snapshot", f"{src}/data@b")
    ok = run_zrepl("--config", cfg, "status", "--json")
    assert ok.returncode == 0, ok.stdout  # @b is new; the receiver's @a is minutes old, not a day


def test_the_daemons_http_metrics_and_textfile_pass_promtool_with_the_values_of_its_replication(
        make_pool, zfs_tree, zfs_shim, tmp_path, sockdir):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    sockpath, port, textfile = f"{sockdir}/control", free_port(), tmp_path / "zrepl.prom"
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True}),
                       global_={"control": {"sockpath": sockpath},
                                "monitoring": [{"type": "prometheus", "listen": f"127.0.0.1:{port}"},
                                               {"type": "textfile", "path": str(textfile)}]})
    daemon = DaemonProcess(zfs_shim, cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: live(sockpath) is not None, "the control socket", daemon)
        code, reply = zrepl.control_request(sockpath, "POST", "/signal", {"job": "push", "op": "wakeup"}, timeout=30)
        assert code == 200, reply
        wait_until(lambda: daemon_state(sockpath, "push") == "waiting for wakeup"
                   and (live_job(sockpath, "push").get("last_run") or {}).get("result") == "ok",
                   "the woken pass to end", daemon)
        # the daemon writes the textfile at its start and once a minute too: wait for the pass's
        fs = f'zrepl_job="push",filesystem="{src}/data"'
        wait_until(lambda: textfile.exists() and metric(textfile.read_text(), "zrepl_replication_bytes_replicated", fs),
                   "the textfile after the pass", daemon)
        entry = live_job(sockpath, "push")
        http = scrape(port)
    finally:
        assert daemon.stop() == 0, daemon.text()
    created = float(get(f"{src}/data@a", "creation"))
    replicated = entry["replication"]["filesystems"][f"{src}/data"]["bytes_total"]
    assert replicated > 0
    for outlet, text in (("http", http), ("textfile", textfile.read_text())):
        promtool_check(text)
        assert metric(text, "zrepl_replication_bytes_replicated", fs) == replicated, outlet
        assert metric(text, "zrepl_replication_last_replicated_timestamp_seconds", fs) == created, outlet
        assert metric(text, "zrepl_replication_lag_seconds", fs) == 0, outlet
        assert metric(text, "zrepl_replication_filesystem_errors", 'zrepl_job="push"') == 0, outlet
        assert metric(text, "zrepl_replication_last_successful", 'zrepl_job="push"') >= created, outlet
        for verb in ("list", "send", "recv"):
            assert metric_sum(text, "zrepl_zfscmd_runtime_count", f'zfsverb="{verb}"') >= 1, (outlet, verb)
    # the listener serves the daemon's own process: its control requests so far are counted
    assert metric(http, "zrepl_control_request_finished_count", 'endpoint="/status"') >= 1
    assert metric(http, "zrepl_control_request_finished_count", 'endpoint="/signal"') == 1
