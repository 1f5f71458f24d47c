"""push/sink and pull/source over the local transport, on real OpenZFS."""
from __future__ import annotations

import json
from pathlib import Path

from zfstest import exists, guid, list_all, zfs


def write_config(tmp_path: Path, jobs: str) -> Path:
    path = tmp_path / "zrepl.toml"
    path.write_text(f'[global]\nstatus_file = "{tmp_path}/status/status.json"\nruntime_dir = "{tmp_path}/run"\n\n{jobs}')
    return path


def push_sink(src: str, dst: str, *, filesystems: str | None = None, keep_sender: str = "[]",
              keep_receiver: str = "[]", initial: str = "most_recent", snapshotting: str = 'type = "manual"',
              send: str = "{}", recv: str = "", replication: str = "") -> str:
    filesystems = filesystems or f'{{ "{src}/data<" = true }}'
    return f'''
[[jobs]]
name = "push"
type = "push"
filesystems = {filesystems}
connect = {{ type = "local", listener_name = "sink", client_identity = "client1" }}
send = {send}
conflict_resolution = {{ initial_replication = "{initial}" }}
[jobs.snapshotting]
{snapshotting}
[jobs.pruning]
keep_sender = {keep_sender}
keep_receiver = {keep_receiver}
{replication}

[[jobs]]
name = "sink"
type = "sink"
root_fs = "{dst}/sink"
serve = {{ type = "local", listener_name = "sink" }}
{recv}
'''


def snapshots(dataset: str) -> list[str]:
    rows = [r for r in list_all(dataset) if r.type == "snapshot" and r.name.startswith(dataset + "@")]
    return [r.name.split("@", 1)[1] for r in sorted(rows, key=lambda r: r.createtxg)]


def status(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "status" / "status.json").read_text())


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
