"""push/sink and pull/source over the local transport, on real OpenZFS (faults and races:
test_replication_faults_zfs.py).

Every test asserts what ZFS holds afterwards (GUIDs, snapshots, holds, bookmarks) and what the
status file says, not only exit codes. Faults come from the zfs_shim fixture. Each zrepl.py run
costs seconds in the emulated guest, so tests combine jobs in one config and one invocation
where the scenarios do not interfere, and use the shim only when they need it.
"""
from __future__ import annotations

import time
from pathlib import Path

from repltest import cursor, fill, push_sink, run, same_guids, state, tentative
from support import (bookmarks, fs_status, holds, last_n, not_replicated, periodic, pull_job, push_job, real_sends,
                     sink_job, snapshots, source_job, status, write_config)
from zfstest import ZFS, exists, get, guid, list_all, send_recv, zfs


# ---- tests -------------------------------------------------------------------------------------

def test_push_initial_then_incremental(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @b @a\ndata/child one @x")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst))
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, target) == ["a"]  # most_recent: only the newest (by createtxg)
    assert guid(f"{target}@a") == guid(f"{src}/data@a")
    assert snapshots(ZFS, f"{target}/child one") == ["x"]
    assert zfs("get", "-H", "-o", "value", "zrepl:placeholder", f"{dst}/sink/client1").strip() == "on"
    zfs_tree(src, "data @c @d")
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, target) == ["a", "c", "d"]
    sends = [c.argv for c in zfs_shim.calls("send") if "-n" not in c.argv]
    assert any("-I" in argv for argv in sends)  # c and d in one -I stream
    doc = status(cfg)["jobs"]["push"]
    fsdoc = doc["replication"]["filesystems"][f"{src}/data"]
    assert fsdoc["state"] == "done" and fsdoc["last_replicated"] == f"{src}/data@d"
    cursor = [r.name for r in list_all(f"{src}/data") if r.type == "bookmark"]
    assert any("zrepl_CURSOR_G_" in n and n.endswith("_J_push") for n in cursor)


def test_initial_replication_all_and_fail(make_pool, zfs_tree, zfs_shim, tmp_path):
    """initial_replication = all sends every snapshot in order (one full + one -I); = fail refuses
    and creates nothing. Two push jobs into one sink, run in one invocation."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b @c\nother @x")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path,
                       push_job("pushall", filesystems={f"{src}/data": True}, client_identity="all",
                                initial_replication="all"),
                       push_job("pushfail", filesystems={f"{src}/other": True}, client_identity="fail",
                                initial_replication="fail"),
                       sink_job("sink", root_fs=f"{dst}/sink"))
    proc = run(zfs_shim, cfg, "run", "pushall", "pushfail")
    assert proc.returncode == 1, proc.stderr
    target = f"{dst}/sink/all/{src}/data"
    assert snapshots(ZFS, target) == ["a", "b", "c"] and same_guids(target, f"{src}/data")
    sends = real_sends(zfs_shim.calls())
    assert sends == [["send", "-v", "-P", f"{src}/data@a"],
                     ["send", "-v", "-P", "-I", f"{src}/data@a", f"{src}/data@c"]]
    assert not exists(f"{dst}/sink/fail")  # nothing created for the refused job
    assert holds(ZFS, f"{src}/other@x") == set() and bookmarks(ZFS, f"{src}/other") == []
    rep = fs_status(cfg, "pushfail", f"{src}/other")
    assert rep["state"] == "planning-error" and "initial_replication = 'fail'" in rep["error"]
    assert status(cfg)["jobs"]["pushfail"]["last_run"]["result"] != "ok"
    assert fs_status(cfg, "pushall", f"{src}/data")["state"] == "done"


def test_incremental_from_cursor_bookmark_with_spaces_in_names(make_pool, zfs_tree, zfs_shim, tmp_path):
    """After the common snapshot is destroyed on the sender, the replication cursor bookmark is
    the incremental source (`-i #cursor`, then `-I` for the rest). Dataset and snapshot names
    contain spaces throughout."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "my data @snap one")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/my data": True}))
    assert run(zfs_shim, cfg, "run", "push").returncode == 0
    sfs, target = f"{src}/my data", f"{dst}/sink/client1/{src}/my data"
    first_cursor = cursor(f"{sfs}@snap one", "push")
    assert bookmarks(ZFS, sfs) == [first_cursor]
    assert holds(ZFS, f"{sfs}@snap one") == set()  # step hold released after the cursor moved
    assert holds(ZFS, f"{target}@snap one") == {"zrepl_last_received_J_sink"}
    zfs("destroy", f"{sfs}@snap one")  # e.g. pruned by another tool
    zfs_tree(src, "my data @snap two @snap three")
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, target) == ["snap one", "snap two", "snap three"]
    assert guid(f"{target}@snap three") == guid(f"{sfs}@snap three")
    assert real_sends(zfs_shim.calls()) == [["send", "-v", "-P", "-i", f"{sfs}#{first_cursor}", f"{sfs}@snap two"],
                                    ["send", "-v", "-P", "-i", f"{sfs}@snap two", f"{sfs}@snap three"]]
    assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@snap three", "push")]  # the old cursor is stale now
    assert holds(ZFS, f"{target}@snap one") == set() and holds(ZFS, f"{target}@snap two") == set()
    assert holds(ZFS, f"{target}@snap three") == {"zrepl_last_received_J_sink"}
    rep = fs_status(cfg, "push", sfs)
    assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@snap three"


