#!/usr/bin/env python3
"""zfs spawns per `zrepl.py run` when there is nothing to do, for 10, 100 and 1000 datasets.

Runs inside the test guest, as root, on throwaway pools (file vdevs on a RAM-backed tmpfs):

    ZREPL_VM_MEMORY=4096 ZREPL_VM_TIMEOUT=7200 tests/vm/run-in-guest python3 bench/spawn_count.py
    tests/vm/run-in-guest python3 bench/spawn_count.py --counts 10,100

For each N: N filesystems SRC/data/fsNNNN (plus their parent SRC/data, which the filters include
too), each with one snapshot @base; a receiving pool with the sink's root_fs. Every zfs spawn goes
through a sh shim in PATH that logs its verb (bench/benchlib.py), so counts are what really ran.

Runs, in this order, each counted per zfs verb and timed:
  push #1        push -> sink over the local transport: the initial replication (skipped with
                 --seed raw, see below)
  push no-op     the same job again: everything is replicated, nothing to send, keep rules that
                 keep everything (not_replicated + last_n 3 on the sender, last_n 3 on the receiver)
  snap manual    a snap job with manual snapshotting and `keep = []`: lists, prunes nothing
  snap periodic  a snap job (periodic, 1h, keep last_n 3): the first run snapshots (one command per
                 pool), the measured second one finds nothing due
Every no-op run is repeated without the shim for a wall time free of the shim's cost.
`zrepl.py version` gives the interpreter start-up + compile time that every zrepl.py command pays.

The expectation: the no-op runs' spawn counts do not grow with N.

--seed raw (default for N above --zrepl-seed-max, 100): the initial replication would take an hour
under emulation at N=1000, so the state it leaves is built directly instead: `zfs send -R | zfs
recv` into the sink's tree below two placeholders, zrepl's cursor bookmark on every sender
filesystem (one channel program) and the sink's last-received hold on every received @base
(`zfs hold -r`): the same datasets, properties, bookmarks and holds zrepl.py leaves behind.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import SpawnLog, run_measured, zfs, zrepl_argv  # noqa: E402

import zrepl  # noqa: E402  (benchlib put the repository root on sys.path)

MiB = 1 << 20
IDENTITY = "c"


@dataclass
class RunResult:
    """One measured zrepl.py run."""

    name: str
    spawns: dict[str, int]
    wall: float
    wall_no_shim: float | None = None
    exit_code: int = 0

    @property
    def total(self) -> int:
        return sum(self.spawns.values())

    def to_json(self) -> dict[str, Any]:
        return {"spawns": self.spawns, "total": self.total, "wall_s": self.wall,
                "wall_no_shim_s": self.wall_no_shim, "exit_code": self.exit_code}


@dataclass
class Scale:
    """Everything measured for one N."""

    n: int
    seed: str
    create_s: float = 0.0
    seed_s: float = 0.0
    runs: list[RunResult] = field(default_factory=list)
    repeated_spawns: dict[str, list[str]] = field(default_factory=dict)  # run -> per-dataset argv patterns


def write_config(workdir: Path, src: str, dst: str) -> Path:
    fs = {f"{src}/data<": True}
    return support.write_config(
        workdir,
        support.push_job(filesystems=fs, client_identity=IDENTITY,
                         keep_sender=[support.not_replicated(), support.last_n(3)], keep_receiver=[support.last_n(3)]),
        support.sink_job(root_fs=f"{dst}/sink"),
        support.snap_job("snap_manual", filesystems=fs),
        support.snap_job("snap_periodic", filesystems=fs, snapshotting=support.periodic("1h"),
                         keep=[support.last_n(3)]))


def create_datasets(parent: str, n: int) -> list[str]:
    """N children of parent, created by 8 concurrent `zfs create`s (they share transaction groups)."""
    names = [f"{parent}/fs{i:04d}" for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in pool.map(lambda name: zfs("create", name), names):
            pass
    return names


def seed_raw(src: str, dst: str, snapshot: str = "base") -> None:
    """Build the state the initial push leaves behind, without running it (see the docstring):
    everything up to SRC/data@snapshot received, cursors and last-received holds on that one."""
    fs = f"{src}/data"
    root = f"{dst}/sink/{IDENTITY}"
    for placeholder in (root, f"{root}/{src}"):
        zfs(*zrepl.create_placeholder_argv(placeholder, encryption_off=False)[1:])
    target = f"{root}/{fs}"
    result = benchlib.zfstest.send_recv(["-R", f"{fs}@{snapshot}"],
                                        ["-u", "-o", f"{zrepl.PLACEHOLDER_PROPERTY}=off", target], timeout=7200)
    assert result.ok
    zfs("hold", "-r", zrepl.last_received_hold_tag("sink"), f"{target}@{snapshot}")
    rows = [line.split("\t") for line in zfs("list", "-Hp", "-o", "name,guid", "-t", "snapshot", "-r", fs).splitlines()]
    place_cursors(src, [(name, int(guid)) for name, guid in rows if name.endswith(f"@{snapshot}")])


def place_cursors(pool: str, snapshots: list[tuple[str, int]]) -> None:
    """zrepl's push cursor bookmark on each (snapshot name, guid), in one channel program."""
    lines = []
    for name, guid in snapshots:
        dataset = name.split("@", 1)[0]
        bookmark = f"{dataset}#{zrepl.cursor_bookmark_name(guid, 'push')}"
        lines.append(f'assert(zfs.sync.bookmark("{name}", "{bookmark}") == 0)')
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        zfs("program", "-t", str(100_000_000), pool, f.name)
    finally:
        os.unlink(f.name)


