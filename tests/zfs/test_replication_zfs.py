"""push/sink and pull/source over the local transport, on real OpenZFS.

Every test asserts what ZFS holds afterwards (GUIDs, snapshots, holds, bookmarks) and what the
status file says, not only exit codes. Faults come from the zfs_shim fixture. Each zrepl.py run
costs seconds in the emulated guest, so tests combine jobs in one config and one invocation
where the scenarios do not interfere, and use the shim only when they need it.
"""
from __future__ import annotations

import time
from pathlib import Path

from repltest import (bookmarks, cursor, fill, fs_status, holds, push_job, push_sink, real_sends, run, same_guids,
                      sink_job, snapshots, state, status, tentative, write_config)
from zfstest import exists, get, guid, list_all, send_recv, zfs


# ---- tests -------------------------------------------------------------------------------------

def test_push_initial_then_incremental(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @b @a\ndata/child one @x")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst))
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(target) == ["a"]  # most_recent: only the newest (by createtxg)
    assert guid(f"{target}@a") == guid(f"{src}/data@a")
    assert snapshots(f"{target}/child one") == ["x"]
    assert zfs("get", "-H", "-o", "value", "zrepl:placeholder", f"{dst}/sink/client1").strip() == "on"
    zfs_tree(src, "data @c @d")
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(target) == ["a", "c", "d"]
    sends = [c.argv for c in zfs_shim.calls("send") if "-n" not in c.argv]
    assert any("-I" in argv for argv in sends)  # c and d in one -I stream
    doc = status(tmp_path)["jobs"]["push"]
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
    cfg = write_config(tmp_path, push_job("pushall", f'{{ "{src}/data" = true }}', identity="all", initial="all")
                       + push_job("pushfail", f'{{ "{src}/other" = true }}', identity="fail", initial="fail")
                       + sink_job("sink", f"{dst}/sink"))
    proc = run(zfs_shim, cfg, "run", "pushall", "pushfail")
    assert proc.returncode == 1, proc.stderr
    target = f"{dst}/sink/all/{src}/data"
    assert snapshots(target) == ["a", "b", "c"] and same_guids(target, f"{src}/data")
    sends = real_sends(zfs_shim)
    assert sends == [["send", "-v", "-P", f"{src}/data@a"],
                     ["send", "-v", "-P", "-I", f"{src}/data@a", f"{src}/data@c"]]
    assert not exists(f"{dst}/sink/fail")  # nothing created for the refused job
    assert holds(f"{src}/other@x") == set() and bookmarks(f"{src}/other") == []
    rep = fs_status(tmp_path, "pushfail", f"{src}/other")
    assert rep["state"] == "planning-error" and "initial_replication = 'fail'" in rep["error"]
    assert status(tmp_path)["jobs"]["pushfail"]["last_run"]["result"] != "ok"
    assert fs_status(tmp_path, "pushall", f"{src}/data")["state"] == "done"


def test_incremental_from_cursor_bookmark_with_spaces_in_names(make_pool, zfs_tree, zfs_shim, tmp_path):
    """After the common snapshot is destroyed on the sender, the replication cursor bookmark is
    the incremental source (`-i #cursor`, then `-I` for the rest). Dataset and snapshot names
    contain spaces throughout."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "my data @snap one")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/my data" = true }}'))
    assert run(zfs_shim, cfg, "run", "push").returncode == 0
    sfs, target = f"{src}/my data", f"{dst}/sink/client1/{src}/my data"
    first_cursor = cursor(f"{sfs}@snap one", "push")
    assert bookmarks(sfs) == [first_cursor]
    assert holds(f"{sfs}@snap one") == set()  # step hold released after the cursor moved
    assert holds(f"{target}@snap one") == {"zrepl_last_received_J_sink"}
    zfs("destroy", f"{sfs}@snap one")  # e.g. pruned by another tool
    zfs_tree(src, "my data @snap two @snap three")
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(target) == ["snap one", "snap two", "snap three"]
    assert guid(f"{target}@snap three") == guid(f"{sfs}@snap three")
    assert real_sends(zfs_shim) == [["send", "-v", "-P", "-i", f"{sfs}#{first_cursor}", f"{sfs}@snap two"],
                                    ["send", "-v", "-P", "-i", f"{sfs}@snap two", f"{sfs}@snap three"]]
    assert bookmarks(sfs) == [cursor(f"{sfs}@snap three", "push")]  # the old cursor is stale now
    assert holds(f"{target}@snap one") == set() and holds(f"{target}@snap two") == set()
    assert holds(f"{target}@snap three") == {"zrepl_last_received_J_sink"}
    rep = fs_status(tmp_path, "push", sfs)
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
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{sfs}" = true }}'))
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match="send -v -P")  # the data send, not the estimate
    zfs_shim.fail("send", match="send -v -P -t", stderr="ssh: connection reset by peer\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    assert get(target, "receive_resume_token") != "-"
    assert snapshots(target) == []
    assert holds(f"{sfs}@s1") == {"zrepl_STEP_J_push"}  # resumability: the sender keeps `to`
    rep = fs_status(tmp_path, "push", sfs)
    assert rep["state"] == "step-error" and "connection reset" in rep["error"]
    zfs_shim.clear()
    zfs_shim.reset_log()
    zfs_tree(src, "big data @s2 @s3")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    sends = real_sends(zfs_shim)
    assert sends[0][:4] == ["send", "-v", "-P", "-t"]  # resumed, not restarted
    assert sends[1:] == [["send", "-v", "-P", "-I", f"{sfs}@s1", f"{sfs}@s3"]]
    assert snapshots(target) == ["s1", "s2", "s3"] and same_guids(target, sfs)
    assert get(target, "receive_resume_token") == "-"
    assert bookmarks(sfs) == [cursor(f"{sfs}@s3", "push")]
    assert all(holds(f"{sfs}@{s}") == set() for s in ("s1", "s2", "s3"))
    rep = fs_status(tmp_path, "push", sfs)
    assert rep["state"] == "done" and rep["error"] is None and rep["last_replicated"] == f"{sfs}@s3"


def test_incremental_send_cut_is_resumed_within_the_run(make_pool, zfs_tree, zfs_shim, tmp_path):
    """An incremental -I package cut mid-stream is resumed by the run's retry (`send -t` finishes
    the snapshot in flight), and the rest follows incrementally."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst))
    assert run(None, cfg, "run", "push").returncode == 0
    fill(f"{src}/data", 3 << 20)
    zfs_tree(src, "data @b @c")
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match="send -v -P")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    sends = real_sends(zfs_shim)
    sfs, target = f"{src}/data", f"{dst}/sink/client1/{src}/data"
    assert sends[0] == ["send", "-v", "-P", "-I", f"{sfs}@a", f"{sfs}@c"]
    assert sends[1][:4] == ["send", "-v", "-P", "-t"]
    assert snapshots(target) == ["a", "b", "c"] and same_guids(target, sfs)
    assert get(target, "receive_resume_token") == "-"
    assert bookmarks(sfs) == [cursor(f"{sfs}@c", "push")]
    assert holds(f"{target}@c") == {"zrepl_last_received_J_sink"} and holds(f"{target}@b") == set()
    rep = fs_status(tmp_path, "push", sfs)
    assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@c"


