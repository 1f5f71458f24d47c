#!/usr/bin/env python3
"""What `zfs list` costs per column set, and a nothing-to-do snap/push run against that floor.

Runs inside the test guest, as root, on throwaway pools (file vdevs on a RAM-backed tmpfs):

    ZREPL_VM_MEMORY=4096 ZREPL_VM_TIMEOUT=4800 tests/vm/run-in-guest python3 bench/listing_cost.py \
        --scale 1000x10 --push --runs 3 --runs-only
    tests/vm/run-in-guest python3 bench/listing_cost.py --scale 100x10 --runs 3 --push
    tests/vm/run-in-guest python3 bench/listing_cost.py --scale 1000x10 --jobs push --runs 3 --runs-only

For each scale FxS: F filesystems SRC/data/fsNNNN below SRC/data, snapshotted S times: s0000 ...
sS-1 on all F+1 at once per name, one transaction group each (one `lzc_snapshot` per name from
this process through libzfs_core, which is what `zfs snapshot -r SRC/data@sK` does, without a
`zfs` spawn per name; `zfs snapshot -r` where the library cannot be loaded). Then, each timed
`--runs` times (median), every listing over SRC:

  floor             `zfs list -t filesystem,volume -r SRC` (default columns): what the issue's
                    goal (a no-op run at most 2x this) is measured against
  fs: name,guid,snapshots_changed   the cheap listing a snapshots_changed cache would start from
  all: name / name,guid,createtxg   OpenZFS's fast path for snapshots
  all: + type, + creation, + userrefs   one column more each
  all: zrepl.py's columns           what the sender and receiver listings request (LIST_PROPERTIES),
                    and before: with encryptionroot and keystatus, which no decision read; and
                    with the cache's two more (origin, snapshots_changed), which every full listing
                    requests to fill the cache
  fs: dataset columns + snap: version columns   the same information in two listings

then `zrepl.py run` of a snap job with nothing due (periodic 1h, keep last_n S+1: lists, keeps all),
each without its listing cache (removed before every run: the full listing of before) and with it
(filled by one untimed run), and, with --push, a push -> sink that has nothing to send.

The sink is seeded with the latest snapshot only: one full (non-incremental) `zfs send
SRC/data[/fsNNNN]@sS-1 | zfs recv -u -o <placeholder property>=off` per dataset (the parent first,
then the children, 5 pipes at a time) below the sink's two placeholders, plus what the initial push
leaves: the sink's last-received hold on every received snapshot (`zfs hold -r`) and zrepl's push
cursor bookmark on every sender @sS-1 (one channel program). The sender keeps all S snapshots, the
sink 1 per filesystem (same guid): nothing is newer than the latest common snapshot, so a push has
nothing to send; keep rules last_n S+1 on both sides keep everything. Receiving every snapshot
(bench/spawn_count.py's seed_raw, `zfs send -R`) would take hours under emulation at 100x1000. The
first run of each job is checked to be a no-op (exit 0, the snapshots of SRC/data and of the whole
sink unchanged) and the verdict printed. Each run's wall is printed as a ratio to the floor, with
the peak RSS over its runs: zrepl.py's own (VmHWM, sampled every 0.25 s) and wait4's (it or any zfs
it ran).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import glob
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import run, run_measured, zfs, zrepl_argv  # noqa: E402
from spawn_count import IDENTITY, create_datasets, place_cursors  # noqa: E402

import zrepl  # noqa: E402  (benchlib put the repository root on sys.path)

MiB = 1 << 20
ALL = "filesystem,volume,snapshot,bookmark"
DATASET_COLUMNS = "name,type,guid,createtxg,receive_resume_token,encryption"
VERSION_COLUMNS = "name,guid,createtxg,creation,userrefs"
BEFORE = ("encryptionroot", "keystatus")  # listed until 2026-12-01, read by no decision


def listings(src: str) -> list[tuple[str, list[list[str]]]]:
    """(label, argvs): each entry is one or more `zfs list` commands timed together."""
    def lst(types: str, columns: str | None) -> list[str]:
        return ["zfs", "list", "-H", *(["-p", "-o", columns] if columns else []), "-t", types, "-r", src]
    return [
        ("floor: zfs list -t filesystem,volume", [lst("filesystem,volume", None)]),
        ("fs: name,guid,snapshots_changed", [lst("filesystem,volume", "name,guid,snapshots_changed")]),
        ("fs,bm: the cache's listing (LISTING_CACHE_COLUMNS)",
         [lst("filesystem,volume,bookmark", ",".join(zrepl.LISTING_CACHE_COLUMNS))]),
        ("all: name", [lst(ALL, "name")]),
        ("all: name,guid,createtxg", [lst(ALL, "name,guid,createtxg")]),
        ("all: name,type,guid,createtxg", [lst(ALL, "name,type,guid,createtxg")]),
        ("all: name,guid,createtxg,creation", [lst(ALL, "name,guid,createtxg,creation")]),
        ("all: name,guid,createtxg,userrefs", [lst(ALL, "name,guid,createtxg,userrefs")]),
        ("all: zrepl.py's columns before 2026-12-01", [lst(ALL, ",".join((*zrepl.LIST_PROPERTIES, *BEFORE)))]),
        ("all: zrepl.py's columns (LIST_PROPERTIES)", [lst(ALL, ",".join(zrepl.LIST_PROPERTIES))]),
        # what a full listing asks for when it may fill the cache (also below the cache's threshold)
        ("all: + origin,snapshots_changed (LISTING_CACHE_COLUMNS)", [lst(ALL, ",".join(zrepl.LISTING_CACHE_COLUMNS))]),
        ("fs: dataset cols + snap,bm: version cols", [lst("filesystem,volume", DATASET_COLUMNS),
                                                     lst("snapshot,bookmark", VERSION_COLUMNS)]),
    ]


def timed(argvs: list[list[str]]) -> float:
    start = time.perf_counter()
    for argv in argvs:
        run([benchlib.REAL_ZFS, *argv[1:]], timeout=7200)
    return time.perf_counter() - start


def seed_latest(src: str, dst: str, filesystems: int, snapshot: str, parallel: int = 5) -> None:
    """The state a push leaves once everything up to SRC/data[/fsNNNN]@snapshot is replicated, built
    from the latest snapshot alone: one full (non-incremental) `zfs send DATASET@snapshot | zfs recv`
    per dataset (SRC/data first, then its children, `parallel` pipes at a time) below the sink's two
    placeholders, the sink's last-received hold on every received @snapshot (`zfs hold -r`) and
    zrepl's push cursor bookmark on every sender @snapshot (one channel program). The older
    snapshots stay on the sender only: a push has nothing to send, since nothing is newer than the
    latest common snapshot, whatever the sender holds before it. (seed_raw in spawn_count.py
    receives every snapshot: 100,000 receives at 100x1000, hours under emulation.)"""
    root = f"{dst}/sink/{IDENTITY}"
    for placeholder in (root, f"{root}/{src}"):
        zfs(*zrepl.create_placeholder_argv(placeholder, encryption_off=False)[1:])
    parent = f"{src}/data"
    children = [f"{parent}/fs{i:04d}" for i in range(filesystems)]

    def receive(dataset: str) -> None:
        result = benchlib.zfstest.send_recv(
            [f"{dataset}@{snapshot}"], ["-u", "-o", f"{zrepl.PLACEHOLDER_PROPERTY}=off", f"{root}/{dataset}"],
            timeout=7200)
        assert result.ok, dataset

    receive(parent)
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        for _ in pool.map(receive, children):
            pass
    zfs("hold", "-r", zrepl.last_received_hold_tag("sink"), f"{root}/{parent}@{snapshot}")
    latest = [f"{dataset}@{snapshot}" for dataset in [parent, *children]]
    rows = [line.split("\t") for line in zfs("list", "-Hp", "-o", "name,guid", *latest).splitlines()]
    place_cursors(src, [(name, int(guid)) for name, guid in rows])


def lzc_snapshotter() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """libzfs_core and libnvpair, initialised, or None where they cannot be loaded."""
    try:
        def load(stem: str) -> ctypes.CDLL:
            paths = sorted(glob.glob(f"/lib/*/{stem}.so.*") + glob.glob(f"/usr/lib/*/{stem}.so.*"))
            return ctypes.CDLL(paths[0] if paths else f"{stem}.so")
        lzc, nvpair = load("libzfs_core"), load("libnvpair")
        if lzc.libzfs_core_init() != 0:
            return None
    except (OSError, AttributeError):
        return None
    lzc.lzc_snapshot.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    nvpair.nvlist_alloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_int]
    nvpair.nvlist_add_boolean.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    nvpair.nvlist_free.argtypes = [ctypes.c_void_p]
    return lzc, nvpair


def snapshot_all(datasets: list[str], names: list[str]) -> str:
    """Each of names, in order, on all datasets at once: what `zfs snapshot -r PARENT@name` does (one
    lzc_snapshot ioctl listing every descendant, atomic, one transaction group per name), but all
    from this one process through libzfs_core (ctypes): under emulation a `zfs` spawn costs more
    than the snapshot, and 100x1000 needs 1,000 of them. Falls back to `zfs snapshot -r` per name
    when the library cannot be used (before anything was created). Returns which way it went."""
    libs = lzc_snapshotter()
    for k, name in enumerate(names):
        if libs is None:
            zfs("snapshot", "-r", f"{datasets[0]}@{name}")
            continue
        lzc, nvpair = libs
        snaps, errors = ctypes.c_void_p(), ctypes.c_void_p()
        assert nvpair.nvlist_alloc(ctypes.byref(snaps), 1, 0) == 0  # NV_UNIQUE_NAME
        try:
            for dataset in datasets:
                assert nvpair.nvlist_add_boolean(snaps, f"{dataset}@{name}".encode()) == 0
            rc = lzc.lzc_snapshot(snaps, None, ctypes.byref(errors))
        finally:
            nvpair.nvlist_free(snaps)
        if rc != 0 and k == 0:  # nothing created yet: the plain way
            print(f"  (lzc_snapshot failed: errno {rc}; using zfs snapshot -r)", flush=True)
            libs = None
            zfs("snapshot", "-r", f"{datasets[0]}@{name}")
        elif rc != 0:
            raise OSError(rc, f"lzc_snapshot of @{name} failed")
    return "zfs snapshot -r per name" if libs is None else "one lzc_snapshot per name (= zfs snapshot -r)"


def snapshot_names(dataset: str) -> list[str]:
    """DATASET's own snapshots (-d 1: cheap even when its children hold 100,000)."""
    return zfs("list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", dataset).split()


