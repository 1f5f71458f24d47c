"""CLI inspection commands on real OpenZFS: zfs-abstractions, test placeholder, test decoderesumetoken."""
from __future__ import annotations

import json
import subprocess

from zfstest import REAL_ZFS, exists, guid, list_all, zfs


def _cursor(g: int, job: str) -> str:
    return f"zrepl_CURSOR_G_{g:016x}_J_{job}"


def test_zfs_abstractions_release_stale_touches_only_that_job(pool, zfs_tree, run_zrepl):
    zfs_tree(pool, "fs @1 @2")
    fs = f"{pool}/fs"
    g1, g2 = guid(f"{fs}@1"), guid(f"{fs}@2")
    zfs("bookmark", f"{fs}@1", f"{fs}#{_cursor(g1, 'a')}")
    zfs("bookmark", f"{fs}@2", f"{fs}#{_cursor(g2, 'a')}")
    zfs("bookmark", f"{fs}@1", f"{fs}#{_cursor(g1, 'b')}")
    zfs("hold", "zrepl_STEP_J_a", f"{fs}@1")
    zfs("hold", "zrepl_STEP_J_b", f"{fs}@1")
    listed = json.loads(run_zrepl("zfs-abstractions", "list", "--fs", fs, "--json").stdout)
    assert {(a["type"], a["job"], a["name"]) for a in listed} >= {
        ("replication-cursor-bookmark-v2", "a", _cursor(g1, "a")), ("step-hold", "b", "1")}
    dry = run_zrepl("zfs-abstractions", "release-stale", "--job", "a", "--fs", fs, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _cursor(g1, "a") in dry.stdout and "zrepl_STEP_J_a" in dry.stdout
    assert exists(f"{fs}#{_cursor(g1, 'a')}")  # dry run changed nothing
    real = run_zrepl("zfs-abstractions", "release-stale", "--job", "a", "--fs", fs)
    assert real.returncode == 0, real.stderr
    assert not exists(f"{fs}#{_cursor(g1, 'a')}")
    assert exists(f"{fs}#{_cursor(g2, 'a')}")  # the newest cursor stays
    assert exists(f"{fs}#{_cursor(g1, 'b')}")  # another job's cursor is never touched
    holds = zfs("holds", "-H", f"{fs}@1")
    assert "zrepl_STEP_J_b" in holds and "zrepl_STEP_J_a" not in holds
    refused = run_zrepl("zfs-abstractions", "release-all")
    assert refused.returncode == 2 and "--job" in refused.stderr
    zfs("release", "zrepl_STEP_J_b", f"{fs}@1")


def test_test_placeholder(pool, zfs_tree, run_zrepl):
    zfs_tree(pool, "real")
    zfs("create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", f"{pool}/ph")
    out = run_zrepl("test", "placeholder", "--all").stdout
    lines = dict(ln.split("\t") for ln in out.splitlines())
    assert lines[f"{pool}/ph"] == "placeholder" and lines[f"{pool}/real"] == "not a placeholder"
    one = run_zrepl("test", "placeholder", "--dataset", f"{pool}/ph")
    assert one.returncode == 0 and one.stdout.strip() == f"{pool}/ph\tplaceholder"


def test_decoderesumetoken(pool, zfs_tree, run_zrepl):
    zfs_tree(pool, "src @s")
    zfs("set", "compression=off", f"{pool}/src")
    send = subprocess.Popen([REAL_ZFS, "send", f"{pool}/src@s"], stdout=subprocess.PIPE)
    recv = subprocess.Popen([REAL_ZFS, "recv", "-s", f"{pool}/dst"], stdin=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    recv.stdin.write(send.stdout.read(40_000))  # a cut stream leaves a resume token behind
    recv.stdin.close()
    send.kill()
    send.wait()
    recv.wait()
    token = zfs("get", "-H", "-o", "value", "receive_resume_token", f"{pool}/dst").strip()
    assert token not in ("", "-")
    proc = run_zrepl("test", "decoderesumetoken", "--token", token)
    assert proc.returncode == 0, proc.stderr
    decoded = json.loads(proc.stdout)
    assert decoded["toname"] == f"{pool}/src@s" and decoded["toguid"] == guid(f"{pool}/src@s")
    assert decoded["fromguid"] is None
    assert any(r.name == f"{pool}/dst" for r in list_all(pool))
