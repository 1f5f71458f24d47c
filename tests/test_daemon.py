"""`zrepl.py daemon` on the host: the scheduler's decisions (driven by Daemon.tick with a fake
clock, passes through the ZFS double), signals and systemd notify, and the control socket
(HTTP on a unix socket) with slow, huge and many clients. Real waits carry a 10x margin."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs, World
from support import periodic, pull_job, push_job, run, sink_job, snap_job, source_job, write_config

T0 = 1_800_000_000.0  # a fixed wall clock start (2027-01-15)
WAIT = 30.0  # seconds a real wait may take before the test fails (the machine is shared and slow)


class FakeClock(zrepl.Clock):
    def __init__(self, now: float = T0):
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0)


def inline(name, target):
    target()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(clock):
    fake = FakeZfs(World(clock=lambda: clock.now))
    fake.world.tree("src", "data\nother")
    fake.world.tree("dst", "sink")
    fake.world.tree("pool2", "vol")
    yield fake
    assert fake.errors == [], f"the ZFS double failed: {fake.errors}"


@pytest.fixture
def sockdir():
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="zd", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield d


def make_daemon(cfg: Path, fake: FakeZfs, clock: FakeClock, *, threads: bool = False, notes=None, exits=None):
    config = zrepl.load_config(str(cfg))
    store_for = lambda c: zrepl.StatusStore(c.global_.status_file, c.global_.runtime_dir)  # noqa: E731
    return zrepl.Daemon(config, fake, store_for, lambda: zrepl.load_config(str(cfg)), clock=clock,
                        start_thread=zrepl._start_thread if threads else inline,
                        notify=(notes.append if notes is not None else lambda s: None),
                        exit_now=(exits.append if exits is not None else lambda code: None))


def record(daemon: zrepl.Daemon, job: str) -> dict:
    return daemon.jobs[job].runner.doc["daemon"]


def status_file(cfg: Path) -> dict:
    return json.loads((cfg.parent / "status.json").read_text())


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def own_snapshots(fake: FakeZfs, fs: str) -> list[str]:
    return [s for s in fake.world.snapshots(fs) if s.startswith("zrepl_")]


# ---- pure scheduling decisions -----------------------------------------------------------------

def job_of(tmp_path: Path, job: dict, *extra: dict) -> zrepl.JobConfig:
    cfg = zrepl.load_config(str(write_config(tmp_path, job, *extra)))
    return cfg.job(job["name"])


def test_schedule_kinds_follow_the_job_type_and_its_snapshotting(tmp_path):
    K = zrepl.ScheduleKind
    src, sink = source_job("src", filesystems={"src<": True}), sink_job("sink", root_fs="dst/sink")
    cases = [
        (K.SNAPSHOTS, snap_job("j", filesystems={"src<": True}, snapshotting=periodic("1h"))),
        (K.WAKEUP, push_job("j", filesystems={"src<": True}), sink),
        (K.INTERVAL, pull_job("j", root_fs="dst/sink", interval="10m"), src),
        (K.WAKEUP, pull_job("j", root_fs="dst/sink"), src),
        (K.PASSIVE, sink_job("j", root_fs="dst/sink")),
        (K.PASSIVE, source_job("j", filesystems={"src<": True})),
        (K.SNAPSHOTS, source_job("j", filesystems={"src<": True}, snapshotting=periodic("1h"))),
    ]
    for i, (kind, *jobs) in enumerate(cases):
        assert zrepl.schedule_kind(job_of(tmp_path / str(i), *jobs)) is kind, jobs[0]


def test_next_pass_is_the_next_due_snapshot_rounded_up_to_the_second(tmp_path):
    job = job_of(tmp_path, snap_job("s", filesystems={"src<": True}, snapshotting=periodic("1h")))
    doc = {"next_snapshot_due": zrepl.iso_time(T0 + 3600)}
    assert zrepl.next_pass_time(job, doc, T0 + 2.5, failed=False) == T0 + 3600
    assert zrepl.next_pass_time(job, doc, T0 + 2.5, failed=True) == T0 + 3600  # replication failed, snapshot fine


def test_an_overdue_snapshot_is_retried_soon_and_never_in_a_tight_loop(tmp_path):
    job = job_of(tmp_path, snap_job("s", filesystems={"src<": True}, snapshotting=periodic("1h")))
    overdue = {"next_snapshot_due": zrepl.iso_time(T0 - 10)}
    assert zrepl.next_pass_time(job, overdue, T0, failed=True) == T0 + zrepl.DAEMON_RETRY_AFTER_ERROR
    assert zrepl.next_pass_time(job, {}, T0, failed=True) == T0 + zrepl.DAEMON_RETRY_AFTER_ERROR
    assert zrepl.next_pass_time(job, {}, T0, failed=False) == T0 + 3600


def test_cron_snapshotting_without_a_known_due_time_waits_for_the_next_fire_time(tmp_path):
    job = job_of(tmp_path, snap_job("s", filesystems={"src<": True},
                                    snapshotting={"type": "cron", "cron": "0 * * * *", "prefix": "zrepl_"}))
    hour = 3600 * (int(T0) // 3600 + 1)
    assert zrepl.next_pass_time(job, {}, T0 + 1, failed=False) == hour


def test_pull_runs_every_interval_after_the_pass_ended_and_manual_only_on_wakeup(tmp_path):
    src = source_job("src", filesystems={"src<": True})
    assert zrepl.next_pass_time(job_of(tmp_path, pull_job("p", root_fs="dst", interval="10m"), src), {}, T0,
                                False) == T0 + 600
    assert zrepl.next_pass_time(job_of(tmp_path / "m", pull_job("p", root_fs="dst"), src), {}, T0, False) is None
    assert zrepl.next_pass_time(job_of(tmp_path / "n", push_job("q", filesystems={"src<": True}),
                                       sink_job(root_fs="dst/sink")), {}, T0, False) is None


# ---- the scheduler, through the ZFS double -------------------------------------------------------

def test_a_periodic_snap_job_snapshots_at_start_then_when_the_next_one_is_due(fake, clock, tmp_path):
    cfg = write_config(tmp_path, snap_job("snap", filesystems={"src/data": True}, snapshotting=periodic("1h")))
    daemon = make_daemon(cfg, fake, clock)
    assert daemon.tick() == 3600  # the first pass at once; then the next in an hour
    assert len(own_snapshots(fake, "src/data")) == 1
    assert record(daemon, "snap")["state"] == "waiting"
    assert record(daemon, "snap")["next_run"] == zrepl.iso_time(T0 + 3600)
    assert status_file(cfg)["jobs"]["snap"]["daemon"]["state"] == "waiting"
    clock.now += 1800
    assert daemon.tick() == 1800 and len(own_snapshots(fake, "src/data")) == 1  # not due: nothing runs
    clock.now += 1800
    daemon.tick()
    assert len(own_snapshots(fake, "src/data")) == 2


def test_a_push_job_replicates_after_each_snapshot_without_cron(fake, clock, tmp_path):
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}, snapshotting=periodic("10m")),
                       sink_job(root_fs="dst/sink"))
    daemon = make_daemon(cfg, fake, clock)
    assert set(daemon.jobs) == {"push"}  # the sink serves its local listener inside the push's pass
    daemon.tick()
    target = "dst/sink/client1/src/data"
    assert fake.world.snapshots(target) == own_snapshots(fake, "src/data") and len(fake.world.snapshots(target)) == 1
    clock.now += 600
    daemon.tick()
    assert len(fake.world.snapshots(target)) == 2
    assert status_file(cfg)["jobs"]["push"]["last_run"]["result"] == "ok"


def test_pull_runs_on_its_interval_and_a_manual_job_only_when_woken_up(fake, clock, tmp_path):
    fake.world.snapshot("src/data@s1")
    cfg = write_config(tmp_path, pull_job("pull", root_fs="dst/sink", interval="10m"),
                       source_job(filesystems={"src/data": True}),
                       push_job("manual", filesystems={"src/data": True}, listener="sink2"),
                       sink_job("sink2", root_fs="pool2/vol", listener="sink2"))
    daemon = make_daemon(cfg, fake, clock)
    assert daemon.tick() == 600
    assert fake.world.snapshots("dst/sink/src/data") == ["s1"]
    assert record(daemon, "manual")["state"] == "waiting for wakeup"
    assert not fake.world.exists("pool2/vol/client1")
    assert daemon.wakeup("manual") == {"job": "manual", "op": "wakeup", "queued": False}
    daemon.tick()
    assert fake.world.snapshots("pool2/vol/client1/src/data") == ["s1"]
    assert record(daemon, "manual")["state"] == "waiting for wakeup"


def test_one_failing_job_never_stops_the_others_and_its_wait_names_the_error(fake, clock, tmp_path):
    fake.fail("snapshot", match="pool2", stderr="cannot create snapshot: out of space\n")
    cfg = write_config(tmp_path, snap_job("bad", filesystems={"pool2/vol": True}, snapshotting=periodic("1h")),
                       snap_job("good", filesystems={"src/data": True}, snapshotting=periodic("1h")))
    daemon = make_daemon(cfg, fake, clock)
    daemon.tick()
    bad, good = record(daemon, "bad"), record(daemon, "good")
    assert bad["state"] == "waiting after error" and "out of space" in bad["error"]
    shown = run("--config", tmp_path / "zrepl.toml", "status", "-v").stdout
    assert f"daemon (pid {os.getpid()}): waiting after error until {bad['next_run']}: " in shown, shown
    assert f"daemon (pid {os.getpid()}): waiting until " in shown
    assert bad["next_run"] == zrepl.iso_time(T0 + zrepl.DAEMON_RETRY_AFTER_ERROR)
    assert good["state"] == "waiting" and "error" not in good and len(own_snapshots(fake, "src/data")) == 1
    fake.clear()
    clock.now += zrepl.DAEMON_RETRY_AFTER_ERROR
    daemon.tick()
    assert record(daemon, "bad")["state"] == "waiting" and len(own_snapshots(fake, "pool2/vol")) == 1


def test_a_job_held_by_a_cron_run_is_busy_and_tried_again(fake, clock, tmp_path):
    cfg = write_config(tmp_path, snap_job("snap", filesystems={"src/data": True}, snapshotting=periodic("1h")))
    daemon = make_daemon(cfg, fake, clock)
    lock = zrepl.JobLock(str(tmp_path / "run"), "snap")  # what a `zrepl.py run snap` holds
    assert lock.try_acquire()
    try:
        daemon.tick()
    finally:
        lock.release()
    rec = record(daemon, "snap")
    assert rec["state"] == "busy" and str(os.getpid()) in rec["error"] and own_snapshots(fake, "src/data") == []
    clock.now += zrepl.DAEMON_BUSY_RETRY
    daemon.tick()
    assert len(own_snapshots(fake, "src/data")) == 1


def _hung_push(fake, clock, tmp_path, **daemon_keys):
    """A daemon whose push job hangs in `zfs send` (in a thread of its own): returns it and the rule."""
    fake.world.snapshot("src/data@s1")
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True},
                                          keep_sender=[{"type": "last_n", "count": 1}]),
                       sink_job(root_fs="dst/sink"))
    hang = fake.hang("send", match="send -v -P")
    daemon = make_daemon(cfg, fake, clock, threads=True, **daemon_keys)
    daemon.wakeup("push")
    daemon.tick()
    assert hang.entered.wait(WAIT), "the push never reached zfs send"
    return daemon, hang, cfg


def test_a_cron_run_next_to_the_daemons_pass_reports_busy(fake, clock, tmp_path):
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path)
    result = run("--config", cfg, "--log-level", "info", "run", "push", zfs=fake)
    assert result.code == 0 and "busy" in result.stderr, result
    hang.release()
    wait_until(lambda: not daemon.running(), "the pass to end")


def test_a_wakeup_while_the_job_runs_is_queued_and_runs_right_after(fake, clock, tmp_path):
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path)
    assert daemon.wakeup("push")["queued"] is True
    assert record(daemon, "push")["wakeup_queued"] is True
    fake.world.snapshot("src/data@s2")
    hang.release()
    wait_until(lambda: not daemon.running(), "the first pass to end")
    daemon.tick()  # the queued wakeup
    wait_until(lambda: not daemon.running(), "the second pass to end")
    assert fake.world.snapshots("dst/sink/client1/src/data") == ["s1", "s2"]
    assert record(daemon, "push")["wakeup_queued"] is False


def test_reset_cancels_the_running_pass_skips_pruning_and_says_so(fake, clock, tmp_path):
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path)
    assert daemon.reset("push")["cancelled"] is True
    wait_until(lambda: not daemon.running(), "the cancelled pass to end")
    doc = daemon.jobs["push"].runner.doc
    assert "reset by `zrepl.py signal reset`" in doc["last_run"]["error"]
    assert doc["daemon"]["state"] == "waiting after error" and "cancelled the running pass" in doc["daemon"]["reset"]
    assert "pruning_sender" not in doc  # a cancelled pass leaves pruning to the next one
    assert not any(c[1] == "destroy" for c in fake.calls if len(c) > 1)
    assert daemon.reset("push")["cancelled"] is False  # idle: nothing to cancel, said so
    assert "nothing was running" in status_file(cfg)["jobs"]["push"]["daemon"]["reset"]


def test_sigterm_cancels_running_passes_records_the_stop_and_a_second_signal_exits_at_once(fake, clock, tmp_path):
    notes, exits = [], []
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path, notes=notes, exits=exits)
    daemon.on_signal(signal.SIGTERM)
    assert daemon.tick() is None or daemon.stopping == "stopped by SIGTERM"
    assert "STOPPING=1" in notes
    wait_until(lambda: not daemon.running(), "the cancelled pass to end")
    daemon.tick()
    assert daemon.jobs["push"].runner.doc["daemon"] == {**record(daemon, "push"), "state": "stopped",
                                                        "error": "stopped by SIGTERM"}
    assert "stopped by SIGTERM" in daemon.jobs["push"].runner.doc["last_run"]["error"]
    daemon.on_signal(signal.SIGINT)  # the second one
    assert exits == [128 + signal.SIGINT] and daemon.store.closed


def test_a_second_signal_marks_the_running_jobs_stopped_in_the_file(fake, clock, tmp_path):
    exits = []
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path, exits=exits)
    daemon.on_signal(signal.SIGTERM)
    daemon.stop_streams = lambda: None
    daemon.on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]
    entry = status_file(cfg)["jobs"]["push"]
    assert entry["state"] == "idle" and "second signal" in entry["last_run"]["error"]
    hang.release()
    wait_until(lambda: not daemon.running(), "the pass to end")


def test_no_pass_starts_after_sigterm(fake, clock, tmp_path):
    cfg = write_config(tmp_path, snap_job("snap", filesystems={"src/data": True}, snapshotting=periodic("1h")))
    daemon = make_daemon(cfg, fake, clock)
    daemon.on_signal(signal.SIGTERM)
    daemon.tick()
    assert own_snapshots(fake, "src/data") == [] and daemon.running() == []
    with pytest.raises(zrepl.HttpError, match="stopping"):
        daemon.wakeup("snap")


class Recorded(logging.Handler):
    """The zrepl logger's records (it does not propagate once a command set up its logging)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        zrepl.log.addHandler(self)
        return self

    def __exit__(self, *exc):
        zrepl.log.removeHandler(self)