def test_receiver_failing_while_the_sender_still_sends(make_pool, zfs_tree, zfs_shim, tmp_path):
    """`zfs recv` hangs without reading, then fails, while `zfs send` still has megabytes to write:
    the send must not block forever, the log names the receiver's error, the retry succeeds."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data")
    fill(f"{src}/data", 2 << 20)
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst))
    zfs_shim.hang("recv", seconds=3, times=1, stderr="cannot receive new filesystem stream: injected I/O error\n")
    started = time.monotonic()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 120  # not the 10-minute watchdog
    assert "injected I/O error" in proc.stderr
    assert [c.action for c in zfs_shim.calls("recv")] == ["hang", "pass"]
    target = f"{dst}/sink/client1/{src}/data"
    assert snapshots(target) == ["a"] and same_guids(target, f"{src}/data")
    assert fs_status(tmp_path, "push", f"{src}/data")["state"] == "done"


def test_one_filesystem_failing_does_not_stop_others_and_blocks_its_children(make_pool, zfs_tree, zfs_shim,
                                                                             tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "a @1\na/child @1\nb @1")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/a<" = true, "{src}/b" = true }}'))
    zfs_shim.fail("send", match=f"send -v -P {src}/a@", stderr="cannot send: injected sender failure\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    base = f"{dst}/sink/client1/{src}"
    assert snapshots(f"{base}/b") == ["1"] and same_guids(f"{base}/b", f"{src}/b")
    assert not exists(f"{base}/a") and not exists(f"{base}/a/child")
    assert not any(f"{src}/a/child@" in " ".join(argv) for argv in real_sends(zfs_shim))
    a = fs_status(tmp_path, "push", f"{src}/a")
    assert a["state"] == "step-error" and "injected sender failure" in a["error"]
    child = fs_status(tmp_path, "push", f"{src}/a/child")
    assert child["state"] == "blocked" and child["blocked_by"] == f"{src}/a"
    assert fs_status(tmp_path, "push", f"{src}/b")["state"] == "done"
    failures = status(tmp_path)["jobs"]["push"]["last_run"]["failures"]
    assert set(failures) == {f"{src}/a", f"{src}/a/child"}


def test_lost_completion_is_recognised_by_the_next_attempt(make_pool, zfs_tree, zfs_shim, tmp_path):
    """The data arrived but the bookkeeping after it failed once: on `one` the receiver's
    last-received hold, on `two` the sender's cursor bookmark. The retry must see that the
    snapshot is there, put the missing hold/cursor in place, and later runs go on incrementally."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "one @a\ntwo @a")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/one" = true, "{src}/two" = true }}'))
    zfs_shim.fail("hold", match="zrepl_last_received", times=1, stderr="cannot hold: injected\n")
    zfs_shim.fail("bookmark", match="zrepl_CURSOR_G", times=1, stderr="cannot create bookmark: injected\n")
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    base = f"{dst}/sink/client1/{src}"
    for fs in ("one", "two"):
        assert snapshots(f"{base}/{fs}") == ["a"]
        assert holds(f"{base}/{fs}@a") == {"zrepl_last_received_J_sink"}
        assert bookmarks(f"{src}/{fs}") == [cursor(f"{src}/{fs}@a", "push")]
        assert holds(f"{src}/{fs}@a") == set()  # the step hold went with the completion
    assert [c.action for c in zfs_shim.calls("recv")] == ["pass", "pass"]  # nothing was sent twice
    zfs_tree(src, "one @b\ntwo @b")
    zfs_shim.reset_log()
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert all(" -i " in " ".join(argv) for argv in real_sends(zfs_shim))  # incremental, no new full send
    for fs in ("one", "two"):
        assert snapshots(f"{base}/{fs}") == ["a", "b"] and same_guids(f"{base}/{fs}", f"{src}/{fs}")
        assert bookmarks(f"{src}/{fs}") == [cursor(f"{src}/{fs}@b", "push")]
        assert fs_status(tmp_path, "push", f"{src}/{fs}")["state"] == "done"


