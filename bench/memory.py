#!/usr/bin/env python3
"""Peak RSS of a `zrepl.py run push` as the pools grow: F filesystems x S snapshots.

Two modes, the same two runs in each:

    python3 bench/memory.py --listing-double [--shapes 1000x100,1000x10,100x100]     # host, no ZFS
    tests/vm/run-in-guest python3 bench/memory.py [--shapes 100x10,100x100]           # real ZFS

  no-op        push -> sink over the local transport with everything replicated and keep rules
               that keep everything: the run lists both sides (one `zfs list` each) and plans;
               nothing is sent or destroyed.
  dry-run -v   `zrepl.py run push --dry-run -v` with receiver rules that keep only the last 10
               of each filesystem: the whole listing goes through the planner and the pruner,
               which decide (and print, with the keeping rule) every snapshot: the listing-heavy
               plan.

--listing-double (host): `zfs` is a sh script in PATH that prints pre-generated listings, byte
for byte in the format of `zfs list -Hp` with zrepl.py's columns (cat of a file: its own memory is
not zrepl.py's), answering the two listings the runs make. The state it describes is what an
initial push leaves: on the sender SRC/data and F children with S snapshots each and the job's
cursor bookmark on the newest; on the receiver the placeholders SINK/c and SINK/c/SRC and every
snapshot with the same guid, the newest held by the last-received hold. Any other zfs command
fails loudly (the script exits 1 naming it), so a run that needs more than the listings shows up
as a failed run, not as a low figure (the receiver lists SINK/c, the sender its whole pool). This
is how 100,000 snapshots (1,000 x 100) are measured: building them on real ZFS under emulation
takes hours.

Real ZFS (guest): the same state built for real (children by 8 concurrent `zfs create`, S
recursive snapshots, `zfs send -R | zfs recv`, the cursor bookmarks by one channel program, the
last-received holds by `zfs hold -r`), so the double's figures can be checked at a scale the guest
builds in minutes.

Peak RSS: VmHWM of the zrepl.py process, sampled every 0.1 s (not wait4's ru_maxrss: a forked
child's count starts from the size of the benchmark's own process, which has imported zrepl).
The listing's own size (bytes of `zfs list` output) is printed with it, and the slope (KiB per
snapshot) between the shapes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import run_measured  # noqa: E402

import zrepl  # noqa: E402  (benchlib put the repository root on sys.path)

JOB, SINK_JOB, IDENTITY = "push", "sink", "c"
MODULE = False  # --module: `python3 -P -m zrepl` (cached bytecode) instead of `python3 zrepl.py`


def zrepl_argv(*args: str) -> list[str]:
    if MODULE:  # PYTHONPATH is set by measure()
        return [sys.executable, "-P", "-m", "zrepl", *args]
    return benchlib.zrepl_argv(*args)
BASE_TIME = 1_780_000_000


def write_config(workdir: Path, src: str, sink_root: str) -> Path:
    return support.write_config(
        workdir,
        support.push_job(JOB, filesystems={f"{src}/data<": True}, client_identity=IDENTITY,
                         keep_sender=[support.regex(".*")], keep_receiver=[support.last_n(10)]),
        support.sink_job(SINK_JOB, root_fs=sink_root))


def write_config_noop(workdir: Path, src: str, sink_root: str) -> Path:
    return support.write_config(
        workdir,
        support.push_job(JOB, filesystems={f"{src}/data<": True}, client_identity=IDENTITY,
                         keep_sender=[support.regex(".*")], keep_receiver=[support.regex(".*")]),
        support.sink_job(SINK_JOB, root_fs=sink_root), name="noop.toml")


# ------------------------------------------------------------------------------------------------
# The listing double
# ------------------------------------------------------------------------------------------------

def _row(name: str, kind: str, guid: int, createtxg: int, creation: int, userrefs: object = "-",
         encryption: str = "-") -> str:
    """One line of `zfs list -Hp` in LIST_PROPERTIES' columns (whichever they are: looked up by
    name, so a column added or dropped there needs no edit here; an unknown one fails loudly)."""
    values = {"name": name, "type": kind, "guid": guid, "createtxg": createtxg, "creation": creation,
              "userrefs": userrefs, "receive_resume_token": "-", "encryption": encryption}
    return "\t".join(str(values[c]) for c in zrepl.LIST_PROPERTIES) + "\n"


def generate_listings(directory: Path, src: str, sink_root: str, filesystems: int, snapshots: int) -> tuple[Path, Path]:
    """The two listings (sender, receiver) of the replicated state, in LIST_PROPERTIES' columns."""
    sender, receiver = directory / "sender.tsv", directory / "receiver.tsv"
    target_root = f"{sink_root}/{IDENTITY}/{src}"
    guid = 10_000_000_000
    with sender.open("w") as s, receiver.open("w") as r:
        r.write(_row(f"{sink_root}/{IDENTITY}", "filesystem", 2, 2, BASE_TIME, encryption="off"))
        r.write(_row(target_root, "filesystem", 3, 3, BASE_TIME, encryption="off"))
        s.write(_row(src, "filesystem", 4, 1, BASE_TIME, encryption="off"))  # the sender lists its pool
        names = [f"{src}/data"] + [f"{src}/data/fs{i:04d}" for i in range(filesystems)]
        for n, fs in enumerate(names):
            guid += 1
            s.write(_row(fs, "filesystem", guid, 10 + n, BASE_TIME, encryption="off"))
            r.write(_row(f"{sink_root}/{IDENTITY}/{fs}", "filesystem", guid + 5_000_000_000, 100 + n, BASE_TIME,
                         encryption="off"))
            last_guid = 0
            for k in range(snapshots):
                guid += 1
                last_guid = guid
                txg, when = 1000 + k, BASE_TIME + 3600 * k
                newest = k == snapshots - 1
                short = f"zrepl_{k:06d}"
                s.write(_row(f"{fs}@{short}", "snapshot", guid, txg, when, 0))
                r.write(_row(f"{sink_root}/{IDENTITY}/{fs}@{short}", "snapshot", guid, txg, when, 1 if newest else 0))
            s.write(_row(f"{fs}#{zrepl.cursor_bookmark_name(last_guid, JOB)}", "bookmark", last_guid,
                         1000 + snapshots - 1, BASE_TIME + 3600 * (snapshots - 1)))
    return sender, receiver


