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

import os
import time

import pytest

from zfstest import REAL_ZFS, run, send_recv, zfs

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
