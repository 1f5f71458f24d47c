"""What a listing cache built on `snapshots_changed` could rely on (issue 12 item 2), on real ZFS.

OpenZFS 2.2 added the read-only property `snapshots_changed`: the wall-clock time at which the
dataset's own list of snapshots last changed. A cache may reuse a dataset's cached snapshot list
only while that value has not moved; so these tests pin down, on the guest's OpenZFS:

- which changes move it (snapshot created, destroyed, renamed, received, rolled back; `zfs snapshot
  -r` moves every child's) and which do NOT (holds and releases, bookmarks created and destroyed,
  a child's snapshot, a new child filesystem, a property set, a filesystem renamed, and the clone
  of a `zfs promote`, which gains snapshots): whatever does not move it (holds: `userrefs`;
  bookmarks: the cursors) must never be answered from a cache, and a promote is seen only in
  `origin`, which changes on both datasets;
- its resolution: whole seconds, also with `-p`, and the value written is the time of the change
  (between the command's start and end). Two changes in one second can leave the same value, so a
  cached value is only trustworthy when it is OLDER than the second in which the cached listing
  began: a later change then carries a value at least that second, i.e. a different one;
- `-` (not a number) on a dataset whose snapshots never changed;
- OpenZFS 2.1 does not know the property at all (a run there must keep listing everything).

Each change is made just after the clock passed the current value's second, so that a change that
moves the value cannot leave it equal by falling into the same second; no fixed sleeps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time

import pytest

import zrepl
from repltest import push_sink
from support import last_n, not_replicated, snapshots, write_config
from zfstest import REAL_ZFS, ZFS, run, send_recv, zfs

OLD_ZFS = os.environ.get("ZREPL_TEST_ZFS", "2.3") == "2.1"
needs_property = pytest.mark.skipif(OLD_ZFS, reason="snapshots_changed is OpenZFS 2.2+")


def changed(dataset: str) -> str:
    """`snapshots_changed` as `zfs get -Hp` prints it ("-" or unix seconds)."""
    return zfs("get", "-Hp", "-o", "value", "snapshots_changed", dataset).strip()


def after_second_of(value: str) -> None:
    """Wait until the wall clock is past the second `value` names (at most a second or so)."""
    if value == "-":
        return
    deadline = time.monotonic() + 30  # 10x margin and more over the wait itself
    while time.time() < int(value) + 1:
        assert time.monotonic() < deadline, "the wall clock did not move past snapshots_changed"
        time.sleep(0.05)


def change(dataset: str, *argv: str) -> tuple[str, str, float, float]:
    """Run `zfs argv` after the clock passed the dataset's value: (before, after, start, end)."""
    before = changed(dataset)
    after_second_of(before)
    start = time.time()
    zfs(*argv)
    end = time.time()
    return before, changed(dataset), start, end


def assert_moved_to_the_change(before: str, after: str, start: float, end: float) -> None:
    assert after != "-" and after.isdigit(), after
    assert after != before
    assert int(start) <= int(after) <= int(end), (before, after, start, end)


