"""zrepl's replication diff tests and step-queue order, ported against the planner (section 6:
plan_filesystem, plan_filesystems, order_steps).

zrepl's IncrementalPath returns the list of versions to walk (from the common base to the newest);
our planner returns steps. A path [b, c, d] is one `zfs send -I b d` step (c an intermediate), a path
starting at a bookmark is `-i #a -> first` (and -I from there): the same versions, in the same order.
Each case names the zrepl file and test it comes from (zrepl/zrepl, internal/replication/...).
"""


import pytest


from zrepl import DatasetInfo, FilesystemPlan, PlanSettings, Step, Version, order_steps, plan_filesystem  # noqa: E402

SENDER, RECEIVER = "pool/src", "backup/src"


def fsvlist(ds: str, *specs: str) -> list[Version]:
    """zrepl's test helper: "@a,1" is snapshot a, "#a,1" bookmark a; the number is guid, createtxg
    and creation (seconds)."""
    versions = []
    for spec in specs:
        name, _, ident = spec[1:].partition(",")
        versions.append(Version(ds, name, "snapshot" if spec[0] == "@" else "bookmark", int(ident), int(ident),
                                int(ident)))
    return versions


def plan(receiver: list[str] | None, sender: list[str], placeholder: bool = False) -> FilesystemPlan:
    props = {"zrepl:placeholder": "on"} if placeholder else {}
    recv = None if receiver is None else DatasetInfo(RECEIVER, "filesystem", props=props,
                                                    versions=fsvlist(RECEIVER, *receiver))
    send = DatasetInfo(SENDER, "filesystem", versions=fsvlist(SENDER, *sender))
    return plan_filesystem(send, recv, PlanSettings(), receiver_fs=RECEIVER)


def path_of(p: FilesystemPlan) -> list[str]:
    """The plan as zrepl's incremental path: base, then every version received, by their relname."""
    assert p.error is None and p.steps, p.describe()
    first = p.steps[0]
    names = [] if first.from_version is None else [_rel(first.from_version)]
    for step in p.steps:
        names += [_rel(v) for v in step.received_versions()]
    return names


def _rel(v: Version) -> str:
    return ("@" if v.is_snapshot else "#") + v.name


# ---- internal/replication/logic/diff/diff_test.go: TestIncrementalPath_SnapshotsOnly ----

def test_basic_functionality():
    """diff_test.go TestIncrementalPath_SnapshotsOnly: basic functionality."""
    p = plan(["@a,1", "@b,2"], ["@a,1", "@b,2", "@c,3", "@d,4"])
    assert path_of(p) == ["@b", "@c", "@d"]
    assert len(p.steps) == 1 and p.steps[0].multi  # one -I stream (zrepl: one step per snapshot)


def test_no_common_ancestor_empty_receiver():
    """diff_test.go TestIncrementalPath_SnapshotsOnly: no common ancestor, receiver without versions.
    zrepl then resolves it by initial replication (conflict_resolution, default most_recent): a
    full send of the newest sender snapshot, as here. zrepl receives into the receiver dataset as it
    is; zrepl.py does that for a missing receiver or a placeholder only (below)."""
    assert path_of(plan(None, ["@a,1"])) == ["@a"]
    assert plan(None, ["@a,1"]).steps[0].is_full
    into_placeholder = plan([], ["@a,1"], placeholder=True)
    assert path_of(into_placeholder) == ["@a"] and into_placeholder.replace_placeholder


def test_empty_receiver_with_data_is_never_overwritten():
    """DIFFERS from zrepl: an existing receiver dataset without snapshots that is not a placeholder
    may hold data; zrepl.py refuses to receive over it (README: Coming from zrepl)."""
    p = plan([], ["@a,1"])
    assert p.error is not None and p.error.kind == "receiver-has-data"


def test_no_common_ancestor():
    """diff_test.go TestIncrementalPath_SnapshotsOnly: no common ancestor (ConflictNoCommonAncestor
    with both sides' versions)."""
    p = plan(["@a,1", "@b,2"], ["@c,3", "@d,4"])
    assert p.error is not None and p.error.kind == "no-common-base" and not p.steps
    assert p.error.details["receiver_snapshots"] == ["a", "b"]
    assert p.error.details["sender_snapshots"] == ["c", "d"]


def test_divergence_is_detected():
    """diff_test.go TestIncrementalPath_SnapshotsOnly: divergence is detected (ConflictDiverged)."""
    p = plan(["@a,1", "@b1,2"], ["@a,1", "@b2,3"])
    assert p.error is not None and p.error.kind == "diverged" and not p.steps
    d = p.error.details
    assert (d["common"], d["receiver_only"], d["sender_only"]) == ("a", ["b1"], ["b2"])


def test_gaps_before_most_recent_common_ancestor_do_not_matter():
    """diff_test.go TestIncrementalPath_SnapshotsOnly: gaps before most recent common ancestor."""
    assert path_of(plan(["@a,1", "@b,2", "@c,3"], ["@a,1", "@c,3", "@d,4"])) == ["@c", "@d"]


