"""Pruning of both sides (push job, local sink) and of snap jobs, host-tested through the ZFS
double: keep rules applied per side in one batch per dataset, holds respected, bookmarks never
destroyed, a failed batch split in halves."""

from __future__ import annotations

from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import (changes, job_status, last_n, not_replicated, periodic, push_job, real_sends, regex, run,
                     sink_job, snap_job, write_config)

SRC, TARGET = "src/data", "dst/sink/client1/src/data"


@pytest.fixture
def world(fake_zfs: FakeZfs):
    w = fake_zfs.world
    w.tree("src", "data @a @b @c @d #mine=a")
    w.tree("dst", "sink")
    return w


def config(tmp_path: Path, **keys) -> Path:
    return write_config(tmp_path, push_job(filesystems={SRC: True}, initial_replication="all", **keys),
                        sink_job(root_fs="dst/sink"))


def push(fake: FakeZfs, cfg: Path):
    return run("--config", cfg, "run", "push", zfs=fake)


def destroys(fake: FakeZfs) -> list[list[str]]:
    """Snapshot destroys (pruning); bookmark destroys are the replication moving its cursor."""
    return [c for c in changes(fake.calls) if c[0] == "destroy" and "@" in c[1]]


def bookmark_destroys(fake: FakeZfs) -> list[str]:
    return [c[1] for c in changes(fake.calls) if c[0] == "destroy" and "#" in c[1]]


def test_keep_rules_prune_each_side_in_one_batch_per_dataset(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(2)], keep_receiver=[last_n(3)])
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    assert ["destroy", "src/data@a,b"] in destroys(fake_zfs) and ["destroy", f"{TARGET}@a"] in destroys(fake_zfs)
    assert world.snapshots(SRC) == ["c", "d"] and world.snapshots(TARGET) == ["b", "c", "d"]
    doc = job_status(cfg, "push")
    assert doc["pruning_sender"]["destroyed"] == ["src/data@a", "src/data@b"]
    assert doc["pruning_receiver"]["destroyed"] == [f"{TARGET}@a"]


def test_not_replicated_keeps_what_the_receiver_lacks(fake_zfs, world, tmp_path):
    fake_zfs.fail("recv", stderr="cannot receive: injected\n")
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(1)])
    assert push(fake_zfs, cfg).code == 1
    assert world.snapshots(SRC) == ["a", "b", "c", "d"] and destroys(fake_zfs) == []


def test_held_snapshots_are_kept_and_reported_with_their_tags(fake_zfs, world, tmp_path):
    world.hold("admin-keep", "src/data@a")
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(1)])
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    assert world.snapshots(SRC) == ["a", "d"] and ["destroy", "src/data@b,c"] in destroys(fake_zfs)
    assert job_status(cfg, "push")["pruning_sender"]["held"] == {"src/data@a": ["admin-keep"]}
    assert "not destroying src/data@a: held by admin-keep" in result.stderr


def test_bookmarks_are_never_pruned_and_the_cursor_carries_the_next_incremental(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, keep_sender=[regex("^never$")], keep_receiver=[regex("^never$")])
    assert push(fake_zfs, cfg).code == 0
    assert world.snapshots(SRC) == []  # the rules keep nothing on the sender ...
    cursor = zrepl.cursor_bookmark_name(world.guid(f"{TARGET}@d"), "push")
    assert world.bookmarks(SRC) == sorted(["mine", cursor])  # ... but bookmarks are not snapshots
    # the only bookmarks that went are this job's cursors the replication moved past
    assert all(b.startswith("src/data#zrepl_CURSOR_G_") and b.endswith("_J_push") and cursor not in b
               for b in bookmark_destroys(fake_zfs))
    # the receiver keeps its newest snapshot: the last-received hold protects the next base
    assert world.snapshots(TARGET) == ["d"] and world.holds(f"{TARGET}@d") == {"zrepl_last_received_J_sink"}
    world.tree("src", "data @e")
    fake_zfs.calls.clear()
    assert push(fake_zfs, cfg).code == 0
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "-i", f"src/data#{cursor}", "src/data@e"]]
    assert world.snapshots(TARGET) == ["e"]


def test_a_failed_destroy_batch_is_split_until_the_culprit_is_alone(fake_zfs, world, tmp_path):
    fake_zfs.fail("destroy", match="src/data@a", stderr="cannot destroy snapshot src/data@a: dataset is busy\n")
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(1)])
    result = push(fake_zfs, cfg)
    assert result.code == 1
    assert destroys(fake_zfs) == [["destroy", "src/data@a,b,c"], ["destroy", "src/data@a"],
                                  ["destroy", "src/data@b,c"]]
    assert world.snapshots(SRC) == ["a", "d"]
    doc = job_status(cfg, "push")
    assert list(doc["pruning_sender"]["errors"]) == ["src/data@a"]
    assert "pruning sender" in doc["last_run"]["failures"][SRC]


def test_a_snap_job_snapshots_each_pool_in_one_command_and_prunes(fake_zfs, tmp_path):
    w = fake_zfs.world
    w.tree("tank", "a @zrepl_old1 @zrepl_old2\nb\nb/c")
    w.tree("zroot", "home")
    for old in ("tank/a@zrepl_old1", "tank/a@zrepl_old2"):  # older than the interval: tank/a is due
        fake_zfs.tamper.creation(old, w.now() - 7200)
    cfg = write_config(tmp_path, snap_job(filesystems={"tank<": True, "zroot/home": True},
                                          snapshotting=periodic("1h"), keep=[last_n(2, regex="^zrepl_")]))
    result = run("--config", cfg, "run", "snap", zfs=fake_zfs)
    assert result.code == 0, result
    snapshots = [c for c in changes(fake_zfs.calls) if c[0] == "snapshot"]
    assert [len(c) - 1 for c in snapshots] == [4, 1]  # tank, tank/a, tank/b, tank/b/c; zroot/home
    [taken] = {c[1].partition("@")[2] for c in snapshots}
    assert taken.startswith("zrepl_") and w.snapshots("tank/a") == ["zrepl_old2", taken]
    assert ["destroy", "tank/a@zrepl_old1"] in changes(fake_zfs.calls)
    fake_zfs.calls.clear()
    assert run("--config", cfg, "run", "snap", zfs=fake_zfs).code == 0
    assert [c[1] for c in fake_zfs.calls] == ["list"]  # not due again within the hour: one listing, nothing else