@needs_property
def test_snapshot_list_changes_move_it_and_holds_bookmarks_do_not(pool):
    fs = f"{pool}/a"
    zfs("create", fs)
    zfs("create", f"{fs}/child")
    assert changed(fs) == "-"  # no snapshot ever: not a number

    assert_moved_to_the_change(*change(fs, "snapshot", f"{fs}@s1"))
    assert_moved_to_the_change(*change(fs, "snapshot", f"{fs}@s2"))

    # None of these touch the list of snapshots: the value stays, so holds (userrefs) and
    # bookmarks (our cursors) can never be served from a cache validated by this value.
    for argv in (("hold", "t", f"{fs}@s1"), ("release", "t", f"{fs}@s1"),
                 ("bookmark", f"{fs}@s1", f"{fs}#b1"), ("destroy", f"{fs}#b1"),
                 ("snapshot", f"{fs}/child@c1"), ("create", f"{fs}/child2"),
                 ("set", "zrepl:test=1", fs)):
        before, after, _, _ = change(fs, *argv)
        assert after == before, (argv, before, after)
    held = zfs("list", "-Hp", "-o", "userrefs", f"{fs}@s1").strip()
    assert held == "0"

    assert_moved_to_the_change(*change(fs, "rename", f"{fs}@s2", f"{fs}@s2r"))
    assert_moved_to_the_change(*change(fs, "destroy", f"{fs}@s2r"))

    # One recursive snapshot moves every dataset it snapshots, each to the change's second.
    before_child = changed(f"{fs}/child")
    before, after, start, end = change(fs, "snapshot", "-r", f"{fs}@r1")
    assert_moved_to_the_change(before, after, start, end)
    assert_moved_to_the_change(before_child, changed(f"{fs}/child"), start, end)
    assert changed(f"{fs}/child2") != "-"

    # Renaming the filesystem keeps both its guid and its value (a cache keyed by name sees a
    # vanished and a new dataset; keyed by guid, the same one).
    guid = zfs("get", "-Hp", "-o", "value", "guid", fs).strip()
    before = changed(fs)
    after_second_of(before)
    zfs("rename", fs, f"{pool}/moved")
    assert changed(f"{pool}/moved") == before
    assert zfs("get", "-Hp", "-o", "value", "guid", f"{pool}/moved").strip() == guid

    # The cheap listing a cache would start from: one line per filesystem, value in seconds.
    rows = [line.split("\t") for line in zfs("list", "-Hp", "-t", "filesystem,volume", "-o",
                                             "name,guid,snapshots_changed", "-r", pool).splitlines()]
    values = {name: value for name, _, value in rows}
    assert values[pool] == "-"
    assert all(v.isdigit() and len(v) <= 11 for n, v in values.items() if n != pool)  # seconds, not ns


@needs_property
def test_a_receive_moves_it_full_and_incremental(make_pool):
    src, dst = make_pool("src"), make_pool("dst")
    zfs("create", f"{src}/a")
    zfs("snapshot", f"{src}/a@1")
    zfs("snapshot", f"{src}/a@2")
    start = time.time()
    assert send_recv([f"{src}/a@1"], ["-u", f"{dst}/r"]).ok
    first = changed(f"{dst}/r")
    assert_moved_to_the_change("-", first, start, time.time())

    after_second_of(first)
    start = time.time()
    assert send_recv(["-i", f"{src}/a@1", f"{src}/a@2"], ["-u", f"{dst}/r"]).ok
    assert_moved_to_the_change(first, changed(f"{dst}/r"), start, time.time())


@needs_property
def test_a_rollback_moves_it_and_a_promote_moves_only_the_origins_value(pool):
    fs = f"{pool}/a"
    zfs("create", fs)
    for name in ("1", "2", "3"):
        zfs("snapshot", f"{fs}@{name}")
    assert_moved_to_the_change(*change(fs, "rollback", "-r", f"{fs}@1"))  # destroys @2 and @3

    # A promote moves the origin's snapshots up to the clone's origin over to the clone. The origin
    # (which lost them) moves; the clone, which gained them, does NOT: a cache validated by
    # snapshots_changed alone would serve the clone's old list. What does change on both is
    # `origin`, so a cache must validate it too.
    zfs("snapshot", f"{fs}@4")
    zfs("clone", f"{fs}@4", f"{pool}/clone")
    clone = f"{pool}/clone"
    before_origin, before_clone = changed(fs), changed(clone)
    assert before_clone == "-"
    origins = zfs("list", "-Hp", "-o", "origin", fs, clone).split()
    assert origins == ["-", f"{fs}@4"]
    after_second_of(before_origin)
    start = time.time()
    zfs("promote", clone)
    end = time.time()
    assert zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", clone).split() == [f"{clone}@1", f"{clone}@4"]
    assert_moved_to_the_change(before_origin, changed(fs), start, end)
    assert changed(clone) == before_clone
    assert zfs("list", "-Hp", "-o", "origin", fs, clone).split() == [f"{clone}@4", "-"]