def test_full_send_cut_then_resumed_next_run_with_new_snapshots(make_pool, zfs_tree, zfs_shim, tmp_path):
    """A full send cut mid-stream leaves a resume token; the run's retries cannot reach the sender
    (resume sends fail). The next run resumes with `zfs send -t`, then sends the snapshots taken
    in between incrementally."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "big data")
    fill(f"{src}/big data", 4 << 20)
    zfs_tree(src, "big data @s1")
    zfs_tree(dst, "sink")
    sfs, target = f"{src}/big data", f"{dst}/sink/client1/{src}/big data"
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={sfs: True}))
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match="send -v -P")  # the data send, not the estimate
    zfs_shim.fail("send", match="send -v -P -t", stderr="ssh: connection reset by peer\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    assert get(target, "receive_resume_token") != "-"
    assert snapshots(ZFS, target) == []
    assert holds(ZFS, f"{sfs}@s1") == {"zrepl_STEP_J_push"}  # resumability: the sender keeps `to`
    rep = fs_status(cfg, "push", sfs)
    assert rep["state"] == "step-error" and "connection reset" in rep["error"]
    zfs_shim.clear()
    zfs_shim.reset_log()
    zfs_tree(src, "big data @s2 @s3")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    sends = real_sends(zfs_shim.calls())
    assert sends[0][:4] == ["send", "-v", "-P", "-t"]  # resumed, not restarted
    assert sends[1:] == [["send", "-v", "-P", "-I", f"{sfs}@s1", f"{sfs}@s3"]]
    assert snapshots(ZFS, target) == ["s1", "s2", "s3"] and same_guids(target, sfs)
    assert get(target, "receive_resume_token") == "-"
    assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@s3", "push")]
    assert all(holds(ZFS, f"{sfs}@{s}") == set() for s in ("s1", "s2", "s3"))
    rep = fs_status(cfg, "push", sfs)
    assert rep["state"] == "done" and rep["error"] is None and rep["last_replicated"] == f"{sfs}@s3"


def test_incremental_send_cut_is_resumed_within_the_run(make_pool, zfs_tree, zfs_shim, tmp_path):
    """An incremental -I package cut mid-stream is resumed by the run's retry (`send -t` finishes
    the snapshot in flight), and the rest follows incrementally."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst))
    assert run(None, cfg, "run", "push").returncode == 0
    fill(f"{src}/data", 3 << 20)
    zfs_tree(src, "data @b @c")
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match="send -v -P")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    sends = real_sends(zfs_shim.calls())
    sfs, target = f"{src}/data", f"{dst}/sink/client1/{src}/data"
    assert sends[0] == ["send", "-v", "-P", "-I", f"{sfs}@a", f"{sfs}@c"]
    assert sends[1][:4] == ["send", "-v", "-P", "-t"]
    assert snapshots(ZFS, target) == ["a", "b", "c"] and same_guids(target, sfs)
    assert get(target, "receive_resume_token") == "-"
    assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@c", "push")]
    assert holds(ZFS, f"{target}@c") == {"zrepl_last_received_J_sink"} and holds(ZFS, f"{target}@b") == set()
    rep = fs_status(cfg, "push", sfs)
    assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@c"


