#!/usr/bin/env python3
"""zrepl.py and its peers (bzfs, syncoid, zfs-autobackup) side by side on identical pools, with the
raw `zfs` floor of each scenario: wall time, zfs spawns, ratio to the floor, peak RSS.

Two steps. On the HOST (the guest has no network), fetch the peers into bench/.cache/peers
(git-ignored; the guest sees it at /src/bench/.cache/peers):

    python3 bench/peers.py --fetch

Then in the guest (it installs the peers from those files into its own /tmp, nothing else):

    flock /work/notes/guest.lock tests/vm/run-in-guest python3 bench/peers.py [--runs 3]
        [--scenarios noop10x10,initial10x10,backlog50,throughput,prune] [--size 512M]

Scenarios (all local: source and destination pools in one guest, vdev files on a tmpfs):
  noopFxS      F filesystems below SRC/data (plus SRC/data itself), S snapshots each, replicated
               by each tool into its own DST/<tool> first; timed: the run with nothing to do.
               Floor: one `zfs list -Hp -r -t filesystem,volume,snapshot -o name,guid` of the
               source tree and the tool's destination tree (what deciding "nothing to do" needs).
               The source tree is shared by the tools (their bookmarks and holds there show up in
               each other's listings; the destinations are separate).
  initialFxS   the same trees, timed: the initial replication of all S snapshots of every
               filesystem into an empty destination (destroyed before each run; the tools'
               bookmarks and holds on the source removed). Floor: `zfs send -R SRC/data@last |
               zfs recv -u`.
  backlogN     one filesystem per tool, replicated up to @base, then N new snapshots (one `zfs
               snapshot` command per index, naming every tool's filesystem, so each has its own
               txgs); timed: the catch-up. Floor: `zfs send -I @base @sN | zfs recv -u`.
  throughput   one filesystem with SIZE of incompressible data in one snapshot (compression off),
               timed: its first replication into an empty destination. Floor: `zfs send | zfs
               recv -u`.
  prune        10 filesystems per tool with 101 snapshots each (101 recursive `zfs snapshot -r`
               commands, naming every tool's tree); timed: destroying the 100 older ones of each
               (1,000 in all), keeping the newest. Floor: one `zfs destroy fs@a,b,...` per
               filesystem (10 commands).
Every tool runs every round, in rotating order; medians over --runs rounds (at least 3 for the
figures in bench/README.md). A tool that fails a run is reported with its exit code and stderr.

How each tool is configured (also printed with the table):
  zrepl.py     push -> sink over the local transport, manual snapshotting,
               initial_replication = "all", keep rules that keep everything (regex ".*") on both
               sides; run as `python3 zrepl.py run push` and (row "zrepl -m") `python3 -m zrepl`
               (cached bytecode, see README.md, Install); row "zrepl steps4" (only when --tools
               names it) adds replication.concurrency.steps = 4. Prune: a snap job, keep = last_n 1.
  bzfs         `bzfs SRC DST --recursive` (its defaults: every snapshot, several datasets in
               parallel); row "bzfs cache" adds `--cache-snapshots` (OpenZFS >= 2.2's
               snapshots_changed). Prune: `bzfs dummy TREE --recursive --skip-replication
               --delete-dst-snapshots --include-snapshot-regex 'bench-.*' --exclude-snapshot-regex NEWEST`.
  syncoid      `syncoid -r --no-sync-snap --no-privilege-elevation --quiet --compress=none SRC DST`
               (no snapshot of its own; --quiet also leaves pv out of the pipe, so it moves the
               stream like the floor). Prune: n/a (syncoid does not prune; sanoid does, by its own
               snapshot names and config; not measured).
  zfs-autobackup  `zfs-autobackup NAME DST --no-snapshot --other-snapshots --no-thinning
               --exclude-received --strip-path N` with autobackup:NAME=true on the source tree
               (its selection; NAME is per scenario, and --exclude-received leaves out the other
               tools' received copies, which carry the property too);
               it holds the snapshots it sends (its default). Prune: `zfs-autobackup bench
               --no-send --no-snapshot --keep-source 1` (thins its own names: the scenario's
               snapshots are named bench-YYYYMMDDHHMMSS for that).
Spawns: every `zfs` process, logged by a sh shim first in PATH (bench/benchlib.py SpawnLog), so
the count is what really ran, whatever spawned it (a tool's shell pipelines included).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "peers"
MiB = 1 << 20
ZAB_NAME = "bench"  # zfs-autobackup's backup name: property autobackup:bench, snapshots bench-<time>

# What --fetch downloads: (client, package). Wheels and .debs only, no dependencies beyond these.
PIP_PACKAGES = ("bzfs", "zfs-autobackup", "colorama")  # colorama: zfs-autobackup's console colours
DEB_PACKAGES = ("sanoid", "libcapture-tiny-perl", "pv", "lzop")  # syncoid and what it loads/calls


def fetch() -> int:
    """On the host: download the peers into bench/.cache/peers (pip download, apt-get download)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(CACHE), *PIP_PACKAGES],
                   check=True)
    # apt-get download writes into the working directory
    subprocess.run(["apt-get", "download", *DEB_PACKAGES], cwd=CACHE, check=True)
    for f in sorted(CACHE.iterdir()):
        print(f"{f.stat().st_size:>9}  {f.name}")
    return 0