def test_sighup_adds_and_removes_jobs_and_an_invalid_config_keeps_the_old_one(fake, clock, tmp_path):
    notes = []
    cfg = write_config(tmp_path, snap_job("a", filesystems={"src/data": True}, snapshotting=periodic("1h")))
    daemon = make_daemon(cfg, fake, clock, notes=notes)
    daemon.tick()
    write_config(tmp_path, snap_job("b", filesystems={"src/other": True}, snapshotting=periodic("1h")))
    daemon.on_signal(signal.SIGHUP)
    daemon.tick()
    assert set(daemon.jobs) == {"b"} and len(own_snapshots(fake, "src/other")) == 1
    assert notes[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and notes[1] == "READY=1"
    cfg.write_text(cfg.read_text().replace('type = "snap"', 'type = "snapp"'))
    daemon.on_signal(signal.SIGHUP)
    with Recorded() as recorded:
        daemon.tick()
    assert set(daemon.jobs) == {"b"} and notes[-1] == "READY=1"
    assert any("old one keeps running" in m and "jobs[0].type" in m for m in recorded.messages), recorded.messages


def test_a_reload_replaces_a_running_job_only_when_its_pass_ends(fake, clock, tmp_path):
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path)
    old = daemon.jobs["push"]
    cfg.write_text(cfg.read_text() + '\n[[jobs]]\nname = "snap"\ntype = "snap"\nfilesystems = { "src/other" = '
                   'true }\nsnapshotting = { type = "manual" }\npruning = { keep = [] }\n')
    daemon.on_signal(signal.SIGHUP)
    daemon.tick()
    assert daemon.jobs["push"] is old and "snap" in daemon.jobs
    hang.release()
    wait_until(lambda: not daemon.running(), "the pass to end")
    daemon.tick()
    new = daemon.jobs["push"]
    assert new is not old and new.runner.doc["last_run"] == old.runner.doc["last_run"]  # its history stays


