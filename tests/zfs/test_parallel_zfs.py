"""Parallel replication (replication.concurrency.steps = 4) over the local transport, on real
OpenZFS: parents before children, a failed parent blocking only its own subtree, a cut stream
failing only its filesystem and resumed by the next run (helpers in repltest.py; faults and the
spawn log from the zfs_shim fixture).

No assertion depends on how fast the guest is: where the order of spawns matters, a shim delay
makes the wrong order observable (a spawn before the delayed one could have finished), and the
delays are many times what the right order needs.
"""
from __future__ import annotations

from repltest import fill, push_sink, run, same_guids
from support import bookmarks, fs_status, holds, real_sends, snapshots, status, write_config
from zfstest import ZFS, ShimCall, ZfsShim, exists, get

STEPS = {"concurrency": {"steps": 4}}
STEP_HOLD = "zrepl_STEP_J_push"
# Long enough that a lane which does not wait for it, or a second lane that starts with it, is
# unmistakable; what the right order needs between two spawns is a few seconds under emulation.
DELAY = 20.0


def first_recv(shim: ZfsShim, target: str) -> ShimCall:
    """The first `zfs recv` into exactly `target` (the target is recv's last argument)."""
    calls = [c for c in shim.calls("recv") if c.argv[-1] == target]
    assert calls, f"no zfs recv into {target}: {[c.argv for c in shim.calls('recv')]}"
    return calls[0]


def test_parents_are_received_before_their_children_and_siblings_run_at_once(make_pool, zfs_tree, zfs_shim,
                                                                             tmp_path):
    """Two trees, a > a/b > a/b/c and d > d/e, with four lanes. The receives into `a` and `d` are
    held back DELAY seconds: `a/b` may only start once `a` was received (its recv is spawned at
    least DELAY after a's), while `d` runs beside `a` (spawned within DELAY of it: one after the
    other would be DELAY apart at least). Every replica is the sender's data, none a placeholder."""
    src, dst = make_pool("src"), make_pool("dst")
    names = ["a", "a/b", "a/b/c", "d", "d/e"]
    zfs_tree(src, "\n".join(f"{n} @1 @2" for n in names))
    zfs_tree(dst, "sink")
    base = f"{dst}/sink/client1/{src}"
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/a<": True, f"{src}/d<": True},
                                            initial_replication="all", replication=STEPS))
    # first match wins: the children's receives (whose targets extend a's and d's) pass first,
    # timestamped (a delay of 0 takes the shim's logging path with the clock)
    zfs_shim.delay("recv", 0, match=f"{base}/a/")
    zfs_shim.delay("recv", 0, match=f"{base}/d/")
    zfs_shim.delay("recv", DELAY, times=1, match=f"{base}/a")  # the first step's (the full stream's)
    zfs_shim.delay("recv", DELAY, times=1, match=f"{base}/d")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    a, b, c = (first_recv(zfs_shim, f"{base}/{n}") for n in ("a", "a/b", "a/b/c"))
    d, e = (first_recv(zfs_shim, f"{base}/{n}") for n in ("d", "d/e"))
    assert a.action == d.action == "delay" and None not in (a.time, b.time, c.time, d.time, e.time)
    assert b.time >= a.time + DELAY and c.time > b.time  # a child waits for its parent's receive
    assert e.time >= d.time + DELAY
    assert abs(d.time - a.time) < DELAY  # the two roots were received at once, on two lanes
    for n in names:
        sfs, target = f"{src}/{n}", f"{base}/{n}"
        assert snapshots(ZFS, target) == ["1", "2"] and same_guids(target, sfs), n
        assert get(target, "zrepl:placeholder") != "on", n
        assert get(target, "receive_resume_token") == "-", n
        assert holds(ZFS, f"{sfs}@1") == set() and holds(ZFS, f"{sfs}@2") == set(), n
        assert bookmarks(ZFS, sfs) and all(m.startswith("zrepl_CURSOR_G_") for m in bookmarks(ZFS, sfs)), n
        rep = fs_status(cfg, "push", sfs)
        assert rep["state"] == "done" and rep["error"] is None and rep["last_replicated"] == f"{sfs}@2", n
    assert not status(cfg)["jobs"]["push"]["last_run"]["failures"]