def test_receiver_failing_while_the_sender_still_sends(make_pool, zfs_tree, zfs_shim, tmp_path):
    """`zfs recv` hangs without reading, then fails, while `zfs send` still has megabytes to write:
    the send must not block forever, the log names the receiver's error, the retry succeeds."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data")
    fill(f"{src}/data", 2 << 20)
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst))
    zfs_shim.hang("recv", seconds=3, times=1, stderr="cannot receive new filesystem stream: injected I/O error\n")
    started = time.monotonic()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 120  # not the 10-minute watchdog
    assert "injected I/O error" in proc.stderr
    assert [c.action for c in zfs_shim.calls("recv")] == ["hang", "pass"]
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, target) == ["a"] and same_guids(target, f"{src}/data")
    assert fs_status(cfg, "push", f"{src}/data")["state"] == "done"


def test_one_filesystem_failing_does_not_stop_others_and_blocks_its_children(make_pool, zfs_tree, zfs_shim,
                                                                             tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "a @1\na/child @1\nb @1")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/a<": True, f"{src}/b": True}))
    zfs_shim.fail("send", match=f"send -v -P {src}/a@", stderr="cannot send: injected sender failure\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    base = f"{dst}/sink/client1/{src}"
    assert snapshots(ZFS, f"{base}/b") == ["1"] and same_guids(f"{base}/b", f"{src}/b")
    assert not exists(f"{base}/a") and not exists(f"{base}/a/child")
    assert not any(f"{src}/a/child@" in " ".join(argv) for argv in real_sends(zfs_shim.calls()))
    a = fs_status(cfg, "push", f"{src}/a")
    assert a["state"] == "step-error" and "injected sender failure" in a["error"]
    child = fs_status(cfg, "push", f"{src}/a/child")
    assert child["state"] == "blocked" and child["blocked_by"] == f"{src}/a"
    assert fs_status(cfg, "push", f"{src}/b")["state"] == "done"
    failures = status(cfg)["jobs"]["push"]["last_run"]["failures"]
    assert set(failures) == {f"{src}/a", f"{src}/a/child"}


def test_lost_completion_is_recognised_by_the_next_attempt(make_pool, zfs_tree, zfs_shim, tmp_path):
    """The data arrived but the bookkeeping after it failed once: on `one` the receiver's
    last-received hold, on `two` the sender's cursor bookmark. The retry must see that the
    snapshot is there, put the missing hold/cursor in place, and later runs go on incrementally."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "one @a\ntwo @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/one": True, f"{src}/two": True}))
    zfs_shim.fail("hold", match="zrepl_last_received", times=1, stderr="cannot hold: injected\n")
    zfs_shim.fail("bookmark", match="zrepl_CURSOR_G", times=1, stderr="cannot create bookmark: injected\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    base = f"{dst}/sink/client1/{src}"
    for fs in ("one", "two"):
        assert snapshots(ZFS, f"{base}/{fs}") == ["a"]
        assert holds(ZFS, f"{base}/{fs}@a") == {"zrepl_last_received_J_sink"}
        assert bookmarks(ZFS, f"{src}/{fs}") == [cursor(f"{src}/{fs}@a", "push")]
        assert holds(ZFS, f"{src}/{fs}@a") == set()  # the step hold went with the completion
    assert [c.action for c in zfs_shim.calls("recv")] == ["pass", "pass"]  # nothing was sent twice
    zfs_tree(src, "one @b\ntwo @b")
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert all(" -i " in " ".join(argv) for argv in real_sends(zfs_shim.calls()))  # incremental, no new full send
    for fs in ("one", "two"):
        assert snapshots(ZFS, f"{base}/{fs}") == ["a", "b"] and same_guids(f"{base}/{fs}", f"{src}/{fs}")
        assert bookmarks(ZFS, f"{src}/{fs}") == [cursor(f"{src}/{fs}@b", "push")]
        assert fs_status(cfg, "push", f"{src}/{fs}")["state"] == "done"


def test_placeholders_chained_a_to_b_to_c(make_pool, zfs_tree, tmp_path):
    """A pushes to sink B; a second job pushes B's received tree (below placeholders) to sink C."""
    a, b, c = make_pool("a"), make_pool("b"), make_pool("c")
    zfs_tree(a, "data @1\ndata/sub @s")
    zfs_tree(b, "sink")
    zfs_tree(c, "sink")
    cfg = write_config(tmp_path,
                       push_job("ab", filesystems={f"{a}/data<": True}, listener="b", client_identity="ida"),
                       sink_job("sinkb", root_fs=f"{b}/sink", listener="b"),
                       push_job("bc", filesystems={f"{b}/sink/ida<": True}, listener="c", client_identity="idb"),
                       sink_job("sinkc", root_fs=f"{c}/sink", listener="c"))
    # one run per hop: jobs of one `run` proceed independently, so bc would not wait for ab
    for job in ("ab", "bc"):
        proc = run(None, cfg, "run", job)
        assert proc.returncode == 0, proc.stderr
    on_b = f"{b}/sink/ida/{a}/data"
    on_c = f"{c}/sink/idb/{b}/sink/ida/{a}/data"
    for ph in (f"{b}/sink/ida", f"{b}/sink/ida/{a}", f"{c}/sink/idb", f"{c}/sink/idb/{b}", f"{c}/sink/idb/{b}/sink",
               f"{c}/sink/idb/{b}/sink/ida", f"{c}/sink/idb/{b}/sink/ida/{a}"):
        assert get(ph, "zrepl:placeholder") == "on" and snapshots(ZFS, ph) == [], ph
    for fs in (on_b, on_c):
        assert get(fs, "zrepl:placeholder") == "off"
        assert snapshots(ZFS, fs) == ["1"] and same_guids(fs, f"{a}/data")
        assert snapshots(ZFS, f"{fs}/sub") == ["s"] and same_guids(f"{fs}/sub", f"{a}/data/sub")
    assert holds(ZFS, f"{on_b}@1") == {"zrepl_last_received_J_sinkb"}
    assert holds(ZFS, f"{on_c}@1") == {"zrepl_last_received_J_sinkc"}
    assert bookmarks(ZFS, on_b) == [cursor(f"{on_b}@1", "bc")]
    zfs_tree(a, "data @2")
    for job in ("ab", "bc"):
        proc = run(None, cfg, "run", job)
        assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, on_c) == ["1", "2"] and same_guids(on_c, f"{a}/data")
    assert fs_status(cfg, "bc", on_b)["state"] == "done"
    assert fs_status(cfg, "bc", f"{b}/sink/ida")["error"] is None  # a placeholder: nothing to send