def test_serve_runs_until_sigterm_notifies_systemd_and_exits_0(fake, clock, tmp_path, sockdir):
    notes: list[str] = []

    def notify(state: str) -> None:  # the signals come once the daemon said it is ready (handlers installed)
        notes.append(state)
        if state == "READY=1":
            os.kill(os.getpid(), signal.SIGHUP if len(notes) == 1 else signal.SIGTERM)
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"),
                       global_={"control": {"sockpath": f"{sockdir}/control"}})
    daemon = make_daemon(cfg, fake, clock)
    daemon.notify = notify
    before = signal.getsignal(signal.SIGTERM)
    assert daemon.serve() == 0
    assert notes[0] == "READY=1" and notes[1].startswith("RELOADING=1") and notes[2:] == ["READY=1", "STOPPING=1"]
    assert signal.getsignal(signal.SIGTERM) is before and not os.path.exists(f"{sockdir}/control")
    assert status_file(cfg)["jobs"]["push"]["daemon"]["error"] == "stopped by SIGTERM"


def test_sd_notify_sends_a_datagram_to_notify_socket(monkeypatch, sockdir):
    path = f"{sockdir}/notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert zrepl.sd_notify("READY=1")
        listener.settimeout(WAIT)
        assert listener.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not zrepl.sd_notify("READY=1")