def measure(name: str, shim: SpawnLog, config: Path, job: str, *, no_shim: bool = True,
            timeout: float = 7200) -> RunResult:
    """One counted run through the shim, then (no_shim) the same run again without it, for time."""
    shim.reset()
    m = run_measured(zrepl_argv("--config", str(config), "run", job), env=shim.env, timeout=timeout)
    if m.returncode != 0:
        print(f"  ! {name}: zrepl.py exited {m.returncode}: {m.stderr.strip()[-2000:]}", flush=True)
    result = RunResult(name, shim.per_verb(), m.wall, exit_code=m.returncode)
    if no_shim:
        again = run_measured(zrepl_argv("--config", str(config), "run", job), timeout=timeout)
        result.wall_no_shim = again.wall
    return result


def per_dataset_patterns(shim: SpawnLog, n: int) -> list[str]:
    """Spawn shapes (argv with dataset names blanked) that ran about once per dataset or more:
    the code paths whose count grows with N."""
    shapes: dict[str, int] = {}
    for s in shim.spawns():
        words = ["DS" if ("/" in w or "@" in w or "#" in w) else w for w in s.argv.split(" ")]
        key = " ".join(words)
        shapes[key] = shapes.get(key, 0) + 1
    return [f"{count}x zfs {shape}" for shape, count in sorted(shapes.items(), key=lambda kv: -kv[1])
            if count >= max(2, n // 2)]


def run_scale(n: int, seed: str, base: Path, tmpfs: Path) -> Scale:
    scale = Scale(n, seed)
    workdir = base / f"n{n}"
    workdir.mkdir()
    pools = benchlib.zfstest.PoolFactory(tmpfs / f"n{n}")
    try:
        vdev = str(256 * MiB + n * 2 * MiB)  # sparse: only what is written takes RAM
        src, dst = pools.create("src", size=vdev), pools.create("dst", size=vdev)
        zfs("create", "-o", "mountpoint=none", f"{src}/data")
        zfs("create", "-o", "mountpoint=none", f"{dst}/sink")
        start = time.perf_counter()
        create_datasets(f"{src}/data", n)
        zfs("snapshot", "-r", f"{src}/data@base")
        scale.create_s = time.perf_counter() - start
        print(f"N={n}: created {n} filesystems + @base in {scale.create_s:.1f} s", flush=True)
        config = write_config(workdir, src, dst)
        shim = SpawnLog(workdir / "shim")

        def record(r: RunResult) -> None:
            scale.runs.append(r)
            repeated = per_dataset_patterns(shim, n)
            if repeated and r.name != "push #1":
                scale.repeated_spawns[r.name] = repeated
            print(f"  {r.name:18} {r.total:6d} spawns {r.wall:8.1f} s"
                  + (f" ({r.wall_no_shim:.1f} s without the shim)" if r.wall_no_shim is not None else "")
                  + f"  {r.spawns}", flush=True)
            for line in scale.repeated_spawns.get(r.name, []):
                print(f"      grows with N: {line}", flush=True)

        if seed == "zrepl":
            record(measure("push #1", shim, config, "push", no_shim=False))
            scale.seed_s = scale.runs[-1].wall
        else:
            start = time.perf_counter()
            seed_raw(src, dst)
            scale.seed_s = time.perf_counter() - start
            print(f"  seeded the replicated state directly in {scale.seed_s:.1f} s", flush=True)
        received = [line for line in zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r",
                                         f"{dst}/sink").splitlines() if line.endswith("@base")]
        if len(received) != n + 1:
            raise SystemExit(f"expected {n + 1} received @base snapshots, found {len(received)}")
        record(measure("push no-op", shim, config, "push"))
        record(measure("snap manual", shim, config, "snap_manual"))
        record(measure("snap periodic #1", shim, config, "snap_periodic", no_shim=False))
        record(measure("snap periodic no-op", shim, config, "snap_periodic"))
        used = subprocess.run(["du", "-sm", str(tmpfs / f"n{n}")], capture_output=True, text=True).stdout.split()
        print(f"  vdev files use {used[0] if used else '?'} MiB of RAM", flush=True)
    finally:
        pools.destroy_all()
    return scale


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,100,1000", help="dataset counts (default 10,100,1000)")
    ap.add_argument("--seed", choices=("auto", "zrepl", "raw"), default="auto",
                    help="how to reach the replicated state (default: zrepl up to --zrepl-seed-max, raw above)")
    ap.add_argument("--zrepl-seed-max", type=int, default=100)
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    benchlib.require_guest()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    print(benchlib.environment(), flush=True)
    startup = [run_measured(zrepl_argv("version")).wall for _ in range(2)]
    print(f"zrepl.py start-up (`zrepl.py version`): {benchlib.median(startup):.2f} s", flush=True)
    tmpfs = benchlib.Tmpfs(benchlib.meminfo()["MemTotal"] * 1024 * 3 // 4)
    base = Path(tempfile.mkdtemp(prefix="zrepl-spawns-"))
    scales = []
    try:
        for n in counts:
            seed = args.seed if args.seed != "auto" else ("zrepl" if n <= args.zrepl_seed_max else "raw")
            scales.append(run_scale(n, seed, base, tmpfs.path))
    finally:
        tmpfs.close()

    print()
    print("zfs spawns per run (per verb) and wall seconds (with the shim / without):")
    for s in scales:
        print(f"N={s.n} (created in {s.create_s:.0f} s; replicated state by {s.seed} in {s.seed_s:.0f} s)")
        for r in s.runs:
            verbs = ", ".join(f"{v} {c}" for v, c in r.spawns.items())
            nos = f" / {r.wall_no_shim:.1f}" if r.wall_no_shim is not None else ""
            print(f"  {r.name:20} {r.total:6d}  {r.wall:7.1f}{nos} s   {verbs}")
    noop = ["push no-op", "snap manual", "snap periodic no-op"]
    grows = []
    for name in noop:
        totals = {s.n: next((r.total for r in s.runs if r.name == name), None) for s in scales}
        if len(set(totals.values())) > 1:
            grows.append(f"{name}: {totals}")
    print()
    print("no-op spawn counts constant across N" if not grows
          else "no-op spawn counts GROW with N: " + "; ".join(grows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": benchlib.environment(), "startup_s": benchlib.median(startup),
            "scales": [{"n": s.n, "seed": s.seed, "create_s": s.create_s, "seed_s": s.seed_s,
                        "runs": {r.name: r.to_json() for r in s.runs}, "grows_with_n": s.repeated_spawns}
                       for s in scales],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