def test_placeholder_replaced_when_its_filesystem_is_selected_later(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @d1\ndata/child @c1")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data/child": True}))
    assert run(None, cfg, "run", "push").returncode == 0
    target = f"{dst}/sink/client1/{src}/data"
    assert get(target, "zrepl:placeholder") == "on" and snapshots(ZFS, target) == []
    child_guid = guid(f"{target}/child@c1")
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data<": True}))
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert get(target, "zrepl:placeholder") == "off"
    assert snapshots(ZFS, target) == ["d1"] and same_guids(target, f"{src}/data")
    assert guid(f"{target}/child@c1") == child_guid  # the child was not touched
    recvs = [c.argv for c in zfs_shim.calls("recv")]
    assert len(recvs) == 1 and "-F" in recvs[0] and recvs[0][-1] == target
    assert fs_status(cfg, "push", f"{src}/data")["state"] == "done"


def test_received_properties_inherit_and_override(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data {compression=gzip}")
    zfs("set", "user:note=secret", f"{src}/data")
    zfs("set", "user:keep=yes", f"{src}/data")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    recv = {"properties": {"inherit": ["user:note"], "override": {"compression": "lz4"}}}
    cfg = write_config(tmp_path, *push_sink(src, dst, send={"send_properties": True}, recv=recv))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    assert same_guids(target, f"{src}/data")

    def value_source(prop: str) -> list[str]:
        return zfs("get", "-H", "-o", "value,source", prop, target).strip().split("\t")
    assert value_source("user:keep") == ["yes", "received"]
    assert value_source("user:note")[0] == "-"  # inherited, i.e. not taken from the stream
    assert value_source("compression") == ["lz4", "local"]


def test_encrypted_raw_send_and_both_refusals(make_pool, zfs_tree, zfs_shim, tmp_path):
    """send.encrypted = true sends raw (-w): the receiver gets ciphertext without the key. It refuses
    an unencrypted filesystem (and its not yet replicated child is blocked); send.raw without
    send.encrypted refuses an encrypted one. Nothing is sent for a refused filesystem."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "secret {encryption=on} @a\nplain @p\nplain/enc {encryption=on} @e")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path,
                       push_job("pushenc", filesystems={f"{src}/secret": True, f"{src}/plain<": True},
                                client_identity="enc", send={"encrypted": True}),
                       push_job("pushraw", filesystems={f"{src}/secret": True}, client_identity="raw",
                                send={"raw": True}),
                       sink_job("sink", root_fs=f"{dst}/sink"))
    proc = run(zfs_shim, cfg, "run", "pushenc", "pushraw")
    assert proc.returncode == 1, proc.stderr
    target = f"{dst}/sink/enc/{src}/secret"
    assert snapshots(ZFS, target) == ["a"] and same_guids(target, f"{src}/secret")
    assert get(target, "encryption") != "off" and get(target, "keystatus") == "unavailable"
    assert real_sends(zfs_shim.calls()) == [["send", "-v", "-P", "-w", f"{src}/secret@a"]]
    assert bookmarks(ZFS, f"{src}/secret") == [cursor(f"{src}/secret@a", "pushenc")]
    assert holds(ZFS, f"{src}/secret@a") == set() and holds(ZFS, f"{src}/plain@p") == set()
    plain = fs_status(cfg, "pushenc", f"{src}/plain")
    assert plain["state"] == "planning-error" and "not encrypted" in plain["error"]
    child = fs_status(cfg, "pushenc", f"{src}/plain/enc")
    assert child["state"] == "blocked" and child["blocked_by"] == f"{src}/plain"
    assert not exists(f"{dst}/sink/enc/{src}/plain")
    raw = fs_status(cfg, "pushraw", f"{src}/secret")
    assert raw["state"] == "planning-error" and "send.encrypted = false" in raw["error"]
    assert not exists(f"{dst}/sink/raw")


def test_stale_abstractions_are_removed_for_this_job_only(make_pool, zfs_tree, tmp_path):
    """Leftover holds and bookmarks of this job go once replication moves on; another job's with
    zrepl-style names stay, on the sender and on the receiver."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b")
    zfs_tree(dst, "sink")
    sfs, target = f"{src}/data", f"{dst}/sink/client1/{src}/data"
    zfs("create", "-p", f"{dst}/sink/client1/{src}")
    send_recv([f"{sfs}@a"], ["-u", target])  # replicated earlier; this job's bookkeeping follows
    for job in ("other", "push"):
        zfs("bookmark", f"{sfs}@a", f"{sfs}#{cursor(f'{sfs}@a', job)}")
        zfs("bookmark", f"{sfs}@a", f"{sfs}#{tentative(f'{sfs}@a', job)}")
        zfs("hold", f"zrepl_STEP_J_{job}", f"{sfs}@a")
    zfs("hold", "zrepl_last_received_J_othersink", f"{target}@a")
    zfs("hold", "zrepl_last_received_J_sink", f"{target}@a")
    cfg = write_config(tmp_path, *push_sink(src, dst))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, target) == ["a", "b"] and same_guids(target, sfs)
    assert bookmarks(ZFS, sfs) == sorted([cursor(f"{sfs}@a", "other"), tentative(f"{sfs}@a", "other"),
                                     cursor(f"{sfs}@b", "push")])
    assert holds(ZFS, f"{sfs}@a") == {"zrepl_STEP_J_other"} and holds(ZFS, f"{sfs}@b") == set()
    assert holds(ZFS, f"{target}@a") == {"zrepl_last_received_J_othersink"}
    assert holds(ZFS, f"{target}@b") == {"zrepl_last_received_J_sink"}


