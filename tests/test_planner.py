"""Host tests for section 2b (abstraction names) and section 6 (planner). Pure: no ZFS needed."""

import hashlib
import shlex

import pytest

import zrepl
from zrepl import DatasetInfo, FilesystemInput, PlanSettings, ResumeToken, Version


def snap(ds, name, txg, guid=None, creation=None, userrefs=0):
    return Version(ds, name, "snapshot", guid if guid is not None else 1000 + txg, txg,
                   creation if creation is not None else 1_700_000_000 + txg, userrefs)


def bm(ds, name, txg, guid):
    return Version(ds, name, "bookmark", guid, txg, 1_700_000_000 + txg)


def fs(name, *versions, props=None):
    return DatasetInfo(name, "filesystem", props=dict(props or {}), versions=list(versions))


def chain(ds, names_and_txgs):
    """Snapshots with GUIDs derived from names, so sender and receiver copies share GUIDs."""
    return [snap(ds, n, t, guid=_guid(n)) for n, t in names_and_txgs]


def _guid(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def received(ds, versions, start_txg=500):
    """Receiver copies of sender snapshots: same name and GUID, receiver-local createtxg."""
    return [snap(ds, v.name, start_txg + i, guid=v.guid) for i, v in enumerate(versions)]


DEFAULT = PlanSettings()


# ---- 2b: abstraction names ----

def test_names_match_zrepl_spelling():
    assert zrepl.step_hold_tag("push") == "zrepl_STEP_J_push"
    assert zrepl.last_received_hold_tag("sink1") == "zrepl_last_received_J_sink1"
    assert zrepl.cursor_bookmark_name(0xABC, "push") == "zrepl_CURSOR_G_0000000000000abc_J_push"
    assert zrepl.tentative_cursor_bookmark_name(0xABC, "push") == \
        "zrepl_CURSORTENTATIVE__G_0000000000000abc_J_push"


def test_names_round_trip():
    guid = 0xFEDCBA9876543210
    for job in ("push", "my-job.2", "a_G_b"):
        assert zrepl.parse_hold_tag(zrepl.step_hold_tag(job)) == ("step-hold", job)
        assert zrepl.parse_hold_tag(zrepl.last_received_hold_tag(job)) == ("last-received-hold", job)
        assert zrepl.parse_bookmark_abstraction(zrepl.cursor_bookmark_name(guid, job)) == \
            ("replication-cursor-bookmark-v2", guid, job)
        assert zrepl.parse_bookmark_abstraction(zrepl.tentative_cursor_bookmark_name(guid, job)) == \
            ("tentative-replication-cursor-bookmark-v2", guid, job)
    assert zrepl.parse_bookmark_abstraction("pool/fs#" + zrepl.cursor_bookmark_name(5, "j")) == \
        ("replication-cursor-bookmark-v2", 5, "j")


def test_foreign_names_are_not_ours():
    assert zrepl.parse_hold_tag("keep") is None
    assert zrepl.parse_hold_tag("zrepl_STEP_J_") is None
    assert zrepl.parse_bookmark_abstraction("manual-bookmark") is None
    assert zrepl.parse_bookmark_abstraction("zrepl_replication_cursor") is None  # v1, not handled
    assert zrepl.parse_bookmark_abstraction("zrepl_STEP_G_0000000000000001_J_x") is None
    assert zrepl.parse_bookmark_abstraction("zrepl_CURSOR_G_000000000000000A_J_x") is None  # uppercase hex


def test_bad_job_names_and_guids_rejected():
    for job in ("", ".", "..", "a/b", "a@b", "a#b"):
        with pytest.raises(ValueError):
            zrepl.step_hold_tag(job)
    with pytest.raises(ValueError):
        zrepl.cursor_bookmark_name(1 << 64, "j")


def A(kind, job, txg, ds="pool/fs", name=None):
    return zrepl.Abstraction(kind, job, ds, name or f"{kind}-{txg}", guid=txg, createtxg=txg,
                             tag="t" if kind in ("step-hold", "last-received-hold") else None)


def test_stale_abstractions_rules():
    items = [
        A("replication-cursor-bookmark-v2", "j", 10), A("replication-cursor-bookmark-v2", "j", 20),
        A("step-hold", "j", 15), A("step-hold", "j", 20), A("step-hold", "j", 25),
        A("last-received-hold", "j", 5), A("last-received-hold", "j", 30),
        A("tentative-replication-cursor-bookmark-v2", "j", 12),
        A("tentative-replication-cursor-bookmark-v2", "j", 26),
        # another job: every one of these would be stale for "j" but must not be touched
        A("replication-cursor-bookmark-v2", "other", 1), A("replication-cursor-bookmark-v2", "other", 2),
        A("step-hold", "other", 1), A("last-received-hold", "other", 1), A("last-received-hold", "other", 3),
        # another dataset of the same job is judged on its own
        A("step-hold", "j", 15, ds="pool/other"),
    ]
    stale = zrepl.stale_abstractions(items, "j")
    got = sorted((a.dataset, a.type, a.createtxg) for a in stale)
    assert got == sorted([
        ("pool/fs", "replication-cursor-bookmark-v2", 10),
        ("pool/fs", "step-hold", 15), ("pool/fs", "step-hold", 20),
        ("pool/fs", "last-received-hold", 5),
        ("pool/fs", "tentative-replication-cursor-bookmark-v2", 12),
    ])
    assert all(a.job == "j" for a in stale)


def test_stale_step_holds_without_cursor_keep_newest():
    items = [A("step-hold", "j", 3), A("step-hold", "j", 7), A("tentative-replication-cursor-bookmark-v2", "j", 1)]
    assert [a.createtxg for a in zrepl.stale_abstractions(items, "j")] == [3]


def test_abstractions_from_listings():
    good = bm("pool/fs", zrepl.cursor_bookmark_name(77, "j"), 10, guid=77)
    tampered = bm("pool/fs", zrepl.cursor_bookmark_name(78, "j"), 11, guid=99)
    newer = bm("pool/fs", zrepl.cursor_bookmark_name(88, "j"), 20, guid=88)
    other_job = bm("pool/fs", zrepl.cursor_bookmark_name(90, "k"), 30, guid=90)
    info = fs("pool/fs", snap("pool/fs", "a", 10, guid=77), good, tampered, newer, other_job,
              bm("pool/fs", "manual", 5, guid=1))
    abs_ = zrepl.bookmark_abstractions(info)
    assert sorted((a.name, a.job) for a in abs_) == sorted([(good.name, "j"), (newer.name, "j"), (other_job.name, "k")])
    assert zrepl.replication_cursor(info, "j") == newer
    assert zrepl.replication_cursor(info, "nobody") is None
    holds = zrepl.hold_abstractions(snap("pool/fs", "a", 10), ["zrepl_STEP_J_j", "mine", "zrepl_last_received_J_x"])
    assert [(h.type, h.job, h.tag, h.full_name) for h in holds] == [
        ("step-hold", "j", "zrepl_STEP_J_j", "pool/fs@a"),
        ("last-received-hold", "x", "zrepl_last_received_J_x", "pool/fs@a")]


# ---- initial replication ----

S = "pool/data"
R = "backup/pool/data"


def test_initial_most_recent():
    a, b, c = chain(S, [("a", 10), ("b", 20), ("c", 30)])
    plan = zrepl.plan_filesystem(fs(S, c, a, b), None, DEFAULT, receiver_fs=R)
    assert plan.error is None and not plan.receiver_exists
    assert len(plan.steps) == 1
    assert plan.steps[0].from_version is None and plan.steps[0].to_version == c
    assert plan.steps[0].describe() == f"full send of {S}@c"


def test_initial_all_full_then_one_dash_I():
    a, b, c, d = chain(S, [("a", 10), ("b", 20), ("c", 30), ("d", 40)])
    plan = zrepl.plan_filesystem(fs(S, d, b, a, c), None, PlanSettings(initial="all"), receiver_fs=R)
    full, inc = plan.steps
    assert full.from_version is None and full.to_version == a
    assert inc.from_version == a and inc.to_version == d
    assert inc.multi and inc.intermediates == [b, c]
    assert [v.name for v in inc.received_versions()] == ["b", "c", "d"]


def test_initial_all_with_two_snapshots_is_plain_incremental():
    a, b = chain(S, [("a", 10), ("b", 20)])
    plan = zrepl.plan_filesystem(fs(S, a, b), None, PlanSettings(initial="all"), receiver_fs=R)
    assert [(s.from_version, s.to_version, s.multi) for s in plan.steps] == [(None, a, False), (a, b, False)]


def test_initial_fail():
    a, = chain(S, [("a", 10)])
    plan = zrepl.plan_filesystem(fs(S, a), None, PlanSettings(initial="fail"), receiver_fs=R)
    assert plan.steps == [] and plan.error.kind == "conflict-fail"
    assert "initial_replication" in plan.error.message and R in plan.error.message


def test_receiver_fs_required_when_absent():
    with pytest.raises(ValueError):
        zrepl.plan_filesystem(fs(S), None, DEFAULT)


def test_invalid_settings_rejected():
    with pytest.raises(ValueError):
        PlanSettings(initial="newest")
    with pytest.raises(ValueError):
        PlanSettings(protection_incremental="guarantee_everything")


# ---- incremental ----

def test_incremental_single():
    a, b = chain(S, [("a", 10), ("b", 20)])
    plan = zrepl.plan_filesystem(fs(S, a, b), fs(R, *received(R, [a])), DEFAULT)
    assert plan.receiver_fs == R and plan.receiver_exists
    (step,) = plan.steps
    assert step.from_version == a and step.to_version == b and not step.multi and step.intermediates == []
    assert step.describe() == f"incremental send {S}@a -> {S}@b"


def test_incremental_multi_is_one_dash_I_step_in_createtxg_order():
    # names in reverse alphabetical order of creation: createtxg must win
    z, y, x, w = chain(S, [("z", 10), ("y", 20), ("x", 30), ("w", 40)])
    plan = zrepl.plan_filesystem(fs(S, w, x, y, z), fs(R, *received(R, [z])), DEFAULT)
    (step,) = plan.steps
    assert step.from_version == z and step.to_version == w
    assert step.multi and step.intermediates == [y, x]
    assert step.versions_to_protect() == [z, y, x, w]
    assert "-I" in step.describe() and "y, x" in step.describe()


def test_reverse_name_order_common_base_and_up_to_date():
    z, y = chain(S, [("z", 10), ("y", 20)])
    # receiver got both; its newest by createtxg is y although "y" < "z" by name
    plan = zrepl.plan_filesystem(fs(S, y, z), fs(R, *received(R, [z, y])), DEFAULT)
    assert plan.up_to_date and plan.steps == [] and plan.error is None


def test_up_to_date():
    a, b = chain(S, [("a", 10), ("b", 20)])
    plan = zrepl.plan_filesystem(fs(S, a, b), fs(R, *received(R, [a, b])), DEFAULT)
    assert plan.up_to_date and not plan.steps and plan.error is None
    assert "up to date" in plan.describe()


def test_bookmark_base_after_snapshot_pruned_single():
    a, b = chain(S, [("a", 10), ("b", 20)])
    cursor = bm(S, zrepl.cursor_bookmark_name(a.guid, "push"), 10, a.guid)
    plan = zrepl.plan_filesystem(fs(S, cursor, b), fs(R, *received(R, [a])), DEFAULT)
    (step,) = plan.steps
    assert step.from_version == cursor and step.to_version == b
    assert "(bookmark)" in step.describe()


def test_bookmark_base_with_many_pending_starts_with_dash_i():
    a, b, c, d = chain(S, [("a", 10), ("b", 20), ("c", 30), ("d", 40)])
    cursor = bm(S, zrepl.cursor_bookmark_name(a.guid, "push"), 10, a.guid)
    plan = zrepl.plan_filesystem(fs(S, d, c, b, cursor), fs(R, *received(R, [a])), DEFAULT)
    first, rest = plan.steps
    assert (first.from_version, first.to_version, first.multi) == (cursor, b, False)
    assert (rest.from_version, rest.to_version, rest.intermediates, rest.multi) == (b, d, [c], True)


def test_snapshot_preferred_over_bookmark_with_same_guid():
    a, b = chain(S, [("a", 10), ("b", 20)])
    cursor = bm(S, zrepl.cursor_bookmark_name(a.guid, "push"), 10, a.guid)
    plan = zrepl.plan_filesystem(fs(S, cursor, a, b), fs(R, *received(R, [a])), DEFAULT)
    assert plan.steps[0].from_version == a


def test_receiver_bookmarks_are_ignored_for_common_base():
    a, b = chain(S, [("a", 10), ("b", 20)])
    receiver = fs(R, bm(R, "a", 5, a.guid))  # only a bookmark: receiver "has no snapshots"
    plan = zrepl.plan_filesystem(fs(S, a, b), receiver, DEFAULT)
    assert plan.error.kind == "receiver-has-data"


# ---- errors ----

def test_diverged_reports_and_recovery_commands():
    a, b, c = chain(S, [("a", 10), ("b", 20), ("c", 30)])
    rx, ry = snap(R, "x", 600, guid=424242), snap(R, "y", 601, guid=434343, userrefs=1)
    receiver = fs(R, *received(R, [a, b]), rx, ry)
    plan = zrepl.plan_filesystem(fs(S, a, b, c), receiver, PlanSettings(receiving_job="sink"))
    err = plan.error
    assert plan.steps == [] and err.kind == "diverged"
    assert err.details["common"] == "b"
    assert err.details["sender_only"] == ["c"]
    assert err.details["receiver_only"] == ["x", "y"]
    assert err.details["held_receiver_only"] == ["y"]
    assert err.details["recovery_commands"] == [
        shlex.join(["zfs", "release", "zrepl_last_received_J_sink", f"{R}@y"]),
        shlex.join(["zfs", "rollback", "-r", f"{R}@b"]),
    ]
    assert err.details["alternative_commands"] == [shlex.join(["zfs", "rename", R, f"{R}-zrepl-aside"])]
    for word in ("diverged", "b", "x", "y", "c", "Nothing was changed"):
        assert word in err.message


def test_diverged_quotes_odd_names():
    odd = "pool/my data"
    a, b = chain(odd, [("a b", 10), ("c'd", 20)])
    rodd = "backup/my data"
    receiver = fs(rodd, *received(rodd, [a]), snap(rodd, "local", 700, guid=1))
    plan = zrepl.plan_filesystem(fs(odd, a, b), receiver, DEFAULT)
    cmd = plan.error.details["recovery_commands"][-1]
    assert shlex.split(cmd) == ["zfs", "rollback", "-r", "backup/my data@a b"]


def test_no_common_base():
    a, = chain(S, [("a", 10)])
    receiver = fs(R, snap(R, "old", 5, guid=999))
    plan = zrepl.plan_filesystem(fs(S, a), receiver, DEFAULT)
    assert plan.error.kind == "no-common-base" and plan.steps == []
    assert plan.error.details["receiver_snapshots"] == ["old"]
    assert plan.error.details["recovery_commands"] == [shlex.join(["zfs", "rename", R, f"{R}-zrepl-aside"])]


def test_receiver_has_data_without_snapshots_is_never_overwritten():
    a, = chain(S, [("a", 10)])
    plan = zrepl.plan_filesystem(fs(S, a), fs(R), DEFAULT)
    assert plan.steps == [] and plan.error.kind == "receiver-has-data" and not plan.replace_placeholder
    assert "zrepl:placeholder=on" in plan.error.details["alternative_commands"][0]
    assert "zfs rename" in plan.error.details["recovery_commands"][0]


def test_placeholder_without_snapshots_is_replaced():
    a, b = chain(S, [("a", 10), ("b", 20)])
    plan = zrepl.plan_filesystem(fs(S, a, b), fs(R, props={"zrepl:placeholder": "on"}), DEFAULT)
    assert plan.error is None and plan.replace_placeholder
    assert [(s.from_version, s.to_version) for s in plan.steps] == [(None, b)]


def test_placeholder_property_off_is_not_a_placeholder():
    a, = chain(S, [("a", 10)])
    plan = zrepl.plan_filesystem(fs(S, a), fs(R, props={"zrepl:placeholder": "off"}), DEFAULT)
    assert plan.error.kind == "receiver-has-data"


def test_sender_without_snapshots_is_nothing_to_do():
    plan = zrepl.plan_filesystem(fs(S), None, DEFAULT, receiver_fs=R)
    assert plan.steps == [] and plan.error is None and not plan.up_to_date
    assert "no snapshots" in plan.note


# ---- resume ----

def test_resume_incremental_then_continue_to_newest():
    a, b, c, d = chain(S, [("a", 10), ("b", 20), ("c", 30), ("d", 40)])
    token = ResumeToken(fromguid=a.guid, toguid=b.guid, toname=f"{S}@b", raw="1-abc")
    plan = zrepl.plan_filesystem(fs(S, a, b, c, d), fs(R, *received(R, [a])), DEFAULT, resume_token=token)
    first, rest = plan.steps
    assert (first.from_version, first.to_version, first.resume_token) == (a, b, "1-abc")
    assert (rest.from_version, rest.to_version, rest.intermediates, rest.resume_token) == (b, d, [c], None)
    assert first.describe().startswith("resume incremental send")
    assert not plan.clear_resume_token


def test_resume_full_from_bookmark_source_and_into_placeholder():
    a, b = chain(S, [("a", 10), ("b", 20)])
    cursor = bm(S, zrepl.cursor_bookmark_name(a.guid, "push"), 10, a.guid)
    token = ResumeToken(fromguid=a.guid, toguid=b.guid, toname=f"{S}@b", raw="t")
    plan = zrepl.plan_filesystem(fs(S, cursor, b), fs(R, *received(R, [a])), DEFAULT, resume_token=token)
    assert [(s.from_version, s.to_version) for s in plan.steps] == [(cursor, b)]
    full = ResumeToken(fromguid=None, toguid=b.guid, toname=f"{S}@b", raw="t2")
    plan = zrepl.plan_filesystem(fs(S, a, b), fs(R, props={"zrepl:placeholder": "on"}), DEFAULT, resume_token=full)
    assert plan.replace_placeholder and [(s.from_version, s.to_version, s.resume_token) for s in plan.steps] == \
        [(None, b, "t2")]


@pytest.mark.parametrize("fromguid,toguid", [(None, 31337), (31337, "b")])
def test_resume_source_gone_clears_token(fromguid, toguid):
    a, b = chain(S, [("a", 10), ("b", 20)])
    token = ResumeToken(fromguid=fromguid, toguid=b.guid if toguid == "b" else toguid, toname=f"{S}@gone", raw="t")
    plan = zrepl.plan_filesystem(fs(S, a, b), fs(R, *received(R, [a])), DEFAULT, resume_token=token)
    assert plan.clear_resume_token and plan.steps == [] and plan.error is None


# ---- encryption ----

def test_check_send_encryption_rules():
    assert zrepl.check_send_encryption(encrypted=True, raw=False, fs_encrypted=False) is not None
    assert zrepl.check_send_encryption(encrypted=True, raw=False, fs_encrypted=True) is None
    assert zrepl.check_send_encryption(encrypted=False, raw=True, fs_encrypted=True) is not None
    assert zrepl.check_send_encryption(encrypted=False, raw=True, fs_encrypted=False) is None
    assert zrepl.check_send_encryption(encrypted=False, raw=False, fs_encrypted=True) is None
    assert PlanSettings(encrypted=True).send_raw and not PlanSettings().send_raw


def test_encryption_error_in_plan():
    a, = chain(S, [("a", 10)])
    plan = zrepl.plan_filesystem(fs(S, a, props={"encryption": "off"}), None, PlanSettings(encrypted=True),
                                 receiver_fs=R)
    assert plan.error.kind == "encryption" and plan.steps == [] and S in plan.error.message
    enc = fs(S, a, props={"encryption": "aes-256-gcm"})
    assert zrepl.plan_filesystem(enc, None, PlanSettings(raw=True), receiver_fs=R).error.kind == "encryption"
    assert zrepl.plan_filesystem(enc, None, PlanSettings(encrypted=True), receiver_fs=R).steps


def test_protection_for_step():
    a, b = chain(S, [("a", 10), ("b", 20)])
    s = PlanSettings(protection_initial="guarantee_nothing", protection_incremental="guarantee_incremental")
    assert s.protection_for(zrepl.Step(None, a)) == "guarantee_nothing"
    assert s.protection_for(zrepl.Step(a, b)) == "guarantee_incremental"


# ---- many filesystems ----

def _inp(name, *versions, receiver=None, props=None):
    return FilesystemInput(fs(name, *versions, props=props), receiver, "backup/" + name)


def test_parents_before_children_and_dependency():
    # child has the OLDER pending snapshot, but needs its parent created first
    child = _inp("pool/a/b", snap("pool/a/b", "s", 5, creation=100))
    parent = _inp("pool/a", snap("pool/a", "s", 50, creation=500))
    plans = zrepl.plan_filesystems([child, parent], DEFAULT)
    assert [p.sender_fs for p in plans] == ["pool/a", "pool/a/b"]
    assert plans[1].depends_on == "pool/a" and plans[0].depends_on is None
    order = [p.sender_fs for p, _ in zrepl.order_steps(plans)]
    assert order == ["pool/a", "pool/a/b"]


def test_child_blocked_when_parent_plan_fails():
    parent = _inp("pool/a", snap("pool/a", "s", 50), props={"encryption": "off"})
    child = _inp("pool/a/b", snap("pool/a/b", "s", 5))
    grandchild = _inp("pool/a/b/c", snap("pool/a/b/c", "s", 6))
    existing_child = _inp("pool/a/d", snap("pool/a/d", "s", 7, guid=77),
                          receiver=fs("backup/pool/a/d", snap("backup/pool/a/d", "s", 9, guid=77)))
    plans = {p.sender_fs: p for p in zrepl.plan_filesystems([grandchild, child, parent, existing_child],
                                                            PlanSettings(encrypted=True))}
    assert plans["pool/a"].error.kind == "encryption"
    assert plans["pool/a/b"].blocked_by == "pool/a" and plans["pool/a/b"].steps == []
    assert "pool/a" in plans["pool/a/b"].describe()
    assert plans["pool/a/b/c"].blocked_by == "pool/a/b"
    # an existing receiver does not need its parent: it is judged on its own (here: encryption too)
    assert plans["pool/a/d"].blocked_by is None
    assert zrepl.order_steps(plans.values()) == []


def test_child_not_blocked_when_parent_receiver_exists():
    parent = _inp("pool/a", snap("pool/a", "x", 5), receiver=fs("backup/pool/a", snap("backup/pool/a", "y", 9, guid=1)))
    child = _inp("pool/a/b", snap("pool/a/b", "s", 5))
    plans = {p.sender_fs: p for p in zrepl.plan_filesystems([parent, child], DEFAULT)}
    assert plans["pool/a"].error.kind == "no-common-base"
    assert plans["pool/a/b"].blocked_by is None and plans["pool/a/b"].depends_on is None
    assert plans["pool/a/b"].runnable


def test_order_oldest_pending_first_and_error_counts_behind():
    def incr(name, mid_creation, new_creation):
        """Receiver has `base`; sender has base (txg 1) < mid (txg 2) < new (txg 3)."""
        base = Version(name, "base", "snapshot", _guid(name + "base"), 1, 1)
        mid = Version(name, "mid", "snapshot", _guid(name + "mid"), 2, mid_creation)
        new = Version(name, "new", "snapshot", _guid(name + "new"), 3, new_creation)
        rec = fs("backup/" + name, Version("backup/" + name, "base", "snapshot", base.guid, 9, 1))
        return FilesystemInput(fs(name, base, mid, new), rec, "backup/" + name)
    inputs = [incr("pool/x", 300, 400), incr("pool/y", 100, 900), incr("pool/z", 200, 250)]
    plans = zrepl.plan_filesystems(inputs, DEFAULT)
    assert [p.sender_fs for p in plans] == ["pool/y", "pool/z", "pool/x"]
    plans = zrepl.plan_filesystems(inputs, DEFAULT, error_counts={"pool/y": 2, "pool/z": 1})
    assert [p.sender_fs for p in plans] == ["pool/x", "pool/z", "pool/y"]


def test_order_steps_interleaves_by_oldest_pending():
    # x: full oldest (t=10) then -I to t=300; y: one incremental at t=200
    x = [snap("pool/x", n, t, creation=c) for n, t, c in (("a", 1, 10), ("b", 2, 250), ("c", 3, 300))]
    y_base = snap("pool/y", "a", 1, guid=55, creation=5)
    y_new = snap("pool/y", "b", 2, creation=200)
    inputs = [FilesystemInput(fs("pool/x", *x), None, "backup/pool/x"),
              FilesystemInput(fs("pool/y", y_base, y_new), fs("backup/pool/y", snap("backup/pool/y", "a", 7, guid=55)),
                              "backup/pool/y")]
    plans = zrepl.plan_filesystems(inputs, PlanSettings(initial="all"))
    seq = [(p.sender_fs, s.to_version.name) for p, s in zrepl.order_steps(plans)]
    assert seq == [("pool/x", "a"), ("pool/y", "b"), ("pool/x", "c")]
    seq = [(p.sender_fs, s.to_version.name) for p, s in zrepl.order_steps(plans, {"pool/x": 1})]
    assert seq == [("pool/y", "b"), ("pool/x", "a"), ("pool/x", "c")]


# ---- placement ----

def test_receiver_path():
    assert zrepl.receiver_path("backup/sink", "zroot/usr/home", "laptop") == "backup/sink/laptop/zroot/usr/home"
    assert zrepl.receiver_path("backup/pulled/", "zroot/usr/home", None) == "backup/pulled/zroot/usr/home"
    with pytest.raises(ValueError):
        zrepl.receiver_path("backup", "zroot", "a/b")
    with pytest.raises(ValueError):
        zrepl.receiver_path("", "zroot", None)


def test_placeholders_needed():
    target = "backup/sink/laptop/zroot/usr/home"
    assert zrepl.placeholders_needed(target, "backup/sink", set()) == [
        "backup/sink/laptop", "backup/sink/laptop/zroot", "backup/sink/laptop/zroot/usr"]
    assert zrepl.placeholders_needed(target, "backup/sink", {"backup/sink/laptop", "backup/sink/laptop/zroot"}) == [
        "backup/sink/laptop/zroot/usr"]
    assert zrepl.placeholders_needed("backup/sink/x", "backup/sink", set()) == []
    with pytest.raises(ValueError):
        zrepl.placeholders_needed("backup/sinkother/x", "backup/sink", set())
    with pytest.raises(ValueError):
        zrepl.placeholders_needed("backup/sink", "backup/sink", set())