# The rest runs in the guest only (the test bed's helpers, real ZFS).

sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import SpawnLog, run_measured, zfs  # noqa: E402

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Names:
    """Snapshot names zfs-autobackup counts as its own (bench-YYYYMMDDHHMMSS), one second apart,
    unique across the whole benchmark run; all tools get the same names."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{ZAB_NAME}-{(EPOCH + dt.timedelta(seconds=self.n)):%Y%m%d%H%M%S}"


@dataclass
class Installed:
    """Where the peers were unpacked in the guest."""

    prefix: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        # after the shim and the system's zfs: pv and lzop for syncoid's availability checks
        env["PATH"] = f"{env['PATH']}{os.pathsep}{self.prefix / 'root' / 'usr' / 'bin'}"
        env["PERL5LIB"] = str(self.prefix / "root" / "usr" / "share" / "perl5")
        env["PYTHONPATH"] = str(self.prefix / "py")
        return env

    @property
    def syncoid(self) -> list[str]:
        return ["perl", str(self.prefix / "root" / "usr" / "sbin" / "syncoid")]


def install(prefix: Path) -> Installed:
    """Unpack the fetched wheels (zip files) and .debs (dpkg-deb -x) below prefix: no pip, no dpkg db."""
    if not CACHE.is_dir() or not any(CACHE.glob("*.whl")):
        sys.exit(f"no peers in {CACHE}: run `python3 bench/peers.py --fetch` on the host first")
    for wheel in CACHE.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(prefix / "py")
    for deb in CACHE.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(prefix / "root")], check=True)
    return Installed(prefix)


@dataclass
class Run:
    """One timed command of one tool."""

    wall: float
    spawns: int
    rss_mib: float
    returncode: int
    error: str = ""
    verbs: dict[str, int] = field(default_factory=dict)  # spawns per zfs verb: where they went


@dataclass
class Row:
    """One tool in one scenario."""

    scenario: str
    tool: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.returncode == 0]


TOOLS = ("floor", "zrepl", "zrepl steps4", "bzfs", "syncoid", "zfs-autobackup")
NOOP_VARIANTS = {"zrepl -m": "zrepl", "bzfs cache": "bzfs"}  # rows sharing a base tool's state
# zrepl.py rows that push, and their replication.concurrency.steps ("zrepl steps4": bzfs too
# replicates several datasets at once by default)
ZREPL_PUSH_ROWS = {"zrepl": 1, "zrepl steps4": 4}


def slug(tool: str) -> str:
    """A tool's name as part of a dataset name ("zfs-autobackup" -> "zfsautobackup")."""
    return tool.replace("-", "").replace(" ", "")


