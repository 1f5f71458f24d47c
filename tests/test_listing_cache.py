"""The snapshots_changed listing cache (issue 12 item 2) on the ZFS double: it may only save work.

Every test compares the cached answer with a plain listing of the same world (`same_answer`), and
counts what was spawned. The double stamps snapshots_changed like OpenZFS 2.2+ (the second of
each snapshot create, destroy or receive; never for holds or bookmarks), with the world's clock,
which the tests move by hand. What real ZFS does is in tests/zfs/test_listing_cache_zfs.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs

T0 = 1_800_000_000.25


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock) -> FakeZfs:
    fake = FakeZfs(clock=clock)
    fake.snapshots_changed = True  # as on OpenZFS 2.2+ (the host has no /sys/module/zfs/version)
    fake.world.tree("tank", "a @1 @2 @3 #b1=2\nb @1 @2\nc\nc/d @1")
    fake.world.hold("zrepl_last_received_J_push", "tank/a@3")
    clock.now += 60  # the first listing comes a minute after the world was made
    return fake


@pytest.fixture
def cache(tmp_path) -> zrepl.ListingCache:
    return zrepl.ListingCache(str(tmp_path / "listings" / "push-sender.jsonl"), "push sender", min_snapshots=0)


def same_answer(fake: FakeZfs, cached: dict[str, zrepl.DatasetInfo]) -> None:
    plain = zrepl.Zfs.list_datasets(fake, ["tank"])  # no cache
    assert cached == plain


def listed(fake: FakeZfs, cache: zrepl.ListingCache) -> tuple[dict[str, zrepl.DatasetInfo], list[list[str]]]:
    fake.calls.clear()
    listing = fake.list_datasets(["tank"], cache=cache)
    return listing, [c for c in fake.calls]


def test_a_first_listing_is_one_full_listing_and_fills_the_cache(fake, cache, clock):
    listing, calls = listed(fake, cache)
    assert len(calls) == 1 and "snapshot" in calls[0][calls[0].index("-t") + 1]
    same_answer(fake, listing)
    lines = Path(cache.path).read_text().splitlines()
    assert json.loads(lines[0]) == {"format": zrepl.LISTING_CACHE_FORMAT, "owner": "push sender"}
    assert {json.loads(line)["name"] for line in lines[1:]} == {"tank", "tank/a", "tank/b", "tank/c", "tank/c/d"}
    assert os.stat(cache.path).st_mode & 0o777 == 0o600


def test_unchanged_datasets_come_from_the_cache_with_their_held_snapshots_asked_again(fake, cache, clock):
    listed(fake, cache)
    clock.now += 60
    listing, calls = listed(fake, cache)
    verbs = [(c[1], c[c.index("-t") + 1] if "-t" in c else "") for c in calls]
    # the cheap listing (no snapshots), then `zfs holds` of the one held snapshot: no snapshot listing
    assert verbs == [("list", "filesystem,volume,bookmark"), ("holds", "")]
    assert calls[1][-1] == "tank/a@3"
    same_answer(fake, listing)


def test_a_snapshot_made_by_another_tool_is_seen_and_only_that_dataset_listed_again(fake, cache, clock):
    listed(fake, cache)
    clock.now += 60
    fake.world.snapshot("tank/b@3")  # another tool, between runs
    clock.now += 60
    listing, calls = listed(fake, cache)
    snapshot_listings = [c for c in calls if c[1] == "list" and "snapshot" in c[c.index("-t") + 1]]
    assert len(snapshot_listings) == 1 and snapshot_listings[0][-1] == "tank/b" and "-d" in snapshot_listings[0]
    assert [v.name for v in listing["tank/b"].snapshots()] == ["1", "2", "3"]
    same_answer(fake, listing)


def test_destroyed_snapshots_and_a_dataset_created_again_under_its_name_are_seen(fake, cache, clock):
    listed(fake, cache)
    clock.now += 60
    fake.world.destroy("tank/a@1")
    fake.world.destroy("tank/c/d")
    fake.world.tree("tank", "c/d @9")  # a new guid under the old name
    clock.now += 60
    listing, _ = listed(fake, cache)
    assert [v.name for v in listing["tank/c/d"].snapshots()] == ["9"]
    assert [v.name for v in listing["tank/a"].snapshots()] == ["2", "3"]
    same_answer(fake, listing)


def test_a_change_in_the_second_the_cached_listing_began_is_not_missed(fake, cache, clock):
    clock.now = 1_800_000_100.0
    fake.world.snapshot("tank/b@3")  # the value is this second...
    listed(fake, cache)  # ...and so is the listing: the value cannot tell a later change apart
    fake.world.snapshot("tank/b@4")  # same second: the value stays
    clock.now += 60
    listing, _ = listed(fake, cache)
    assert [v.name for v in listing["tank/b"].snapshots()] == ["1", "2", "3", "4"]
    same_answer(fake, listing)


def test_holds_and_bookmarks_changed_by_others_are_never_answered_from_the_cache(fake, cache, clock):
    listed(fake, cache)
    clock.now += 60
    fake.world.datasets["tank/a"].snapshots[2].holds.clear()  # someone released our hold
    fake.world.bookmark("tank/b@2", "tank/b#other")  # bookmarks do not move snapshots_changed
    fake.world.destroy("tank/a#b1")
    listing, _ = listed(fake, cache)
    assert listing["tank/a"].snapshots()[2].userrefs == 0
    assert [v.name for v in listing["tank/b"].bookmarks()] == ["other"]
    assert listing["tank/a"].bookmarks() == []
    same_answer(fake, listing)


def test_our_own_holds_and_releases_drop_the_dataset_before_they_run(fake, cache, clock):
    listed(fake, cache)
    clock.now += 60
    fake.hold_many("zrepl_STEP_J_push", ["tank/b@2"])
    # a crash right here: the next run must see the hold, so the file already forgot tank/b
    fresh = zrepl.ListingCache(cache.path, cache.owner, min_snapshots=0)
    assert "tank/b" not in fresh.load() and "tank/a" in fresh.load()
    listing, calls = listed(fake, fresh)
    assert listing["tank/b"].snapshots()[1].userrefs == 1
    assert any(c[1] == "list" and c[-1] == "tank/b" for c in calls)
    same_answer(fake, listing)
    fake.release_many("zrepl_STEP_J_push", ["tank/b@2"])
    assert "tank/b" not in zrepl.ListingCache(cache.path, cache.owner).load()


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],  # cut in the middle of a line
    lambda text: text.replace('"guid": ', '"guid": -', 1),
    lambda text: text.replace('"tank/b"', '"tank/b@x"', 1),
    lambda text: "\x00garbage\n" + text,
    lambda text: text.replace('"push sender"', '"another job"', 1),  # a foreign cache
    lambda text: text.replace(zrepl.LISTING_CACHE_FORMAT, "zrepl.py listing cache 0", 1),
])
def test_a_corrupt_or_foreign_cache_means_a_full_listing(fake, cache, clock, damage):
    listed(fake, cache)
    clock.now += 60
    fake.world.snapshot("tank/b@3")
    clock.now += 60
    Path(cache.path).write_text(damage(Path(cache.path).read_text()))
    listing, calls = listed(fake, cache)
    assert len(calls) == 1 and "snapshot" in calls[0][calls[0].index("-t") + 1]  # the full listing
    same_answer(fake, listing)
    assert zrepl.ListingCache(cache.path, cache.owner).load()  # and written anew


def test_a_cache_that_lies_about_snapshots_of_a_moved_dataset_is_not_believed(fake, cache, clock):
    listed(fake, cache)
    text = Path(cache.path).read_text().replace('["1", ', '["forged", ', 1)
    Path(cache.path).write_text(text)
    clock.now += 60
    fake.world.snapshot("tank/a@4")
    fake.world.snapshot("tank/b@3")
    fake.world.snapshot("tank/c/d@2")
    clock.now += 60
    listing, _ = listed(fake, cache)
    same_answer(fake, listing)


def test_a_clock_gone_back_trusts_nothing(fake, cache, clock):
    listed(fake, cache)
    clock.now -= 3600
    listing, calls = listed(fake, cache)
    assert any(c[1] == "list" and "snapshot" in c[c.index("-t") + 1] for c in calls)
    same_answer(fake, listing)


def test_small_pools_keep_one_full_listing(fake, tmp_path, clock):
    cache = zrepl.ListingCache(str(tmp_path / "c.jsonl"), "o")  # default threshold: 1,000 snapshots
    listed(fake, cache)
    clock.now += 60
    _, calls = listed(fake, cache)
    assert len(calls) == 1 and "snapshot" in calls[0][calls[0].index("-t") + 1]


def test_openzfs_without_the_property_lists_as_before(fake, cache):
    fake.fail("list", "bad property list: invalid property 'snapshots_changed'\n", exit_code=2,
              match="snapshots_changed")
    listing, calls = listed(fake, cache)
    assert len(calls) == 2 and "snapshots_changed" not in calls[1][calls[1].index("-o") + 1]
    assert fake.snapshots_changed is False
    same_answer(fake, listing)
    _, calls = listed(fake, cache)
    assert len(calls) == 1  # known now: no second try


def test_without_a_module_version_there_is_no_cache(tmp_path, monkeypatch):
    fake = FakeZfs()
    fake.world.tree("tank", "a @1")
    monkeypatch.setattr(zrepl, "openzfs_module_version", lambda: None)
    cache = zrepl.ListingCache(str(tmp_path / "c.jsonl"), "o", min_snapshots=0)
    fake.list_datasets(["tank"], cache=cache)
    assert not os.path.exists(cache.path) and fake.snapshots_changed is False
    monkeypatch.undo()
    assert zrepl.openzfs_module_version(str(tmp_path / "missing")) is None
    (tmp_path / "version").write_text("2.2.0-1\n")
    assert zrepl.openzfs_module_version(str(tmp_path / "version")) == (2, 2)


def test_a_read_only_cache_answers_but_never_writes(fake, tmp_path, clock):
    path = str(tmp_path / "c.jsonl")
    listed(fake, zrepl.ListingCache(path, "o", min_snapshots=0))  # (gone after this line)
    before = Path(path).read_text()
    clock.now += 60
    fake.world.snapshot("tank/b@3")
    clock.now += 60
    dry = zrepl.ListingCache(path, "o", writable=False, min_snapshots=0)
    listing, _ = listed(fake, dry)
    same_answer(fake, listing)
    fake.hold_many("t", ["tank/a@1"])
    assert Path(dry.path).read_text() == before


def test_the_rule_on_stamps():
    def entry(changed: int, guid: int = 7, origin: str = "", listed_at: float = T0) -> zrepl.CachedSnapshots:
        return zrepl.CachedSnapshots(zrepl.SnapshotsStamp(guid, changed, origin), listed_at, [])
    cached = {"p/a": entry(1_799_999_999), "p/same_second": entry(1_800_000_000), "p/never": entry(0),
              "p/clone": entry(0)}
    current = {name: e.stamp for name, e in cached.items()}
    current["p/clone"] = zrepl.SnapshotsStamp(7, 0, "p/x@s")  # promoted: only its origin moved
    current["p/new"] = zrepl.SnapshotsStamp(9, 0, "")
    assert zrepl.stale_snapshot_lists(cached, current, T0 + 60) == {"p/same_second", "p/clone", "p/new"}
    assert zrepl.stale_snapshot_lists(cached, current, T0 - 1) == set(current)


# ---- whole runs: the same decisions with and without the cache --------------------------------

def world_state(fake: FakeZfs) -> dict[str, tuple]:
    """Everything a run can change: each dataset's snapshots with their holds, and its bookmarks."""
    w = fake.world
    return {name: (tuple((s.name, tuple(sorted(s.holds))) for s in ds.snapshots),
                   tuple(sorted(b.name for b in ds.bookmarks)))
            for name, ds in sorted(w.datasets.items())}


