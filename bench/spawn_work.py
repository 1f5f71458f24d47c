#!/usr/bin/env python3
"""zfs spawns per filesystem for real replication work (issue 12, item 3).

Runs inside the test guest, as root, on throwaway pools (file vdevs on a RAM-backed tmpfs):

    tests/vm/run-in-guest python3 bench/spawn_work.py [--filesystems 10]
    ZREPL_BENCH_DIR=<other checkout> ...   measures that checkout's zrepl.py (before/after)

N filesystems SRC/data/fsNN below SRC/data, each counted by the sh shim in PATH that logs every zfs
spawn (bench/benchlib.py). Scenarios, each on fresh pools unless said otherwise:
  initial, 1 snapshot        push -> sink (local transport), initial_replication = most_recent
  initial, 10 snapshots all  the same with 10 snapshots per filesystem and initial_replication = all
  incremental, 1 snapshot    after "initial, 1 snapshot": one new snapshot on every filesystem, push
Keep rules keep everything (not_replicated + last_n 20 on the sender, last_n 20 on the receiver),
so pruning destroys nothing. SRC/data is snapshotted and replicated too, so a run replicates N + 1
filesystems: the table prints the total, total / (N + 1), the verbs, and the spawn shapes that ran
at least once per filesystem (with their count per filesystem).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402
from benchlib import SpawnLog, run_measured, zfs, zrepl_argv  # noqa: E402

MiB = 1 << 20


def write_config(workdir: Path, src: str, dst: str, initial: str) -> Path:
    return support.write_config(
        workdir,
        support.push_job(filesystems={f"{src}/data<": True}, client_identity="c", initial_replication=initial,
                         keep_sender=[support.not_replicated(), support.last_n(20)],
                         keep_receiver=[support.last_n(20)]),
        support.sink_job(root_fs=f"{dst}/sink"))


def per_fs_shapes(shim: SpawnLog, n: int) -> list[str]:
    shapes: dict[str, int] = {}
    for s in shim.spawns():
        words = ["DS" if ("/" in w or "@" in w or "#" in w) else w for w in s.argv.split(" ")]
        key = " ".join(words)[:120]
        shapes[key] = shapes.get(key, 0) + 1
    return [f"{count / n:5.1f}/fs  zfs {shape}" for shape, count in sorted(shapes.items(), key=lambda kv: -kv[1])
            if count >= n]


def push(name: str, shim: SpawnLog, config: Path, n: int) -> None:
    shim.reset()
    m = run_measured(zrepl_argv("--config", str(config), "run", "push"), env=shim.env, timeout=7200)
    if m.returncode != 0:
        print(f"  ! {name}: zrepl.py exited {m.returncode}: {m.stderr.strip()[-2000:]}", flush=True)
    verbs = shim.per_verb()
    total = sum(verbs.values())
    print(f"{name:28} {total:5d} spawns  {total / n:5.1f}/fs  {m.wall:6.1f} s  {verbs}", flush=True)
    for line in per_fs_shapes(shim, n):
        print(f"      {line}", flush=True)


def scenario(name: str, n: int, snapshots: int, initial: str, base: Path, tmpfs: Path, incremental: bool) -> None:
    workdir = Path(tempfile.mkdtemp(dir=base))
    pools = benchlib.zfstest.PoolFactory(tmpfs / workdir.name)
    try:
        src, dst = pools.create("src", size=str(256 * MiB)), pools.create("dst", size=str(256 * MiB))
        zfs("create", "-o", "mountpoint=none", f"{src}/data")
        zfs("create", "-o", "mountpoint=none", f"{dst}/sink")
        for i in range(n):
            zfs("create", f"{src}/data/fs{i:02d}")
        for j in range(snapshots):
            zfs("snapshot", "-r", f"{src}/data@s{j:02d}")
        config = write_config(workdir, src, dst, initial)
        shim = SpawnLog(workdir / "shim")
        push(name, shim, config, n + 1)
        if incremental:
            zfs("snapshot", "-r", f"{src}/data@new")
            push("incremental, 1 snapshot", shim, config, n + 1)
    finally:
        pools.destroy_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--filesystems", type=int, default=10)
    args = ap.parse_args()
    benchlib.require_guest()
    print(benchlib.environment(), flush=True)
    print(f"zrepl.py: {benchlib.ZREPL_PY}; {args.filesystems} filesystems below SRC/data (which is replicated too)",
          flush=True)
    tmpfs = benchlib.Tmpfs(benchlib.meminfo()["MemTotal"] * 1024 // 2)
    base = Path(tempfile.mkdtemp(prefix="zrepl-spawn-work-"))
    try:
        n = args.filesystems
        scenario("initial, 1 snapshot", n, 1, "most_recent", base, tmpfs.path, incremental=True)
        scenario("initial, 10 snapshots, all", n, 10, "all", base, tmpfs.path, incremental=False)
    finally:
        tmpfs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
