"""ssh+stdinserver on real OpenZFS: push -> sink and pull <- source over ssh to localhost, with sshd
started by the test and a throwaway key whose authorized_keys line forces
`zrepl.py stdinserver IDENTITY` (no daemon on the passive side).

The active and the passive side have separate configs and status files, as on two hosts.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import zrepl
from support import (Job, last_n, not_replicated, periodic, pull_job, push_job, sink_job, snapshots, source_job, status,
                     stdinserver, write_config)
from zfstest import ZFS, ZREPL_PY, exists, get, guid, list_all, run, run_zrepl, zfs

MiB = 1 << 20
INSTALLED = Path("/usr/local/bin/zrepl.py")  # where the README puts it (the guest disk is throwaway)

# What each side needs delegated with `zfs allow` to run as a non-root user (README, "Running as a
# non-root user"); test_non_root_push_and_prune_with_zfs_allow runs with exactly these.
SENDER_PERMISSIONS = "send,snapshot,hold,release,bookmark,destroy,mount"
RECEIVER_PERMISSIONS = "receive,create,mount,hold,release,destroy,userprop,mountpoint"


@pytest.fixture(scope="module", autouse=True)
def installed_zrepl():
    """zrepl.py at the path authorized_keys names, as an admin would install it."""
    shutil.copyfile(ZREPL_PY, INSTALLED)
    INSTALLED.chmod(0o755)
    yield INSTALLED


def ssh_connect(server, identity_file: Path, user: str = "root", **extra: str) -> dict:
    """A push or pull job's `connect` over ssh+stdinserver to the test's sshd."""
    return {"type": "ssh+stdinserver", "host": server.host, "user": user, "port": server.port,
            "identity_file": str(identity_file), "options": server.option_list(), **extra}


def forced(config: Path, identity: str) -> str:
    return f"{INSTALLED} --config {config} stdinserver {identity}"


def sink_jobs(dst: str, *identities: str) -> Job:
    return sink_job("sink", root_fs=f"{dst}/sink", serve=stdinserver(*(identities or ("client1",))))


def resume_token(dataset: str) -> str:
    """The dataset's receive_resume_token, "" when there is none (or no dataset yet)."""
    if not exists(dataset):
        return ""
    value = get(dataset, "receive_resume_token")
    return "" if value == "-" else value