def test_diverged_receiver_and_unsnapshotted_target_are_refused_untouched(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "div @a\nkeep @k")
    zfs_tree(dst, "sink")
    base = f"{dst}/sink/client1/{src}"
    zfs("create", "-p", base)
    send_recv([f"{src}/div@a"], ["-u", f"{base}/div"])
    zfs("snapshot", f"{base}/div@rogue")  # the receiver moved on by itself
    zfs_tree(src, "div @b")
    zfs("create", f"{base}/keep")  # someone's data where the copy of keep would go
    (Path(get(f"{base}/keep", "mountpoint")) / "precious.txt").write_text("do not overwrite")
    before = state(src, dst)
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/div": True, f"{src}/keep": True}))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    assert state(src, dst) == before  # nothing created, destroyed, held or released anywhere
    assert (Path(get(f"{base}/keep", "mountpoint")) / "precious.txt").read_text() == "do not overwrite"
    div = fs_status(cfg, "push", f"{src}/div")
    assert div["state"] == "planning-error"
    details = div["error_details"]
    assert details["common"] == "a" and details["sender_only"] == ["b"] and details["receiver_only"] == ["rogue"]
    assert f"zfs rollback -r {base}/div@a" in details["recovery_commands"]
    for word in ("diverged", "a", "rogue", "b", f"zfs rollback -r {base}/div@a", "zfs rename"):
        assert word in div["error"], word
    keep = fs_status(cfg, "push", f"{src}/keep")
    assert keep["state"] == "planning-error" and "refusing to overwrite" in keep["error"]
    assert keep["error_details"]["recovery_commands"] == [f"zfs rename {base}/keep {base}/keep-zrepl-aside"]