def timed_run(config: Path, job: str, remove_cache: Path | None = None) -> benchlib.Measured:
    """One `zrepl.py run JOB`; with remove_cache, its listing caches removed first (a full listing,
    as before the cache)."""
    if remove_cache is not None:
        shutil.rmtree(remove_cache, ignore_errors=True)
    m = run_measured(zrepl_argv("--config", str(config), "run", job), timeout=7200)
    if m.returncode != 0:
        print(f"  ! {job}: exit {m.returncode}: {m.stderr.strip()[-1500:]}", flush=True)
    return m


def check_noop(job: str, m: benchlib.Measured, before: list[str], after: list[str], what: str) -> None:
    """Print whether the run was the no-op it is meant to be: exit 0 and `what` unchanged."""
    changed = sorted(set(before) ^ set(after))
    verdict = "a no-op" if m.returncode == 0 and not changed else "NOT a no-op"
    print(f"  check: first {job} run: exit {m.returncode}, {what}: {len(before)} before, {len(after)} after"
          f"{', changed: ' + ' '.join(changed[:10]) if changed else ', unchanged'}: {verdict}", flush=True)
    tail = [line for line in (m.stdout + m.stderr).strip().splitlines() if line.strip()][-4:]
    for line in tail or ["(no output)"]:
        print(f"    | {line[:200]}", flush=True)


