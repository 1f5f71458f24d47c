"""Host tests for replication fixes found by the real-ZFS suite (tests/zfs/test_replication*_zfs.py):
error classification, the sender's error as the cause of a failed step, and restoring a lost
cursor / last-received hold while planning. Pure: fake endpoints, no ZFS."""

import zrepl
from zrepl import DatasetInfo, PlanSettings, Version


def snap(ds, name, txg, guid, userrefs=0):
    return Version(ds, name, "snapshot", guid, txg, 1_700_000_000 + txg, userrefs)


def bookmark(ds, name, txg, guid):
    return Version(ds, name, "bookmark", guid, txg, 1_700_000_000 + txg)


def test_bookmark_exists_is_classified_as_exists():
    # `zfs bookmark` says "bookmark exists", not "already exists": re-protecting a step after a
    # failed attempt must treat it as done (guarantee_incremental retried forever before).
    assert zrepl.classify_zfs_error("cannot create bookmark 'p/fs#x': bookmark exists") == "exists"
    assert zrepl.classify_zfs_error("cannot create 'p/fs': dataset already exists") == "exists"


def test_sender_error_is_named_as_the_cause():
    # the peer's ERROR frame carries its ZfsError's temporary flag (kind "other": temporary)
    recv = zrepl.RemoteError("`zfs recv -u -s p/x` failed (exit 1, other): cannot receive: failed to read from stream",
                             remote_type="ZfsError", temporary=True)
    err = zrepl.with_sender_error(recv, "`zfs send -v -P p/a@1` exited with status 1: ssh: connection reset")
    assert isinstance(err, zrepl.EndpointError)
    assert str(err).startswith("the sending side failed: `zfs send -v -P p/a@1` exited with status 1: ssh: connection")
    assert "failed to read from stream" in str(err)
    assert err.temporary  # as temporary as the receive's failure


def test_receiver_error_stays_when_the_sender_only_saw_a_broken_pipe():
    recv = zrepl.RemoteError("cannot receive new filesystem stream: injected I/O error", remote_type="ZfsError")
    assert zrepl.with_sender_error(recv, "`zfs send p/a@1` exited with status 1: warning: cannot send "
                                         "'p/a@1': Broken pipe") is recv
    assert zrepl.with_sender_error(recv, None) is recv
    cancelled = zrepl.Cancelled("watchdog")
    assert zrepl.with_sender_error(cancelled, "`zfs send` exited with status -9") is cancelled


def test_plan_carries_the_common_snapshot_only_when_continuing():
    a_s, b_s = snap("src/fs", "a", 10, 1), snap("src/fs", "b", 20, 2)
    a_r = snap("dst/fs", "a", 5, 1, userrefs=1)
    sender = DatasetInfo("src/fs", "filesystem", versions=[a_s, b_s])
    plan = zrepl.plan_filesystem(sender, DatasetInfo("dst/fs", "filesystem", versions=[a_r]), PlanSettings())
    assert plan.common == a_s and plan.receiver_common == a_r and len(plan.steps) == 1
    up = zrepl.plan_filesystem(DatasetInfo("src/fs", "filesystem", versions=[a_s]),
                               DatasetInfo("dst/fs", "filesystem", versions=[a_r]), PlanSettings())
    assert up.up_to_date and up.common == a_s
    rogue = snap("dst/fs", "rogue", 6, 99)
    diverged = zrepl.plan_filesystem(sender, DatasetInfo("dst/fs", "filesystem", versions=[a_r, rogue]),
                                     PlanSettings())
    assert diverged.error is not None and diverged.common is None


class FakeSender:
    info = zrepl.PeerInfo(job="push", type="push", abstraction_job="push")

    def __init__(self, datasets):
        self.datasets = datasets
        self.completed = []
        self.released = []

    def list_filesystems(self):
        return self.datasets

    def complete(self, fs, to, to_guid, level):
        self.completed.append((fs, to, to_guid, level))

    def release_stale(self, fs):
        self.released.append(fs)

    def hold_tags_all(self, names):  # every held snapshot carries our step hold unless told otherwise
        self.asked.append(names)
        return {fs: {n: self.tags.get(n, [zrepl.step_hold_tag("push")]) for n in ns} for fs, ns in names.items()}

    asked: list = []
    tags: dict = {}

    def placeholders(self, filesystems):
        return set()