def test_pull_from_a_source_that_takes_its_own_snapshots(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @old\ndata/child")
    zfs_tree(dst, "pulled")
    cfg = write_config(tmp_path, source_job("source", filesystems={f"{src}/data<": True}, listener="src",
                                            snapshotting=periodic("1h")),
                       pull_job("pull", root_fs=f"{dst}/pulled", listener="src", client_identity="backup",
                                keep_sender=[not_replicated(), last_n(1)]))
    proc = run(None, cfg, "run", "source")
    assert proc.returncode == 0, proc.stderr
    taken = snapshots(ZFS, f"{src}/data/child")
    assert len(taken) == 1 and taken[0].startswith("zrepl_") and snapshots(ZFS, f"{src}/data") == ["old", *taken]
    proc = run(None, cfg, "run", "pull")
    assert proc.returncode == 0, proc.stderr
    snap = taken[0]
    # most_recent sent only the new snapshot; @old is older than the cursor, so not_replicated
    # counts it as replicated and last_n 1 pruned it on the source, through the connection
    assert snapshots(ZFS, f"{src}/data") == [snap]
    assert status(cfg)["jobs"]["pull"]["pruning_sender"]["destroyed"] == [f"{src}/data@old"]
    target = f"{dst}/pulled/{src}/data"
    assert get(f"{dst}/pulled/{src}", "zrepl:placeholder") == "on"
    for sfs, rfs in ((f"{src}/data", target), (f"{src}/data/child", f"{target}/child")):
        assert snapshots(ZFS, rfs) == [snap] and same_guids(rfs, sfs)
        assert holds(ZFS, f"{rfs}@{snap}") == {"zrepl_last_received_J_pull"}
        assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@{snap}", "source")]  # the sending job's cursor
        assert holds(ZFS, f"{sfs}@{snap}") == set()
        rep = fs_status(cfg, "pull", sfs)
        assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@{snap}"


def test_dry_run_push_changes_nothing(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a\ndata/child @x")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, keep_sender=[last_n(1)], snapshotting=periodic("1h")))
    before = state(src, dst)
    proc = run(zfs_shim, cfg, "run", "--dry-run", "push")
    assert proc.returncode == 0, proc.stderr
    assert state(src, dst) == before
    changing = {"snapshot", "hold", "release", "bookmark", "create", "recv", "destroy", "rename", "set", "inherit"}
    assert [c.argv for c in zfs_shim.calls() if c.verb in changing] == []
    assert real_sends(zfs_shim.calls()) == []
    assert "would snapshot" in proc.stdout
    if "full send" in proc.stdout:  # the replication plan and its estimates, once the CLI prints them
        assert f"full send of {src}/data@a" in proc.stdout and f"full send of {src}/data/child@x" in proc.stdout
        estimates = [line for line in proc.stdout.splitlines() if line.strip().startswith("estimate ")]
        assert len(estimates) == 2 and not any(line.endswith("unknown") for line in estimates), proc.stdout


def test_nothing_to_do_costs_two_listings_and_prunes_from_them(make_pool, zfs_tree, zfs_shim, tmp_path):
    """A push run with nothing to send lists each side once: pruning reuses the listings the plan
    was made from, since replication changed neither side. With something to send, pruning lists
    again and sees what arrived."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b\ndata/child @a @b")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, *push_sink(src, dst, keep_sender=[not_replicated(), last_n(2)],
                                            keep_receiver=[last_n(2)], initial_replication="all"))
    assert run(None, cfg, "run", "push").returncode == 0
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert [c.verb for c in zfs_shim.calls()] == ["list", "list"]
    # new snapshots: replication runs, so pruning must not trust the old listings
    zfs("snapshot", "-r", f"{src}/data@c")
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, f"{src}/data") == ["b", "c"] and snapshots(ZFS, target) == ["b", "c"]
    assert snapshots(ZFS, f"{target}/child") == ["b", "c"]
    doc = status(cfg)["jobs"]["push"]
    assert sorted(doc["pruning_receiver"]["destroyed"]) == [f"{target}/child@a", f"{target}@a"]
    assert sorted(doc["pruning_sender"]["destroyed"]) == [f"{src}/data/child@a", f"{src}/data@a"]
