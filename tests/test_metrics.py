"""Prometheus metrics (section 15): the exposition text from the status document, checked by the real
`promtool check metrics`; the node_exporter textfile written after a `run` and a `stdinserver`
connection, with the values a replication leaves; the HTTP listener (MetricsServer) standalone."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import (job_status, last_n, not_replicated, promtool_check, push_job, run, sink_job, snap_job, status,
                     write_config)

SRC = "src/data"

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Series -> value; fails on a line that is no sample or comment, and on a repeated series
    (promtool 2.42 does not check that)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        key = (m[1], frozenset(_LABEL.findall(m[2] or "")))
        assert key not in out, f"series twice: {line}"
        out[key] = float(m[3])
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


@pytest.fixture
def world(fake_zfs: FakeZfs):
    w = fake_zfs.world
    w.tree("src", "data @a @b")
    w.tree("dst", "sink")
    return w


def push_config(tmp_path: Path, textfile: Path, **keys) -> Path:
    keys.setdefault("filesystems", {"src/data": True})
    return write_config(tmp_path, push_job(keep_sender=[not_replicated(), last_n(1)], **keys),
                        sink_job(root_fs="dst/sink"),
                        global_={"monitoring": [{"type": "textfile", "path": str(textfile)}]})


def creation(fake: FakeZfs, snapshot: str) -> int:
    return fake.world.find(snapshot).creation


# ---- after a run: the textfile --------------------------------------------------------------------

def test_a_push_run_writes_a_textfile_that_promtool_accepts_with_the_replications_values(fake_zfs, world, tmp_path):
    textfile = tmp_path / "prom" / "zrepl.prom"
    textfile.parent.mkdir()
    cfg = push_config(tmp_path, textfile)
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    text = textfile.read_text()
    promtool_check(text)
    job, fs = {"zrepl_job": "push"}, {"zrepl_job": "push", "filesystem": SRC}
    report = status(cfg)["jobs"]["push"]["replication"]["filesystems"][SRC]
    assert report["bytes_total"] > 0
    assert value(text, "zrepl_replication_bytes_replicated", **fs) == report["bytes_total"]
    assert value(text, "zrepl_replication_filesystem_errors", **job) == 0
    assert value(text, "zrepl_replication_filesystem_failed", **fs) == 0
    assert value(text, "zrepl_replication_last_replicated_timestamp_seconds", **fs) == creation(fake_zfs, f"{SRC}@b")
    assert value(text, "zrepl_replication_lag_seconds", **fs) == 0
    assert value(text, "zrepl_replication_bytes_remaining", **fs) == 0
    assert value(text, "zrepl_snapshot_newest_timestamp_seconds", **fs) == creation(fake_zfs, f"{SRC}@b")
    success = zrepl.parse_iso(status(cfg)["jobs"]["push"]["last_success"])
    assert value(text, "zrepl_replication_last_successful", **job) == success
    assert value(text, "zrepl_job_last_success_timestamp_seconds", **job) == success
    assert value(text, "zrepl_job_running", **job) == 0
    assert value(text, "zrepl_pruning_destroyed", **job, prune_side="sender") == 1  # @a, replicated
    assert value(text, "zrepl_pruning_time_count", **job, prune_side="sender") == 1
    assert value(text, "zrepl_start_time", raw=zrepl.__version__,
                 version_info=f"zrepl.py version={zrepl.__version__} python="
                              f"{'.'.join(map(str, sys.version_info[:3]))}") is not None
    assert [p.name for p in textfile.parent.iterdir()] == ["zrepl.prom"]  # no temp file left behind
    assert textfile.stat().st_mode & 0o777 == 0o644


def test_the_byte_counter_grows_across_runs_and_a_failing_filesystem_shows_its_lag(fake_zfs, world, tmp_path):
    textfile = tmp_path / "zrepl.prom"
    cfg = push_config(tmp_path, textfile)
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    fs = {"zrepl_job": "push", "filesystem": SRC}
    first = value(textfile.read_text(), "zrepl_replication_bytes_replicated", **fs)
    assert first
    world.snapshot(f"{SRC}@c")
    fake_zfs.tamper.creation(f"{SRC}@c", creation(fake_zfs, f"{SRC}@b") + 3600)
    fake_zfs.fail("recv", "cannot receive: injected\n")
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 1
    text = textfile.read_text()
    promtool_check(text)
    assert value(text, "zrepl_replication_filesystem_errors", zrepl_job="push") == 1
    assert value(text, "zrepl_replication_filesystem_failed", **fs) == 1
    assert value(text, "zrepl_replication_lag_seconds", **fs) == 3600
    assert value(text, "zrepl_replication_bytes_replicated", **fs) == first  # a failed step adds nothing
    assert value(text, "zrepl_job_last_run_failed", zrepl_job="push") == 1
    # as in zrepl, the last success stays exported through failures (alert on its age)
    assert value(text, "zrepl_replication_last_successful", zrepl_job="push") == \
        zrepl.parse_iso(status(cfg)["jobs"]["push"]["last_success"])
    fake_zfs.clear()
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    text = textfile.read_text()
    assert value(text, "zrepl_replication_bytes_replicated", **fs) > first
    assert value(text, "zrepl_replication_lag_seconds", **fs) == 0


def test_a_textfile_that_cannot_be_written_is_logged_and_the_run_still_succeeds(fake_zfs, world, tmp_path):
    cfg = push_config(tmp_path, tmp_path / "missing-dir" / "zrepl.prom")
    result = run("--config", cfg, "run", "push", zfs=fake_zfs)
    assert result.code == 0, result
    assert "cannot write metrics textfile" in result.stderr and "missing-dir" in result.stderr


def test_a_dry_run_writes_no_textfile(fake_zfs, world, tmp_path):
    textfile = tmp_path / "zrepl.prom"
    cfg = push_config(tmp_path, textfile)
    assert run("--config", cfg, "run", "--dry-run", "push", zfs=fake_zfs).code == 0
    assert not textfile.exists()


def test_a_snap_job_exports_its_newest_snapshot_and_local_pruning(fake_zfs, world, tmp_path):
    textfile = tmp_path / "zrepl.prom"
    cfg = write_config(tmp_path, snap_job("s", filesystems={SRC: True}, snapshotting={"type": "periodic",
                                          "interval": "1h", "prefix": "zrepl_"}, keep=[last_n(1)]),
                       global_={"monitoring": [{"type": "textfile", "path": str(textfile)}]})
    assert run("--config", cfg, "run", zfs=fake_zfs).code == 0
    text = textfile.read_text()
    promtool_check(text)
    taken = status(cfg)["jobs"]["s"]["filesystems"][SRC]["last_snapshot_time"]
    assert value(text, "zrepl_snapshot_newest_timestamp_seconds", zrepl_job="s", filesystem=SRC) == \
        zrepl.parse_iso(taken)
    assert value(text, "zrepl_pruning_destroyed", zrepl_job="s", prune_side="local") == 2  # @a @b
    assert value(text, "zrepl_pruning_kept", zrepl_job="s", prune_side="local") == 1
    assert value(text, "zrepl_replication_filesystem_errors", zrepl_job="s") is None  # no replication


def test_a_stdinserver_connection_writes_the_textfile_with_the_clients_times(tmp_path):
    from test_stdinserver import WORLD, FakeZfsOnPath

    fake = FakeZfsOnPath(tmp_path / "fakezfs", WORLD)
    textfile = tmp_path / "zrepl.prom"
    cfg = write_config(tmp_path, sink_job("sink", root_fs="tank/sink", serve={"type": "stdinserver",
                                          "client_identities": ["client1"]}),
                       global_={"monitoring": [{"type": "textfile", "path": str(textfile)}]})
    conn = zrepl.ssh_connect([sys.executable, str(Path(zrepl.__file__)), "--config", str(cfg), "stdinserver",
                              "client1"], name="stdinserver", timeout=20, env=fake.env)
    try:
        conn.handshake_client("client1")
    finally:
        conn.close()
    deadline = time.monotonic() + 60
    while not textfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = textfile.read_text()
    promtool_check(text)
    client = {"zrepl_job": "sink", "client": "client1"}
    record = status(cfg)["jobs"]["sink"]["clients"]["client1"]
    assert value(text, "zrepl_client_last_connection_timestamp_seconds", **client) == \
        zrepl.parse_iso(record["last_connection"]["end"])
    assert value(text, "zrepl_client_last_success_timestamp_seconds", **client) == \
        zrepl.parse_iso(record["last_success"])


# ---- the exposition itself --------------------------------------------------------------------------

def test_zfs_command_runtimes_are_recorded_by_verb_and_job_in_zrepls_buckets(tmp_path):
    zfs = zrepl.Zfs(zfs_bin=shutil.which("true") or "/bin/true")
    token = zrepl.LOG_JOB.set("push")
    try:
        zfs.run(["zfs", "list"])
        zfs.run(["zfs", "list"])
    finally:
        zrepl.LOG_JOB.reset(token)
    zfs.run(["zfs", "get"])
    text = zrepl.render_metrics(zrepl.StatusDocument(), zrepl.ProcessMetrics(), [zfs.counters])
    promtool_check(text)
    series = {"jobid": "push", "zfsbinary": "zfs", "zfsverb": "list"}
    assert value(text, "zrepl_zfscmd_runtime_count", **series) == 2
    assert value(text, "zrepl_zfscmd_runtime_bucket", **series, le="+Inf") == 2
    assert value(text, "zrepl_zfscmd_runtime_bucket", **series, le="60") == 2  # `true` takes well under 60 s
    assert value(text, "zrepl_zfscmd_runtime_count", jobid="_nojobid", zfsbinary="zfs", zfsverb="get") == 1
    buckets = [le for (name, labels) in samples(text) if name == "zrepl_zfscmd_runtime_bucket"
               for k, le in labels if k == "le" and ("zfsverb", "get") in labels]
    assert buckets == ["0.01", "0.1", "0.2", "0.5", "0.75", "1", "2", "5", "10", "60", "+Inf"]


def test_stream_commands_send_and_recv_are_timed_until_waited_for_under_the_job_that_started_them(tmp_path):
    stub = tmp_path / "zfs"
    stub.write_text("#!/bin/sh\nexec cat\n")  # a stream: stdin to stdout until EOF
    stub.chmod(0o755)
    zfs = zrepl.Zfs(zfs_bin=str(stub))
    token = zrepl.LOG_JOB.set("push")
    try:
        send = zfs.spawn(["zfs", "send", "p/fs@a"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        recv = zfs.spawn(["zfs", "recv", "-s", "q/fs"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    finally:
        zrepl.LOG_JOB.reset(token)
    assert zfs.counters.runtimes == {}  # running: nothing to observe yet
    results: list[object] = []
    # waited for in threads that run no job: still counted under the job that started them
    waiter = threading.Thread(target=lambda: results.extend([send.communicate(b"stream"), recv.communicate(b"")]))
    waiter.start()
    waiter.join(30)
    assert not waiter.is_alive() and results[0] == (b"stream", None)
    assert send.poll() == 0 and recv.wait() == 0  # seen again: observed once, not twice
    text = zrepl.render_metrics(zrepl.StatusDocument(), zrepl.ProcessMetrics(), [zfs.counters])
    promtool_check(text)
    for verb in ("send", "recv"):
        assert value(text, "zrepl_zfscmd_runtime_count", jobid="push", zfsbinary="zfs", zfsverb=verb) == 1, text


def test_label_values_are_escaped_and_log_entries_and_control_requests_are_counted():
    process = zrepl.ProcessMetrics(start_time=1_700_000_000)
    doc = zrepl.StatusDocument(jobs={"j": {"type": "sink", "clients": {'odd "id"\\\nx': {
        "last_success": "2026-01-01T00:00:00Z", "last_connection": {"end": "2026-01-01T00:00:00Z", "result": "ok"}}}}})
    logger = zrepl.logging.getLogger("zrepl-metrics-test")
    logger.addHandler(process.log_handler)
    logger.propagate = False
    try:
        logger.warning("one", extra={"job": "j"})
        logger.error("two")
    finally:
        logger.removeHandler(process.log_handler)
    process.request_begun("/status")
    process.request_finished("/status", 0.0002)
    text = zrepl.render_metrics(doc, process)
    promtool_check(text)
    assert 'client="odd \\"id\\"\\\\\\nx"' in text
    assert value(text, "zrepl_client_last_success_timestamp_seconds", zrepl_job="j",
                 client='odd \\"id\\"\\\\\\nx') == zrepl.parse_iso("2026-01-01T00:00:00Z")
    assert value(text, "zrepl_daemon_log_entries", zrepl_job="j", level="warn") == 1
    assert value(text, "zrepl_daemon_log_entries", zrepl_job="_nojobid", level="error") == 1
    assert value(text, "zrepl_control_request_begin", endpoint="/status") == 1
    assert value(text, "zrepl_control_request_finished_bucket", endpoint="/status", le="0.0005") == 1
    assert value(text, "zrepl_control_request_finished_bucket", endpoint="/status", le="0.0001") == 0
    assert value(text, "zrepl_start_time", raw=zrepl.__version__,
                 version_info=f"zrepl.py version={zrepl.__version__} python="
                              f"{'.'.join(map(str, sys.version_info[:3]))}") == 1_700_000_000


def test_a_replication_in_flight_shows_its_remaining_bytes_and_a_run_that_failed_early_shows_minus_one():
    doc = zrepl.StatusDocument(jobs={
        "push": {"type": "push", "state": "running", "pid": os.getpid(),
                 "last_run": {"start": "2026-01-01T00:00:00Z", "result": "running"},
                 "replication": {"filesystems": {SRC: {"sender_fs": SRC, "state": "stepping", "bytes_expected": 1000,
                                                       "bytes_replicated": 300, "bytes_total": 5}}}},
        "pull": {"type": "pull", "last_run": {"end": "2026-01-01T00:00:00Z", "result": "error", "error": "no peer"}}})
    text = zrepl.render_metrics(doc, zrepl.ProcessMetrics())
    promtool_check(text)
    assert value(text, "zrepl_replication_bytes_remaining", zrepl_job="push", filesystem=SRC) == 700
    assert value(text, "zrepl_replication_bytes_replicated", zrepl_job="push", filesystem=SRC) == 5
    assert value(text, "zrepl_job_running", zrepl_job="push") == 1
    assert value(text, "zrepl_replication_filesystem_errors", zrepl_job="pull") == -1
    assert value(text, "zrepl_replication_last_successful", zrepl_job="pull") is None


def test_every_family_render_metrics_writes_is_listed_in_the_readme():
    readme = (Path(zrepl.__file__).parent / "README.md").read_text()
    missing = [name for name in zrepl.METRIC_FAMILIES if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"


# ---- the HTTP listener ------------------------------------------------------------------------------

def http_get(address: tuple[str, int], request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
             timeout: float = 30) -> tuple[int, bytes, bytes]:
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


@pytest.fixture
def server():
    servers: list[zrepl.MetricsServer] = []

    def start(render=lambda: zrepl.render_metrics(zrepl.StatusDocument(), zrepl.ProcessMetrics(start_time=5)),
              **kwargs) -> zrepl.MetricsServer:
        s = zrepl.MetricsServer("127.0.0.1:0", render, **kwargs)
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def test_the_listener_serves_metrics_that_promtool_accepts_and_nothing_else(server):
    s = server()
    code, head, body = http_get(s.address)
    assert code == 200 and b"text/plain; version=0.0.4" in head
    promtool_check(body.decode())
    assert value(body.decode(), "zrepl_start_time", raw=zrepl.__version__,
                 version_info=f"zrepl.py version={zrepl.__version__} python="
                              f"{'.'.join(map(str, sys.version_info[:3]))}") == 5
    assert http_get(s.address, b"GET / HTTP/1.1\r\n\r\n")[0] == 404
    assert http_get(s.address, b"POST /metrics HTTP/1.1\r\n\r\n")[0] == 405
    assert http_get(s.address, b"nonsense\r\n\r\n")[0] == 400
    code, _, body = http_get(s.address, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert code == 200 and body == b""


def test_a_silent_client_does_not_block_a_scrape_and_is_dropped_after_the_timeout(server):
    s = server(timeout=1.0)
    silent = socket.create_connection(s.address)
    try:
        assert http_get(s.address)[0] == 200  # while the silent one holds its own thread
        silent.settimeout(30)  # 10x+ the server's timeout: the server hangs up first
        assert silent.recv(1) == b""
    finally:
        silent.close()


def test_a_client_that_sends_endless_headers_is_cut_off(server):
    s = server()
    with socket.create_connection(s.address, timeout=30) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\n")
        with pytest.raises(OSError):
            for _ in range(10000):
                c.sendall(b"X-Filler: " + b"a" * 4000 + b"\r\n")
    assert http_get(s.address)[0] == 200


def test_a_render_that_fails_is_a_500_and_the_listener_keeps_serving(server):
    calls = []

    def render() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise zrepl.ZreplError("status file unreadable")
        return "# HELP x y\n# TYPE x gauge\nx 1\n"
    s = server(render)
    assert http_get(s.address)[0] == 500
    assert http_get(s.address)[0] == 200


def test_more_clients_than_slots_are_closed_unanswered_and_the_listener_recovers(server):
    s = server(max_clients=2, timeout=60.0)
    holders = [socket.create_connection(s.address) for _ in range(2)]
    try:
        # accepted in order of arrival: the two silent holders have the slots when this one comes
        extra = socket.create_connection(s.address, timeout=30)
        try:
            extra.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            answer = extra.recv(100)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""
        extra.close()
    finally:
        for h in holders:
            h.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if http_get(s.address, timeout=5)[0] == 200:
                break
        except (OSError, IndexError):  # IndexError: closed unanswered, the holders' slots not freed yet
            time.sleep(0.1)
    else:
        pytest.fail("the listener did not recover its slots")


def test_a_listen_address_in_use_is_an_error_naming_it(server):
    s = server()
    host, port = s.address
    other = zrepl.MetricsServer(f"{host}:{port}", lambda: "")
    with pytest.raises(zrepl.ZreplError, match=f"cannot listen on {host}:{port} for metrics"):
        other.start()


def test_close_stops_the_listener_and_returns(server):
    s = server()
    address = s.address
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(OSError):
        http_get(address, timeout=5)


def test_without_promtool_the_check_skips_alone_and_fails_under_run_all(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("ZREPL_TEST_PROMTOOL", raising=False)
    monkeypatch.delenv("ZREPL_TEST_REQUIRE_PROMTOOL", raising=False)
    with pytest.raises(pytest.skip.Exception):
        promtool_check("")
    monkeypatch.setenv("ZREPL_TEST_REQUIRE_PROMTOOL", "1")
    with pytest.raises(pytest.fail.Exception, match="promtool is missing"):
        promtool_check("")


def test_start_metrics_servers_starts_each_prometheus_outlet_and_undoes_them_when_one_fails(server):
    taken = server()
    host, port = taken.address
    outlets = [zrepl.MonitoringOutlet("prometheus", listen="127.0.0.1:0"),
               zrepl.MonitoringOutlet("textfile", path="/nonexistent/x.prom")]
    started = zrepl.start_metrics_servers(outlets, lambda: "# HELP x y\n# TYPE x gauge\nx 1\n")
    try:
        assert len(started) == 1 and http_get(started[0].address)[0] == 200
    finally:
        for s in started:
            s.close()
    with pytest.raises(zrepl.ZreplError, match=f"{host}:{port}"):
        zrepl.start_metrics_servers([zrepl.MonitoringOutlet("prometheus", listen="127.0.0.1:0"),
                                     zrepl.MonitoringOutlet("prometheus", listen=f"{host}:{port}")], lambda: "")


def test_an_empty_host_listens_on_every_address():
    s = zrepl.MetricsServer(":0", lambda: "# HELP x y\n# TYPE x gauge\nx 1\n")
    s.start()
    try:
        assert http_get(("127.0.0.1", s.address[1]))[0] == 200
    finally:
        s.close()


def test_a_filter_pattern_that_selects_nothing_is_logged_recorded_and_counted_up_per_run(fake_zfs, world, tmp_path):
    """zrepl's zrepl_zfs_list_unmatched_user_specified_dataset_count{jobid}: its Grafana dashboard
    watches it for rules without effect (a renamed dataset is silently no longer backed up)."""
    textfile = tmp_path / "zrepl.prom"
    cfg = push_config(tmp_path, textfile, filesystems={"src/data": True, "src/renamed<": True})
    for runs in (1, 2):
        result = run("--config", cfg, "run", "push", zfs=fake_zfs)
        assert result.code == 0, result  # the rest replicated
        assert "'src/renamed<' selected no dataset" in result.stderr
        entry = job_status(cfg, "push")
        assert entry["filter_unmatched"] == ["src/renamed<"]
        assert value(textfile.read_text(), "zrepl_zfs_list_unmatched_user_specified_dataset_count",
                     jobid="push") == runs
    # once the dataset exists, the count stops growing (and the pattern is no longer named)
    fake_zfs.world.tree("src", "renamed")
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    assert job_status(cfg, "push").get("filter_unmatched", []) == []
    assert value(textfile.read_text(), "zrepl_zfs_list_unmatched_user_specified_dataset_count", jobid="push") == 2