@pytest.mark.parametrize("receiver,sender", [
    pytest.param(["@a,1", "@b,2"], ["@a,1", "@b,2"], id="diff_test.go:SnapshotsOnly/fully-shared-history"),
    pytest.param(["@c,3"], ["@a,1", "@b,2", "@c,3"], id="diff_test.go:SnapshotsOnly/most-recent-present"),
])
def test_most_recent_snapshot_already_present(receiver, sender):
    """diff_test.go TestIncrementalPath_SnapshotsOnly: nothing to do (ConflictMostRecentSnapshotAlreadyPresent)."""
    p = plan(receiver, sender)
    assert p.up_to_date and not p.steps and p.error is None


@pytest.mark.parametrize("receiver", [pytest.param([], id="diff_test.go:SnapshotsOnly/no-sender-snapshots-empty"),
                                      pytest.param(["@a,1"], id="diff_test.go:SnapshotsOnly/no-sender-snapshots")])
def test_no_sender_snapshots(receiver):
    """diff_test.go TestIncrementalPath_SnapshotsOnly: no sender snapshots (ConflictNoSenderSnapshots):
    nothing to send, and nothing is touched on the receiver."""
    p = plan(receiver, [])
    assert not p.steps and p.error is None and "no snapshots" in p.note


# ---- internal/replication/logic/diff/diff_test.go: TestIncrementalPath_BookmarkSupport ----

@pytest.mark.parametrize("receiver,sender,path", [
    pytest.param(["@a,1"], ["#a,1", "@b,2"], ["#a", "@b"], id="diff_test.go:BookmarkSupport/bookmarks-are-used"),
    pytest.param(["@a,1"], ["#a,1", "#b,2", "@c,3"], ["#a", "@c"],
                 id="diff_test.go:BookmarkSupport/bookmarks-stripped-from-path"),
    pytest.param(["@a,1"], ["#a,1", "@a,1", "@b,2"], ["@a", "@b"],
                 id="diff_test.go:BookmarkSupport/snapshots-preferred-over-bookmarks"),
    pytest.param(["@a,1"], ["@a,1", "#a,1", "@b,2"], ["@a", "@b"],
                 id="diff_test.go:BookmarkSupport/snapshots-preferred-over-bookmarks-2"),
    pytest.param(["@a,1", "#b,2"], ["@a,1", "@c,3"], ["@a", "@c"],
                 id="diff_test.go:BookmarkSupport/receiver-bookmarks-younger-than-base-no-conflict"),
])
def test_bookmark_support(receiver, sender, path):
    """diff_test.go TestIncrementalPath_BookmarkSupport."""
    assert path_of(plan(receiver, sender)) == path


def test_receiver_bookmark_is_no_common_ancestor():
    """diff_test.go TestIncrementalPath_BookmarkSupport: a receiver with only a bookmark has no
    common ancestor, and its receiver versions count as empty. zrepl then does the initial
    replication; zrepl.py does so into a placeholder and refuses an existing non-placeholder dataset
    (it may hold data), as above."""
    assert path_of(plan(["#a,1"], ["@a,1", "@b,2"], placeholder=True)) == ["@b"]
    refused = plan(["#a,1"], ["@a,1", "@b,2"])
    assert refused.error is not None and refused.error.kind == "receiver-has-data"


# ---- internal/replication/driver/replication_stepqueue_test.go ----

def _plan_with_steps(fs: str, dates: list[int]) -> FilesystemPlan:
    """A plan of single steps whose `to` snapshots are dated `dates` (the step queue's target date)."""
    snaps = [Version(fs, f"s{i}", "snapshot", hash((fs, i)) & 0xFFFF, 10 + i, d) for i, d in enumerate(dates)]
    steps = [Step(snaps[i - 1] if i else None, s) for i, s in enumerate(snaps)]
    return FilesystemPlan(sender_fs=fs, receiver_fs="backup/" + fs, steps=steps)


def test_pq_not_concurrent():
    """replication_stepqueue_test.go TestPqNotconcurrent: with one slot, the step with the oldest
    target date goes first, then 2, 3, 4 (zrepl's queue; here the order order_steps gives)."""
    plans = [_plan_with_steps(f"pool/{name}", [date]) for name, date in (("1", 9999), ("4", 4), ("2", 2), ("3", 3))]
    assert [p.sender_fs for p, _ in order_steps(plans)] == ["pool/2", "pool/3", "pool/4", "pool/1"]


def test_pq_concurrent():
    """replication_stepqueue_test.go TestPqConcurrent, without its timing: F filesystems x N steps,
    the target date of each step is its step number; every step with a lower number comes before
    any step with a higher number, and each filesystem's steps stay in order."""
    plans = [_plan_with_steps(f"pool/fs{f:03d}", list(range(20))) for f in range(100)]
    ordered = order_steps(plans)
    numbers = [step.to_version.creation for _, step in ordered]
    assert numbers == sorted(numbers) and len(ordered) == 100 * 20
    for p in plans:
        mine = [step for q, step in ordered if q is p]
        assert mine == p.steps