@pytest.mark.skipif(not OLD_ZFS, reason="OpenZFS 2.1 only")
def test_openzfs_2_1_does_not_know_the_property(pool):
    proc = run([REAL_ZFS, "list", "-Hp", "-o", "name,snapshots_changed", pool], check=False)
    assert proc.returncode != 0
    assert "invalid property" in proc.stderr or "bad property list" in proc.stderr


# ---- the cache itself (zrepl.ListingCache through zrepl.Zfs) on real ZFS ------------------------

class CountingZfs(zrepl.Zfs):
    """The real zfs through zrepl's layer, remembering each argv it ran."""

    def __init__(self) -> None:
        super().__init__(zfs_bin=REAL_ZFS)
        self.snapshots_changed = True
        self.argvs: list[list[str]] = []

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def]
        self.argvs.append(list(argv))
        return super().run(argv, **kwargs)


def past_every_value(pool: str) -> None:
    """Wait until the clock is past the second of every snapshots_changed below the pool, so a
    listing from now on may be trusted by the next one."""
    values = [v for v in zfs("list", "-Hp", "-r", "-o", "snapshots_changed", pool).split() if v != "-"]
    after_second_of(str(max(map(int, values))) if values else "-")


def snapshot_listings(z: CountingZfs) -> list[list[str]]:
    return [a for a in z.argvs if a[1] == "list" and "snapshot" in a[a.index("-t") + 1]]


@needs_property
def test_cached_listings_answer_like_plain_ones_whatever_another_tool_changes(make_pool, tmp_path):
    src = make_pool("src")
    for fs in ("a", "b", "c", "c/d"):
        zfs("create", f"{src}/{fs}")
    for snap in ("a@1", "a@2", "b@1", "c/d@1"):
        zfs("snapshot", f"{src}/{snap}")
    zfs("bookmark", f"{src}/a@1", f"{src}/a#one")
    zfs("hold", "someone", f"{src}/a@2")
    z = CountingZfs()
    cache = zrepl.ListingCache(str(tmp_path / "cache.jsonl"), "test", min_snapshots=0)

    unseen_holds: set[str] = set()

    def check(what: str) -> None:
        z.argvs.clear()
        cached = z.list_datasets([src], cache=cache)
        plain = zrepl.Zfs(zfs_bin=REAL_ZFS).list_datasets([src])
        for ds in plain.values():  # see "a hold placed" below
            ds.versions = [dataclasses.replace(v, userrefs=0) if v.full_name in unseen_holds else v
                           for v in ds.versions]
        assert cached == plain, what

    past_every_value(src)
    check("first (full) listing")
    past_every_value(src)
    check("nothing changed")
    assert snapshot_listings(z) == []  # everything came from the cache...
    assert [a[1] for a in z.argvs] == ["list", "holds"]  # ...and the held snapshot was asked again

    changes = [
        ("a snapshot created", lambda: zfs("snapshot", f"{src}/b@2")),
        ("a snapshot destroyed", lambda: zfs("destroy", f"{src}/a@1")),
        ("a snapshot renamed", lambda: zfs("rename", f"{src}/b@2", f"{src}/b@two")),
        ("a hold released", lambda: zfs("release", "someone", f"{src}/a@2")),
        # A hold another tool places on a snapshot cached as not held is the one thing a cached
        # listing does not show (asking `zfs holds` of every snapshot would cost more than the
        # listing saves). It matters only when pruning destroys that snapshot, and there `zfs
        # destroy` refuses a held one: the pruner reports it held (tests/test_listing_cache.py
        # replays runs with and without the cache and finds the same result). Our own holds drop
        # the dataset from the cache before they are placed.
        ("a hold placed", lambda: (zfs("hold", "other", f"{src}/b@1"), unseen_holds.add(f"{src}/b@1"))),
        ("that hold released", lambda: (zfs("release", "other", f"{src}/b@1"), unseen_holds.clear())),
        ("a bookmark created", lambda: zfs("bookmark", f"{src}/b@1", f"{src}/b#mark")),
        ("a bookmark destroyed", lambda: zfs("destroy", f"{src}/a#one")),
        ("a rollback", lambda: zfs("rollback", "-r", f"{src}/b@1")),
        ("a snapshot below", lambda: zfs("snapshot", "-r", f"{src}/c@r")),
        ("a dataset destroyed and made again", lambda: (zfs("destroy", "-r", f"{src}/c/d"),
                                                        zfs("create", f"{src}/c/d"), zfs("snapshot", f"{src}/c/d@9"))),
        ("a clone promoted", lambda: (zfs("clone", f"{src}/c/d@9", f"{src}/e"), zfs("promote", f"{src}/e"))),
        ("a receive", lambda: send_recv([f"{src}/b@1"], ["-u", f"{src}/f"])),
    ]
    for what, act in changes:
        act()
        check(what + ", listed at once")  # possibly in the very second of the change
        past_every_value(src)
        check(what + ", listed a second later")


