"""Taking over from zrepl without a full resend, on real OpenZFS (README: Coming from zrepl).

Each test builds, with plain `zfs` commands, the state zrepl (v0.7, internal/endpoint/
endpoint_zfs_abstraction_*.go) leaves after it replicated: a replica whose snapshots carry the
sender's GUIDs below zrepl's placeholders, the SENDING job's replication cursor bookmark
`zrepl_CURSOR_G_<guid hex16>_J_<job>` on the sender, the RECEIVING job's hold
`zrepl_last_received_J_<job>` on the receiver's newest snapshot, and a step hold
`zrepl_STEP_J_<job>` that a zrepl stopped mid-step leaves behind. Then zrepl.py runs with the
converted config (the TOML the README's YAML->TOML one-liner writes for that zrepl YAML) and
must replicate incrementally from zrepl's base, move zrepl's cursor and hold on, release what
zrepl would release, never drop the old base before the new one exists, and leave other jobs'
abstractions alone.
"""
from __future__ import annotations

from pathlib import Path

from repltest import cursor, run, same_guids
from support import bookmarks, fs_status, holds, real_sends, snapshots, toml_value
from zfstest import ZFS, ZfsShim, exists, get, send_recv, zfs

# What the README's one-liner writes for a zrepl push/sink YAML config (only [global]'s two paths
# are added, so the test's status file and locks live in its tmp dir).
PUSH_SINK_TOML = """\
[global]
status_file = {status}
runtime_dir = {rundir}
logging = [
    {{ type = "stdout", level = "warn", format = "human" }},
]

[[jobs]]
name = "push"
type = "push"

[jobs.connect]
type = "local"
listener_name = "backuppool"
client_identity = "thishost"

[jobs.filesystems]
"{src}/data<" = true

[jobs.snapshotting]
type = "manual"

[jobs.pruning]
keep_sender = [
    {{ type = "not_replicated" }},
    {{ type = "last_n", count = 10 }},
]
keep_receiver = [
    {{ type = "last_n", count = 10 }},
]

[[jobs]]
name = "sink"
type = "sink"
root_fs = "{dst}/sink"

[jobs.serve]
type = "local"
listener_name = "backuppool"

[jobs.recv.properties]
"""

PULL_SOURCE_TOML = """\
[global]
status_file = {status}
runtime_dir = {rundir}

[[jobs]]
name = "backup"
type = "pull"
root_fs = "{dst}/pulled"
interval = "manual"

[jobs.connect]
type = "local"
listener_name = "prod"
client_identity = "backupserver"

[jobs.pruning]
keep_sender = [
    {{ type = "not_replicated" }},
    {{ type = "last_n", count = 10 }},
]
keep_receiver = [
    {{ type = "last_n", count = 10 }},
]

[[jobs]]
name = "prod"
type = "source"

[jobs.serve]
type = "local"
listener_name = "prod"

[jobs.filesystems]
"{src}/data<" = true

[jobs.snapshotting]
type = "manual"
"""


def converted_config(tmp_path: Path, template: str, src: str, dst: str) -> Path:
    path = tmp_path / "zrepl.toml"
    path.write_text(template.format(src=src, dst=dst, status=toml_value(str(tmp_path / "status.json")),
                                    rundir=toml_value(str(tmp_path / "run"))))
    return path


def placeholder(dataset: str) -> None:
    """A parent as zrepl creates it on the receiver."""
    zfs("create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", dataset)


def zrepl_replicated(sfs: str, target: str, snaps: list[str], *, sending_job: str, receiving_job: str) -> None:
    """What a finished zrepl replication of SNAPS leaves: the replica, the sender's cursor on the
    last one, the receiver's last-received hold on it."""
    send_recv([f"{sfs}@{snaps[0]}"], ["-s", "-u", target])
    for older, newer in zip(snaps, snaps[1:], strict=False):
        send_recv(["-i", f"{sfs}@{older}", f"{sfs}@{newer}"], ["-s", "-u", target])
    last = snaps[-1]
    zfs("bookmark", f"{sfs}@{last}", f"{sfs}#{cursor(f'{sfs}@{last}', sending_job)}")
    zfs("hold", f"zrepl_last_received_J_{receiving_job}", f"{target}@{last}")