def between_runs(fake: FakeZfs, step: int) -> None:
    """What other tools and admins do between runs, none of which a cache may hide."""
    w = fake.world
    if step == 1:
        w.snapshot("src/data/fs1@s3")  # new work for one filesystem
    elif step == 2:
        w.hold("backup-tool", "src/data/fs0@s1")  # another tool holds what pruning would destroy
        w.snapshot("src/data/fs0@s3", "src/data/fs0@s4", "src/data/fs0@s5")
    elif step == 3:
        w.datasets["dst/sink/client1/src/data/fs2"].snapshots[-1].holds.clear()  # an admin's release
    elif step == 4:
        w.datasets["src/data/fs0"].snapshots[1].holds.clear()  # the other tool is done
        w.snapshot("src/data/fs3@s3")
        w.destroy("dst/sink/client1/src/data/fs3@s0")  # an admin prunes the replica by hand
    elif step == 5:
        w.bookmark("src/data/fs1@s1", "src/data/fs1#mine")
    elif step == 6:  # a hold the cache cannot see (no snapshot list moves), on what pruning destroys next
        w.hold("backup-tool", "src/data/fs2@s1")


def replay(tmp_path: Path, cached: bool, monkeypatch) -> tuple[list[int], list[dict], FakeZfs]:
    from support import last_n, not_replicated, push_job, run, sink_job, write_config
    clock = Clock()
    fake = FakeZfs(clock=clock)
    fake.snapshots_changed = cached
    monkeypatch.setattr(zrepl, "LISTING_CACHE_MIN_SNAPSHOTS", 0)
    fake.world.tree("src", "\n".join(f"data/fs{i} @s0 @s1 @s2" for i in range(4)))
    fake.world.tree("dst", "sink")
    def config(keep: int) -> Path:
        return write_config(tmp_path, push_job(filesystems={"src/data<": True},
                                               keep_sender=[not_replicated(), last_n(keep)],
                                               keep_receiver=[last_n(3)], initial_replication="all"),
                            sink_job(root_fs="dst/sink"))
    codes, states = [], []
    for step in range(8):
        cfg = config(3 if step < 7 else 1)  # the last run's rules destroy more than the others'
        clock.now += 60
        between_runs(fake, step)
        clock.now += 60
        codes.append(run("--config", cfg, "run", "push", zfs=fake).code)
        states.append(world_state(fake))
    assert fake.errors == []
    return codes, states, fake