def run_scale(filesystems: int, snapshots: int, runs: int, jobs: list[str], base: Path, tmpfs: Path,
              columns: bool = True) -> None:
    label = f"{filesystems}x{snapshots}"
    pools = benchlib.zfstest.PoolFactory(tmpfs / label)
    workdir = base / label
    workdir.mkdir()
    try:
        vdev = str(512 * MiB + filesystems * snapshots * MiB // 4)  # sparse: only what is written costs
        src, dst = pools.create("src", size=vdev), pools.create("dst", size=vdev)
        zfs("create", "-o", "mountpoint=none", f"{src}/data")
        zfs("create", "-o", "mountpoint=none", f"{dst}/sink")
        start = time.perf_counter()
        children = create_datasets(f"{src}/data", filesystems)
        created = time.perf_counter()
        how = snapshot_all([f"{src}/data", *children], [f"s{k:04d}" for k in range(snapshots)])
        newest = snapshot_names(f"{src}/data")[-1]  # zfs list sorts a dataset's snapshots by createtxg
        assert newest == f"{src}/data@s{snapshots - 1:04d}", newest
        print(f"{label}: {filesystems} filesystems created in {created - start:.0f} s, {snapshots} snapshots"
              f" of all {filesystems + 1} in {time.perf_counter() - created:.0f} s ({how})", flush=True)
        figures: dict[str, float] = {}

        def record(name: str, seconds: float, measured: list[benchlib.Measured] | None = None) -> None:
            figures[name] = seconds
            floor = next(iter(figures.values()))
            rss = ""
            if measured:  # zrepl.py's own peak (VmHWM), and wait4's (zrepl.py or a zfs it ran)
                rss = (f"  peak RSS {max(m.hwm_kib for m in measured) / 1024:6.1f} MiB"
                       f" (with children {max(m.maxrss_kib for m in measured) / 1024:.1f} MiB)")
            print(f"  {name:48} {seconds:8.2f} s  {seconds / floor:6.2f}x{rss}", flush=True)

        print(f"{label} ({runs} run(s) each, median), seconds and ratio to the floor:", flush=True)
        for name, argvs in listings(src) if columns else listings(src)[:1]:
            record(name, benchlib.median([timed(argvs) for _ in range(runs)]))
        fs = {f"{src}/data<": True}
        config = support.write_config(
            workdir,
            support.snap_job("snap", filesystems=fs, snapshotting=support.periodic("1h", prefix="s"),
                             keep=[support.last_n(snapshots + 1)]),
            support.push_job(filesystems=fs, client_identity=IDENTITY, keep_sender=[support.last_n(snapshots + 1)],
                             keep_receiver=[support.last_n(snapshots + 1)]),
            support.sink_job(root_fs=f"{dst}/sink"))

        def state() -> list[str]:
            """What a no-op leaves alone: SRC/data's own snapshots and the sink's."""
            return (snapshot_names(f"{src}/data")
                    + zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", f"{dst}/sink").split())

        for job in jobs:
            if job == "push":
                start = time.perf_counter()
                seed_latest(src, dst, filesystems, f"s{snapshots - 1:04d}")
                print(f"{label}: sink seeded in {time.perf_counter() - start:.0f} s", flush=True)
            before = state()
            caches = workdir / "run" / "listings"
            without = [timed_run(config, job, caches)]
            check_noop(job, without[0], before, state(),
                       "snapshots of SRC/data and of the sink")
            without += [timed_run(config, job, caches) for _ in range(runs - 1)]
            record(f"zrepl.py run {job}, no cache (full listing)", benchlib.median([m.wall for m in without]), without)
            timed_run(config, job)  # fills the cache
            time.sleep(1.5)  # values of the second the cache was listed in are not trusted
            warm = [timed_run(config, job) for _ in range(runs)]
            record(f"zrepl.py run {job}, with the cache", benchlib.median([m.wall for m in warm]), warm)
            files = sorted(p.name for p in caches.iterdir()) if caches.is_dir() else []
            print(f"  cache files after the {job} runs: {' '.join(files) or 'none'}", flush=True)
    finally:
        pools.destroy_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="1000x10", help="FILESYSTEMSxSNAPSHOTS[,...] (default 1000x10)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per figure (median; default 1)")
    ap.add_argument("--push", action="store_true", help="also seed a sink and time a no-op push")
    ap.add_argument("--jobs", help="the zrepl.py jobs to time, of snap,push (default snap, and push with --push)")
    ap.add_argument("--runs-only", action="store_true", help="only the floor and the zrepl.py runs, no column sets")
    args = ap.parse_args()
    jobs = args.jobs.split(",") if args.jobs else ["snap", "push"] if args.push else ["snap"]
    if not set(jobs) <= {"snap", "push"}:
        ap.error(f"--jobs: {args.jobs!r}: name snap, push or both")
    benchlib.require_guest()
    print(benchlib.environment(), flush=True)
    startup = benchlib.median([run_measured(zrepl_argv("version")).wall for _ in range(2)])
    print(f"zrepl.py start-up (`zrepl.py version`): {startup:.2f} s", flush=True)
    tmpfs = benchlib.Tmpfs(benchlib.meminfo()["MemTotal"] * 1024 * 3 // 4)
    base = Path(tempfile.mkdtemp(prefix="zrepl-listing-"))
    try:
        for scale in args.scale.split(","):
            f, _, s = scale.strip().partition("x")
            run_scale(int(f), int(s), args.runs, jobs, base, tmpfs.path, columns=not args.runs_only)
    finally:
        tmpfs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