# ---- the control socket ----------------------------------------------------------------------------

@pytest.fixture
def served(fake, clock, tmp_path, sockdir):
    """A daemon (manual push to a local sink, nothing scheduled) with its control socket listening."""
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"),
                       global_={"control": {"sockpath": f"{sockdir}/control"}})
    daemon = make_daemon(cfg, fake, clock)
    server = daemon.outlets[0]
    server.start()
    yield daemon, f"{sockdir}/control", cfg
    server.close()


def request(path, method, target, body=None):
    return zrepl.control_request(path, method, target, body, timeout=WAIT)


def test_the_control_socket_is_root_only_and_answers_version_and_status(served):
    daemon, path, cfg = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
    code, version = request(path, "GET", "/version")
    assert code == 200 and version["version"] == zrepl.__version__ and version["pid"] == os.getpid()
    code, doc = request(path, "GET", "/status")
    assert code == 200 and doc["version"] == zrepl.STATUS_VERSION
    assert doc["jobs"]["push"]["daemon"]["state"] == "waiting for wakeup"
    assert zrepl.status_document(doc).job("push")[1] == []  # the file's schema: parses without a problem


def test_signal_wakeup_and_the_errors_of_bad_requests(served):
    daemon, path, cfg = served
    assert request(path, "POST", "/signal", {"job": "push", "op": "wakeup"}) == (
        200, {"job": "push", "op": "wakeup", "queued": False})
    assert daemon.jobs["push"].wakeup
    assert request(path, "POST", "/signal", {"job": "push", "op": "explode"})[0] == 400
    assert request(path, "POST", "/signal", {"job": "nope", "op": "wakeup"})[0] == 404
    assert request(path, "POST", "/signal", {"job": "sink", "op": "wakeup"})[0] == 409
    assert request(path, "POST", "/signal", [1])[0] == 400
    assert request(path, "GET", "/signal")[0] == 405
    assert request(path, "GET", "/nothing")[0] == 404