class FakeReceiver:
    info = zrepl.PeerInfo(job="sink", type="sink", abstraction_job="sink", root="dst")

    def __init__(self, listing):
        self.listing = listing
        self.held = []
        self.released = []

    def release_stale(self, fs):
        self.released.append(fs)

    def hold_tags_all(self, names):
        self.asked.append(names)
        return {fs: {n: self.tags.get(n, [zrepl.last_received_hold_tag("sink")]) for n in ns}
                for fs, ns in names.items()}

    asked: list = []
    tags: dict = {}

    def placeholders(self, filesystems):
        return set()

    def list_filesystems(self):
        return self.listing

    def hold_last_received(self, fs, snapshot, guid):
        self.held.append((fs, snapshot, guid))


def _replication(sender_versions, receiver_versions, dry_run=False, incremental="guarantee_resumability"):
    sender = FakeSender([DatasetInfo("src/fs", "filesystem", versions=sender_versions)])
    receiver = FakeReceiver({"src/fs": zrepl.ReceiverFilesystem(DatasetInfo("dst/src/fs", "filesystem",
                                                                             versions=receiver_versions))})
    settings = zrepl.ReplicationSettings(job="push", plan=PlanSettings(protection_incremental=incremental),
                                         dry_run=dry_run)
    return zrepl.Replication(sender, receiver, settings, zrepl.Progress()), sender, receiver


def test_lost_completion_is_restored_while_planning():
    a = snap("src/fs", "a", 10, 0xA, userrefs=1)  # still carries the step hold
    repl, sender, receiver = _replication([a], [snap("dst/src/fs", "a", 5, 0xA)])
    plans = repl.plan()
    assert plans[0].up_to_date
    assert sender.completed == [("src/fs", "a", 0xA, "guarantee_resumability")]
    assert receiver.held == [("src/fs", "a", 0xA)]


def test_nothing_is_restored_when_cursor_and_hold_are_in_place():
    cursor = bookmark("src/fs", zrepl.cursor_bookmark_name(0xA, "push"), 10, 0xA)
    other_jobs = bookmark("src/fs", zrepl.cursor_bookmark_name(0xA, "other"), 10, 0xA)
    a = snap("src/fs", "a", 10, 0xA)
    repl, sender, receiver = _replication([cursor, other_jobs, a], [snap("dst/src/fs", "a", 5, 0xA, userrefs=1)])
    repl.plan()
    assert sender.completed == [] and receiver.held == []


def test_an_older_cursor_is_moved_to_the_common_snapshot():
    old = bookmark("src/fs", zrepl.cursor_bookmark_name(0x1, "push"), 5, 0x1)
    a = snap("src/fs", "a", 10, 0xA)
    repl, sender, _ = _replication([old, a], [snap("dst/src/fs", "a", 5, 0xA, userrefs=1)])
    repl.plan()
    assert sender.completed == [("src/fs", "a", 0xA, "guarantee_resumability")]


def test_no_restoring_in_dry_runs_nor_cursors_at_guarantee_nothing():
    a = snap("src/fs", "a", 10, 0xA)
    repl, sender, receiver = _replication([a], [snap("dst/src/fs", "a", 5, 0xA)], dry_run=True)
    repl.plan()
    assert sender.completed == [] and receiver.held == []
    repl, sender, receiver = _replication([a], [snap("dst/src/fs", "a", 5, 0xA)], incremental="guarantee_nothing")
    repl.plan()
    assert sender.completed == [] and receiver.held == [("src/fs", "a", 0xA)]


def test_a_filesystem_that_vanished_since_the_last_attempt_is_dropped_from_the_reports():
    a = snap("src/fs", "a", 10, 0xA)
    repl, sender, _ = _replication([a], [])
    repl._report("src/gone").state = "step-error"
    repl.plan()
    assert "src/gone" not in repl.reports and "src/fs" in repl.reports


class ManualClock(zrepl.Clock):
    def __init__(self):
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_watchdog_fires_only_after_the_timeout_without_progress():
    clock = ManualClock()
    progress = zrepl.Progress(clock)
    cancelled = []
    dog = zrepl.Watchdog(progress, timeout=600, cancel=cancelled.append)
    clock.now += 599
    assert not dog.check()
    progress.add_bytes(1)  # a sign of life restarts the count
    clock.now += 599
    assert not dog.check() and not cancelled
    clock.now += 2
    assert dog.check()
    assert len(cancelled) == 1
    assert "no progress for 10m1s" in cancelled[0] and "replication.timeout = 10m" in cancelled[0]