def argv_index(calls: list[list[str]], *words: str) -> int:
    """Position of the first command containing all WORDS (AssertionError when none does)."""
    for i, argv in enumerate(calls):
        if all(w in argv for w in words):
            return i
    raise AssertionError(f"no zfs command with {words}: {calls}")


def commands(shim: ZfsShim) -> list[list[str]]:
    return [c.argv[1:] if c.argv and c.argv[0] == "zfs" else c.argv for c in shim.calls()]


def assert_incremental_only(shim: ZfsShim) -> list[list[str]]:
    sends = real_sends(shim.calls())
    assert sends and all("-i" in s or "-I" in s for s in sends), sends  # no full send
    return sends


# ---- tests -------------------------------------------------------------------------------------

def test_push_takes_over_a_zrepl_replica_without_a_full_send(make_pool, zfs_tree, zfs_shim, tmp_path):
    """push -> sink. `data` still has zrepl's base snapshot; on `data/pruned` the sender pruned
    every snapshot zrepl sent, only zrepl's cursor bookmark is left as the incremental source."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @zrepl_1 @zrepl_2\ndata/pruned @zrepl_1 @zrepl_2")
    zfs_tree(dst, "sink")
    sfs, pfs = f"{src}/data", f"{src}/data/pruned"
    for parent in (f"{dst}/sink/thishost", f"{dst}/sink/thishost/{src}"):
        placeholder(parent)
    target, ptarget = f"{dst}/sink/thishost/{src}/data", f"{dst}/sink/thishost/{src}/data/pruned"
    zrepl_replicated(sfs, target, ["zrepl_1", "zrepl_2"], sending_job="push", receiving_job="sink")
    zrepl_replicated(pfs, ptarget, ["zrepl_1", "zrepl_2"], sending_job="push", receiving_job="sink")
    old_cursor, pruned_cursor = cursor(f"{sfs}@zrepl_2", "push"), cursor(f"{pfs}@zrepl_2", "push")
    zfs("hold", "zrepl_STEP_J_push", f"{sfs}@zrepl_2")  # zrepl stopped before it released its step hold
    zfs("destroy", f"{pfs}@zrepl_1,zrepl_2")
    # another zrepl job's abstractions on the same datasets: not ours to touch
    other_cursor = cursor(f"{sfs}@zrepl_1", "offsite")
    zfs("bookmark", f"{sfs}@zrepl_1", f"{sfs}#{other_cursor}")
    zfs("hold", "zrepl_last_received_J_othersink", f"{target}@zrepl_1")
    zfs_tree(src, "data @zrepl_3 @zrepl_4\ndata/pruned @zrepl_3")

    cfg = converted_config(tmp_path, PUSH_SINK_TOML, src, dst)
    check = run(zfs_shim, cfg, "configcheck")
    assert check.returncode == 0, check.stdout + check.stderr
    dry = run(zfs_shim, cfg, "run", "--dry-run", "push")
    assert dry.returncode == 0, dry.stderr
    assert f"incremental send {sfs}@zrepl_2 -> {sfs}@zrepl_4" in dry.stdout, dry.stdout
    assert f"incremental send {pfs}#{pruned_cursor} (bookmark) -> {pfs}@zrepl_3" in dry.stdout, dry.stdout
    assert "full send" not in dry.stdout, dry.stdout
    zfs_shim.reset_log()

    proc = run(zfs_shim, cfg, "run", "push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sends = assert_incremental_only(zfs_shim)
    assert sorted(sends) == sorted([["send", "-v", "-P", "-I", f"{sfs}@zrepl_2", f"{sfs}@zrepl_4"],
                                    ["send", "-v", "-P", "-i", f"{pfs}#{pruned_cursor}", f"{pfs}@zrepl_3"]])
    assert snapshots(ZFS, target) == ["zrepl_1", "zrepl_2", "zrepl_3", "zrepl_4"] and same_guids(target, sfs)
    assert snapshots(ZFS, ptarget) == ["zrepl_1", "zrepl_2", "zrepl_3"]
    # zrepl's cursor and hold moved on, as zrepl moves them: new ones first, then the old released
    assert bookmarks(ZFS, sfs) == sorted([other_cursor, cursor(f"{sfs}@zrepl_4", "push")])
    assert bookmarks(ZFS, pfs) == [cursor(f"{pfs}@zrepl_3", "push")]
    assert holds(ZFS, f"{sfs}@zrepl_2") == set()  # zrepl's leftover step hold is released
    assert holds(ZFS, f"{target}@zrepl_4") == {"zrepl_last_received_J_sink"}
    assert holds(ZFS, f"{target}@zrepl_2") == set()
    assert holds(ZFS, f"{target}@zrepl_1") == {"zrepl_last_received_J_othersink"}
    assert holds(ZFS, f"{ptarget}@zrepl_3") == {"zrepl_last_received_J_sink"}
    assert holds(ZFS, f"{ptarget}@zrepl_2") == set()
    done = commands(zfs_shim)
    assert argv_index(done, "bookmark", f"{sfs}#{cursor(f'{sfs}@zrepl_4', 'push')}") < \
        argv_index(done, "destroy", f"{sfs}#{old_cursor}")
    assert argv_index(done, "bookmark", f"{pfs}#{cursor(f'{pfs}@zrepl_3', 'push')}") < \
        argv_index(done, "destroy", f"{pfs}#{pruned_cursor}")
    assert argv_index(done, "hold", "zrepl_last_received_J_sink", f"{target}@zrepl_4") < \
        argv_index(done, "release", "zrepl_last_received_J_sink", f"{target}@zrepl_2")
    assert not [c for c in done if c[0] == "destroy" and "@" in c[-1]]  # pruning kept every snapshot
    assert get(f"{dst}/sink/thishost/{src}", "zrepl:placeholder") == "on"  # zrepl's placeholders reused
    for fs in (sfs, pfs):
        rep = fs_status(cfg, "push", fs)
        assert rep["state"] == "done" and rep["error"] is None, rep
    assert fs_status(cfg, "push", sfs)["last_replicated"] == f"{sfs}@zrepl_4"


def test_pull_takes_over_a_zrepl_replica_without_a_full_send(make_pool, zfs_tree, zfs_shim, tmp_path):
    """pull <- source: the cursor carries the SOURCE job's name, the hold the PULL job's."""
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @zrepl_1 @zrepl_2")
    zfs_tree(dst, "pulled")
    sfs, target = f"{src}/data", f"{dst}/pulled/{src}/data"
    placeholder(f"{dst}/pulled/{src}")
    zrepl_replicated(sfs, target, ["zrepl_1", "zrepl_2"], sending_job="prod", receiving_job="backup")
    zfs("hold", "zrepl_STEP_J_prod", f"{sfs}@zrepl_1")
    zfs("hold", "zrepl_STEP_J_prod", f"{sfs}@zrepl_2")
    zfs_tree(src, "data @zrepl_3")

    cfg = converted_config(tmp_path, PULL_SOURCE_TOML, src, dst)
    proc = run(zfs_shim, cfg, "run", "backup")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert assert_incremental_only(zfs_shim) == [["send", "-v", "-P", "-i", f"{sfs}@zrepl_2", f"{sfs}@zrepl_3"]]
    assert snapshots(ZFS, target) == ["zrepl_1", "zrepl_2", "zrepl_3"] and same_guids(target, sfs)
    assert bookmarks(ZFS, sfs) == [cursor(f"{sfs}@zrepl_3", "prod")]
    assert holds(ZFS, f"{sfs}@zrepl_1") == set() and holds(ZFS, f"{sfs}@zrepl_2") == set()
    assert holds(ZFS, f"{target}@zrepl_3") == {"zrepl_last_received_J_backup"}
    assert holds(ZFS, f"{target}@zrepl_2") == set()
    done = commands(zfs_shim)
    assert argv_index(done, "bookmark", f"{sfs}#{cursor(f'{sfs}@zrepl_3', 'prod')}") < \
        argv_index(done, "destroy", f"{sfs}#{cursor(f'{sfs}@zrepl_2', 'prod')}")
    assert exists(f"{sfs}@zrepl_1")  # not_replicated + last_n 10: nothing pruned
    rep = fs_status(cfg, "backup", sfs)
    assert rep["state"] == "done" and rep["last_replicated"] == f"{sfs}@zrepl_3"