def test_a_client_that_sends_nothing_is_dropped_and_others_are_served_meanwhile(served):
    daemon, path, cfg = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)
        started = time.monotonic()
        assert request(path, "GET", "/version")[0] == 200
        silent.settimeout(WAIT)
        assert silent.recv(100) == b""  # closed by the daemon after its 1 s read timeout
        assert time.monotonic() - started < WAIT


def test_a_client_that_sends_100_mb_is_refused_early_and_never_blocks_the_daemon(served):
    daemon, path, cfg = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as huge:
        huge.connect(path)
        huge.settimeout(WAIT)
        head = (f"POST /signal HTTP/1.1\r\nContent-Length: {100 << 20}\r\n\r\n").encode()
        sent, chunk = 0, b"x" * (1 << 20)
        huge.sendall(head)
        with pytest.raises(OSError):  # the daemon answered 413 and closed: the rest cannot go
            while sent < 100 << 20:
                huge.sendall(chunk)
                sent += len(chunk)
        assert sent < 100 << 20
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as garbage:  # 100 MB without a header end
        garbage.connect(path)
        garbage.settimeout(WAIT)
        with pytest.raises(OSError):
            for _ in range(100):
                garbage.sendall(chunk)
    assert request(path, "GET", "/version")[0] == 200


def test_200_concurrent_clients_are_all_answered(served):
    daemon, path, cfg = served
    results: list[int] = []
    lock = threading.Lock()

    def client():
        try:
            code, _ = request(path, "GET", "/status")
        except Exception as exc:  # counted as a failure below, with its reason
            code = repr(exc)
        with lock:
            results.append(code)
    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
    assert results == [200] * 200


