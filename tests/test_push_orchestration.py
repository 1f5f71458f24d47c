"""Push to a local sink, host-tested through the ZFS double (tests/fakezfs.py) and the local
transport, in-process: the argv sequence zrepl.py runs and the world it leaves behind (what
the guest suite checks on real ZFS, in milliseconds). Each test names one behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import (changes, fs_status, job_status, last_n, not_replicated, push_job, real_sends, run, sink_job,
                     write_config)

SRC, TARGET = "src/data", "dst/sink/client1/src/data"
# what every new replica is received with (recv.properties.safe): see zrepl.receive_property_args
SAFE_RECEIVE = ["-x", "mountpoint", "-x", "sharenfs", "-x", "sharesmb", "-o", "canmount=noauto", "-o", "readonly=on"]
LISTED = ["-H", "-p", "-t", "filesystem,volume,snapshot,bookmark", "-o", ",".join(zrepl.LIST_PROPERTIES)]


def list_r(root: str) -> list[str]:
    return ["zfs", "list", "-H", "-p", "-r", *LISTED[2:], root]


@pytest.fixture
def world(fake_zfs: FakeZfs):
    w = fake_zfs.world
    w.tree("src", "data @a @b\ndata/child @x")
    w.tree("dst", "sink")
    return w


def config(tmp_path: Path, **push_keys) -> Path:
    push_keys.setdefault("filesystems", {"src/data<": True})
    return write_config(tmp_path, push_job(**push_keys), sink_job(root_fs="dst/sink"))


def push(fake: FakeZfs, cfg: Path, *extra: str):
    return run("--config", cfg, "run", *extra, "push", zfs=fake)


def cursor(w, snapshot: str, job: str = "push") -> str:
    return zrepl.cursor_bookmark_name(w.guid(snapshot), job)


def test_initial_push_sends_the_newest_snapshot_full_and_leaves_cursor_and_holds(fake_zfs, world, tmp_path):
    result = push(fake_zfs, config(tmp_path))
    assert result.code == 0, result
    b = "src/data@b"
    x = "src/data/child@x"
    assert changes(fake_zfs.calls) == [
        # guarantee_resumability: every step's snapshot first, in one command for the whole run
        ["hold", "zrepl_STEP_J_push", b, x],
        ["create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", "dst/sink/client1"],
        ["create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", "dst/sink/client1/src"],
        # a new replica: the stream may not mount or share it (recv.properties.safe)
        ["recv", "-u", "-s", *SAFE_RECEIVE, "-o", "zrepl:placeholder=off", TARGET],
        ["recv", "-u", "-s", *SAFE_RECEIVE, "-o", "zrepl:placeholder=off", f"{TARGET}/child"],
        # after the steps: the receiver's holds on what arrived (checked in one listing), the
        # cursors, then the step holds go in one command
        ["hold", "zrepl_last_received_J_sink", f"{TARGET}@b", f"{TARGET}/child@x"],
        ["bookmark", b, f"src/data#{cursor(world, b)}"],
        ["bookmark", x, f"src/data/child#{cursor(world, x)}"],
        ["release", "zrepl_STEP_J_push", b, x],
    ]
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", b], ["send", "-v", "-P", "src/data/child@x"]]
    assert world.snapshots(TARGET) == ["b"] and world.guid(f"{TARGET}@b") == world.guid(b)  # most_recent
    assert world.snapshots(f"{TARGET}/child") == ["x"]
    assert world.bookmarks(SRC) == [cursor(world, b)] and world.holds(b) == set()
    assert world.holds(f"{TARGET}@b") == {"zrepl_last_received_J_sink"}
    assert world.property("dst/sink/client1/src", "zrepl:placeholder") == ("on", "local")
    assert world.property(TARGET, "zrepl:placeholder") == ("off", "local")
    rep = fs_status(tmp_path / "zrepl.toml", "push", SRC)
    assert rep["state"] == "done" and rep["last_replicated"] == b


def test_initial_replication_all_sends_the_oldest_full_then_the_rest_in_one_I_stream(fake_zfs, world, tmp_path):
    world.tree("src", "data @c")
    result = push(fake_zfs, config(tmp_path, filesystems={SRC: True}, initial_replication="all"))
    assert result.code == 0, result
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "src/data@a"],
                                          ["send", "-v", "-P", "-I", "src/data@a", "src/data@c"]]
    assert world.snapshots(TARGET) == ["a", "b", "c"]


def test_initial_replication_fail_refuses_and_creates_nothing(fake_zfs, world, tmp_path):
    result = push(fake_zfs, config(tmp_path, initial_replication="fail"))
    assert result.code == 1
    assert changes(fake_zfs.calls) == [] and not world.exists("dst/sink/client1")
    assert fs_status(tmp_path / "zrepl.toml", "push", SRC)["state"] == "planning-error"


def test_incremental_push_sends_new_snapshots_in_one_I_stream_and_moves_cursor_and_hold(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, filesystems={SRC: True})
    assert push(fake_zfs, cfg).code == 0
    old_cursor = cursor(world, "src/data@b")
    world.tree("src", "data @c @d")
    fake_zfs.calls.clear()
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "-I", "src/data@b", "src/data@d"]]
    assert world.snapshots(TARGET) == ["b", "c", "d"]
    assert [c for c in changes(fake_zfs.calls) if c[0] in ("bookmark", "destroy")] == [
        ["bookmark", "src/data@d", f"src/data#{cursor(world, 'src/data@d')}"],
        ["destroy", f"src/data#{old_cursor}"]]  # the cursor moved; only this job's old one went
    assert world.holds(f"{TARGET}@d") == {"zrepl_last_received_J_sink"} and world.holds(f"{TARGET}@b") == set()
    assert all(world.holds(f"src/data@{s}") == set() for s in "bcd")  # step holds released


def test_a_cut_stream_resumes_from_the_receivers_token_on_the_next_run(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, filesystems={SRC: True})
    assert push(fake_zfs, cfg).code == 0
    world.write(SRC, 1 << 20)
    world.snapshot("src/data@c")
    fake_zfs.cut("send", 300_000, match="send -v -P -i", stderr="ssh: connection reset\n")
    fake_zfs.fail("send", match="send -v -P -t", stderr="ssh: connection reset\n")
    result = push(fake_zfs, cfg)
    assert result.code == 1
    token = world.resume_token(TARGET)
    assert token and "the sending side failed" in fs_status(cfg, "push", SRC)["error"]
    assert world.holds("src/data@c") == {"zrepl_STEP_J_push"}  # resumability: the step keeps its hold
    fake_zfs.clear()
    fake_zfs.calls.clear()
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    # the token is decoded by zrepl.py itself, never by running zfs on what a peer sent
    assert ["zfs", "send", "-n", "-v", "-t", token] not in fake_zfs.calls
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "-t", token]]
    assert world.snapshots(TARGET) == ["b", "c"] and world.resume_token(TARGET) is None
    assert world.guid(f"{TARGET}@c") == world.guid("src/data@c") and world.holds("src/data@c") == set()


def test_a_temporary_failure_is_retried_within_the_run(fake_zfs, world, tmp_path):
    fake_zfs.fail("recv", stderr="cannot receive: dataset is busy\n", times=1)
    result = push(fake_zfs, config(tmp_path, filesystems={SRC: True}))
    assert result.code == 0, result
    assert len(fake_zfs.calls_of("recv")) == 2 and world.snapshots(TARGET) == ["b"]
    assert "retrying 1 filesystem(s)" in result.stderr


def test_placeholders_stand_in_for_unreplicated_parents_and_a_full_receive_replaces_one(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, filesystems={"src/data/child": True})
    assert push(fake_zfs, cfg).code == 0
    assert world.snapshots(f"{TARGET}/child") == ["x"]
    assert world.snapshots(TARGET) == [] and world.property(TARGET, "zrepl:placeholder") == ("on", "local")
    # the parent joins the filter: its full stream goes into the placeholder, forced (-F)
    cfg = config(tmp_path, filesystems={"src/data<": True})
    fake_zfs.calls.clear()
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    assert ["recv", "-u", "-s", "-F", *SAFE_RECEIVE, "-o", "zrepl:placeholder=off", TARGET] in changes(fake_zfs.calls)
    assert world.snapshots(TARGET) == ["b"] and world.get(TARGET, "zrepl:placeholder") == "off"
    assert world.snapshots(f"{TARGET}/child") == ["x"]  # the child below the placeholder is untouched


def test_a_receiver_dataset_with_data_is_never_received_over(fake_zfs, world, tmp_path):
    world.tree("dst", "sink/client1/src/data")  # made by an admin: not a placeholder
    world.write(TARGET)
    result = push(fake_zfs, config(tmp_path, filesystems={SRC: True}))
    assert result.code == 1
    assert [c for c in changes(fake_zfs.calls) if c[0] == "recv"] == []
    rep = fs_status(tmp_path / "zrepl.toml", "push", SRC)
    assert rep["state"] == "planning-error" and TARGET in rep["error"]
    assert world.snapshots(TARGET) == []


def test_a_diverged_receiver_is_refused_with_recovery_commands(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, filesystems={SRC: True})
    assert push(fake_zfs, cfg).code == 0
    world.snapshot(f"{TARGET}@rogue")
    world.tree("src", "data @c")
    before = [c for c in fake_zfs.calls]
    result = push(fake_zfs, cfg)
    assert result.code == 1
    assert changes(fake_zfs.calls[len(before):]) == []
    rep = fs_status(cfg, "push", SRC)
    assert rep["state"] == "planning-error" and rep["error_details"]["recovery_commands"]
    assert world.snapshots(TARGET) == ["b", "rogue"]


def test_a_push_with_nothing_to_do_lists_each_side_once(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(5)], keep_receiver=[last_n(5)])
    assert push(fake_zfs, cfg).code == 0
    fake_zfs.calls.clear()
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    # pruning reused both listings; the sink lists only this client's subtree
    assert fake_zfs.calls == [list_r("src"), list_r("dst/sink/client1")]


@pytest.mark.parametrize("level,during,after", [
    ("guarantee_resumability", {"hold zrepl_STEP_J_push"}, {"cursor"}),
    ("guarantee_incremental", {"tentative"}, {"cursor"}),
    ("guarantee_nothing", set(), set()),
])
def test_protection_levels_place_and_release_step_holds_and_cursors(fake_zfs, world, tmp_path, level, during,
                                                                       after):
    cfg = config(tmp_path, filesystems={SRC: True},
                 replication={"protection": {"initial": level, "incremental": level}})
    assert push(fake_zfs, cfg).code == 0
    world.tree("src", "data @c")
    fake_zfs.calls.clear()
    assert push(fake_zfs, cfg).code == 0
    before_send = changes(fake_zfs.calls[:fake_zfs.calls.index(["zfs", "send", "-v", "-P", "-i", "src/data@b",
                                                                 "src/data@c"])])
    placed = set()
    for argv in before_send:
        if argv[:2] == ["hold", "zrepl_STEP_J_push"]:
            assert argv[2:] == ["src/data@c", "src/data@b"]  # the step's snapshot and its base
            placed.add("hold zrepl_STEP_J_push")
        if argv[0] == "bookmark" and "zrepl_CURSORTENTATIVE_" in argv[2]:
            placed.add("tentative")
    assert placed == during
    left = {"cursor" for b in world.bookmarks(SRC) if b.startswith("zrepl_CURSOR_G_")}
    assert left == after and not [b for b in world.bookmarks(SRC) if "TENTATIVE" in b]
    assert all(world.holds(f"src/data@{s}") == set() for s in "bc")


def test_a_dry_run_changes_nothing_and_shows_the_plan_and_estimates(fake_zfs, world, tmp_path):
    result = push(fake_zfs, config(tmp_path, keep_sender=[last_n(1)]), "--dry-run")
    assert result.code == 0, result
    assert changes(fake_zfs.calls) == [] and real_sends(fake_zfs.calls) == []
    assert "full send of src/data@b" in result.stdout
    estimates = [line for line in result.stdout.splitlines() if line.strip().startswith("estimate ")]
    assert len(estimates) == 2 and not any(line.endswith("unknown") for line in estimates)
    assert "would destroy src/data@a" in result.stdout


def test_encrypted_sends_are_raw_and_refused_for_unencrypted_datasets(fake_zfs, world, tmp_path):
    world.create("src/secret", encrypted=True)
    world.tree("src", "secret @s1")
    cfg = config(tmp_path, filesystems={"src/secret": True, SRC: True}, send={"encrypted": True})
    result = push(fake_zfs, cfg)
    assert result.code == 1
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "-w", "src/secret@s1"]]
    secret = "dst/sink/client1/src/secret"
    assert (world.get(secret, "encryption"), world.get(secret, "keystatus")) == ("aes-256-gcm", "unavailable")
    rep = fs_status(cfg, "push", SRC)  # send.encrypted with a plain dataset: never sent in the clear
    assert rep["state"] == "planning-error" and not world.exists(TARGET)


def test_the_status_document_records_the_run(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(1)])
    assert push(fake_zfs, cfg).code == 0
    doc = job_status(cfg, "push")
    assert doc["last_run"]["result"] == "ok" and doc["state"] == "idle"
    assert sorted(doc["replication"]["filesystems"]) == [SRC, "src/data/child"]
    assert doc["pruning_sender"]["destroyed"] == ["src/data@a"]
    assert json.loads(json.dumps(doc)) == doc


def test_bookkeeping_lost_twice_is_put_back_within_the_run(fake_zfs, tmp_path):
    """The one batched last-received hold fails once (both filesystems' completions are lost),
    then the retry's first cursor bookmark fails once: the next attempt still puts every hold and
    cursor in place, nothing is sent twice, and the run is OK."""
    w = fake_zfs.world
    w.tree("src", "one @a\ntwo @a")
    w.tree("dst", "sink")
    cfg = write_config(tmp_path, push_job(filesystems={"src/one": True, "src/two": True}), sink_job(root_fs="dst/sink"))
    fake_zfs.fail("hold", match="zrepl_last_received", times=1, stderr="cannot hold: injected\n")
    fake_zfs.fail("bookmark", match="zrepl_CURSOR_G", times=1, stderr="cannot create bookmark: injected\n")
    result = push(fake_zfs, cfg)
    assert result.code == 0, result
    for fs in ("one", "two"):
        assert w.holds(f"dst/sink/client1/src/{fs}@a") == {"zrepl_last_received_J_sink"}
        assert w.bookmarks(f"src/{fs}") == [cursor(w, f"src/{fs}@a")]
        assert w.holds(f"src/{fs}@a") == set()
    assert len(fake_zfs.calls_of("recv")) == 2
