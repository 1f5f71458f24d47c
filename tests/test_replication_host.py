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
    recv = zrepl.RemoteError("`zfs recv -u -s p/x` failed (exit 1, other): cannot receive: failed to read from stream",
                             remote_type="ZfsError")
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
    def __init__(self, datasets):
        self.job = "push"
        self.datasets = datasets
        self.completed = []

    def list_filesystems(self):
        return self.datasets

    def complete(self, fs, to, to_guid, level):
        self.completed.append((fs, to, to_guid, level))


class FakeReceiver:
    root = "dst"

    def __init__(self, listing):
        self.listing = listing
        self.held = []

    def list_filesystems(self):
        return self.listing

    def hold_last_received(self, fs, snapshot, guid):
        self.held.append((fs, snapshot, guid))


def _replication(sender_versions, receiver_versions, dry_run=False, incremental="guarantee_resumability"):
    sender = FakeSender([DatasetInfo("src/fs", "filesystem", versions=sender_versions)])
    receiver = FakeReceiver({"src/fs": (DatasetInfo("dst/src/fs", "filesystem", versions=receiver_versions), None)})
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
