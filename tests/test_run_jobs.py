"""`zrepl.py run`: jobs proceed independently (each in its own thread, under its own lock), the
exit code is the worst of them, a setup error is 2, a signal is recorded, logs name their job and
are quiet by default (issue 13 items 3, 6, 9; issue 9 item 3)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import zrepl
import support
from fakezfs import FakeZfs

REPO = Path(__file__).resolve().parents[1]


class SnapshotWatch(FakeZfs):
    """A fake that says when a snapshot of one pool was taken."""

    def __init__(self, pool: str, *filesystems: str):
        super().__init__()
        for fs in filesystems:
            self.world.tree(*fs.split("/", 1))
        self.pool, self.snapshotted = pool, threading.Event()

    def run(self, argv, **kwargs):
        done = super().run(argv, **kwargs)
        if argv[1] == "snapshot" and any(a.startswith(self.pool + "/") for a in argv[2:]):
            self.snapshotted.set()
        return done


def test_a_long_job_does_not_delay_another_jobs_snapshot(tmp_path, capsys):
    # "slow" comes first in the config and its listing hangs until "fast" has taken its
    # snapshot: run one after another, slow would wait out the 60 s margin
    cfg = str(support.snap_config(tmp_path, {"slow": "slow/big", "fast": "fast/home"}))
    zfs = SnapshotWatch("fast", "slow/big", "fast/home")
    held = zfs.hang("list", match="slow")  # the pool's listing
    released_by_fast: list[bool] = []

    def release_after_fast() -> None:
        released_by_fast.append(zfs.snapshotted.wait(60))
        held.release()

    watcher = threading.Thread(target=release_after_fast)
    watcher.start()
    try:
        assert zrepl.main(["--config", cfg, "run"], zfs=zfs) == 0, capsys.readouterr().err
    finally:
        held.release()
        watcher.join(70)
    assert held.entered.is_set() and released_by_fast == [True]  # fast went on while slow was held
    assert support.snapshots(zfs, "fast/home") and support.snapshots(zfs, "slow/big")
    doc = support.status(cfg)
    assert {doc["jobs"][j]["last_run"]["result"] for j in ("slow", "fast")} == {"ok"}


def test_the_exit_code_is_the_worst_of_all_jobs(tmp_path, capsys):
    cfg = str(support.snap_config(tmp_path, {"good": "tank/a", "typo": "tank/nonexistent"}))
    zfs = FakeZfs.with_filesystems("tank/a")
    assert zrepl.main(["--config", cfg, "run"], zfs=zfs) == 1
    doc = support.status(cfg)
    assert doc["jobs"]["good"]["last_run"]["result"] == "ok"
    assert doc["jobs"]["typo"]["last_run"]["result"] == "failed"
    assert "job typo:" in capsys.readouterr().err


def test_a_setup_error_still_ends_the_run_with_2(tmp_path, capsys):
    cfg = str(support.snap_config(tmp_path, {"a": "tank/a", "b": "tank/b"}))
    (tmp_path / "run").write_text("a file where the runtime dir should be")
    assert zrepl.main(["--config", cfg, "run"], zfs=FakeZfs.with_filesystems("tank/a", "tank/b")) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "internal error" not in err


def test_a_busy_job_is_skipped_quietly(tmp_path, capsys):
    # an overlapping cron run: no WARNING every minute (INFO, shown with --log-level info)
    cfg = str(support.snap_config(tmp_path, {"a": "tank/a"}))
    lock = zrepl.JobLock(str(tmp_path / "run"), "a")
    assert lock.try_acquire()
    try:
        assert zrepl.main(["--config", cfg, "run"], zfs=FakeZfs.with_filesystems("tank/a")) == 0
        assert capsys.readouterr().err == ""
        assert zrepl.main(["--config", cfg, "--log-level", "info", "run"], zfs=FakeZfs.with_filesystems("tank/a")) == 0
        err = capsys.readouterr().err
        assert "INFO" in err and "job a: busy" in err
    finally:
        lock.release()


def test_quiet_by_default_detail_with_log_level_info(tmp_path, capsys):
    cfg = str(support.snap_config(tmp_path, {"a": "tank/a"}))
    assert zrepl.main(["--config", cfg, "run"], zfs=FakeZfs.with_filesystems("tank/a")) == 0
    assert capsys.readouterr().err == ""  # cron mails nothing when all is well
    (tmp_path / "two").mkdir()
    cfg = str(support.snap_config(tmp_path / "two", {"a": "tank/a"}))
    assert zrepl.main(["--config", cfg, "run", "--log-level", "info"], zfs=FakeZfs.with_filesystems("tank/a")) == 0
    err = capsys.readouterr().err
    assert "job a: snapshotted 1 filesystem(s) of pool tank" in err


def test_the_config_keeps_the_detail(tmp_path, capsys):
    cfg = str(support.snap_config(tmp_path, {"a": "tank/a"}, global_={
        "logging": [{"type": "stderr", "level": "info", "format": "logfmt"}]}))
    assert zrepl.main(["--config", cfg, "run"], zfs=FakeZfs.with_filesystems("tank/a")) == 0
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "snapshotted" in ln)
    assert " job=a " in line and "snapshot=zrepl_" in line and line.startswith("time=")


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("zrepl", logging.WARNING, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_log_formats_carry_fields_and_name_the_job():
    token = zrepl.LOG_JOB.set("backup")
    try:
        record = _record("tank/data: full send of tank/data@a", fs="tank/data", step="full send of tank/data@a",
                         bytes=1234)
        data = json.loads(zrepl._JsonFormatter().format(record))
        assert data["job"] == "backup" and data["fs"] == "tank/data" and data["bytes"] == 1234
        assert data["msg"] == "tank/data: full send of tank/data@a" and data["level"] == "warning"
        logfmt = zrepl._LogfmtFormatter().format(record)
        assert ' job=backup fs=tank/data step="full send of tank/data@a" bytes=1234 msg=' in logfmt
        human = zrepl._HumanFormatter().format(record)
        # local time with its zone, then the level, then the job
        assert human.split()[0][-5] in "+-" and human.split()[0][-4:].isdigit()
        assert " WARNING job backup: tank/data: full send" in human
        # a message that names its job already is not prefixed twice
        assert "job backup: job backup" not in zrepl._HumanFormatter().format(_record("job backup: failed"))
    finally:
        zrepl.LOG_JOB.reset(token)


def test_threads_a_job_starts_log_in_its_name():
    seen: list[str | None] = []

    class Tick(zrepl.PeriodicThread):
        def tick(self) -> bool:
            seen.append(zrepl.LOG_JOB.get())
            return True

    def job() -> None:
        zrepl.LOG_JOB.set("snapjob")
        with Tick(0.01, "tick") as t:
            t._thread.join(10)

    worker = threading.Thread(target=job)
    worker.start()
    worker.join(10)
    assert seen == ["snapjob"]


def test_syslog_without_a_daemon_warns_once_and_logs_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(zrepl, "_syslog_reachable", lambda path="/dev/log": "/dev/log: no such socket")
    zrepl.setup_logging([zrepl.LoggingConfig(type="syslog", level="info")])
    for i in range(5):
        zrepl.log.info("line %d", i)
    err = capsys.readouterr().err
    assert err.count("no syslog daemon") == 1 and err.count("line ") == 5 and "Traceback" not in err


def test_syslog_that_fails_later_falls_back_once(monkeypatch, capsys):
    monkeypatch.setattr(zrepl, "_syslog_reachable", lambda path="/dev/log": None)
    zrepl.setup_logging([zrepl.LoggingConfig(type="syslog", level="info")])
    handler = zrepl.log.handlers[0]
    handler.address = "/nonexistent/zrepl-test-log"  # the daemon went away after we connected
    handler.socket.close()
    handler.socket = None  # reconnects to the address above, and fails
    for i in range(3):
        zrepl.log.info("after %d", i)
    err = capsys.readouterr().err
    assert err.count("cannot write to syslog") == 1 and err.count("after ") == 3 and "Traceback" not in err


FAKE_ZFS = """\
#!{python}
# zfs for the signal test: `zfs list` blocks (it writes its pid first), everything else succeeds
import os, sys, time
if sys.argv[1] == "list":
    with open({pidfile!r}, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
"""


def test_sigterm_mid_run_is_recorded_in_log_and_status(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pidfile = tmp_path / "zfs.pid"
    fake = bindir / "zfs"
    fake.write_text(FAKE_ZFS.format(python=sys.executable, pidfile=str(pidfile)))
    fake.chmod(0o755)
    cfg = str(support.snap_config(tmp_path, {"a": "tank/a"}))
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(REPO / "zrepl.py"), "--config", cfg, "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert pidfile.exists(), proc.communicate(timeout=10)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if pidfile.exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "job a: stopped by SIGTERM" in err and "Traceback" not in err
    entry = support.status(cfg)["jobs"]["a"]
    assert entry["state"] == "idle" and "activity" not in entry
    assert entry["last_run"]["result"] == "error" and entry["last_run"]["error"] == "stopped by SIGTERM"
    status = subprocess.run([sys.executable, str(REPO / "zrepl.py"), "--config", cfg, "status"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 2 and "stopped by SIGTERM" in status.stdout  # and it never succeeded


@pytest.mark.parametrize("argv", [["run"], ["run", "a"], ["run", "--dry-run"], ["wakeup", "a"],
                                  ["test", "placeholder"], ["zfs-abstractions", "list"],
                                  ["test", "filesystems", "--job", "a"]])
def test_zfs_missing_from_path_is_a_setup_error(tmp_path, monkeypatch, capsys, argv):
    cfg = str(support.snap_config(tmp_path, {"a": "tank/a"}))
    monkeypatch.setenv("PATH", str(tmp_path))  # cron's PATH without /sbin, or no OpenZFS at all
    assert zrepl.main(["--config", cfg, *argv]) == 2
    err = capsys.readouterr().err
    assert "zfs not found in PATH; is OpenZFS installed?" in err and "PATH=" in err


def test_a_sink_as_a_run_job_is_a_usage_error(tmp_path, capsys):
    cfg = tmp_path / "zrepl.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [global]
        status_file = "{tmp_path}/status.json"
        runtime_dir = "{tmp_path}/run"
        [[jobs]]
        name = "backuppool"
        type = "sink"
        root_fs = "backup/sink"
        serve = {{ type = "local", listener_name = "backuppool" }}
        """))
    for argv in (["run", "backuppool"], ["wakeup", "backuppool"]):
        assert zrepl.main(["--config", str(cfg), *argv], zfs=FakeZfs.with_filesystems()) == 2
        assert "is a sink" in capsys.readouterr().err
