"""Replication on real OpenZFS under faults: datasets vanishing between listing and sending, pruning
while replication fails, the watchdog cancelling a hung receive, an interrupted step whose snapshot
is destroyed before the next run (helpers in repltest.py; faults from the zfs_shim fixture)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from repltest import cursor, fill, push_sink, run, same_guids, start, tentative, wait_for_call
from support import (bookmarks, fs_status, holds, last_n, not_replicated, real_sends, regex,
                     snapshots, status, write_config)
from zfstest import ZFS, exists, get, guid, send_recv, zfs


def test_snapshot_and_dataset_vanishing_between_listing_and_sending(make_pool, zfs_tree, zfs_shim, tmp_path):
    """While the run waits for the receiver's listing, the sender's newest snapshot of `data` and
    the whole `gone` filesystem are destroyed. The run replicates what still exists and does not
    fail over what vanished."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b\ngone @g")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True, f"{src}/gone": True}))
    zfs_shim.delay("list", 6, times=1, match=f"{dst}/sink")
    proc = start(zfs_shim, cfg, "run", "push")
    try:
        wait_for_call(zfs_shim, "list", "delay")
        zfs("destroy", f"{src}/data@b")
        zfs("destroy", "-r", f"{src}/gone")
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, target) == ["a"] and same_guids(target, f"{src}/data")
    assert not exists(f"{dst}/sink/client1/{src}/gone")
    assert bookmarks(ZFS, f"{src}/data") == [cursor(f"{src}/data@a", "push")]
    assert holds(ZFS, f"{src}/data@a") == set()
    rep = fs_status(cfg, "push", f"{src}/data")
    assert rep["state"] == "done" and rep["last_replicated"] == f"{src}/data@a"
    gone = status(cfg)["jobs"]["push"]["replication"]["filesystems"].get(f"{src}/gone")
    assert gone is None or not gone.get("error")