_DOUBLE = r"""#!/bin/sh
# zfs double of bench/memory.py: answers the two listings, refuses everything else.
case "$1" in
  list)
    for last; do :; done
    case "$last" in
      @SRC@|@SRC@/data) exec cat @SENDER@ ;;
      @SINK@/@IDENTITY@) exec cat @RECEIVER@ ;;
    esac ;;
esac
echo "zfs double: unexpected command: zfs $*" >&2
exit 1
"""


def install_double(directory: Path, src: str, sink_root: str, sender: Path, receiver: Path) -> dict[str, str]:
    script = directory / "bin" / "zfs"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_DOUBLE.replace("@SRC@", src).replace("@SINK@", sink_root)
                      .replace("@IDENTITY@", IDENTITY)
                      .replace("@SENDER@", shlex.quote(str(sender))).replace("@RECEIVER@", shlex.quote(str(receiver))))
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{script.parent}{os.pathsep}{os.environ['PATH']}")


# ------------------------------------------------------------------------------------------------
# Real ZFS (guest)
# ------------------------------------------------------------------------------------------------

def build_real(pools: benchlib.zfstest.PoolFactory, filesystems: int, snapshots: int) -> tuple[str, str, int]:
    """The replicated state on real pools; returns (source pool, sink root, listing bytes)."""
    from benchlib import zfs  # noqa: PLC0415
    import concurrent.futures  # noqa: PLC0415
    vdev = str((512 << 20) + filesystems * snapshots * 16384)
    src, dst = pools.create("src", size=vdev), pools.create("dst", size=vdev)
    zfs("create", "-o", "mountpoint=none", f"{src}/data")
    names = [f"{src}/data/fs{i:04d}" for i in range(filesystems)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: zfs("create", n), names))
    for k in range(snapshots):
        zfs("snapshot", "-r", f"{src}/data@zrepl_{k:06d}")
    sink_root = f"{dst}/sink"
    zfs("create", "-o", "mountpoint=none", sink_root)
    for placeholder in (f"{sink_root}/{IDENTITY}", f"{sink_root}/{IDENTITY}/{src}"):
        zfs(*zrepl.create_placeholder_argv(placeholder, encryption_off=False)[1:])
    last = f"zrepl_{snapshots - 1:06d}"
    target = f"{sink_root}/{IDENTITY}/{src}/data"
    result = benchlib.zfstest.send_recv(["-R", f"{src}/data@{last}"],
                                        ["-u", "-o", f"{zrepl.PLACEHOLDER_PROPERTY}=off", target], timeout=7200)
    assert result.ok, result
    zfs("hold", "-r", zrepl.last_received_hold_tag(SINK_JOB), f"{target}@{last}")
    rows = [line.split("\t") for line in
            zfs("list", "-Hp", "-o", "name,guid", "-t", "snapshot", "-r", f"{src}/data").splitlines()]
    lua = [f'assert(zfs.sync.bookmark("{name}", "{name.split("@")[0]}#'
           f'{zrepl.cursor_bookmark_name(int(guid), JOB)}") == 0)' for name, guid in rows if name.endswith("@" + last)]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lua) + "\n")
    try:
        zfs("program", "-t", str(100_000_000), "-m", str(100 << 20), src, f.name)
    finally:
        os.unlink(f.name)
    size = sum(len(zfs(*zrepl.zfs_list_argv([root])[1:]).encode()) for root in (f"{src}/data", sink_root))
    return src, sink_root, size


