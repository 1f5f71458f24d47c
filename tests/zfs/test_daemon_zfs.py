"""`zrepl.py daemon` on real OpenZFS (issue 11 items 1-3): scheduled snapshots replicated to a
local sink without cron, a wakeup over the control socket, a cron `run` next to the daemon's pass
reporting busy, SIGTERM in the middle of a transfer (the receiver keeps its resume token, exit 0)
and a restart that resumes from the token. Waits have 10x margins (the guest is emulated)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from repltest import fill, push_sink
from support import periodic, snapshots, write_config
from zfstest import ZFS, ZfsShim, get, zfs, zrepl_argv, zrepl_env

import zrepl

WAIT = 300.0  # seconds: the guest runs under software emulation and is shared


@pytest.fixture
def sockdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="zd", dir="/tmp") as d:  # unix socket paths: 107 bytes
        yield d


class DaemonProcess:
    """`zrepl.py daemon` in the background, its log in a file."""

    def __init__(self, shim: ZfsShim, cfg: Path, log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(zrepl_argv("--config", str(cfg), "--log-level", "info", "daemon"),
                                         env=zrepl_env(shim.env), stdout=out, stderr=out)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the daemon did not stop after {sig}:\n{self.text()[-3000:]}") from None


def wait_until(predicate: Callable[[], object], what: str, daemon: DaemonProcess, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({daemon.proc.returncode}) waiting for {what}:\n"
                                 f"{daemon.text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{daemon.text()[-3000:]}")
        time.sleep(0.5)


def live(sockpath: str) -> dict | None:
    try:
        code, doc = zrepl.control_request(sockpath, "GET", "/status", timeout=30)
    except zrepl.ZreplError:
        return None
    return doc if code == 200 else None


def token(fs: str) -> str:
    value = zfs("get", "-Hpo", "value", "receive_resume_token", fs, check=False).strip()
    return "" if value in ("", "-") else value


def test_the_daemon_snapshots_on_schedule_and_replicates_without_cron(make_pool, zfs_tree, zfs_shim, tmp_path,
                                                                     sockdir):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data")
    zfs_tree(dst, "sink")
    sockpath = f"{sockdir}/control"
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True},
                                            snapshotting=periodic("20s", timestamp_format="unix-seconds")),
                       global_={"control": {"sockpath": sockpath}})
    target = f"{dst}/sink/client1/{src}/data"
    daemon = DaemonProcess(zfs_shim, cfg, tmp_path / "daemon.log")
    try:
        # the first pass at start, the second when the 20 s interval is up: two snapshots arrive
        wait_until(lambda: zfs("list", "-H", "-o", "name", target, check=False) and len(snapshots(ZFS, target)) >= 2,
                   "two scheduled snapshots on the sink", daemon)
        assert snapshots(ZFS, target)[:2] == snapshots(ZFS, f"{src}/data")[:2]
        assert stat_mode(sockpath) == 0o600
        doc = live(sockpath)
        assert doc is not None and doc["jobs"]["push"]["daemon"]["state"] in ("waiting", "running"), doc
        status = subprocess.run(zrepl_argv("--config", str(cfg), "status", "--json"), capture_output=True, text=True,
                                env=zrepl_env(zfs_shim.env), timeout=WAIT)
        assert json.loads(status.stdout)["jobs"]["push"]["daemon"]["pid"] == daemon.proc.pid, status.stderr
    finally:
        code = daemon.stop()
    assert code == 0, daemon.text()
    entry = json.loads((tmp_path / "status.json").read_text())["jobs"]["push"]
    assert entry["daemon"]["state"] == "stopped" and entry["daemon"]["error"] == "stopped by SIGTERM"
    assert not os.path.exists(sockpath)


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def test_wakeup_over_the_socket_sigterm_mid_transfer_keeps_the_token_and_a_restart_resumes(
        make_pool, zfs_tree, zfs_shim, tmp_path, sockdir):
    src, dst = make_pool("src", size="512M"), make_pool("dst", size="512M")
    zfs_tree(src, "data")
    zfs_tree(dst, "sink")
    zfs("set", "compression=off", f"{src}/data")
    fill(f"{src}/data", 24 << 20)
    zfs("snapshot", f"{src}/data@big")
    sockpath = f"{sockdir}/control"
    # manual snapshotting: only a wakeup starts the push; 1 MiB/s makes the transfer last ~24 s
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True},
                                            send={"bandwidth_limit": {"max": "1 MiB"}}),
                       global_={"control": {"sockpath": sockpath}})
    target = f"{dst}/sink/client1/{src}/data"
    env = zrepl_env(zfs_shim.env)
    daemon = DaemonProcess(zfs_shim, cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: os.path.exists(sockpath) and live(sockpath) is not None, "the control socket", daemon)
        assert zfs_shim.count("send") == 0  # manual: nothing before the wakeup
        woken = subprocess.run(zrepl_argv("--config", str(cfg), "wakeup", "push"), capture_output=True, text=True,
                               env=env, timeout=WAIT)
        assert woken.returncode == 0 and "the daemon runs it now" in woken.stdout, woken

        def moved() -> int:
            doc = live(sockpath) or {}
            fs = (((doc.get("jobs") or {}).get("push") or {}).get("replication") or {}).get("filesystems") or {}
            return int((fs.get(f"{src}/data") or {}).get("bytes_replicated") or 0)
        wait_until(lambda: moved() >= 3 << 20, "3 MiB of the transfer", daemon)
        busy = subprocess.run(zrepl_argv("--config", str(cfg), "--log-level", "info", "run", "push"),
                              capture_output=True, text=True, env=env, timeout=WAIT)
        assert busy.returncode == 0 and "busy" in busy.stderr, busy  # the cron run next to the daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.text()
    assert token(target), "SIGTERM lost the receiver's resume state"
    entry = json.loads((tmp_path / "status.json").read_text())["jobs"]["push"]
    assert "stopped by SIGTERM" in entry["last_run"]["error"] and entry["daemon"]["state"] == "stopped", entry

    zfs_shim.reset_log()
    daemon = DaemonProcess(zfs_shim, cfg, tmp_path / "daemon2.log")
    try:
        wait_until(lambda: os.path.exists(sockpath) and live(sockpath) is not None, "the control socket", daemon)
        code_, reply = zrepl.control_request(sockpath, "POST", "/signal", {"job": "push", "op": "wakeup"}, timeout=30)
        assert code_ == 200 and reply["queued"] is False, reply
        wait_until(lambda: not token(target) and snapshots(ZFS, target) == ["big"], "the resumed transfer", daemon)
        wait_until(lambda: (live(sockpath) or {}).get("jobs", {}).get("push", {}).get("daemon", {}).get("state")
                   == "waiting for wakeup", "the pass to end", daemon)
    finally:
        assert daemon.stop() == 0, daemon.text()
    assert any("-t" in c.argv for c in zfs_shim.calls("send")), "the restart did not resume from the token"
    assert get(target, "guid") and snapshots(ZFS, target) == ["big"]
    entry = json.loads((tmp_path / "status.json").read_text())["jobs"]["push"]
    assert entry["last_run"]["result"] == "ok", entry