def test_a_second_daemon_on_the_same_socket_is_a_setup_error(served):
    daemon, path, cfg = served
    with pytest.raises(zrepl.SetupError, match="another daemon listens"):
        zrepl.bind_private_unix_socket(path)


# ---- the commands through the socket ------------------------------------------------------------------

def test_status_reads_the_daemon_live_and_the_file_without_one(served):
    daemon, path, cfg = served
    assert not (cfg.parent / "status.json").exists() or True
    daemon.jobs["push"].runner.doc["last_success"] = zrepl.iso_time(zrepl.utcnow())  # only in the daemon
    result = run("--config", cfg, "status", "--json")
    assert json.loads(result.stdout)["jobs"]["push"]["last_success"] == daemon.jobs["push"].runner.doc[
        "last_success"], result
    daemon.outlets[0].close()
    result = run("--config", cfg, "status", "--json")
    assert "last_success" not in json.loads(result.stdout)["jobs"].get("push", {}), result


def test_wakeup_and_signal_go_through_the_socket_when_a_daemon_runs(served):
    daemon, path, cfg = served
    result = run("--config", cfg, "wakeup", "push")
    assert result.code == 0 and "the daemon runs it now" in result.stdout, result
    assert daemon.jobs["push"].wakeup
    result = run("--config", cfg, "signal", "reset", "push")
    assert result.code == 0 and "nothing was running" in result.stdout and not daemon.jobs["push"].wakeup, result
    result = run("--config", cfg, "signal", "wakeup", "sink")
    assert result.code == 2, result  # a sink: usage error before anything is asked


def test_signal_reset_without_a_daemon_says_none_runs(tmp_path, sockdir):
    cfg = write_config(tmp_path, snap_job("snap", filesystems={"src<": True}),
                       global_={"control": {"sockpath": f"{sockdir}/control"}})
    result = run("--config", cfg, "signal", "reset", "snap")
    assert result.code == 1 and "no daemon runs" in result.stderr, result


def test_the_daemons_live_status_keeps_the_history_of_earlier_runs_before_its_first_pass(fake, clock, tmp_path):
    fake.world.snapshot("src/data@s1")
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"))
    assert run("--config", cfg, "run", "push", zfs=fake).code == 0  # a cron run before the daemon
    daemon = make_daemon(cfg, fake, clock)
    daemon.tick()  # manual: nothing runs
    entry = daemon.live_status()["jobs"]["push"]
    assert entry["last_run"]["result"] == "ok" and entry["daemon"]["state"] == "waiting for wakeup"
    assert entry["last_success"] == status_file(cfg)["jobs"]["push"]["last_success"]