def test_placeholders_chained_a_to_b_to_c(make_pool, zfs_tree, tmp_path):
    """A pushes to sink B; a second job pushes B's received tree (below placeholders) to sink C."""
    a, b, c = make_pool("a"), make_pool("b"), make_pool("c")
    zfs_tree(a, "data @1\ndata/sub @s")
    zfs_tree(b, "sink")
    zfs_tree(c, "sink")
    cfg = write_config(tmp_path, push_job("ab", f'{{ "{a}/data<" = true }}', listener="b", identity="ida")
                       + sink_job("sinkb", f"{b}/sink", listener="b")
                       + push_job("bc", f'{{ "{b}/sink/ida<" = true }}', listener="c", identity="idb")
                       + sink_job("sinkc", f"{c}/sink", listener="c"))
    proc = run(None, cfg, "run", "ab", "bc")
    assert proc.returncode == 0, proc.stderr
    on_b = f"{b}/sink/ida/{a}/data"
    on_c = f"{c}/sink/idb/{b}/sink/ida/{a}/data"
    for ph in (f"{b}/sink/ida", f"{b}/sink/ida/{a}", f"{c}/sink/idb", f"{c}/sink/idb/{b}", f"{c}/sink/idb/{b}/sink",
               f"{c}/sink/idb/{b}/sink/ida", f"{c}/sink/idb/{b}/sink/ida/{a}"):
        assert get(ph, "zrepl:placeholder") == "on" and snapshots(ph) == [], ph
    for fs in (on_b, on_c):
        assert get(fs, "zrepl:placeholder") == "off"
        assert snapshots(fs) == ["1"] and same_guids(fs, f"{a}/data")
        assert snapshots(f"{fs}/sub") == ["s"] and same_guids(f"{fs}/sub", f"{a}/data/sub")
    assert holds(f"{on_b}@1") == {"zrepl_last_received_J_sinkb"}
    assert holds(f"{on_c}@1") == {"zrepl_last_received_J_sinkc"}
    assert bookmarks(on_b) == [cursor(f"{on_b}@1", "bc")]
    zfs_tree(a, "data @2")
    proc = run(None, cfg, "run", "ab", "bc")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(on_c) == ["1", "2"] and same_guids(on_c, f"{a}/data")
    assert fs_status(tmp_path, "bc", on_b)["state"] == "done"
    assert fs_status(tmp_path, "bc", f"{b}/sink/ida")["error"] is None  # a placeholder: nothing to send


