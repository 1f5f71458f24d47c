"""What only ZFS can decide about the safety properties of issue 8, on real OpenZFS: an admin's
dataset below a placeholder (inherited zrepl:placeholder=on) is never received over; two pull
clients of one source stay incremental at different speeds; a received stream cannot mount,
share or expose what it carries."""

from __future__ import annotations

from pathlib import Path

from repltest import run
from support import sink_job, snapshots, write_config
from zfstest import REPO_ROOT, ZFS, get, guid, zfs


def test_a_dataset_created_below_a_placeholder_is_never_received_over(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @s1")
    # the sink's layout: root_fs/client1/<pool> is a placeholder; an admin created data below it
    zfs("create", "-p", f"{dst}/sink")
    zfs("create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", f"{dst}/sink/client1")
    zfs("create", "-o", "zrepl:placeholder=on", f"{dst}/sink/client1/{src}")
    zfs("create", "-o", f"mountpoint=/tmp/zrepl-admin-{dst}", f"{dst}/sink/client1/{src}/data")
    Path(f"/tmp/zrepl-admin-{dst}/precious.txt").write_text("the admin's data")
    assert get(f"{dst}/sink/client1/{src}/data", "zrepl:placeholder") == "on"  # inherited, not local
    cfg = write_config(tmp_path, f'''
[[jobs]]
name = "push"
type = "push"
filesystems = {{ "{src}/data" = true }}
connect = {{ type = "local", listener_name = "sink", client_identity = "client1" }}
[jobs.snapshotting]
type = "manual"
[jobs.pruning]
keep_sender = []
keep_receiver = []
''', sink_job("sink", root_fs=f"{dst}/sink"))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 1, proc.stderr
    assert "not a zrepl placeholder" in proc.stderr or "receiver-has-data" in proc.stderr, proc.stderr
    assert Path(f"/tmp/zrepl-admin-{dst}/precious.txt").read_text() == "the admin's data"
    assert snapshots(ZFS, f"{dst}/sink/client1/{src}/data") == []
    # the command to inspect placeholders says the same
    listed = run(None, cfg, "test", "placeholder", "--dataset", f"{dst}/sink/client1/{src}/data")
    assert listed.stdout.strip().endswith("not a placeholder"), listed.stdout


def test_two_clients_of_one_source_keep_their_own_cursors_and_stay_incremental(make_pool, zfs_tree, tmp_path,
                                                                                 sshd_localhost):
    src, fast_pool, slow_pool = make_pool("src"), make_pool("fast"), make_pool("slow")
    zfs_tree(src, "data @s1")
    for d in ("server", "fast", "slow"):
        (tmp_path / d).mkdir()
    server = write_config(tmp_path / "server", f'''
[[jobs]]
name = "src"
type = "source"
filesystems = {{ "{src}/data" = true }}
serve = {{ type = "stdinserver", client_identities = ["fast", "slow"] }}
[jobs.snapshotting]
type = "manual"
''')
    clients = {}
    for name, pool in (("fast", fast_pool), ("slow", slow_pool)):
        forced = f"cd {REPO_ROOT} && python3 -m zrepl --config {server} stdinserver {name}"
        key = sshd_localhost.authorize(command=forced)
        options = ", ".join(f'"{o}"' for o in sshd_localhost.option_list())
        clients[name] = write_config(tmp_path / name, f'''
[[jobs]]
name = "pull"
type = "pull"
root_fs = "{pool}/backup"
interval = "manual"
[jobs.connect]
type = "ssh+stdinserver"
host = "{sshd_localhost.host}"
port = {sshd_localhost.port}
user = "{sshd_localhost.user}"
identity_file = "{key}"
options = [{options}]
[jobs.pruning]
keep_sender = [{{ type = "not_replicated" }}, {{ type = "last_n", count = 1 }}]
keep_receiver = [{{ type = "last_n", count = 10 }}]
''')
        zfs("create", f"{pool}/backup")

    def pull(name: str) -> None:
        proc = run(None, clients[name], "run", "pull")
        assert proc.returncode == 0, f"{name}: {proc.stderr}"

    pull("fast")
    pull("slow")
    for i in range(2, 6):  # the fast client pulls every snapshot; the slow one only at the end
        zfs("snapshot", f"{src}/data@s{i}")
        pull("fast")
    # the fast client's pruning of the source (last_n = 1) kept what the slow client still needs
    assert snapshots(ZFS, f"{src}/data") == ["s1", "s2", "s3", "s4", "s5"]
    bookmarks = zfs("list", "-H", "-t", "bookmark", "-o", "name", f"{src}/data")
    assert f"zrepl_CURSOR_G_{guid(f'{src}/data@s5'):016x}_J_src:fast" in bookmarks
    assert f"zrepl_CURSOR_G_{guid(f'{src}/data@s1'):016x}_J_src:slow" in bookmarks
    pull("slow")  # incremental from s1, not a full send: its base survived
    assert snapshots(ZFS, f"{slow_pool}/backup/{src}/data") == ["s1", "s2", "s3", "s4", "s5"]
    pull("fast")  # now both have s5: the source may drop the rest
    assert snapshots(ZFS, f"{src}/data") == ["s5"]


def test_a_received_stream_cannot_mount_share_or_expose_what_it_carries(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @s1")
    zfs("set", f"mountpoint=/tmp/zrepl-hostile-{src}", f"{src}/data")
    zfs("set", "sharenfs=on", f"{src}/data")
    zfs("snapshot", f"{src}/data@s2")
    zfs("create", f"{dst}/sink")
    cfg = write_config(tmp_path, f'''
[[jobs]]
name = "push"
type = "push"
filesystems = {{ "{src}/data" = true }}
connect = {{ type = "local", listener_name = "sink", client_identity = "client1" }}
send = {{ send_properties = true }}
conflict_resolution = {{ initial_replication = "all" }}
[jobs.snapshotting]
type = "manual"
[jobs.pruning]
keep_sender = []
keep_receiver = []
''', sink_job("sink", root_fs=f"{dst}/sink"))
    proc = run(None, cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    replica = f"{dst}/sink/client1/{src}/data"
    assert snapshots(ZFS, replica) == ["s1", "s2"]
    assert get(replica, "canmount") == "noauto" and get(replica, "readonly") == "on"
    assert get(replica, "mountpoint") == "none"  # inherited from the placeholder, not the stream's
    assert get(replica, "sharenfs") == "off"
    assert get(replica, "mounted") == "no"