def test_the_daemon_process_notifies_systemd_reloads_on_sighup_and_exits_0_on_sigterm(tmp_path, sockdir):
    """`zrepl.py daemon` as systemd runs it (Type=notify): real signals, a real $NOTIFY_SOCKET."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "zfs").write_text("#!/bin/sh\necho 'fake zfs: not called by a manual job' >&2\nexit 1\n")
    (bindir / "zfs").chmod(0o755)
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"),
                       global_={"control": {"sockpath": f"{sockdir}/control"}})
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{sockdir}/notify")
    notify.settimeout(WAIT)
    env = {**os.environ, "NOTIFY_SOCKET": f"{sockdir}/notify", "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(Path(zrepl.__file__)), "--config", str(cfg), "daemon"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert notify.recv(200) == b"READY=1"
        assert zrepl.control_request(f"{sockdir}/control", "GET", "/version", timeout=WAIT)[1]["pid"] == proc.pid
        proc.send_signal(signal.SIGHUP)
        assert notify.recv(200).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert notify.recv(200) == b"READY=1"
        assert proc.poll() is None  # zrepl dies on SIGHUP; we reload
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(200) == b"STOPPING=1"
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    assert status_file(cfg)["jobs"]["push"]["daemon"] == {"state": "stopped", "error": "stopped by SIGTERM",
                                                          "pid": proc.pid, "wakeup_queued": False}


def _signal_at_every_line(daemon, calls, wait: float = WAIT) -> bool:
    """Run `calls` once per line they execute (theirs and the libraries' below), each time calling
    daemon.on_signal(SIGHUP) at that one line, as a signal handler runs between two bytecodes of
    the main thread. True when every run returned; False at the first whose handler blocked (a
    deadlock, as it was in the daemon's main thread)."""
    def run_with_signal_at(line: int) -> tuple[bool, int]:
        seen = [0]

        def tracer(frame, event, arg):
            if event == "line":
                seen[0] += 1
                if seen[0] == line:
                    daemon.on_signal(signal.SIGHUP)
            return tracer

        def work():
            sys.settrace(tracer)
            try:
                for call in calls:
                    call()
            finally:
                sys.settrace(None)

        worker = threading.Thread(target=work, daemon=True)  # a deadlocked one is left behind
        worker.start()
        worker.join(wait)
        return not worker.is_alive(), seen[0]

    finished, lines = run_with_signal_at(0)  # no signal: counts the lines
    assert finished and lines > 5
    return all(run_with_signal_at(line)[0] for line in range(1, lines + 1))


def test_a_signal_at_any_point_of_the_loops_wait_cannot_deadlock_the_daemon(fake, clock, tmp_path):
    """The flake that found it: SIGTERM right after the READY=1 of a reload hung the daemon. Its
    handler had interrupted the main thread inside threading.Event.wait() (holding the Event's
    lock) and then blocked in Event.set() on that same lock."""
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"))
    daemon = make_daemon(cfg, fake, clock)
    flag = daemon.changed
    loop = [flag.clear, lambda: flag.wait(0), flag.set, flag.is_set, flag.clear, lambda: flag.wait(0.001)]
    assert _signal_at_every_line(daemon, loop)
    assert flag.is_set() and len(daemon._signals) > 5  # the handlers ran, and their wake-up is seen
    daemon.changed = event = threading.Event()  # what it was: one of the same interleavings deadlocks
    assert not _signal_at_every_line(daemon, [event.clear, lambda: event.wait(0.001)], wait=1.0)


def test_the_wakeup_flag_behaves_as_an_event_and_is_woken_by_a_real_signal_handler():
    flag = zrepl.WakeupFlag()
    assert not flag.is_set() and not flag.wait(0.01)
    flag.set()
    flag.set()
    assert flag.is_set() and flag.wait(0) and flag.wait(None)  # stays set until cleared
    flag.clear()
    assert not flag.is_set()
    for _ in range(100_000):  # more sets than the pipe holds: none blocks
        flag.set()
    flag.clear()
    assert not flag.is_set()
    previous = signal.signal(signal.SIGUSR1, lambda n, f: flag.set())
    try:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        assert flag.wait(WAIT)  # woken by the handler, long before WAIT
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_cancelled_pass_leaves_a_wakeup_request_for_later_instead_of_running_again(fake, clock, tmp_path):
    daemon, hang, cfg = _hung_push(fake, clock, tmp_path)
    zrepl.WakeupRequest(str(tmp_path / "run"), "push").post()  # a `wakeup` from before the daemon's socket
    daemon.on_signal(signal.SIGTERM)
    daemon.tick()
    wait_until(lambda: not daemon.running(), "the cancelled pass to end")
    assert len([c for c in fake.calls if c[1:2] == ["send"] and "-n" not in c]) == 1  # no second pass
    assert zrepl.WakeupRequest(str(tmp_path / "run"), "push").pending()


def test_the_daemon_serves_metrics_of_its_live_status_and_writes_textfiles_after_a_pass(fake, clock, tmp_path,
                                                                                        sockdir):
    textfile = tmp_path / "zrepl.prom"
    with socket.socket() as probe:  # a free port (the config takes no port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}, snapshotting=periodic("10m")),
                       sink_job(root_fs="dst/sink"),
                       global_={"control": {"sockpath": f"{sockdir}/control"},
                                "monitoring": [{"type": "prometheus", "listen": f"127.0.0.1:{port}"},
                                               {"type": "textfile", "path": str(textfile)}]})
    daemon = make_daemon(cfg, fake, clock)
    control, metrics = daemon.outlets
    assert isinstance(metrics, zrepl.MetricsServer)
    daemon.tick()  # the first pass: a snapshot, replicated; the textfile follows it
    assert 'zrepl_replication_bytes_replicated{zrepl_job="push"' in textfile.read_text()
    for outlet in daemon.outlets:
        outlet.start()
    try:
        assert request(f"{sockdir}/control", "GET", "/version")[0] == 200
        assert request(f"{sockdir}/control", "GET", "/no-such-endpoint")[0] == 404
        with socket.create_connection(metrics.address, timeout=WAIT) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            text = b"".join(iter(lambda: conn.recv(65536), b"")).decode()
    finally:
        for outlet in reversed(daemon.outlets):
            outlet.close()
    assert " 200 " in text.splitlines()[0]
    assert 'zrepl_replication_bytes_replicated{zrepl_job="push"' in text
    assert 'zrepl_control_request_finished_count{endpoint="/version"}' in text
    assert 'endpoint="other"' in text and "/no-such-endpoint" not in text  # labels stay a bounded set


def test_textfiles_are_rewritten_periodically_while_no_job_runs(fake, clock, tmp_path):
    """Issue 11 item 4: the daemon writes the textfile periodically, not only after passes: a push
    that replicates only on wakeup must not leave node_exporter a file from the daemon's start."""
    textfile = tmp_path / "zrepl.prom"
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"),
                       global_={"monitoring": [{"type": "textfile", "path": str(textfile)}]})
    daemon = make_daemon(cfg, fake, clock)
    delay = daemon.tick()  # manual snapshotting: nothing is scheduled, but the textfile is
    assert 'zrepl_start_time' in textfile.read_text()
    assert delay == zrepl.DAEMON_TEXTFILE_INTERVAL  # the loop wakes for the next rewrite
    assert not daemon.running() and fake.calls_of("send") == []
    textfile.unlink()
    clock.now += zrepl.DAEMON_TEXTFILE_INTERVAL / 2
    assert daemon.tick() == zrepl.DAEMON_TEXTFILE_INTERVAL / 2
    assert not textfile.exists()  # not yet due
    clock.now += zrepl.DAEMON_TEXTFILE_INTERVAL / 2
    daemon.tick()
    assert 'zrepl_start_time' in textfile.read_text()


def test_a_daemon_without_textfile_outlets_keeps_no_textfile_timer(fake, clock, tmp_path):
    cfg = write_config(tmp_path, push_job("push", filesystems={"src/data": True}), sink_job(root_fs="dst/sink"))
    assert make_daemon(cfg, fake, clock).tick() is None  # manual and no textfile: nothing to wake for