def test_runs_decide_the_same_with_the_cache_as_without(tmp_path, monkeypatch):
    codes, states, fake = replay(tmp_path / "cached", True, monkeypatch)
    plain_codes, plain_states, plain = replay(tmp_path / "plain", False, monkeypatch)
    assert codes == plain_codes
    for step, (got, want) in enumerate(zip(states, plain_states, strict=True)):
        assert got == want, f"after run {step}"
    assert [s.name for s in fake.world.datasets["src/data/fs2"].snapshots] == ["s1", "s2"]  # held: kept
    held = [c for c in fake.calls if c[1] == "destroy" and c[-1].startswith("src/data/fs2@")]
    assert len(held) > 1  # the cached listing did not know the hold: `zfs destroy` refused it
    # and the cache did save work: fewer snapshot rows listed
    def snapshot_listings(f: FakeZfs) -> int:
        return sum(1 for c in f.calls if c[1] == "list" and "snapshot" in c[c.index("-t") + 1])
    assert snapshot_listings(fake) < snapshot_listings(plain)
    files = list((tmp_path / "cached" / "run" / "listings").iterdir())
    assert len(files) == 2  # the job's sender side and the sink's side for client1


def test_a_hold_between_a_listing_and_its_store_keeps_that_dataset_out(fake, cache, clock):
    listed(fake, cache)
    clock.now += 60
    mark = cache.mark()
    entries = cache.load()
    fake.hold_many("zrepl_STEP_J_push", ["tank/b@1"])  # another lane, while this listing ran
    cache.store(entries, mark)
    assert "tank/b" not in zrepl.ListingCache(cache.path, cache.owner).load()
    assert "tank/a" in zrepl.ListingCache(cache.path, cache.owner).load()


def test_the_threshold_is_1000_snapshots_unless_the_test_environment_lowers_it(monkeypatch, tmp_path):
    path = str(tmp_path / "c.jsonl")
    assert zrepl.ListingCache(path, "o").min_snapshots == zrepl.LISTING_CACHE_MIN_SNAPSHOTS == 1000
    monkeypatch.setenv("ZREPL_LISTING_CACHE_MIN_SNAPSHOTS", "40")
    assert zrepl.ListingCache(path, "o").min_snapshots == 40
    monkeypatch.setenv("ZREPL_LISTING_CACHE_MIN_SNAPSHOTS", "-3")  # not a count: the default
    assert zrepl.ListingCache(path, "o").min_snapshots == 1000