def test_placeholder_replaced_when_its_filesystem_is_selected_later(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @d1\ndata/child @c1")
    zfs_tree(dst, "sink")
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/data/child" = true }}'))
    assert run(None, cfg, "run", "push").returncode == 0
    target = f"{dst}/sink/client1/{src}/data"
    assert get(target, "zrepl:placeholder") == "on" and snapshots(target) == []
    child_guid = guid(f"{target}/child@c1")
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/data<" = true }}'))
    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert get(target, "zrepl:placeholder") == "off"
    assert snapshots(target) == ["d1"] and same_guids(target, f"{src}/data")
    assert guid(f"{target}/child@c1") == child_guid  # the child was not touched
    recvs = [c.argv for c in zfs_shim.calls("recv")]
    assert len(recvs) == 1 and "-F" in recvs[0] and recvs[0][-1] == target
    assert fs_status(tmp_path, "push", f"{src}/data")["state"] == "done"


def test_received_properties_inherit_and_override(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data {compression=gzip}")
    zfs("set", "user:note=secret", f"{src}/data")
    zfs("set", "user:keep=yes", f"{src}/data")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    recv = '[jobs.recv.properties]\ninherit = ["user:note"]\noverride = { compression = "lz4" }'
    cfg = write_config(tmp_path, push_sink(src, dst, send="{ send_properties = true }", recv=recv))
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
                       push_job("pushenc", f'{{ "{src}/secret" = true, "{src}/plain<" = true }}', identity="enc",
                                send="{ encrypted = true }")
                       + push_job("pushraw", f'{{ "{src}/secret" = true }}', identity="raw", send="{ raw = true }")
                       + sink_job("sink", f"{dst}/sink"))
    proc = run(zfs_shim, cfg, "run", "pushenc", "pushraw")
    assert proc.returncode == 1, proc.stderr
    target = f"{dst}/sink/enc/{src}/secret"
    assert snapshots(target) == ["a"] and same_guids(target, f"{src}/secret")
    assert get(target, "encryption") != "off" and get(target, "keystatus") == "unavailable"
    assert real_sends(zfs_shim) == [["send", "-v", "-P", "-w", f"{src}/secret@a"]]
    assert bookmarks(f"{src}/secret") == [cursor(f"{src}/secret@a", "pushenc")]
    assert holds(f"{src}/secret@a") == set() and holds(f"{src}/plain@p") == set()
    plain = fs_status(tmp_path, "pushenc", f"{src}/plain")
    assert plain["state"] == "planning-error" and "not encrypted" in plain["error"]
    child = fs_status(tmp_path, "pushenc", f"{src}/plain/enc")
    assert child["state"] == "blocked" and child["blocked_by"] == f"{src}/plain"
    assert not exists(f"{dst}/sink/enc/{src}/plain")
    raw = fs_status(tmp_path, "pushraw", f"{src}/secret")
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
    cfg = write_config(tmp_path, push_sink(src, dst))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(target) == ["a", "b"] and same_guids(target, sfs)
    assert bookmarks(sfs) == sorted([cursor(f"{sfs}@a", "other"), tentative(f"{sfs}@a", "other"),
                                     cursor(f"{sfs}@b", "push")])
    assert holds(f"{sfs}@a") == {"zrepl_STEP_J_other"} and holds(f"{sfs}@b") == set()
    assert holds(f"{target}@a") == {"zrepl_last_received_J_othersink"}
    assert holds(f"{target}@b") == {"zrepl_last_received_J_sink"}


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
    cfg = write_config(tmp_path, push_sink(src, dst, filesystems=f'{{ "{src}/div" = true, "{src}/keep" = true }}'))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    assert state(src, dst) == before  # nothing created, destroyed, held or released anywhere
    assert (Path(get(f"{base}/keep", "mountpoint")) / "precious.txt").read_text() == "do not overwrite"
    div = fs_status(tmp_path, "push", f"{src}/div")
    assert div["state"] == "planning-error"
    details = div["error_details"]
    assert details["common"] == "a" and details["sender_only"] == ["b"] and details["receiver_only"] == ["rogue"]
    assert f"zfs rollback -r {base}/div@a" in details["recovery_commands"]
    for word in ("diverged", "a", "rogue", "b", f"zfs rollback -r {base}/div@a", "zfs rename"):
        assert word in div["error"], word
    keep = fs_status(tmp_path, "push", f"{src}/keep")
    assert keep["state"] == "planning-error" and "refusing to overwrite" in keep["error"]
    assert keep["error_details"]["recovery_commands"] == [f"zfs rename {base}/keep {base}/keep-zrepl-aside"]
