"""`zrepl.py daemon` on real OpenZFS (issue 11 items 1-3): scheduled snapshots replicated to a
local sink without cron, a wakeup over the control socket, a cron `run` next to the daemon's pass
reporting busy, SIGTERM in the middle of a transfer (the receiver keeps its resume token, exit 0)
and a restart that resumes from the token; `signal reset` in the middle of a transfer (the token
stays, the status says so) and the next wakeup resuming; SIGHUP adding a job, removing one, and an
invalid config that leaves the old jobs running. Waits have 10x margins (the guest is emulated)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from daemontest import WAIT, DaemonProcess, daemon_state, live, live_job, token, wait_until
from repltest import fill, push_sink
from support import periodic, snap_job, snapshots, write_config
from zfstest import ZFS, get, zfs, zrepl_argv, zrepl_env

import zrepl


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


def slow_push(make_pool, zfs_tree, tmp_path, sockpath: str, size: int) -> tuple[str, str, Path]:
    """SRC/data with one snapshot @big of `size` incompressible bytes, a push job into a local sink
    with manual snapshotting (only wakeups start passes) and a 1 MiB/s bandwidth limit, so a
    transfer is under way long enough to act on it (the tests wait for bytes moved, not for time).
    Returns (src pool, the receiving filesystem, config path)."""
    src, dst = make_pool("src", size="512M"), make_pool("dst", size="512M")
    zfs_tree(src, "data")
    zfs_tree(dst, "sink")
    zfs("set", "compression=off", f"{src}/data")
    fill(f"{src}/data", size)
    zfs("snapshot", f"{src}/data@big")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True},
                                            send={"bandwidth_limit": {"max": "1 MiB"}}),
                       global_={"control": {"sockpath": sockpath}})
    return src, f"{dst}/sink/client1/{src}/data", cfg


def test_wakeup_over_the_socket_sigterm_mid_transfer_keeps_the_token_and_a_restart_resumes(
        make_pool, zfs_tree, zfs_shim, tmp_path, sockdir):
    sockpath = f"{sockdir}/control"
    src, target, cfg = slow_push(make_pool, zfs_tree, tmp_path, sockpath, 24 << 20)
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


def moved(sockpath: str, fs: str) -> int:
    """Bytes of fs's current transfer so far, as GET /status has them."""
    replication = live_job(sockpath, "push").get("replication") or {}
    return int(((replication.get("filesystems") or {}).get(fs) or {}).get("bytes_replicated") or 0)


def wakeup(sockpath: str, job: str) -> dict:
    code, reply = zrepl.control_request(sockpath, "POST", "/signal", {"job": job, "op": "wakeup"}, timeout=30)
    assert code == 200, reply
    return reply


def test_reset_over_the_socket_mid_transfer_keeps_the_token_says_so_and_the_next_wakeup_resumes(
        make_pool, zfs_tree, zfs_shim, tmp_path, sockdir):
    sockpath = f"{sockdir}/control"
    src, target, cfg = slow_push(make_pool, zfs_tree, tmp_path, sockpath, 12 << 20)  # the reset after 2 MiB
    daemon = DaemonProcess(zfs_shim, cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: live(sockpath) is not None, "the control socket", daemon)
        assert wakeup(sockpath, "push")["queued"] is False
        wait_until(lambda: moved(sockpath, f"{src}/data") >= 2 << 20, "2 MiB of the transfer", daemon)
        # straight over the socket (what `zrepl.py signal reset` sends; its CLI is a host test): a
        # client start-up under emulation could outlast the rest of the transfer
        code, reply = zrepl.control_request(sockpath, "POST", "/signal", {"job": "push", "op": "reset"}, timeout=30)
        assert code == 200 and reply["cancelled"] is True, reply
        wait_until(lambda: daemon_state(sockpath, "push") == "waiting after error", "the reset pass to end", daemon)
        entry = live_job(sockpath, "push")
        assert "cancelled the running pass (the receiver keeps its resume token)" in entry["daemon"]["reset"], entry
        assert "reset by `zrepl.py signal reset`" in entry["last_run"]["error"], entry
        assert token(target), "the reset lost the receiver's resume state"
        on_file = json.loads((tmp_path / "status.json").read_text())["jobs"]["push"]
        assert on_file["daemon"]["reset"] == entry["daemon"]["reset"]  # the file says it too

        zfs_shim.reset_log()
        assert wakeup(sockpath, "push")["queued"] is False
        wait_until(lambda: daemon_state(sockpath, "push") == "waiting for wakeup", "the resumed pass to end", daemon)
        entry = live_job(sockpath, "push")
        assert entry["last_run"]["result"] == "ok", entry
    finally:
        assert daemon.stop() == 0, daemon.text()
    resumed = [c.argv for c in zfs_shim.calls("send") if "-n" not in c.argv]
    assert resumed and all("-t" in argv for argv in resumed), resumed  # from the token, not from the start
    assert not token(target) and snapshots(ZFS, target) == ["big"]
    assert get(target, "guid") != get(f"{src}/data", "guid") and get(f"{target}@big", "guid") == get(
        f"{src}/data@big", "guid")


def test_sighup_starts_an_added_job_stops_a_removed_one_and_an_invalid_config_keeps_the_old_jobs(
        make_pool, zfs_tree, zfs_shim, tmp_path, sockdir):
    src = make_pool("src")
    zfs_tree(src, "a\nb")
    sockpath = f"{sockdir}/control"

    def config(*names: str, interval: str = "10s"):
        return write_config(tmp_path, *(snap_job(n, filesystems={f"{src}/{n}": True},
                                                 snapshotting=periodic(interval, timestamp_format="unix-seconds"))
                                        for n in names), global_={"control": {"sockpath": sockpath}})

    def count(name: str) -> int:
        return len(snapshots(ZFS, f"{src}/{name}"))

    cfg = config("a")
    daemon = DaemonProcess(zfs_shim, cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: count("a") >= 1 and daemon_state(sockpath, "a") == "waiting", "job a's first pass", daemon)
        assert count("b") == 0
        config("b")  # a goes, b comes
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "no longer in the config" in daemon.text(), "job a to leave the schedule", daemon)
        a_after_reload = count("a")
        wait_until(lambda: count("b") >= 2, "two snapshots of the added job b (one interval apart)", daemon)
        # a snapshotted every 10 s until the reload; in the interval b took since, it took none
        assert count("a") == a_after_reload, "the removed job still snapshots"
        code, reply = zrepl.control_request(sockpath, "POST", "/signal", {"job": "a", "op": "wakeup"}, timeout=30)
        assert code == 404 and "no job named 'a'" in reply["error"], reply

        cfg.write_text(cfg.read_text().replace('interval = "10s"', 'interval = "10 parsecs"'))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "old one keeps running" in daemon.text(), "the invalid config to be logged", daemon)
        line = next(x for x in daemon.text().splitlines() if "old one keeps running" in x)
        assert "jobs[0].snapshotting.interval" in line and "10 parsecs" in line, line
        b_after_invalid = count("b")
        wait_until(lambda: count("b") > b_after_invalid, "job b's next snapshot under the old config", daemon)
        assert daemon.proc.poll() is None and daemon_state(sockpath, "b") in ("waiting", "running")
    finally:
        assert daemon.stop() == 0, daemon.text()