def write_random(dataset: str, name: str, size: int) -> None:
    path = Path(get(dataset, "mountpoint")) / name
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def test_push_to_sink_over_ssh_with_an_encrypted_raw_send(make_pool, zfs_tree, sshd_localhost, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data {encryption=on} @a\ndata/child @x")
    zfs_tree(dst, "sink")
    server_cfg = write_config(tmp_path / "server", sink_jobs(dst))
    key = sshd_localhost.authorize(command=forced(server_cfg, "client1"))
    client_cfg = write_config(tmp_path / "client", push_job(
        filesystems={f"{src}/data<": True}, connect=ssh_connect(sshd_localhost, key), send={"encrypted": True}))

    proc = run_zrepl("--config", client_cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr + json.dumps(status(client_cfg), indent=1)
    root = f"{dst}/sink/client1/{src}"
    assert snapshots(ZFS, f"{root}/data") == ["a"] and guid(f"{root}/data@a") == guid(f"{src}/data@a")
    assert snapshots(ZFS, f"{root}/data/child") == ["x"]
    # raw: still encrypted on the sink, and the key never left the client
    for fs in (f"{root}/data", f"{root}/data/child"):
        assert get(fs, "encryption") != "off" and get(fs, "keystatus") == "unavailable"
    assert get(f"{dst}/sink/client1", "zrepl:placeholder") == "on"

    zfs_tree(src, "data @b\ndata/child @y")
    proc = run_zrepl("--config", client_cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr + json.dumps(status(client_cfg), indent=1)
    assert snapshots(ZFS, f"{root}/data") == ["a", "b"] and snapshots(ZFS, f"{root}/data/child") == ["x", "y"]

    # the passive side recorded the client itself, and its `status` shows it
    client = status(server_cfg)["jobs"]["sink"]["clients"]["client1"]
    assert client["last_connection"]["result"] == "ok" and client["last_connection"]["transfers"] == 2
    received = {t["received"] for t in client["transfers"]}
    assert {f"{src}/data@a", f"{src}/data/child@x", f"{src}/data@b", f"{src}/data/child@y"} <= received
    proc = run_zrepl("--config", server_cfg, "status")
    assert proc.returncode == 0, proc.stdout
    assert "client client1: last connection" in proc.stdout and " ok; last pushed " in proc.stdout


def test_pull_from_source_over_ssh_with_a_bandwidth_limit(make_pool, zfs_tree, sshd_localhost, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    write_random(f"{src}/data", "big", 8 * MiB)
    zfs("snapshot", f"{src}/data@b")
    zfs_tree(dst, "pulled")
    # the production host: a source serving one client identity, limited to 2 MiB/s
    server_cfg = write_config(tmp_path / "prod", source_job(
        filesystems={f"{src}/data<": True}, serve=stdinserver("backup"),
        send={"bandwidth_limit": {"max": "2 MiB", "bucket_capacity": "256 KiB"}}))
    key = sshd_localhost.authorize(command=forced(server_cfg, "backup"))
    client_cfg = write_config(tmp_path / "backup", pull_job(
        root_fs=f"{dst}/pulled", connect=ssh_connect(sshd_localhost, key),
        keep_sender=[not_replicated(), last_n(1)]))
    proc = run_zrepl("--config", client_cfg, "run", "pull")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/pulled/{src}/data"
    assert snapshots(ZFS, target) == ["b"] and guid(f"{target}@b") == guid(f"{src}/data@b")
    assert snapshots(ZFS, f"{src}/data") == ["b"]  # @a pruned on the source, through the connection
    client = status(server_cfg)["jobs"]["source"]["clients"]["backup"]
    [transfer] = client["transfers"]
    assert transfer["sent"] == f"{src}/data@b" and transfer["bytes"] > 8 * MiB
    # the source's send limit held: > 8 MiB at 2 MiB/s (256 KiB head start) takes at least ~3.9 s
    assert transfer["seconds"] >= 3.5, transfer
    assert transfer["bytes"] / transfer["seconds"] <= 2.3 * MiB
    proc = run_zrepl("--config", server_cfg, "status")
    assert "client backup: last connection" in proc.stdout and f"last pulled {src}/data@b" in proc.stdout


KILLING_SSH = r'''#!/usr/bin/env python3
# ssh that dies (SIGKILL, like a lost network) after relaying LIMIT bytes towards the server, as long
# as the counter file says kills are left; otherwise plain ssh. With KILL_PARENT the zrepl.py that
# started it dies too (a crashed or rebooted host).
import os, signal, subprocess, sys
COUNTER, LIMIT, KILL_PARENT = {counter!r}, {limit}, {kill_parent}
left = int(open(COUNTER).read())
if left <= 0:
    os.execvp("ssh", ["ssh"] + sys.argv[1:])
proc = subprocess.Popen(["ssh"] + sys.argv[1:], stdin=subprocess.PIPE)
moved = 0
while data := os.read(0, 1 << 16):
    proc.stdin.write(data)
    proc.stdin.flush()
    moved += len(data)
    if moved >= LIMIT:
        open(COUNTER, "w").write(str(left - 1))
        if KILL_PARENT:
            os.kill(os.getppid(), signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        os._exit(255)
proc.stdin.close()
sys.exit(proc.wait())
'''


def killing_push(tmp_path: Path, src: str, dst: str, server, *, kill_parent: bool) -> tuple[Path, Path, Path]:
    """A sink config, and a push config whose ssh dies mid-stream while kills-left > 0."""
    server_cfg = write_config(tmp_path / "server", sink_jobs(dst))
    key = server.authorize(command=forced(server_cfg, "client1"))
    counter = tmp_path / "kills-left"
    wrapper = tmp_path / "killing-ssh"
    wrapper.write_text(KILLING_SSH.format(counter=str(counter), limit=2 * MiB, kill_parent=kill_parent))
    wrapper.chmod(0o755)
    client_cfg = write_config(tmp_path / "client", push_job(
        filesystems={f"{src}/data": True}, connect=ssh_connect(server, key, ssh_command=str(wrapper))))
    return server_cfg, client_cfg, counter


def test_killed_connection_is_retried_within_the_run_from_the_resume_token(make_pool, zfs_tree, sshd_localhost,
                                                                           zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data")
    write_random(f"{src}/data", "one", 6 * MiB)
    zfs("snapshot", f"{src}/data@a")
    zfs_tree(dst, "sink")
    server_cfg, client_cfg, counter = killing_push(tmp_path, src, dst, sshd_localhost, kill_parent=False)
    counter.write_text("1")
    target = f"{dst}/sink/client1/{src}/data"

    proc = zfs_shim.run_zrepl("--config", client_cfg, "run", "push", extra_env={"ZREPL_RETRY_DELAY": "0.5"})
    assert proc.returncode == 0, proc.stderr
    assert counter.read_text() == "0"  # the connection was lost once
    assert "connection closed by the peer" in proc.stderr and "connecting again" in proc.stderr
    assert snapshots(ZFS, target) == ["a"] and guid(f"{target}@a") == guid(f"{src}/data@a")
    sends = [c.argv for c in zfs_shim.calls("send") if "-n" not in c.argv]
    assert len(sends) == 2 and "-t" not in sends[0] and "-t" in sends[1]  # the retry resumed
    client = status(server_cfg)["jobs"]["sink"]["clients"]["client1"]
    assert any(e["request"] == "receiver.receive" for e in client["errors"])  # the sink saw the cut
    assert client["last_connection"]["result"] == "ok" and client["last_transfer"]["resumed"] is True


def test_next_run_resumes_after_the_active_side_died_mid_stream(make_pool, zfs_tree, sshd_localhost, zfs_shim,
                                                                tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data")
    write_random(f"{src}/data", "one", 6 * MiB)
    zfs("snapshot", f"{src}/data@a")
    zfs_tree(dst, "sink")
    server_cfg, client_cfg, counter = killing_push(tmp_path, src, dst, sshd_localhost, kill_parent=True)
    counter.write_text("1")
    target = f"{dst}/sink/client1/{src}/data"

    proc = zfs_shim.run_zrepl("--config", client_cfg, "run", "push")
    assert proc.returncode == -9  # killed with its connection
    deadline = time.monotonic() + 30  # the sink's zfs recv saves its state once the server saw the loss
    while not resume_token(target) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert resume_token(target)
    zfs_shim.reset_log()
    proc = zfs_shim.run_zrepl("--config", client_cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, target) == ["a"] and guid(f"{target}@a") == guid(f"{src}/data@a")
    assert not resume_token(target)
    sends = [c.argv for c in zfs_shim.calls("send") if "-n" not in c.argv]
    assert len(sends) == 1 and "-t" in sends[0]  # resumed, not started over


def inventory(pool: str) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Every dataset, snapshot and bookmark of a pool with its guid and holds."""
    out = {}
    snaps = []
    for row in list_all(pool):
        out[row.name] = (row.guid, ())
        if row.type == "snapshot":
            snaps.append(row.name)
    if snaps:
        for line in zfs("holds", "-H", *snaps).splitlines():
            name, tag, _ = line.split("\t", 2)
            out[name] = (out[name][0], tuple(sorted(out[name][1] + (tag,))))
    return out


def test_hostile_client_over_ssh_changes_nothing_outside_its_subtree(make_pool, zfs_tree, sshd_localhost, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "x @s1")
    zfs_tree(dst, f"sink/client1/{src}/data @s1 @s2\nsink/client2/{src}/data @s1\nother @o1")
    zfs("hold", "keep", f"{dst}/sink/client2/{src}/data@s1")
    before = inventory(dst)
    server_cfg = write_config(tmp_path / "server", sink_jobs(dst, "client1", "client2"))
    key = sshd_localhost.authorize(command=forced(server_cfg, "client1"))

    conn = zrepl.ssh_connect(sshd_localhost.ssh_argv(identity_file=key), timeout=60)
    try:
        conn.handshake_client("client2")  # claiming another identity changes nothing
        assert conn.request("endpoint.info", {})["root"] == f"{dst}/sink/client1"
        for fs in (f"../client2/{src}/data", f"{src}/data/../../../client2/{src}/data", f"/{dst}/other",
                   f"{src}/data@s1", f"{src}/data#s1", f"{src}/da\nta", "x" * 300, "..", None):
            for kind, body in (("receiver.destroy", {"fs": fs, "names": ["s1"]}),
                               ("receiver.clear_token", {"fs": fs})):
                with pytest.raises(zrepl.RemoteError):
                    conn.request(kind, body)
        for name in ("s1,s2", "s1%s2", "../s1", "s1@x", f"s1 {dst}/other@o1"):
            with pytest.raises(zrepl.RemoteError):
                conn.request("receiver.destroy", {"fs": f"{src}/data", "names": [name]})
        for fs in (f"../client2/{src}/y", f"/{dst}/other/y"):
            sender = subprocess.Popen(["zfs", "send", f"{src}/x@s1"], stdout=subprocess.PIPE)
            with pytest.raises(zrepl.RemoteError):
                conn.request("receiver.receive", {"fs": fs, "to": "s1", "to_guid": guid(f"{src}/x@s1")},
                             stream_in=zrepl.OutgoingStream.from_process(sender, "zfs send"))
            sender.wait()
        # what the subtree allows still works: the client may prune its own snapshots
        assert conn.request("receiver.destroy", {"fs": f"{src}/data", "names": ["s1"]})["destroyed"] == ["s1"]
    finally:
        conn.close()

    # garbage on the real transport: an ERROR frame, then the server hangs up
    proc = subprocess.run(sshd_localhost.ssh_argv(identity_file=key),
                          input=b"ZRPL\x02\xff\xff\xff\xff" + b"\0" * 64, capture_output=True, timeout=60)
    assert zrepl.FRAME_MAGIC in proc.stdout and b"oversized" in proc.stdout
    assert b"Traceback" not in proc.stderr

    after = inventory(dst)
    gone = set(before) - set(after)
    assert gone == {f"{dst}/sink/client1/{src}/data@s1"}
    assert {k: v for k, v in after.items()} == {k: v for k, v in before.items() if k not in gone}


def test_non_root_push_and_prune_with_zfs_allow(make_pool, zfs_tree, sshd_localhost, tmp_path):
    user = "zrepl"
    if run(["id", user], check=False).returncode != 0:
        run(["useradd", "--create-home", "--shell", "/bin/sh", user])
        run(["usermod", "--password", "*", user])  # not locked: sshd refuses locked accounts
    pw = pwd.getpwnam(user)
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b")
    zfs_tree(dst, "sink")
    zfs("allow", "-u", user, SENDER_PERMISSIONS, f"{src}/data")
    zfs("allow", "-u", user, RECEIVER_PERMISSIONS, f"{dst}/sink")

    home = Path(f"/tmp/zrepl-nonroot-{os.getpid()}")
    home.mkdir(mode=0o755)
    # sshd reads authorized_keys as the logging-in user
    sshd_localhost.directory.chmod(0o755)
    server_cfg = write_config(home / "server", sink_jobs(dst))
    key = sshd_localhost.authorize(command=forced(server_cfg, "client1"))
    user_key = home / "id_ed25519"
    shutil.copyfile(key, user_key)
    known_hosts = home / "known_hosts"
    shutil.copyfile(sshd_localhost.known_hosts, known_hosts)
    options = [o if not o.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={known_hosts}"
               for o in sshd_localhost.option_list()]
    connect = {**ssh_connect(sshd_localhost, user_key, user=user), "options": options}
    client_cfg = write_config(home / "client", push_job(
        filesystems={f"{src}/data": True}, connect=connect, initial_replication="all", snapshotting=periodic("1h"),
        keep_sender=[not_replicated(), last_n(1)], keep_receiver=[last_n(1)]))
    for path in [home, *home.rglob("*")]:
        os.chown(path, pw.pw_uid, pw.pw_gid)
    user_key.chmod(0o600)
    (sshd_localhost.directory / "authorized_keys").chmod(0o644)
    try:
        proc = subprocess.run(["python3", str(ZREPL_PY), "--config", str(client_cfg), "run", "push"],
                              capture_output=True, text=True, timeout=300, user=user, group=pw.pw_gid,
                              extra_groups=[],
                              env={"PATH": os.environ["PATH"], "HOME": pw.pw_dir})
        assert proc.returncode == 0, proc.stderr
        target = f"{dst}/sink/client1/{src}/data"
        [taken] = [s for s in snapshots(ZFS, f"{src}/data") if s.startswith("zrepl_")]  # snapshot: delegated
        assert snapshots(ZFS, f"{src}/data") == [taken]  # a and b pruned on the sender
        assert snapshots(ZFS, target) == [taken]  # a and b replicated, then pruned on the receiver
        assert guid(f"{target}@{taken}") == guid(f"{src}/data@{taken}")
        # both sides really ran as the user: the files they wrote belong to it
        assert (home / "server" / "status.json").stat().st_uid == pw.pw_uid
        assert (home / "client" / "status.json").stat().st_uid == pw.pw_uid
        assert status(server_cfg)["jobs"]["sink"]["clients"]["client1"]["last_connection"]["result"] == "ok"
    finally:
        shutil.rmtree(home, ignore_errors=True)
