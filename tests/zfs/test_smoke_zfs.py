"""Smoke suite: the OpenZFS behaviours zrepl.py depends on, proved with the zfs CLI directly.

If one of these fails, the product's assumptions about ZFS are wrong on this OpenZFS version.
Also checks the guest services the product's tests use: ssh to localhost, PostgreSQL, MariaDB.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from zfstest import REAL_ZFS, exists, get, guid, list_all, run, send_recv, zfs


def _mountpoint(dataset: str) -> Path:
    return Path(get(dataset, "mountpoint"))


def test_incremental_send_from_bookmark_after_snapshot_destroyed(make_pool, zfs_tree):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @one #one")
    send_recv([f"{src}/data@one"], ["-u", f"{dst}/data"])

    zfs("destroy", f"{src}/data@one")
    assert not exists(f"{src}/data@one")
    assert exists(f"{src}/data#one")
    zfs_tree(src, "data @two")

    send_recv(["-i", f"{src}/data#one", f"{src}/data@two"], ["-u", f"{dst}/data"])

    assert guid(f"{dst}/data@two") == guid(f"{src}/data@two")
    # A bookmark carries its snapshot's guid: that is how a cursor stays matchable.
    assert guid(f"{dst}/data@one") == guid(f"{src}/data#one")
    zfs("mount", f"{dst}/data")
    assert (_mountpoint(f"{dst}/data") / "two.dat").read_bytes() == \
        (_mountpoint(f"{src}/data") / "two.dat").read_bytes()


def test_resumable_receive_with_token_after_cut_stream(make_pool, zfs_shim):
    src, dst = make_pool("src"), make_pool("dst")
    zfs("create", "-o", "compression=off", f"{src}/big")
    (_mountpoint(f"{src}/big") / "blob").write_bytes(os.urandom(8 << 20))
    zfs("snapshot", f"{src}/big@full")
    zfs_shim.cut("send", nbytes=2 << 20)

    cut = send_recv([f"{src}/big@full"], ["-s", "-u", f"{dst}/big"],
                    send_argv0=str(zfs_shim.zfs_path), check=False)

    assert cut.send_rc != 0 and cut.recv_rc != 0, cut
    assert zfs_shim.count("send") == 1
    token = get(f"{dst}/big", "receive_resume_token")
    assert token not in ("", "-")
    assert not exists(f"{dst}/big@full")
    # The token names what is being received: zrepl plans the resume step from this.
    described = run([REAL_ZFS, "send", "-nvt", token])
    text = described.stdout + described.stderr
    toguid = re.search(r"toguid = (0x[0-9a-f]+)", text)
    assert toguid and int(toguid.group(1), 16) == guid(f"{src}/big@full"), text
    assert re.search(rf"toname = {re.escape(src)}/big@full\b", text), text

    send_recv(["-t", token], ["-s", "-u", f"{dst}/big"])

    assert guid(f"{dst}/big@full") == guid(f"{src}/big@full")
    assert get(f"{dst}/big", "receive_resume_token") == "-"


def test_hold_blocks_destroy_until_released(pool, zfs_tree):
    tree = zfs_tree(pool, "fs @older @held @newer")
    older, snap, newer = tree.snapshots
    zfs("hold", "zrepl_test_hold", snap)

    blocked = run([REAL_ZFS, "destroy", snap], check=False)

    assert blocked.returncode != 0
    # OpenZFS words EBUSY from a hold as "it's being held" (older tools: "dataset is busy").
    assert re.search(r"being held|dataset is busy", blocked.stderr), blocked.stderr
    assert exists(snap)
    # A batched destroy that includes a held snapshot destroys none of the batch.
    batch = run([REAL_ZFS, "destroy", f"{tree.fs('fs')}@older,held,newer"], check=False)
    assert batch.returncode != 0
    assert exists(older) and exists(snap) and exists(newer)
    holds = [line.split("\t") for line in zfs("holds", "-H", snap).splitlines()]
    assert [(name, tag) for name, tag, _when in holds] == [(snap, "zrepl_test_hold")]

    zfs("release", "zrepl_test_hold", snap)
    zfs("destroy", snap)
    assert not exists(snap)


def test_list_all_includes_bookmarks_with_guid_and_createtxg(pool, zfs_tree):
    # Snapshots made in reverse name order: "latest" must come from createtxg, not from names.
    tree = zfs_tree(pool, "fs with space @snap b @snap a #bm of a")
    fs = tree.fs("fs with space")

    out = zfs("list", "-Hp", "-o", "name,guid,createtxg", "-t", "all", "-r", pool)

    rows = {}
    for line in out.splitlines():
        name, g, txg = line.split("\t")
        rows[name] = (int(g), int(txg))
    assert set(rows) == {pool, fs, f"{fs}@snap b", f"{fs}@snap a", f"{fs}#bm of a"}
    assert rows[f"{fs}#bm of a"] == rows[f"{fs}@snap a"]
    assert rows[f"{fs}@snap b"][1] < rows[f"{fs}@snap a"][1]
    latest = max((n for n in rows if "@" in n), key=lambda n: rows[n][1])
    assert latest == f"{fs}@snap a"
    kinds = {row.name: row.type for row in list_all(pool)}
    assert kinds[f"{fs}#bm of a"] == "bookmark"


def test_raw_send_of_encrypted_dataset_keeps_it_encrypted(make_pool, zfs_tree):
    src, dst = make_pool("src"), make_pool("dst")
    tree = zfs_tree(src, "secret {encryption=on} @one")

    send_recv(["-w", f"{src}/secret@one"], ["-u", f"{dst}/secret"])

    target = f"{dst}/secret"
    assert get(target, "encryption") == "aes-256-gcm"
    assert get(target, "encryptionroot") == target
    assert get(target, "keystatus") == "unavailable"
    assert guid(f"{target}@one") == guid(f"{src}/secret@one")
    zfs("load-key", "-L", f"file://{tree.key_file}", target)
    zfs("mount", target)
    assert (_mountpoint(target) / "one.dat").read_bytes() == \
        (_mountpoint(f"{src}/secret") / "one.dat").read_bytes()


def test_ssh_to_localhost_runs_zfs_and_carries_a_send_stream(sshd_localhost, make_pool, zfs_tree):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "fs @s1")

    listed = run(sshd_localhost.ssh_argv("zfs", "list", "-H", "-o", "name", "-r", src))
    assert listed.stdout.split() == [src, f"{src}/fs"]

    sender = subprocess.Popen([REAL_ZFS, "send", f"{src}/fs@s1"], stdout=subprocess.PIPE)
    receiver = subprocess.run(sshd_localhost.ssh_argv("zfs", "recv", "-u", f"{dst}/fs"),
                              stdin=sender.stdout, capture_output=True, text=True, timeout=120)
    sender.stdout.close()
    assert sender.wait(timeout=60) == 0
    assert receiver.returncode == 0, receiver.stderr
    assert guid(f"{dst}/fs@s1") == guid(f"{src}/fs@s1")


def test_ssh_forced_command_replaces_the_requested_command(sshd_localhost, pool):
    key = sshd_localhost.authorize(command="echo forced:$SSH_ORIGINAL_COMMAND")

    result = run(sshd_localhost.ssh_argv("zfs", "destroy", "-r", pool, identity_file=key))

    assert result.stdout.strip() == f"forced:zfs destroy -r {pool}"
    assert exists(pool)


def test_postgres_server_answers_select_1(postgres_server):
    assert run(postgres_server.psql_argv("SELECT 1")).stdout.strip() == "1"
    # The postgres-checkpoint hook needs CHECKPOINT to work for this user.
    run(postgres_server.psql_argv("CHECKPOINT"))


def test_mariadb_server_answers_select_1(mariadb_server):
    assert run(mariadb_server.mysql_argv("SELECT 1")).stdout.strip() == "1"
    # The mysql-lock-tables hook relies on this pair.
    run(mariadb_server.mysql_argv("FLUSH TABLES WITH READ LOCK; UNLOCK TABLES"))
