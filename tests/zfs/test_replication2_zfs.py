"""Replication on real OpenZFS, part 2: races, pruning safety, watchdog, pull/source, protection
levels and dry runs (helpers in repltest.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from repltest import (bookmarks, cursor, fill, fs_status, holds, push_sink, real_sends, run, same_guids, snapshots,
                      start, state, status, tentative, wait_for_call, write_config)
from zfstest import exists, get, guid, send_recv, zfs


def test_snapshot_and_dataset_vanishing_between_listing_and_sending(make_pool, zfs_tree, zfs_shim, tmp_path):
    """While the run waits for the receiver's listing, the sender's newest snapshot of `data` and
    the whole `gone` filesystem are destroyed. The run replicates what still exists and does not
    fail over what vanished."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b\ngone @g")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/data" = true, "{src}/gone" = true }}'))
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
    assert snapshots(target) == ["a"] and same_guids(target, f"{src}/data")
    assert not exists(f"{dst}/sink/client1/{src}/gone")
    assert bookmarks(f"{src}/data") == [cursor(f"{src}/data@a", "push")]
    assert holds(f"{src}/data@a") == set()
    rep = fs_status(tmp_path, "push", f"{src}/data")
    assert rep["state"] == "done" and rep["last_replicated"] == f"{src}/data@a"
    gone = status(tmp_path)["jobs"]["push"]["replication"]["filesystems"].get(f"{src}/gone")
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
    cfg = write_config(tmp_path, push_sink(
        src, dst, keep_sender='[{ type = "not_replicated" }, { type = "last_n", count = 1 }]',
        keep_receiver='[{ type = "regex", regex = "^never$" }]',
        replication='protection = { initial = "guarantee_resumability", incremental = "guarantee_incremental" }'))
    zfs_shim.fail("recv", stderr="cannot receive incremental stream: injected\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1
    assert snapshots(sfs) == ["a", "b", "c"]  # a: the cursor (incremental base); b, c: not replicated
    assert all(holds(f"{sfs}@{s}") == set() for s in ("a", "b", "c"))  # kept by the rule, not by holds
    assert snapshots(target) == ["a"]
    doc = status(tmp_path)["jobs"]["push"]
    assert doc["pruning_sender"]["destroyed"] == [] and doc["pruning_receiver"]["destroyed"] == []
    zfs_shim.clear()
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(sfs) == ["c"] and snapshots(target) == ["c"]
    assert guid(f"{target}@c") == guid(f"{sfs}@c")
    assert holds(f"{target}@c") == {"zrepl_last_received_J_sink"}
    assert bookmarks(sfs) == [cursor(f"{sfs}@c", "push")]
    doc = status(tmp_path)["jobs"]["push"]
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
    cfg = write_config(tmp_path, push_sink(src, dst, keep_sender='[{ type = "last_n", count = 1 }]',
                                           replication='timeout = "5s"'))
    zfs_shim.hang("recv", seconds=600)
    started = time.monotonic()
    proc = run(zfs_shim, cfg, "run", "push", timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 90, elapsed  # 5 s without progress, then cancelled; not 600 s
    assert _zfs_shim_processes(zfs_shim.dir) == []  # the hung `zfs recv` was killed
    doc = status(tmp_path)["jobs"]["push"]
    rep = doc["replication"]["filesystems"].get(f"{src}/data")
    assert rep is not None, (doc, proc.stderr)  # the watchdog fired while stepping, not while planning
    assert rep["state"] == "step-error"
    assert "no progress" in rep["error"] and "replication.timeout" in rep["error"]
    assert "no progress" in (doc["replication"]["cancelled"] or "")
    assert "no progress" in (doc["last_run"]["error"] or "")
    # pruning ran after the cancelled replication: last_n 1 destroyed a (b carries the step hold)
    assert snapshots(f"{src}/data") == ["b"]
    assert doc["pruning_sender"]["destroyed"] == [f"{src}/data@a"]
    assert holds(f"{src}/data@b") == {"zrepl_STEP_J_push"}


def test_pull_from_a_source_that_takes_its_own_snapshots(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @old\ndata/child")
    zfs_tree(dst, "pulled")
    cfg = write_config(tmp_path, f'''
[[jobs]]
name = "source"
type = "source"
filesystems = {{ "{src}/data<" = true }}
serve = {{ type = "local", listener_name = "src" }}
[jobs.snapshotting]
type = "periodic"
prefix = "zrepl_"
interval = "1h"

[[jobs]]
name = "pull"
type = "pull"
root_fs = "{dst}/pulled"
interval = "manual"
connect = {{ type = "local", listener_name = "src", client_identity = "backup" }}
[jobs.pruning]
keep_sender = [{{ type = "not_replicated" }}, {{ type = "last_n", count = 1 }}]
keep_receiver = []
''')
    proc = run(None, cfg, "run", "source")
    assert proc.returncode == 0, proc.stderr
    taken = snapshots(f"{src}/data/child")
    assert len(taken) == 1 and taken[0].startswith("zrepl_") and snapshots(f"{src}/data") == ["old", *taken]
    proc = run(None, cfg, "run", "pull")
    assert proc.returncode == 0, proc.stderr
    snap = taken[0]
    # most_recent sent only the new snapshot; @old is older than the cursor, so not_replicated
    # counts it as replicated and last_n 1 pruned it on the source, through the connection
    assert snapshots(f"{src}/data") == [snap]
    assert status(tmp_path)["jobs"]["pull"]["pruning_sender"]["destroyed"] == [f"{src}/data@old"]
    target = f"{dst}/pulled/{src}/data"
    assert get(f"{dst}/pulled/{src}", "zrepl:placeholder") == "on"
    for sfs, rfs in ((f"{src}/data", target), (f"{src}/data/child", f"{target}/child")):
        assert snapshots(rfs) == [snap] and same_guids(rfs, sfs)
        assert holds(f"{rfs}@{snap}") == {"zrepl_last_received_J_pull"}
        assert bookmarks(sfs) == [cursor(f"{sfs}@{snap}", "source")]  # the sending job's cursor
        assert holds(f"{sfs}@{snap}") == set()
        rep = fs_status(tmp_path, "pull", sfs)
        assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@{snap}"


def zrepl_holds(snapshot: str) -> set[str]:
    return {t for t in holds(snapshot) if t.startswith("zrepl_")}


def test_guarantee_nothing_then_incremental_restarts_when_the_interrupted_snapshot_is_gone(
        make_pool, zfs_tree, zfs_shim, tmp_path):
    """Initial step at guarantee_nothing: no holds, no bookmarks on the sender. Incremental at
    guarantee_incremental: an interrupted -I step leaves tentative cursors and no holds, so the
    sender may destroy the snapshot that was being received. The next run discards the partial
    receive (`zfs recv -A`) and continues from the common snapshot to the newest one."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(
        src, dst, replication='protection = { initial = "guarantee_nothing", incremental = "guarantee_incremental" }'))
    assert run(None, cfg, "run", "push").returncode == 0
    sfs, target = f"{src}/data", f"{dst}/sink/client1/{src}/data"
    assert snapshots(target) == ["a"] and same_guids(target, sfs)
    assert bookmarks(sfs) == [] and zrepl_holds(f"{sfs}@a") == set()
    fill(sfs, 3 << 20)
    zfs_tree(src, "data @b @c")
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match="send -v -P")  # inside b's part of the -I stream
    zfs_shim.fail("send", match="send -v -P -t", stderr="ssh: connection reset by peer\n")
    assert run(zfs_shim, cfg, "run", "push").returncode == 1
    assert get(target, "receive_resume_token") != "-"
    tentative_b, tentative_c = tentative(f"{sfs}@b", "push"), tentative(f"{sfs}@c", "push")
    # the cursor on a: planning put it on the common snapshot at the incremental level
    assert bookmarks(sfs) == sorted([cursor(f"{sfs}@a", "push"), tentative_b, tentative_c])
    assert [zrepl_holds(f"{sfs}@{s}") for s in ("a", "b", "c")] == [set(), set(), set()]
    zfs("destroy", f"{sfs}@b")  # nothing holds it: guarantee_incremental does not promise resumability
    zfs_shim.clear()
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert [c.argv for c in zfs_shim.calls("recv") if "-A" in c.argv] == [["recv", "-A", target]]
    assert real_sends(zfs_shim) == [["send", "-v", "-P", "-i", f"{sfs}@a", f"{sfs}@c"]]
    assert snapshots(target) == ["a", "c"] and same_guids(target, sfs)
    assert get(target, "receive_resume_token") == "-"
    assert bookmarks(sfs) == [cursor(f"{sfs}@c", "push")]  # tentative ones and the old cursor went
    assert all(zrepl_holds(f"{sfs}@{s}") == set() for s in ("a", "c"))
    rep = fs_status(tmp_path, "push", sfs)
    assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@c"


def test_dry_run_push_changes_nothing(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a\ndata/child @x")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst, keep_sender='[{ type = "last_n", count = 1 }]',
                                           snapshotting='type = "periodic"\nprefix = "zrepl_"\ninterval = "1h"'))
    before = state(src, dst)
    proc = run(zfs_shim, cfg, "run", "--dry-run", "push")
    assert proc.returncode == 0, proc.stderr
    assert state(src, dst) == before
    changing = {"snapshot", "hold", "release", "bookmark", "create", "recv", "destroy", "rename", "set", "inherit"}
    assert [c.argv for c in zfs_shim.calls() if c.verb in changing] == []
    assert real_sends(zfs_shim) == []
    assert "would snapshot" in proc.stdout
    if "full send" in proc.stdout:  # the replication plan and its estimates, once the CLI prints them
        assert f"full send of {src}/data@a" in proc.stdout and f"full send of {src}/data/child@x" in proc.stdout
        estimates = [line for line in proc.stdout.splitlines() if line.strip().startswith("estimate ")]
        assert len(estimates) == 2 and not any(line.endswith("unknown") for line in estimates), proc.stdout


def test_nothing_to_do_costs_two_listings_and_prunes_from_them(make_pool, zfs_tree, zfs_shim, tmp_path):
    """A push run with nothing to send lists each side once: pruning reuses the listings the plan
    was made from, since replication changed neither side. With something to send, pruning lists
    again and sees what arrived."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b\ndata/child @a @b")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(
        src, dst, keep_sender='[{ type = "not_replicated" }, { type = "last_n", count = 2 }]',
        keep_receiver='[{ type = "last_n", count = 2 }]', initial="all"))
    assert run(None, cfg, "run", "push").returncode == 0
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert [c.verb for c in zfs_shim.calls()] == ["list", "list"]
    # new snapshots: replication runs, so pruning must not trust the old listings
    zfs("snapshot", "-r", f"{src}/data@c")
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(f"{src}/data") == ["b", "c"] and snapshots(target) == ["b", "c"]
    assert snapshots(f"{target}/child") == ["b", "c"]
    doc = status(tmp_path)["jobs"]["push"]
    assert sorted(doc["pruning_receiver"]["destroyed"]) == [f"{target}/child@a", f"{target}@a"]
    assert sorted(doc["pruning_sender"]["destroyed"]) == [f"{src}/data/child@a", f"{src}/data@a"]