def test_a_failed_parent_blocks_its_subtree_while_the_others_replicate(make_pool, zfs_tree, zfs_shim, tmp_path):
    """`zfs recv` into `p` fails on every attempt: p/c and p/c/g are never sent nor received (blocked,
    each naming the parent it waits for), q and r replicate on the other lanes, and the exit code and
    status name exactly the three that did not."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "p @1\np/c @1\np/c/g @1\nq @1\nr @1")
    zfs_tree(dst, "sink")
    base = f"{dst}/sink/client1/{src}"
    cfg = write_config(tmp_path, *push_sink(src, dst, replication=STEPS, filesystems={
        f"{src}/p<": True, f"{src}/q": True, f"{src}/r": True}))
    zfs_shim.delay("recv", 0, match=f"{base}/p/")  # a child's receive would pass (and be seen below)
    zfs_shim.fail("recv", match=f"{base}/p", stderr="cannot receive new filesystem stream: injected failure\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    targets = [c.argv[-1] for c in zfs_shim.calls("recv")]
    assert f"{base}/p" in targets
    assert not [t for t in targets if t.startswith(f"{base}/p/")]
    assert not [s for s in real_sends(zfs_shim.calls()) if any(f"{src}/p/" in arg for arg in s)]
    for n in ("q", "r"):
        assert snapshots(ZFS, f"{base}/{n}") == ["1"] and same_guids(f"{base}/{n}", f"{src}/{n}")
        assert fs_status(cfg, "push", f"{src}/{n}")["state"] == "done"
        assert holds(ZFS, f"{src}/{n}@1") == set()
    assert not exists(f"{base}/p") and not exists(f"{base}/p/c")
    p = fs_status(cfg, "push", f"{src}/p")
    assert p["state"] == "step-error" and "injected failure" in p["error"]
    child, grandchild = fs_status(cfg, "push", f"{src}/p/c"), fs_status(cfg, "push", f"{src}/p/c/g")
    assert child["state"] == "blocked" and child["blocked_by"] == f"{src}/p"
    assert grandchild["state"] == "blocked" and grandchild["blocked_by"] == f"{src}/p/c"
    assert holds(ZFS, f"{src}/p@1") == {STEP_HOLD}  # resumability: the failed step keeps its `to`
    assert holds(ZFS, f"{src}/p/c@1") == set() and holds(ZFS, f"{src}/p/c/g@1") == set()  # never started
    failures = status(cfg)["jobs"]["push"]["last_run"]["failures"]
    assert set(failures) == {f"{src}/p", f"{src}/p/c", f"{src}/p/c/g"}


def test_a_stream_cut_in_one_of_three_parallel_steps_is_resumed_by_the_next_run(make_pool, zfs_tree, zfs_shim,
                                                                                tmp_path):
    """Three filesystems replicate at once; a's full send is cut after 1 MiB of 4 and its resume
    sends fail within the run (as if the sender were unreachable), so the run ends with a's
    partial receive saved. b and c are complete. The next run resumes a with `zfs send -t`."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "a\nb\nc")
    fill(f"{src}/a", 4 << 20)
    fill(f"{src}/b", 1 << 20)
    fill(f"{src}/c", 1 << 20)
    zfs_tree(src, "a @1\nb @1\nc @1")
    zfs_tree(dst, "sink")
    base = f"{dst}/sink/client1/{src}"
    cfg = write_config(tmp_path, *push_sink(src, dst, replication=STEPS, filesystems={
        f"{src}/{n}": True for n in "abc"}))
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match=f"send -v -P {src}/a@")
    zfs_shim.fail("send", match="send -v -P -t", stderr="ssh: connection reset by peer\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    assert [c.action for c in zfs_shim.calls("send") if f"{src}/a@1" in c.argv] == ["cut"]
    assert get(f"{base}/a", "receive_resume_token") != "-" and snapshots(ZFS, f"{base}/a") == []
    assert holds(ZFS, f"{src}/a@1") == {STEP_HOLD}
    for n in "bc":
        assert snapshots(ZFS, f"{base}/{n}") == ["1"] and same_guids(f"{base}/{n}", f"{src}/{n}")
        assert fs_status(cfg, "push", f"{src}/{n}")["state"] == "done"
    rep = fs_status(cfg, "push", f"{src}/a")
    assert rep["state"] == "step-error" and "connection reset" in rep["error"]
    assert set(status(cfg)["jobs"]["push"]["last_run"]["failures"]) == {f"{src}/a"}

    zfs_shim.clear()
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    sends = real_sends(zfs_shim.calls())
    assert len(sends) == 1 and sends[0][:4] == ["send", "-v", "-P", "-t"]  # a resumed; b and c had nothing to do
    for n in "abc":
        target = f"{base}/{n}"
        assert snapshots(ZFS, target) == ["1"] and same_guids(target, f"{src}/{n}"), n
        assert get(target, "receive_resume_token") == "-", n
        assert holds(ZFS, f"{src}/{n}@1") == set(), n
        assert fs_status(cfg, "push", f"{src}/{n}")["state"] == "done", n