@needs_property
def test_a_corrupt_cache_is_ignored_and_written_anew(pool, tmp_path):
    zfs("create", f"{pool}/a")
    zfs("snapshot", f"{pool}/a@1")
    z = CountingZfs()
    path = tmp_path / "cache.jsonl"
    path.write_text('{"format": "zrepl.py listing cache 1", "owner": "test"}\n{"name": "' + pool + '/a", "gu')
    cache = zrepl.ListingCache(str(path), "test", min_snapshots=0)
    assert z.list_datasets([pool], cache=cache) == zrepl.Zfs(zfs_bin=REAL_ZFS).list_datasets([pool])
    assert len(z.argvs) == 1  # one full listing, as without a cache
    assert set(zrepl.ListingCache(str(path), "test").load()) == {pool, f"{pool}/a"}


@needs_property
def test_push_runs_with_the_cache_see_another_tools_changes_and_survive_a_corrupt_file(make_pool, zfs_tree,
                                                                                       zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(dst, "sink")
    zfs_tree(src, "\n".join(f"data/fs{i}" for i in range(10)), data=False)
    for k in range(5):  # 55 snapshots, over this test's threshold of 40 (1,000 by default: 20x the guest time)
        zfs("snapshot", "-r", f"{src}/data@s{k:03d}")
    cfg = write_config(tmp_path, *push_sink(src, dst, keep_sender=[not_replicated(), last_n(101)],
                                            keep_receiver=[last_n(101)]))

    def run_push() -> subprocess.CompletedProcess:
        return zfs_shim.run_zrepl("--config", cfg, "run", "push", extra_env={"ZREPL_LISTING_CACHE_MIN_SNAPSHOTS": "40"})
    proc = run_push()
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    # The sender's first run placed and released step holds on every filesystem, which drops them
    # from its cache: this no-op run's full listing fills it again.
    assert run_push().returncode == 0
    past_every_value(src)
    past_every_value(dst)
    zfs_shim.reset_log()
    proc = run_push()  # nothing to do
    assert proc.returncode == 0, proc.stderr
    lists = [c.argv for c in zfs_shim.calls("list")]
    sender = [c for c in lists if c[-1] == src]
    receiver = [c for c in lists if c[-1] == f"{dst}/sink/client1"]
    assert len(sender) == 1 and "filesystem,volume,bookmark" in sender[0], lists  # no snapshot listing
    # the sink holds 11 snapshots (initial replication: the newest of each), below the threshold
    assert len(receiver) == 1 and "filesystem,volume,snapshot,bookmark" in receiver[0], lists

    zfs("snapshot", f"{src}/data/fs3@new")  # another tool, between runs
    past_every_value(src)
    proc = run_push()
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, f"{target}/fs3")[-1] == "new"

    for listing in (tmp_path / "run" / "listings").iterdir():
        listing.write_text("garbage\n")
    zfs("snapshot", f"{src}/data/fs7@newer")
    proc = run_push()
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, f"{target}/fs7")[-1] == "newer"
    for listing in (tmp_path / "run" / "listings").iterdir():  # written anew
        assert json.loads(listing.read_text().splitlines()[0])["format"] == zrepl.LISTING_CACHE_FORMAT