def test_not_replicated_keeps_the_incremental_base_and_last_received_hold_the_newest(make_pool, zfs_tree, zfs_shim,
                                                                                      tmp_path):
    """keep_sender = [not_replicated, last_n 1] while replication fails: nothing the next
    incremental needs is destroyed (guarantee_incremental: no step holds help here). On the
    receiver a rule that keeps nothing still cannot destroy the last received snapshot."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b @c")
    zfs_tree(dst, "sink")
    sfs, target = f"{src}/data", f"{dst}/sink/client1/{src}/data"
    # @a was replicated by an earlier run: its copy, the cursor and the last-received hold
    zfs("create", "-p", f"{dst}/sink/client1/{src}")
    send_recv([f"{sfs}@a"], ["-u", target])
    zfs("bookmark", f"{sfs}@a", f"{sfs}#{cursor(f'{sfs}@a', 'push')}")
    zfs("hold", "zrepl_last_received_J_sink", f"{target}@a")
    cfg = write_config(tmp_path, *push_sink(
        src, dst, keep_sender=[not_replicated(), last_n(1)], keep_receiver=[regex("^never$")],
        replication={"protection": {"initial": "guarantee_resumability", "incremental": "guarantee_incremental"}}))
    zfs_shim.fail("recv", stderr="cannot receive incremental stream: injected\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1
    assert snapshots(ZFS, sfs) == ["a", "b", "c"]  # a: the cursor (incremental base); b, c: not replicated
    assert all(holds(ZFS, f"{sfs}@{s}") == set() for s in ("a", "b", "c"))  # kept by the rule, not by holds
    assert snapshots(ZFS, target) == ["a"]
    doc = status(cfg)["jobs"]["push"]
    assert doc["pruning_sender"]["destroyed"] == [] and doc["pruning_receiver"]["destroyed"] == []
    zfs_shim.clear()
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, sfs) == ["c"] and snapshots(ZFS, target) == ["c"]
    assert guid(f"{target}@c") == guid(f"{sfs}@c")
    assert holds(ZFS, f"{target}@c") == {"zrepl_last_received_J_sink"}
    assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@c", "push")]
    doc = status(cfg)["jobs"]["push"]
    assert sorted(doc["pruning_sender"]["destroyed"]) == [f"{sfs}@a", f"{sfs}@b"]
    assert sorted(doc["pruning_receiver"]["destroyed"]) == [f"{target}@a", f"{target}@b"]


def _zfs_shim_processes(shim_dir: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(shim_dir) in cmdline:
            found.append(cmdline)
    return found


def test_watchdog_cancels_a_hung_receive_and_pruning_still_runs(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, keep_sender=[last_n(1)], replication={"timeout": "5s"}))
    zfs_shim.hang("recv", seconds=600)
    started = time.monotonic()
    proc = run(zfs_shim, cfg, "run", "push", timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 90, elapsed  # 5 s without progress, then cancelled; not 600 s
    assert _zfs_shim_processes(zfs_shim.dir) == []  # the hung `zfs recv` was killed
    doc = status(cfg)["jobs"]["push"]
    rep = doc["replication"]["filesystems"].get(f"{src}/data")
    assert rep is not None, (doc, proc.stderr)  # the watchdog fired while stepping, not while planning
    assert rep["state"] == "step-error"
    assert "no progress" in rep["error"] and "replication.timeout" in rep["error"]
    assert "no progress" in (doc["replication"]["cancelled"] or "")
    assert "no progress" in (doc["last_run"]["error"] or "")
    # pruning ran after the cancelled replication: last_n 1 destroyed a (b carries the step hold)
    assert snapshots(ZFS, f"{src}/data") == ["b"]
    assert doc["pruning_sender"]["destroyed"] == [f"{src}/data@a"]
    assert holds(ZFS, f"{src}/data@b") == {"zrepl_STEP_J_push"}


def zrepl_holds(snapshot: str) -> set[str]:
    return {t for t in holds(ZFS, snapshot) if t.startswith("zrepl_")}


def test_guarantee_nothing_then_incremental_restarts_when_the_interrupted_snapshot_is_gone(
        make_pool, zfs_tree, zfs_shim, tmp_path):
    """Initial step at guarantee_nothing: no holds, no bookmarks on the sender. Incremental at
    guarantee_incremental: an interrupted -I step leaves tentative cursors and no holds, so the
    sender may destroy the snapshot that was being received. The next run discards the partial
    receive (`zfs recv -A`) and continues from the common snapshot to the newest one."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(
        src, dst, replication={"protection": {"initial": "guarantee_nothing", "incremental": "guarantee_incremental"}}))
    assert run(None, cfg, "run", "push").returncode == 0
    sfs, target = f"{src}/data", f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, target) == ["a"] and same_guids(target, sfs)
    assert bookmarks(ZFS, sfs) == [] and zrepl_holds(f"{sfs}@a") == set()
    fill(sfs, 3 << 20)
    zfs_tree(src, "data @b @c")
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match="send -v -P")  # inside b's part of the -I stream
    zfs_shim.fail("send", match="send -v -P -t", stderr="ssh: connection reset by peer\n")
    assert run(zfs_shim, cfg, "run", "push").returncode == 1
    assert get(target, "receive_resume_token") != "-"
    tentative_b, tentative_c = tentative(f"{sfs}@b", "push"), tentative(f"{sfs}@c", "push")
    # the cursor on a: planning put it on the common snapshot at the incremental level
    assert bookmarks(ZFS, sfs) == sorted([cursor(f"{sfs}@a", "push"), tentative_b, tentative_c])
    assert [zrepl_holds(f"{sfs}@{s}") for s in ("a", "b", "c")] == [set(), set(), set()]
    zfs("destroy", f"{sfs}@b")  # nothing holds it: guarantee_incremental does not promise resumability
    zfs_shim.clear()
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert [c.argv for c in zfs_shim.calls("recv") if "-A" in c.argv] == [["recv", "-A", target]]
    assert real_sends(zfs_shim.calls()) == [["send", "-v", "-P", "-i", f"{sfs}@a", f"{sfs}@c"]]
    assert snapshots(ZFS, target) == ["a", "c"] and same_guids(target, sfs)
    assert get(target, "receive_resume_token") == "-"
    assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@c", "push")]  # tentative ones and the old cursor went
    assert all(zrepl_holds(f"{sfs}@{s}") == set() for s in ("a", "c"))
    rep = fs_status(cfg, "push", sfs)
    assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@c"


def test_a_receiver_out_of_space_fails_only_that_filesystem_and_the_next_run_completes_once_space_is_freed(
        make_pool, zfs_tree, zfs_shim, tmp_path):
    """A quota on the sink too small for the stream: the step fails (naming the space), the
    sender's snapshot is still there to send, and after the admin frees space the next run
    completes with the sender's guids, no resume state and no hold left behind."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data\nsmall @s")
    fill(f"{src}/data", 24 << 20)  # incompressible: the stream is at least 24 MiB
    zfs("snapshot", f"{src}/data@big")
    zfs_tree(dst, "sink")
    zfs("set", "quota=8M", f"{dst}/sink")  # room for small, not for data
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True, f"{src}/small": True}))
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    rep = fs_status(cfg, "push", f"{src}/data")
    assert rep["state"] != "done" and any(w in (rep["error"] or "") for w in ("space", "quota")), rep
    assert fs_status(cfg, "push", f"{src}/small")["state"] == "done"  # the other filesystem went on
    assert snapshots(ZFS, f"{src}/data") == ["big"]
    zfs("set", "quota=none", f"{dst}/sink")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, target) == ["big"] and same_guids(target, f"{src}/data")
    assert get(target, "receive_resume_token") == "-"
    assert holds(ZFS, f"{src}/data@big") == set()
    assert bookmarks(ZFS, f"{src}/data") == [cursor(f"{src}/data@big", "push")]