class Bench:
    """Two pools, the shim, the peers, and the commands of each tool."""

    def __init__(self, args: argparse.Namespace, tmpfs: Path, workdir: Path, inst: Installed):
        self.args, self.workdir, self.inst = args, workdir, inst
        self.size = _size(args.size)
        self.pools = benchlib.zfstest.PoolFactory(tmpfs)
        wants_tp = "throughput" in args.scenarios
        vdev = str((2 << 30) + (3 * self.size if wants_tp else 0))
        self.src = self.pools.create("src", size=vdev, fs_properties={"compression": "off"})
        self.dst = self.pools.create("dst", size=vdev, pool_properties={"autotrim": "on"},
                                     fs_properties={"compression": "off", "mountpoint": "none"})
        self.shim = SpawnLog(workdir / "shim")
        self.env = inst.env(self.shim.env)
        self.names = Names()
        self.rows: list[Row] = []
        self.zab_of: dict[str, str] = {}  # source tree -> zfs-autobackup backup name selecting it

    # ---- the tools' commands ----------------------------------------------------------------

    def zrepl_config(self, key: str, tree: str, dst_root: str, prune_keep: int | None = None,
                     steps: int = 1) -> Path:
        if prune_keep is not None:
            jobs = [support.snap_job("prune", filesystems={f"{tree}<": True}, keep=[support.last_n(prune_keep)])]
        else:
            parallel = {"replication": {"concurrency": {"steps": steps}}} if steps > 1 else {}
            jobs = [support.push_job(filesystems={f"{tree}<": True}, client_identity="c",
                                     keep_sender=[support.regex(".*")], keep_receiver=[support.regex(".*")],
                                     initial_replication="all", **parallel),
                    support.sink_job(root_fs=dst_root)]
        return support.write_config(self.workdir / (f"zrepl-{key}" + (f"-steps{steps}" if steps > 1 else "")), *jobs)

    def push_config(self, tool: str, key: str, tree: str, dst_root: str) -> Path | None:
        """The config of a zrepl.py row that pushes ("zrepl", "zrepl steps4"), None for the others."""
        steps = ZREPL_PUSH_ROWS.get(tool)
        return None if steps is None else self.zrepl_config(key, tree, dst_root, steps=steps)

    def replicate_argv(self, tool: str, tree: str, dst_root: str, config: Path | None) -> list[str]:
        target = f"{dst_root}/{tree.rsplit('/', 1)[1]}"
        py = sys.executable
        if tool in ZREPL_PUSH_ROWS:
            return [py, str(benchlib.ZREPL_PY), "--config", str(config), "run", "push"]
        if tool == "zrepl -m":
            return ["env", f"PYTHONPATH={benchlib.ZREPL_PY.parent}", py, "-m", "zrepl", "--config", str(config),
                    "run", "push"]
        if tool in ("bzfs", "bzfs cache"):
            return [py, "-m", "bzfs_main.bzfs", tree, target, "--recursive",
                    *(["--cache-snapshots"] if tool == "bzfs cache" else [])]
        if tool == "syncoid":
            return [*self.inst.syncoid, "-r", "--no-sync-snap", "--no-privilege-elevation", "--quiet",
                    "--compress=none", tree, target]
        if tool == "zfs-autobackup":
            return [py, "-m", "zfs_autobackup.ZfsAutobackup", self.zab_of[tree], dst_root, "--no-snapshot",
                    "--other-snapshots", "--no-thinning", "--exclude-received", "--strip-path", str(tree.count("/"))]
        raise ValueError(tool)

    def prune_argv(self, tool: str, tree: str, newest: str, config: Path | None) -> list[str] | None:
        py = sys.executable
        if tool == "zrepl":
            return [py, str(benchlib.ZREPL_PY), "--config", str(config), "run", "prune"]
        if tool == "bzfs":
            return [py, "-m", "bzfs_main.bzfs", "dummy", tree, "--recursive", "--skip-replication",
                    "--delete-dst-snapshots", "--include-snapshot-regex", f"{ZAB_NAME}-.*",
                    "--exclude-snapshot-regex", newest]
        if tool == "zfs-autobackup":
            return [py, "-m", "zfs_autobackup.ZfsAutobackup", ZAB_NAME, "--no-send", "--no-snapshot",
                    "--keep-source", "1"]
        return None

    # ---- measuring ------------------------------------------------------------------------

    def timed(self, argv: Sequence[str] | Callable[[], None]) -> Run:
        """One run through the shim: wall, zfs spawns, the tool's own peak RSS, exit code."""
        self.shim.reset()
        if callable(argv):
            start = time.perf_counter()
            rc, err = 0, ""
            try:
                argv()
            except Exception as exc:  # noqa: BLE001  (reported in the table, the bench goes on)
                rc, err = 1, str(exc)[-1500:]
            return Run(time.perf_counter() - start, len(self.shim.spawns()), 0.0, rc, err, self.shim.per_verb())
        m = run_measured(list(argv), env=self.env, timeout=self.args.timeout)
        err = "" if m.returncode == 0 else (m.stderr + m.stdout)[-1500:]
        # VmHWM of the tool's own process only: wait4's ru_maxrss starts from this (forking) script's size
        return Run(m.wall, len(self.shim.spawns()), m.hwm_kib / 1024, m.returncode, err, self.shim.per_verb())

    def record(self, rows: dict[str, Row], tool: str, run: Run) -> None:
        rows[tool].runs.append(run)
        state = "ok" if run.returncode == 0 else f"FAILED exit {run.returncode}: {run.error.strip()[-600:]}"
        print(f"    {rows[tool].scenario:14} {tool:15} {run.wall:8.2f} s {run.spawns:6d} spawns "
              f"{run.rss_mib:6.1f} MiB  {state}", flush=True)
        if run.verbs:
            print("      spawns per verb: " + ", ".join(f"{verb} {n}" for verb, n in run.verbs.items()), flush=True)

    def rotation(self, tools: Sequence[str], r: int) -> list[str]:
        k = r % len(tools)
        return list(tools[k:]) + list(tools[:k])

    # ---- building state ---------------------------------------------------------------------

    def create_tree(self, tree: str, children: int) -> list[str]:
        """tree and its children, created by 8 concurrent `zfs create`s (they share txgs)."""
        zfs("create", "-p", tree)
        names = [f"{tree}/fs{i:04d}" for i in range(children)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: zfs("create", n), names))
        return names

    def snapshot_all(self, datasets: Sequence[str], count: int, recursive: bool = False) -> list[str]:
        """count snapshots of every dataset: one `zfs snapshot` per name, naming all datasets (each
        snapshot has its own txg, as with a real schedule). Returns the short names."""
        shorts = []
        for _ in range(count):
            short = self.names.next()
            zfs("snapshot", *(["-r"] if recursive else []), *[f"{d}@{short}" for d in datasets])
            shorts.append(short)
        return shorts

    def mark_zab(self, tree: str, name: str) -> None:
        """Select tree for zfs-autobackup under its own backup name (one per scenario: a run
        replicates every dataset carrying its property, pool-wide)."""
        zfs("set", f"autobackup:{name}=true", tree)
        self.zab_of[tree] = name

    def release_all(self, tree: str) -> None:
        """Release every hold below tree (the tools' own): zfs destroy -r refuses held snapshots."""
        rows = [line.split("\t") for line in
                zfs("list", "-Hp", "-t", "snapshot", "-o", "name,userrefs", "-r", tree, check=False).splitlines()]
        held = [name for name, refs in rows if refs not in ("0", "-")]
        for i in range(0, len(held), 200):
            for line in zfs("holds", "-H", *held[i:i + 200]).splitlines():
                name, tag, _ = line.split("\t", 2)
                zfs("release", tag, name, check=False)

    def clean_source(self, tree: str) -> None:
        """Remove what the tools left on the source (holds, bookmarks), for a next initial run."""
        self.release_all(tree)
        for bm in zfs("list", "-H", "-t", "bookmark", "-o", "name", "-r", tree, check=False).split():
            zfs("destroy", bm, check=False)

    def fresh_dst(self, dst_root: str) -> None:
        if zfs("list", "-H", "-o", "name", dst_root, check=False).strip():
            self.release_all(dst_root)
            zfs("destroy", "-r", dst_root)
        zfs("create", "-p", dst_root)

    def count_snapshots(self, tree: str) -> int:
        return len(zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", tree, check=False).split())

    def tools(self) -> list[str]:
        wanted = [t.strip() for t in self.args.tools.split(",")]
        return [t for t in TOOLS if t in wanted or t == "floor"]

    def new_rows(self, scenario: str, tools: Sequence[str]) -> dict[str, Row]:
        rows = {t: Row(scenario, t) for t in tools}
        self.rows.extend(rows.values())
        return rows

    # ---- scenarios ----------------------------------------------------------------------------

    def noop(self, f: int, s: int) -> None:
        scen = f"noop {f}x{s}"
        tree = f"{self.src}/n{f}x{s}/data"
        start = time.perf_counter()
        children = self.create_tree(tree, f)
        self.snapshot_all([tree], s, recursive=True)
        self.mark_zab(tree, f"n{f}x{s}")
        print(f"  {scen}: built {f + 1} filesystems x {s} snapshots in {time.perf_counter() - start:.0f} s",
              flush=True)
        base = [t for t in self.tools() if t != "floor"]
        wanted = [t.strip() for t in self.args.tools.split(",")]
        rows_order = ["floor"] + [t for t in base] + [v for v, b in NOOP_VARIANTS.items() if v in wanted and b in base]
        rows = self.new_rows(scen, rows_order)
        expected = (len(children) + 1) * s
        dst_of = {t: f"{self.dst}/{slug(t)}-n{f}x{s}" for t in base + ["floor"]}
        configs = {}
        for tool in ["floor"] + base:  # the replicated state, untimed
            self.fresh_dst(dst_of[tool])
            if tool == "floor":
                res = benchlib.zfstest.send_recv(["-R", f"{tree}@{self.names_last(tree)}"],
                                                 ["-u", f"{dst_of[tool]}/data"], timeout=self.args.timeout)
                assert res.ok
                continue
            configs[tool] = self.push_config(tool, f"n{f}x{s}", tree, dst_of[tool])
            run = self.timed(self.replicate_argv(tool, tree, dst_of[tool], configs[tool]))
            got = self.count_snapshots(dst_of[tool])
            print(f"    {scen:14} {tool:15} initial replication (untimed set-up): {run.wall:.1f} s, "
                  f"{run.spawns} spawns, exit {run.returncode}, {got}/{expected} snapshots", flush=True)
            if run.returncode != 0 or got != expected:
                rows[tool].note = (f"set-up failed: exit {run.returncode}, {got}/{expected} snapshots; "
                                   f"{run.error[-300:]}")
        if "bzfs cache" in rows and not rows["bzfs"].note:
            self.timed(self.replicate_argv("bzfs cache", tree, dst_of["bzfs"], None))  # fills its cache
        for r in range(self.args.runs):
            for tool in self.rotation(rows_order, r):
                basetool = NOOP_VARIANTS.get(tool, tool)
                if rows[basetool].note:
                    continue
                if tool == "floor":
                    argv = [benchlib.REAL_ZFS, "list", "-Hp", "-r", "-t", "filesystem,volume,snapshot",
                            "-o", "name,guid", tree, dst_of["floor"]]
                    argv[0] = "zfs"  # through the shim, counted like the tools' spawns
                else:
                    argv = self.replicate_argv(tool, tree, dst_of[basetool], configs.get(basetool))
                self.record(rows, tool, self.timed(argv))
        for tool in base:
            if not rows[tool].note and self.count_snapshots(dst_of[tool]) != expected:
                rows[tool].note = "a no-op run changed the destination"

    def names_last(self, tree: str) -> str:
        snaps = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg", "-d", "1", tree).split()
        return snaps[-1].split("@", 1)[1]

    def initial(self, f: int, s: int) -> None:
        scen = f"initial {f}x{s}"
        tree = f"{self.src}/i{f}x{s}/data"
        children = self.create_tree(tree, f)
        self.snapshot_all([tree], s, recursive=True)
        self.mark_zab(tree, f"i{f}x{s}")
        expected = (len(children) + 1) * s
        last = self.names_last(tree)
        tools = self.tools()
        rows = self.new_rows(scen, tools)
        for r in range(self.args.runs):
            for tool in self.rotation(tools, r):
                dst_root = f"{self.dst}/{slug(tool)}-i{f}x{s}"
                self.clean_source(tree)
                self.fresh_dst(dst_root)
                if tool == "floor":
                    run = self.timed(functools.partial(self._send_recv, ["-R", f"{tree}@{last}"],
                                                       ["-u", f"{dst_root}/data"]))
                else:
                    config = self.push_config(tool, f"i{f}x{s}", tree, dst_root)
                    run = self.timed(self.replicate_argv(tool, tree, dst_root, config))
                got = self.count_snapshots(dst_root)
                if run.returncode == 0 and got != expected:
                    run.returncode, run.error = -1, f"{got}/{expected} snapshots arrived"
                self.record(rows, tool, run)
        self.clean_source(tree)

    def _send_recv(self, send: list[str], recv: list[str]) -> None:
        res = benchlib.zfstest.send_recv(send, recv, send_argv0=str(self.shim.dir / "zfs"),
                                         recv_argv0=str(self.shim.dir / "zfs"), timeout=self.args.timeout)
        if not res.ok:
            raise RuntimeError(f"raw send | recv failed: {res}")

    def backlog(self, n: int) -> None:
        scen = f"backlog {n}"
        tools = self.tools()
        rows = self.new_rows(scen, tools)
        fs_of = {t: f"{self.src}/b{n}-{slug(t)}/data" for t in tools}
        dst_of = {t: f"{self.dst}/{slug(t)}-b{n}" for t in tools}
        for fs in fs_of.values():
            zfs("create", "-p", fs)
        if "zfs-autobackup" in fs_of:
            self.mark_zab(fs_of["zfs-autobackup"], f"b{n}")
        prev = self.snapshot_all(list(fs_of.values()), 1)[-1]
        configs = {}
        for tool in tools:  # the replicated @base, untimed
            self.fresh_dst(dst_of[tool])
            if tool == "floor":
                self._send_recv([f"{fs_of[tool]}@{prev}"], ["-u", f"{dst_of[tool]}/data"])
                continue
            configs[tool] = self.push_config(tool, f"b{n}", fs_of[tool], dst_of[tool])
            run = self.timed(self.replicate_argv(tool, fs_of[tool], dst_of[tool], configs[tool]))
            if run.returncode != 0:
                rows[tool].note = f"set-up failed: exit {run.returncode}: {run.error[-300:]}"
        for r in range(self.args.runs):
            start = time.perf_counter()
            last = self.snapshot_all(list(fs_of.values()), n)[-1]
            print(f"  {scen}: {n} snapshots on {len(fs_of)} filesystems in {time.perf_counter() - start:.0f} s",
                  flush=True)
            expected = 1 + n * (r + 1)
            for tool in self.rotation(tools, r):
                if rows[tool].note:
                    continue
                if tool == "floor":
                    run = self.timed(functools.partial(self._send_recv, ["-I", f"@{prev}", f"{fs_of['floor']}@{last}"],
                                                       ["-u", f"{dst_of['floor']}/data"]))
                else:
                    run = self.timed(self.replicate_argv(tool, fs_of[tool], dst_of[tool], configs[tool]))
                got = self.count_snapshots(dst_of[tool])
                if run.returncode == 0 and got != expected:
                    run.returncode, run.error = -1, f"{got}/{expected} snapshots on the destination"
                self.record(rows, tool, run)
            prev = last

    def throughput(self) -> None:
        scen = f"throughput {self.args.size}"
        fs = f"{self.src}/tp/data"
        zfs("create", "-p", fs)
        self.mark_zab(fs, "tp")
        mountpoint = zfs("get", "-H", "-o", "value", "mountpoint", fs).strip()
        block = os.urandom(8 * MiB)
        with open(Path(mountpoint) / "data", "wb") as out:
            for i in range(max(1, self.size // len(block))):
                out.write(i.to_bytes(16, "big") + block[16:])
        snap = self.snapshot_all([fs], 1)[-1]
        tools = self.tools()
        rows = self.new_rows(scen, tools)
        for r in range(self.args.runs):
            for tool in self.rotation(tools, r):
                dst_root = f"{self.dst}/{slug(tool)}-tp"
                self.clean_source(fs)
                self.fresh_dst(dst_root)
                if tool == "floor":
                    run = self.timed(functools.partial(self._send_recv, [f"{fs}@{snap}"], ["-u", f"{dst_root}/data"]))
                else:
                    config = self.push_config(tool, "tp", fs, dst_root)
                    run = self.timed(self.replicate_argv(tool, fs, dst_root, config))
                if run.returncode == 0 and self.count_snapshots(dst_root) != 1:
                    run.returncode, run.error = -1, "the snapshot did not arrive"
                self.record(rows, tool, run)
            for tool in tools:
                self.fresh_dst(f"{self.dst}/{slug(tool)}-tp")

    def prune(self) -> None:
        nfs, nsnap = (int(x) for x in self.args.prune.split("x"))
        scen = f"prune {nfs}x{nsnap}"
        tools = [t for t in self.tools() if t not in ("syncoid", "zrepl steps4")]  # steps: replication only
        rows = self.new_rows(scen, tools + (["syncoid"] if "syncoid" in self.tools() else []))
        if "syncoid" in rows:
            rows["syncoid"].note = "n/a: syncoid does not prune (sanoid does, by its own names and config)"
        trees = {t: f"{self.src}/p-{slug(t)}" for t in tools}
        children = {t: self.create_tree(trees[t], nfs) for t in tools}
        if "zfs-autobackup" in trees:
            self.mark_zab(trees["zfs-autobackup"], ZAB_NAME)  # its thinner keeps to its own names
        for r in range(self.args.runs):
            start = time.perf_counter()
            shorts = self.snapshot_all([c for t in tools for c in children[t]], nsnap + 1)
            print(f"  {scen}: {nsnap + 1} snapshots on {sum(len(c) for c in children.values())} filesystems in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            newest, doomed = shorts[-1], shorts[:-1]
            for tool in self.rotation(tools, r):
                if tool == "floor":
                    run = self.timed(functools.partial(self._destroy_raw, children["floor"], doomed))
                else:
                    config = self.zrepl_config("prune", trees[tool], "", prune_keep=1) if tool == "zrepl" else None
                    argv = self.prune_argv(tool, trees[tool], newest, config)
                    assert argv is not None
                    run = self.timed(argv)
                left = self.count_snapshots(trees[tool])
                if run.returncode == 0 and left != len(children[tool]):
                    run.returncode, run.error = -1, f"{left} snapshots left, wanted {len(children[tool])}"
                self.record(rows, tool, run)
            for tool in tools:  # what a failed tool left, so that every round starts alike
                for c in children[tool]:
                    zfs("destroy", f"{c}@{','.join(doomed)}", check=False)

    def _destroy_raw(self, datasets: Sequence[str], shorts: Sequence[str]) -> None:
        """The floor of pruning: one `zfs destroy fs@a,b,...` per filesystem."""
        for ds in datasets:
            subprocess.run([str(self.shim.dir / "zfs"), "destroy", f"{ds}@{','.join(shorts)}"],
                           check=True, capture_output=True)

    def close(self) -> None:
        self.pools.destroy_all()


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def table(rows: Sequence[Row]) -> str:
    """One markdown table: per scenario the floor first, ratios to its median."""
    out = ["| scenario | tool | wall s, median (min-max) | zfs spawns | x floor | peak RSS MiB | runs |",
           "|---|---|---|---|---|---|---|"]
    floors = {r.scenario: statistics.median([x.wall for x in r.ok()]) for r in rows
              if r.tool == "floor" and r.ok()}
    for r in rows:
        ok = r.ok()
        failed = [x for x in r.runs if x.returncode != 0]
        if not ok:
            last_line = failed[0].error.strip().splitlines()[-1][:120] if failed and failed[0].error.strip() else ""
            why = " ".join((r.note or (f"failed: {last_line}" if last_line else "no run")).split()).replace("|", "/")
            out.append(f"| {r.scenario} | {r.tool} | {why} | | | | {len(r.runs)} |")
            continue
        walls = [x.wall for x in ok]
        spawns = sorted({x.spawns for x in ok})
        med = statistics.median(walls)
        ratio = f"{med / floors[r.scenario]:.2f}" if r.scenario in floors and r.tool != "floor" else ""
        rss = statistics.median([x.rss_mib for x in ok])
        spawn_text = str(spawns[0]) if len(spawns) == 1 else f"{spawns[0]}-{spawns[-1]}"
        out.append(f"| {r.scenario} | {r.tool} | {med:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {spawn_text} | "
                   f"{ratio} | {rss:.0f} | {len(ok)}{f' (+{len(failed)} failed)' if failed else ''} |"
                   if r.tool != "floor" else
                   f"| {r.scenario} | floor | {med:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {spawn_text} | 1 | | "
                   f"{len(ok)} |")
    return "\n".join(out)


def run_scenarios(args: argparse.Namespace) -> int:
    benchlib.require_guest()
    print(benchlib.environment(), flush=True)
    for tool in ("perl", "mbuffer", "pv", "lzop"):
        print(f"  {tool}: {shutil.which(tool) or 'not installed in the guest'}")
    workdir = Path(tempfile.mkdtemp(prefix="zrepl-peers-"))
    inst = install(workdir / "peers")
    print("  peers: " + ", ".join(sorted(p.name for p in CACHE.iterdir() if p.suffix in (".whl", ".deb"))), flush=True)
    tmpfs = benchlib.Tmpfs(benchlib.meminfo()["MemTotal"] * 1024 * 3 // 4)
    bench = Bench(args, tmpfs.path, workdir, inst)
    try:
        for scen in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            print(f"scenario {scen}", flush=True)
            first = len(bench.rows)
            if scen.startswith("noop"):
                f, s = (int(x) for x in scen[4:].split("x"))
                bench.noop(f, s)
            elif scen.startswith("initial"):
                f, s = (int(x) for x in scen[7:].split("x"))
                bench.initial(f, s)
            elif scen.startswith("backlog"):
                bench.backlog(int(scen[7:]))
            elif scen == "throughput":
                bench.throughput()
            elif scen == "prune":
                bench.prune()
            else:
                sys.exit(f"unknown scenario {scen!r}")
            print(table(bench.rows[first:]), flush=True)
    finally:
        bench.close()
        tmpfs.close()
    print()
    print(benchlib.environment())
    print(table(bench.rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"scenario": r.scenario, "tool": r.tool, "note": r.note,
                                                "runs": [vars(x) for x in r.runs]} for r in bench.rows], indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetch", action="store_true", help="on the host: download the peers into bench/.cache/peers")
    ap.add_argument("--runs", type=int, default=3, help="rounds per scenario (median; default 3)")
    ap.add_argument("--scenarios", default="noop10x10,initial10x10,backlog50,throughput,prune",
                    help="comma separated: noopFxS, initialFxS, backlogN, throughput, prune "
                         "(e.g. noop100x10,noop1000x1,backlog500)")
    ap.add_argument("--size", default="512M", help="throughput: data size (default 512M)")
    ap.add_argument("--prune", default="10x100", help="prune: filesystems x snapshots destroyed (default 10x100)")
    ap.add_argument("--tools", default="zrepl,zrepl -m,bzfs,bzfs cache,syncoid,zfs-autobackup",
                    help="comma separated rows (the floor always runs; 'zrepl -m' and 'bzfs cache' in noop only)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command (default 3600)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    if args.fetch:
        return fetch()
    return run_scenarios(args)


if __name__ == "__main__":
    sys.exit(main())
