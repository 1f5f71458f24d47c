"""What the run-wide batches of step holds and releases rely on (Zfs.hold_many/release_many): one
`zfs hold`/`zfs release` takes snapshots of several datasets and pools, goes on past a snapshot
it cannot hold or release, and names each such snapshot on its own stderr line."""

from __future__ import annotations

from zfstest import ZFS, zfs

TAG = "zrepl_STEP_J_batch"


def holds(snapshot: str) -> set[str]:
    return {line.split("\t")[1] for line in zfs("holds", "-H", snapshot).splitlines()}


def test_one_hold_and_one_release_cover_several_datasets_and_pools(make_pool, zfs_tree):
    a, b = make_pool("a"), make_pool("b")
    zfs_tree(a, "x @s\ny @s")
    zfs_tree(b, "z @s")
    snaps = [f"{a}/x@s", f"{a}/y@s", f"{b}/z@s"]
    z = ZFS
    assert z.hold_many(TAG, snaps) == {}
    assert all(holds(s) == {TAG} for s in snaps)
    assert z.release_many(TAG, snaps) == {}
    assert all(holds(s) == set() for s in snaps)


def test_a_tag_already_there_is_held_and_a_tag_not_there_is_released(make_pool, zfs_tree):
    a = make_pool("a")
    zfs_tree(a, "x @s\ny @s")
    z = ZFS
    zfs("hold", TAG, f"{a}/x@s")
    assert z.hold_many(TAG, [f"{a}/x@s", f"{a}/y@s"]) == {}  # x: "tag already exists", y held anyway
    assert holds(f"{a}/y@s") == {TAG}
    zfs("release", TAG, f"{a}/x@s")
    assert z.release_many(TAG, [f"{a}/x@s", f"{a}/y@s"]) == {}  # x: "no such tag", y released anyway
    assert holds(f"{a}/y@s") == set()


def test_a_snapshot_that_cannot_be_held_is_named_and_the_others_are_held(make_pool, zfs_tree):
    a = make_pool("a")
    zfs_tree(a, "x @s\ny @s")
    z = ZFS
    failed = z.hold_many(TAG, [f"{a}/x@s", f"{a}/x@gone", f"{a}/y@s"])
    assert list(failed) == [f"{a}/x@gone"]
    assert holds(f"{a}/x@s") == {TAG} and holds(f"{a}/y@s") == {TAG}
    assert z.release_many(TAG, [f"{a}/x@s", f"{a}/x@gone", f"{a}/y@s"]) == {}  # gone: nothing held