def test_a_no_op_run_heals_what_a_crash_during_completion_left():
    # killed between the new cursor and the release of the old one (sender), and between the new
    # last-received hold and the release of the older one (receiver): issue 14 item 2
    a, b = snap("src/fs", "a", 10, 0xA), snap("src/fs", "b", 20, 0xB, userrefs=1)
    old = bookmark("src/fs", zrepl.cursor_bookmark_name(0xA, "push"), 10, 0xA)
    new = bookmark("src/fs", zrepl.cursor_bookmark_name(0xB, "push"), 20, 0xB)
    repl, sender, receiver = _replication([old, a, new, b], [snap("dst/src/fs", "a", 5, 0xA, userrefs=1),
                                                              snap("dst/src/fs", "b", 6, 0xB, userrefs=1)])
    assert repl.plan()[0].up_to_date
    assert sender.released == ["src/fs"] and receiver.released == ["src/fs"]
    b_released = snap("src/fs", "b", 20, 0xB)
    clean, sender, receiver = _replication([a, new, b_released], [snap("dst/src/fs", "a", 5, 0xA),
                                                          snap("dst/src/fs", "b", 6, 0xB, userrefs=1)])
    clean.plan()
    assert sender.released == [] and receiver.released == []  # nothing to heal: no spawn


def test_another_tools_holds_cost_one_tag_lookup_per_side_and_no_release():
    # zfs-autobackup holds what it sends; a user holds old snapshots: nothing of ours to heal
    cursor = bookmark("src/fs", zrepl.cursor_bookmark_name(0xB, "push"), 20, 0xB)
    a, b = snap("src/fs", "a", 10, 0xA, userrefs=1), snap("src/fs", "b", 20, 0xB, userrefs=1)
    a2, b2 = snap("src/fs2", "a", 11, 0xA2, userrefs=1), snap("src/fs2", "b", 21, 0xB2)
    cursor2 = bookmark("src/fs2", zrepl.cursor_bookmark_name(0xB2, "push"), 21, 0xB2)
    sender = FakeSender([DatasetInfo("src/fs", "filesystem", versions=[cursor, a, b]),
                         DatasetInfo("src/fs2", "filesystem", versions=[cursor2, a2, b2])])
    receiver = FakeReceiver({
        "src/fs": zrepl.ReceiverFilesystem(DatasetInfo("dst/src/fs", "filesystem", versions=[
            snap("dst/src/fs", "a", 5, 0xA, userrefs=1), snap("dst/src/fs", "b", 6, 0xB, userrefs=1)])),
        "src/fs2": zrepl.ReceiverFilesystem(DatasetInfo("dst/src/fs2", "filesystem", versions=[
            snap("dst/src/fs2", "a", 7, 0xA2), snap("dst/src/fs2", "b", 8, 0xB2, userrefs=1)]))})
    repl = zrepl.Replication(sender, receiver, zrepl.ReplicationSettings(job="push", plan=PlanSettings()),
                             zrepl.Progress())
    sender.asked, receiver.asked = [], []
    sender.tags = {"a": ["zfs_autobackup:bench"], "b": ["zfs_autobackup:bench"]}
    receiver.tags = {"a": ["keep"]}
    assert all(p.up_to_date for p in repl.plan())
    assert sender.asked == [{"src/fs": ["a", "b"], "src/fs2": ["a"]}]  # one question for all filesystems
    assert receiver.asked == [{"src/fs": ["a"]}]
    assert sender.released == [] and receiver.released == [] and not repl.changed


def test_placeholders_are_asked_for_only_when_a_replica_has_no_snapshots():
    a = snap("src/fs", "a", 10, 0xA)
    asked = []
    repl, _, receiver = _replication([a], [snap("dst/src/fs", "a", 5, 0xA, userrefs=1)])
    receiver.placeholders = lambda names: asked.append(list(names)) or set()
    repl.plan()
    assert asked == []  # an up-to-date replica: no zfs get on a no-op run
    repl, _, receiver = _replication([a], [])
    receiver.placeholders = lambda names: asked.append(list(names)) or {"src/fs"}
    [plan] = repl.plan()
    assert asked == [["src/fs"]] and plan.replace_placeholder