# ------------------------------------------------------------------------------------------------

def measure(config: Path, env: dict[str, str] | None, extra: list[str], runs: int) -> tuple[float, float, float]:
    """(median peak RSS MiB, median wall s, median CPU s) of `runs` runs; a failed run stops the bench."""
    rss, wall, cpu = [], [], []
    if MODULE:
        env = dict(env if env is not None else os.environ, PYTHONPATH=str(benchlib.ZREPL_PY.parent))
    for _ in range(runs):
        m = run_measured(zrepl_argv("--config", str(config), "run", *extra, JOB), env=env, timeout=7200,
                         interval=0.1)
        if m.returncode != 0:
            sys.exit(f"zrepl.py run {' '.join(extra)} exited {m.returncode}:\n{m.stderr[-3000:]}")
        rss.append(m.hwm_kib / 1024)  # not ru_maxrss: a forked child starts from this script's size
        wall.append(m.wall)
        cpu.append(m.cpu)
    return statistics.median(rss), statistics.median(wall), statistics.median(cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listing-double", action="store_true", help="host: a zfs double printing generated listings")
    ap.add_argument("--shapes", default=None, help="FxS,... (default: 100x10,1000x10,1000x100 with the double, "
                                                   "10x10,100x100 on real ZFS)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (median; default 3)")
    ap.add_argument("--module", action="store_true",
                    help="run `python3 -P -m zrepl` (cached bytecode, README.md Install) instead of `python3 zrepl.py`")
    args = ap.parse_args()
    global MODULE
    MODULE = args.module
    if not args.listing_double:
        benchlib.require_guest()
        print(benchlib.environment(), flush=True)
    else:
        print(f"host, listing double; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs", flush=True)
    shapes = [tuple(int(x) for x in s.split("x")) for s in
              (args.shapes or ("100x10,1000x10,1000x100" if args.listing_double else "10x10,100x100")).split(",")]
    if MODULE:
        subprocess.run([sys.executable, "-m", "py_compile", str(benchlib.ZREPL_PY)], check=True)
    startup = measure_startup()
    print(f"zrepl.py version alone: peak RSS {startup:.1f} MiB", flush=True)
    results = []
    for f, s in shapes:
        work = Path(tempfile.mkdtemp(prefix="zrepl-memory-"))
        pools = None
        try:
            if args.listing_double:
                src, sink_root = "srcpool", "dstpool/sink"
                sender, receiver = generate_listings(work, src, sink_root, f, s)
                env: dict[str, str] | None = install_double(work, src, sink_root, sender, receiver)
                listing_bytes = sender.stat().st_size + receiver.stat().st_size
            else:
                pools = benchlib.zfstest.PoolFactory(work / "vdevs")
                src, sink_root, listing_bytes = build_real(pools, f, s)
                env = None
            snaps = (f + 1) * s
            noop = measure(write_config_noop(work, src, sink_root), env, [], args.runs)
            dry = measure(write_config(work, src, sink_root), env, ["--dry-run", "-v"], args.runs)
            results.append((f, s, snaps, listing_bytes, noop, dry))
            print(f"{f}x{s} ({snaps} snapshots per side, listings {listing_bytes / 2**20:.1f} MiB): "
                  f"no-op {noop[0]:.1f} MiB ({noop[1]:.1f} s wall, {noop[2]:.1f} s CPU); "
                  f"dry-run -v {dry[0]:.1f} MiB ({dry[1]:.1f} s, {dry[2]:.1f} s CPU)", flush=True)
        finally:
            if pools is not None:
                pools.destroy_all()
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print()
    print("| filesystems x snapshots | snapshots per side | listings MiB | no-op: peak RSS MiB | wall s | "
          "dry-run -v: peak RSS MiB | wall s |")
    print("|---|---|---|---|---|---|---|")
    for f, s, snaps, lb, noop, dry in results:
        print(f"| {f} x {s} | {snaps} | {lb / 2**20:.1f} | {noop[0]:.1f} | {noop[1]:.1f} | {dry[0]:.1f} | "
              f"{dry[1]:.1f} |")
    if len(results) >= 2:
        (_, _, a, _, na, da), (_, _, b, _, nb, db) = results[0], results[-1]
        if b != a:
            print(f"slope between {a} and {b} snapshots: no-op {(nb[0] - na[0]) * 1024 / (b - a):.2f} KiB per "
                  f"snapshot, dry-run {(db[0] - da[0]) * 1024 / (b - a):.2f} KiB per snapshot")
    return 0


def measure_startup() -> float:
    env = dict(os.environ, PYTHONPATH=str(benchlib.ZREPL_PY.parent)) if MODULE else None
    m = run_measured(zrepl_argv("version"), env=env, interval=0.05)
    return m.hwm_kib / 1024


if __name__ == "__main__":
    sys.exit(main())
