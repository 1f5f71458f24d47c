"""How many zfs processes real replication work costs (issue 12, item 3), host-tested through the
ZFS double: the per-filesystem commands of an initial and an incremental push, the run-wide
batches of step holds and releases, and the safety each batch keeps (what a failed or blocked
filesystem keeps held, where the cursor goes when a later step fails)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import fs_status, last_n, not_replicated, pull_job, push_job, run, sink_job, source_job, write_config

N = 4
WAIT = 30.0  # seconds for something that happens at once (10x margin and more)
STEP, RECEIVED = "zrepl_STEP_J_push", "zrepl_last_received_J_sink"
ROOT = "dst/sink/client1"


def filesystems(n: int = N) -> list[str]:
    return [f"src/data/fs{i}" for i in range(n)]


@pytest.fixture
def world(fake_zfs: FakeZfs):
    w = fake_zfs.world
    w.tree("src", "data")
    w.tree("dst", "sink")
    return w


def build(world, snapshots: int) -> None:
    names = " ".join(f"@s{j}" for j in range(snapshots))
    world.tree("src", "\n".join(f"data/fs{i} {names}" for i in range(N)))


def push(fake: FakeZfs, tmp_path: Path, **keys) -> int:
    keys.setdefault("filesystems", {"src/data<": True})
    cfg = write_config(tmp_path, push_job(keep_sender=[not_replicated(), last_n(30)], keep_receiver=[last_n(30)],
                                          **keys), sink_job(root_fs="dst/sink"))
    return run("--config", cfg, "run", "push", zfs=fake).code


def shapes(calls: list[list[str]]) -> Counter:
    """Each call as its verb and flags (dataset names left out), counted."""
    return Counter(" ".join(w for w in c[1:] if not ("/" in w or "@" in w or "#" in w) or w.startswith("-"))
                   for c in calls)


def per_filesystem(calls: list[list[str]], fs: str) -> list[list[str]]:
    """The calls that name exactly this filesystem (or its replica) and no other one."""
    mine = (fs, f"{ROOT}/{fs}")
    def names(c: list[str]) -> set[str]:
        return {w.split("@")[0].split("#")[0] for w in c[1:] if "/" in w}
    return [c for c in calls if names(c) and names(c) <= set(mine)]


def test_initial_replication_costs_three_spawns_per_filesystem_with_holds_batched_per_run(fake_zfs, world, tmp_path):
    build(world, 1)
    assert push(fake_zfs, tmp_path) == 0
    for fs in filesystems():
        verbs = sorted(c[1] for c in per_filesystem(fake_zfs.calls, fs))
        assert verbs == ["bookmark", "recv", "send"], (fs, verbs)  # the stream and the cursor
    counted = shapes(fake_zfs.calls)
    assert counted["send -n -v -P"] == 0  # the size comes with `zfs send -v -P` itself
    assert counted["holds -H"] == 0
    holds = [c for c in fake_zfs.calls if c[1] == "hold" and c[2] == STEP]
    releases = [c for c in fake_zfs.calls if c[1] == "release"]
    assert holds == [["zfs", "hold", STEP, *(f"{fs}@s0" for fs in filesystems())]]
    assert releases == [["zfs", "release", STEP, *(f"{fs}@s0" for fs in filesystems())]]
    # the receiver checks what arrived in one listing of all replicas, then holds all in one command
    targets = [f"{ROOT}/{fs}" for fs in filesystems()]
    checks = [c for c in fake_zfs.calls if c[1] == "list" and "-d" in c and c[-len(targets):] == targets]
    assert len(checks) == 1
    assert [c for c in fake_zfs.calls if c[1] == "hold" and c[2] == RECEIVED] == [
        ["zfs", "hold", RECEIVED, *(f"{t}@s0" for t in targets)]]
    for fs in filesystems():
        assert world.holds(f"{fs}@s0") == set() and world.holds(f"{ROOT}/{fs}@s0") == {RECEIVED}
        assert world.bookmarks(fs) == [zrepl.cursor_bookmark_name(world.guid(f"{fs}@s0"), "push")]


def test_initial_replication_of_all_snapshots_makes_one_cursor_and_holds_once(fake_zfs, world, tmp_path):
    build(world, 10)
    assert push(fake_zfs, tmp_path, initial_replication="all") == 0
    for fs in filesystems():
        verbs = Counter(c[1] for c in per_filesystem(fake_zfs.calls, fs))
        # a full send and one -I stream; one cursor, never a first one made and destroyed
        assert verbs == {"send": 2, "recv": 2, "bookmark": 1}, (fs, verbs)
        assert world.snapshots(f"{ROOT}/{fs}") == [f"s{j}" for j in range(10)]
        assert world.bookmarks(fs) == [zrepl.cursor_bookmark_name(world.guid(f"{fs}@s9"), "push")]
        assert all(world.holds(f"{fs}@s{j}") == set() for j in range(10))
        assert world.holds(f"{ROOT}/{fs}@s9") == {RECEIVED} and world.holds(f"{ROOT}/{fs}@s0") == set()
    assert not [c for c in fake_zfs.calls if c[1] == "destroy"]
    assert len([c for c in fake_zfs.calls if c[1] == "hold" and c[2] == STEP]) == 1
    assert len([c for c in fake_zfs.calls if c[1] == "release" and c[2] == STEP]) == 1


def test_an_incremental_step_needs_no_holds_query_estimate_or_sender_listing(fake_zfs, world, tmp_path):
    build(world, 1)
    assert push(fake_zfs, tmp_path) == 0
    for fs in filesystems():
        world.snapshot(f"{fs}@new")
    fake_zfs.calls.clear()
    assert push(fake_zfs, tmp_path) == 0
    for fs in filesystems():
        verbs = Counter(c[1] for c in per_filesystem(fake_zfs.calls, fs))
        # the stream, the cursor moving (the holds move in run-wide batches)
        assert verbs == {"send": 1, "recv": 1, "bookmark": 1, "destroy": 1}, (fs, verbs)
        assert world.holds(f"{ROOT}/{fs}@new") == {RECEIVED} and world.holds(f"{ROOT}/{fs}@s0") == set()
        assert world.holds(f"{fs}@new") == set() and world.holds(f"{fs}@s0") == set()
        assert world.bookmarks(fs) == [zrepl.cursor_bookmark_name(world.guid(f"{fs}@new"), "push")]
    counted = shapes(fake_zfs.calls)
    assert counted["holds -H"] == 0 and counted["send -n -v -P -i"] == 0


def test_a_failed_later_step_leaves_the_cursor_at_the_last_step_done_and_its_snapshots_held(
        fake_zfs, world, tmp_path):
    build(world, 3)
    fake_zfs.fail("send", match="-I src/data/fs1@s0", stderr="cannot send: injected\n")
    assert push(fake_zfs, tmp_path, initial_replication="all") == 1
    fs = "src/data/fs1"
    assert world.snapshots(f"{ROOT}/{fs}") == ["s0"]
    # the full step arrived: its cursor is there, and what the failed -I step needs (its source
    # included: the retries planned it from s0) stays held for resuming
    assert world.bookmarks(fs) == [zrepl.cursor_bookmark_name(world.guid(f"{fs}@s0"), "push")]
    assert all(world.holds(f"{fs}@s{j}") == {STEP} for j in range(3))
    for other in ("src/data/fs0", "src/data/fs2"):
        assert all(world.holds(f"{other}@s{j}") == set() for j in range(3))


def test_a_filesystem_that_never_starts_loses_the_holds_placed_for_it(fake_zfs, world, tmp_path):
    world.tree("src", "data/p @a\ndata/p/child @b")
    fake_zfs.fail("recv", match=f"{ROOT}/src/data/p")  # the parent's creating step fails: child blocked
    assert push(fake_zfs, tmp_path, filesystems={"src/data/p<": True}) == 1
    assert world.holds("src/data/p@a") == {STEP}  # resumability: the failed step keeps its hold
    assert world.holds("src/data/p/child@b") == set()  # never sent: nothing to resume


def test_a_snapshot_zfs_cannot_hold_fails_only_its_filesystem(fake_zfs, world, tmp_path):
    build(world, 1)
    fake_zfs.fail("hold", match=STEP, stderr="cannot hold snapshot 'src/data/fs2@s0': permission denied\n")
    assert push(fake_zfs, tmp_path) == 1
    assert not world.exists(f"{ROOT}/src/data/fs2")
    for fs in ("src/data/fs0", "src/data/fs1", "src/data/fs3"):
        assert world.snapshots(f"{ROOT}/{fs}") == ["s0"]


def test_parallel_lanes_protect_and_complete_in_one_batch_like_the_serial_run(fake_zfs, world, tmp_path):
    """Per-lane holds and releases doubled the spawns and ate the lanes' gain (bench/parallel_steps.py:
    1.00x at 4 steps): protection before the lanes and completion after them are one batch each."""
    build(world, 3)
    assert push(fake_zfs, tmp_path, initial_replication="all", replication={"concurrency": {"steps": 3}}) == 0
    for fs in filesystems():
        assert world.snapshots(f"{ROOT}/{fs}") == ["s0", "s1", "s2"]
        assert world.bookmarks(fs) == [zrepl.cursor_bookmark_name(world.guid(f"{fs}@s2"), "push")]
        assert all(world.holds(f"{fs}@s{j}") == set() for j in range(3))
        assert world.holds(f"{ROOT}/{fs}@s2") == {RECEIVED}
    every = [f"{fs}@s{j}" for fs in filesystems() for j in range(3)]
    assert [c for c in fake_zfs.calls if c[1] == "hold" and c[2] == STEP] == [["zfs", "hold", STEP, *every]]
    assert len([c for c in fake_zfs.calls if c[1] == "release" and c[2] == STEP]) == 1
    assert len([c for c in fake_zfs.calls if c[1] == "hold" and c[2] == RECEIVED]) == 1
    # no step looks up its own filesystem on either side
    single = [c for c in fake_zfs.calls if c[1] == "list" and "-d" in c and c[-1].startswith(("src/data/fs", ROOT))
              and len([a for a in c if a.startswith(("src/", "dst/"))]) == 1]
    assert single == []


def test_parallel_lanes_spawn_what_the_serial_run_does_sharing_its_listings(tmp_path):
    """Each extra lane used to list both sides again before its first step (at 1,000 filesystems,
    two whole-tree listings per lane, one lane after another): the lanes share the run's listing
    on both sides, so a run with steps = 3 spawns exactly the commands of a serial one. The tree
    has children below children, received on whichever lane is free: none of them takes a parent
    another lane received for missing (no placeholder `zfs create` beyond the serial run's)."""
    counts = []
    for steps in (1, 3):
        fake = FakeZfs()
        fake.world.tree("src", "\n".join(f"data/p{i}{child} @s0 @s1"
                                         for i in range(3) for child in ("", "/c0", "/c1", "/c2")))
        fake.world.tree("dst", "sink")
        run_dir = tmp_path / f"steps{steps}"
        run_dir.mkdir()
        assert push(fake, run_dir, initial_replication="all", replication={"concurrency": {"steps": steps}}) == 0
        assert fake.errors == []
        for i in range(3):
            for fs in (f"src/data/p{i}", *(f"src/data/p{i}/c{j}" for j in range(3))):
                assert fake.world.snapshots(f"{ROOT}/{fs}") == ["s0", "s1"], (steps, fs)
        counts.append(Counter(c[1] for c in fake.calls))
    serial, parallel = counts
    assert parallel == serial, (serial, parallel)
    assert serial["list"] > 0 and serial["recv"] == 24  # 12 filesystems, a full and an incremental stream


def test_local_lanes_share_the_runs_bandwidth_buckets(fake_zfs, world, tmp_path, monkeypatch):
    """Each lane of a local run used to make its own TokenBuckets, so `steps = 3` let three times
    the configured rate through; every pair of the run must draw from the same buckets."""
    pairs: list[tuple[zrepl.Connection, zrepl.Connection]] = []
    local_pair = zrepl.local_pair

    def recording_pair(*args, **kwargs):
        pair = local_pair(*args, **kwargs)
        pairs.append(pair)
        return pair

    monkeypatch.setattr(zrepl, "local_pair", recording_pair)
    build(world, 1)
    limit = {"max": "100 MiB", "bucket_capacity": "1 MiB"}
    cfg = write_config(tmp_path, push_job(filesystems={"src/data<": True}, keep_sender=[not_replicated(), last_n(30)],
                                          keep_receiver=[last_n(30)], send={"bandwidth_limit": limit},
                                          replication={"concurrency": {"steps": 3}}),
                       sink_job(root_fs="dst/sink", recv={"bandwidth_limit": limit}))
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    for fs in filesystems():
        assert world.snapshots(f"{ROOT}/{fs}") == ["s0"]
    assert len(pairs) >= 3  # the run's own pair and its lanes
    assert len({id(client.send_limit) for client, _ in pairs}) == 1 and pairs[0][0].send_limit is not None
    assert len({id(server.recv_limit) for _, server in pairs}) == 1 and pairs[0][1].recv_limit is not None
    assert all(client.recv_limit is None and server.send_limit is None for client, server in pairs)


@pytest.mark.parametrize("size_estimates", [1, 3])
def test_a_dry_runs_estimates_run_size_estimates_at_a_time(fake_zfs, world, tmp_path, size_estimates):
    """replication.concurrency.size_estimates: that many `zfs send -n` at once (zrepl's key); each
    of the first three estimates hangs until all three have started, which only happens in parallel."""
    build(world, 1)
    hung = [fake_zfs.hang("send", match=f"src/data/fs{i}@", times=1) for i in range(3)]
    cfg = write_config(tmp_path, push_job(filesystems={"src/data<": True}, keep_sender=[last_n(30)],
                                          keep_receiver=[last_n(30)],
                                          replication={"concurrency": {"size_estimates": size_estimates}}),
                       sink_job(root_fs="dst/sink"))
    results: list = []
    runner = threading.Thread(target=lambda: results.append(run("--config", cfg, "run", "push", "--dry-run",
                                                                 zfs=fake_zfs)))
    runner.start()
    try:
        hung[0].entered.wait(WAIT)
        started_together = all(rule.entered.wait(WAIT if size_estimates > 1 else 0.5) for rule in hung)
    finally:
        for rule in hung:
            rule.release()
        runner.join(WAIT)
    assert started_together == (size_estimates >= 3)
    assert results and results[0].code == 0, results
    estimates = [line for line in results[0].stdout.splitlines() if line.strip().startswith("estimate ")]
    assert len(estimates) == N  # every child (src/data itself has no snapshot), in plan order
    assert not [c for c in fake_zfs.calls if c[1] == "send" and "-n" not in c]


def test_parallel_lanes_block_the_child_of_a_failed_parent_and_leave_it_unheld(fake_zfs, world, tmp_path):
    world.tree("src", "data/p @a\ndata/p/child @b\ndata/q @c")
    fake_zfs.fail("recv", match=f"{ROOT}/src/data/p")
    assert push(fake_zfs, tmp_path, filesystems={"src/data/p<": True, "src/data/q": True},
                replication={"concurrency": {"steps": 3}}) == 1
    assert world.holds("src/data/p@a") == {STEP}  # the failed step keeps its hold (resumability)
    assert world.holds("src/data/p/child@b") == set() and not world.exists(f"{ROOT}/src/data/p/child")
    assert world.snapshots(f"{ROOT}/src/data/q") == ["c"] and world.holds("src/data/q@c") == set()


def test_the_status_shows_the_size_zfs_send_states_without_an_estimate(fake_zfs, world, tmp_path):
    build(world, 1)
    world.write("src/data/fs0", 1 << 20)
    world.snapshot("src/data/fs0@big")
    assert push(fake_zfs, tmp_path) == 0
    assert not [c for c in fake_zfs.calls if c[1] == "send" and "-n" in c]
    rep = fs_status(tmp_path / "zrepl.toml", "push", "src/data/fs0")
    assert rep["bytes_expected"] and rep["bytes_expected"] >= 1 << 20
    assert rep["bytes_replicated"] >= rep["bytes_expected"]


def test_a_pull_asks_the_source_for_estimates_and_protects_only_what_it_sends(fake_zfs, world, tmp_path):
    world.tree("prod", "data/p @a\ndata/p/child @b")
    world.tree("backup", "pulled")
    fake_zfs.fail("recv", match="backup/pulled/prod/data/p")
    cfg = write_config(tmp_path, source_job(filesystems={"prod/data/p<": True}), pull_job(root_fs="backup/pulled"))
    assert run("--config", cfg, "run", "pull", zfs=fake_zfs).code == 1
    assert [c for c in fake_zfs.calls if c[1] == "send" and "-n" in c]  # the source's stderr stays there
    assert world.holds("prod/data/p@a") == {"zrepl_STEP_J_source"}
    assert world.holds("prod/data/p/child@b") == set()  # blocked: never protected on the source


def test_a_replica_the_receiver_could_not_hold_gets_no_cursor_until_its_arrival_is_listed(fake_zfs, world, tmp_path):
    build(world, 1)
    assert push(fake_zfs, tmp_path) == 0
    for fs in filesystems():
        world.snapshot(f"{fs}@new")
    bad = f"{ROOT}/src/data/fs1@new"
    # zfs names the one snapshot it could not hold (the double changes nothing for a failed command)
    fake_zfs.fail("hold", match=RECEIVED, stderr=f"cannot hold snapshot '{bad}': permission denied\n", times=1)
    fake_zfs.calls.clear()
    push(fake_zfs, tmp_path)
    batch = next(i for i, c in enumerate(fake_zfs.calls) if c[1] == "hold" and c[2] == RECEIVED)
    first_release = next(c for c in fake_zfs.calls[batch:] if c[1] == "release" and c[2] == RECEIVED)
    assert f"{ROOT}/src/data/fs1@s0" not in first_release  # its base keeps the receiver's hold
    first_cursors = [c[2] for c in fake_zfs.calls[batch:] if c[1] == "bookmark"][:3]
    assert first_cursors == ["src/data/fs0@new", "src/data/fs2@new", "src/data/fs3@new"]
    # the retry's planning lists the replica, sees @new arrived, and puts cursor and hold in place
    for fs in filesystems():
        assert world.bookmarks(fs) == [zrepl.cursor_bookmark_name(world.guid(f"{fs}@new"), "push")]
        assert world.holds(f"{fs}@new") == set() and world.holds(f"{fs}@s0") == set()
    assert world.holds(bad) == {RECEIVED} and world.holds(f"{ROOT}/src/data/fs1@s0") == set()


def test_a_receiver_that_cannot_batch_checks_and_holds_in_each_receive(fake_zfs, world, tmp_path, monkeypatch):
    """An older sink's endpoint.info reply does not say batched_holds: no defer_hold, no batch."""
    wire = zrepl.PeerInfo.to_wire
    monkeypatch.setattr(zrepl.PeerInfo, "to_wire", lambda self: {k: v for k, v in wire(self).items()
                                                                   if k != "batched_holds"})
    build(world, 1)
    assert push(fake_zfs, tmp_path) == 0
    for fs in filesystems():
        verbs = sorted(c[1] for c in per_filesystem(fake_zfs.calls, fs))
        assert verbs == ["bookmark", "hold", "list", "recv", "send"], (fs, verbs)
        assert world.holds(f"{ROOT}/{fs}@s0") == {RECEIVED}


def test_a_filesystem_gone_since_the_listing_fails_only_itself_in_the_batched_hold(fake_zfs, world, tmp_path):
    build(world, 1)
    fake_zfs.fail("hold", match=STEP, stderr="cannot open 'src/data/fs2': dataset does not exist\n", times=1)
    assert push(fake_zfs, tmp_path) == 0  # the retry's planning finds it (the double only said so)
    step_holds = [i for i, c in enumerate(fake_zfs.calls) if c[1] == "hold" and c[2] == STEP]
    first_attempt = [c[-1].split("@")[0] for c in fake_zfs.calls[step_holds[0]:step_holds[1]] if c[1] == "send"]
    assert first_attempt == ["src/data/fs0", "src/data/fs1", "src/data/fs3"]
    assert fake_zfs.calls[step_holds[1]] == ["zfs", "hold", STEP, "src/data/fs2@s0"]
    assert all(world.snapshots(f"{ROOT}/{fs}") == ["s0"] for fs in filesystems())


def test_another_tools_holds_cost_one_zfs_holds_per_side_on_a_no_op_run(fake_zfs, world, tmp_path):
    # zfs-autobackup holds what it sends, admins hold old snapshots: nothing of ours to heal, so
    # a no-op run asks whose holds they are once per side (not a listing and `zfs holds` per
    # filesystem), releases nothing and re-lists nothing for pruning
    build(world, 3)
    assert push(fake_zfs, tmp_path, initial_replication="all") == 0
    for fs in filesystems():
        world.hold("zfs_autobackup:x", f"{fs}@s0")
        world.hold("keep", f"{ROOT}/{fs}@s0")
    fake_zfs.calls.clear()
    assert push(fake_zfs, tmp_path, initial_replication="all") == 0
    # (the `get`: src/data itself has no snapshots, so its replica's placeholder state is asked)
    assert sorted(c[1] for c in fake_zfs.calls) == ["get", "holds", "holds", "list", "list"], fake_zfs.calls
    assert [c for c in fake_zfs.calls if c[1] == "holds"] == [
        ["zfs", "holds", "-H", *(f"{fs}@s0" for fs in filesystems())],
        ["zfs", "holds", "-H", *(f"{ROOT}/{fs}@s0" for fs in filesystems())]]
    for fs in filesystems():
        assert world.holds(f"{fs}@s0") == {"zfs_autobackup:x"} and world.holds(f"{ROOT}/{fs}@s0") == {"keep"}


def test_a_stale_hold_of_ours_beside_another_tools_is_still_released(fake_zfs, world, tmp_path):
    build(world, 3)
    assert push(fake_zfs, tmp_path, initial_replication="all") == 0
    world.hold("zfs_autobackup:x", "src/data/fs0@s0")
    world.hold(STEP, "src/data/fs1@s1")  # left by a crash during completion
    world.hold(RECEIVED, f"{ROOT}/src/data/fs2@s0")  # an older last-received hold, left likewise
    assert push(fake_zfs, tmp_path, initial_replication="all") == 0
    assert world.holds("src/data/fs0@s0") == {"zfs_autobackup:x"}
    assert world.holds("src/data/fs1@s1") == set()
    assert world.holds(f"{ROOT}/src/data/fs2@s0") == set()
    assert world.holds(f"{ROOT}/src/data/fs2@s2") == {RECEIVED}
