#!/usr/bin/env python3
"""Local replication throughput of `zrepl.py run` (push -> sink) against raw `zfs send | zfs recv`.

Runs inside the test guest, as root, on two throwaway pools whose file vdevs live on a dedicated
tmpfs (RAM): a source pool holding SIZE of incompressible data in one snapshot, and a receiving pool.

    tests/vm/run-in-guest python3 bench/replication_throughput.py [--size 512M] [--runs 3]
    ZREPL_VM_MEMORY=4608 tests/vm/run-in-guest python3 bench/replication_throughput.py --size 1G

Each round moves the same snapshot (a full send) once per variant, in rotating order, and destroys
what was received (and zrepl's cursor bookmark and holds on the sender) in between:

  raw            `zfs send SNAP | zfs recv -u TARGET`: two Popen joined by a pipe, no shell.
  zrepl          `zrepl.py run push`, a push job and a sink job joined by the local transport: the
                 `zfs send` stdout pipe itself is handed to `zfs recv` (no byte passes through Python).
  zrepl-copy     the same with a (non-binding) send.bandwidth_limit, which makes the stream go
                 through Python as DATA frames: shows what the zero-copy path saves.

Measured per run:
  stream s   from the start of the (non -n) `zfs send` to the end of the last stream command,
             taken by a sh shim around zfs (bench/benchlib.py), the same for every variant; this is
             what the issue's "within 2% of raw" is about.
  wall s     the whole command: for zrepl this adds interpreter start-up and compiling zrepl.py
             (several seconds under emulation), listings, the size estimate, holds, bookmarks.
  RSS        zrepl.py's own peak resident set (VmHWM) and its own CPU seconds; both must stay
             small and independent of SIZE, since no stream passes through Python.

The data: one random 8 MiB block (os.urandom is slow under emulation) written SIZE/8MiB times, each
copy with a distinct first 16 bytes; compression=off on both pools, no dedup, so ZFS stores and
sends every byte. Reported MB/s are 10^6 bytes of `zfs send -nP` stream size per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import Series, SpawnLog, run_measured, zfs, zrepl_argv  # noqa: E402

import zrepl  # noqa: E402  (benchlib put the repository root on sys.path)

MiB = 1 << 20
BLOCK = 8 * MiB


@dataclass
class Variant:
    """One way of moving the snapshot, with its measurements."""

    name: str
    what: str
    stream: Series = field(default_factory=Series)
    transfer: Series = field(default_factory=Series)
    recv_delay: Series = field(default_factory=Series)
    wall: Series = field(default_factory=Series)
    hwm_kib: Series = field(default_factory=Series)
    cpu: Series = field(default_factory=Series)
    cpu_transfer: Series = field(default_factory=Series)  # zrepl.py's own CPU while bytes flowed
    argv: list[str] = field(default_factory=list)
    while_send_waited: list[str] = field(default_factory=list)  # zfs commands between send and recv start


class Bench:
    """The pools, the configs and one method per variant."""

    def __init__(self, size: int, workdir: Path, tmpfs: Path):
        self.size = size
        self.workdir = workdir
        self.pools = benchlib.zfstest.PoolFactory(tmpfs)
        vdev = size + size // 4 + 256 * MiB
        self.src = self.pools.create("src", size=str(vdev), fs_properties={"compression": "off"})
        self.dst = self.pools.create("dst", size=str(vdev), fs_properties={"compression": "off"})
        self.fs = f"{self.src}/data"
        self.snap = f"{self.fs}@bench"
        self.raw_target = f"{self.dst}/raw"
        self.sink_root = f"{self.dst}/sink"
        self.zrepl_target = f"{self.sink_root}/c/{self.fs}"
        self.shim = SpawnLog(workdir / "shim", stamp_all=True)
        self.stream_bytes = 0

    def populate(self) -> float:
        """Write SIZE bytes of incompressible data into src/data and snapshot it; returns seconds."""
        start = time.perf_counter()
        zfs("create", self.fs)
        mountpoint = Path(zfs("get", "-H", "-o", "value", "mountpoint", self.fs).strip())
        block = bytearray(os.urandom(BLOCK))
        with open(mountpoint / "blob", "wb") as f:
            for i in range(self.size // BLOCK):
                block[:16] = i.to_bytes(16, "little")
                f.write(block)
            if self.size % BLOCK:
                f.write(block[: self.size % BLOCK])
        zfs("snapshot", self.snap)
        zfs("create", "-o", "mountpoint=none", self.sink_root)
        out = zfs("send", "-n", "-P", self.snap)
        self.stream_bytes = zrepl.parse_send_estimate(out) or self.size
        return time.perf_counter() - start

    def write_configs(self) -> dict[str, Path]:
        """Configs for the zero-copy run and the copy-path run (bandwidth limit far above reality)."""
        return {name: support.write_config(self.workdir / name,
                                           support.push_job(filesystems={self.fs: True}, client_identity="c",
                                                            send=send),
                                           support.sink_job(root_fs=self.sink_root))
                for name, send in (("zrepl", {}), ("zrepl-copy", {"bandwidth_limit": {"max": "100 GiB"}}))}

    # -- cleanup between runs ----------------------------------------------------------------------
    def reset(self) -> None:
        """Remove what any variant received and zrepl's marks on the sender, so every run is a
        full send into an empty receiver."""
        for target in (self.raw_target, f"{self.sink_root}/c"):
            if benchlib.zfstest.exists(target):
                benchlib.zfstest.release_holds(target)  # zrepl holds what it received
                zfs("destroy", "-r", target)
        benchlib.zfstest.release_holds(self.snap)
        for bookmark in zfs("list", "-H", "-o", "name", "-t", "bookmark", self.fs).split():
            zfs("destroy", bookmark)
        subprocess.run(["sync"], check=False)
        self.shim.reset()

    def _verify(self, target: str) -> None:
        got, want = benchlib.zfstest.guid(f"{target}@bench"), benchlib.zfstest.guid(self.snap)
        if got != want:
            raise SystemExit(f"{target}@bench has guid {got}, expected {want}")

    def _timeline(self, v: Variant) -> None:
        t = self.shim.stream_timeline()
        if t is None:
            raise SystemExit(f"no send/recv pair was logged:\n{self.shim.log.read_text()}")
        v.stream.add(t.window)
        v.transfer.add(t.transfer)
        v.recv_delay.add(t.recv_delay)

    # -- variants --------------------------------------------------------------------------------
    def raw(self, v: Variant, zrepl_flags: bool = False) -> None:
        """Two Popen joined by a pipe; zrepl_flags: with the flags zrepl.py passes (send -v -P,
        recv -s -o zrepl:placeholder=off), to tell their cost from zrepl.py's."""
        self.reset()
        env = self.shim.env
        send_argv, recv_argv = ["zfs", "send", self.snap], ["zfs", "recv", "-u", self.raw_target]
        if zrepl_flags:
            send_argv[2:2] = ["-v", "-P"]
            recv_argv[3:3] = ["-s", "-o", f"{zrepl.PLACEHOLDER_PROPERTY}=off"]
        start = time.perf_counter()
        sender = subprocess.Popen(send_argv, stdout=subprocess.PIPE, env=env,
                                  stderr=subprocess.DEVNULL if zrepl_flags else None)
        receiver = subprocess.Popen(recv_argv, stdin=sender.stdout, env=env)
        assert sender.stdout is not None
        sender.stdout.close()
        recv_rc, send_rc = receiver.wait(), sender.wait()
        wall = time.perf_counter() - start
        if send_rc or recv_rc:
            raise SystemExit(f"raw send|recv failed: send {send_rc}, recv {recv_rc}")
        self._verify(self.raw_target)
        self._timeline(v)
        v.wall.add(wall)
        v.argv = [" ".join(send_argv), " ".join(recv_argv)]

    def zrepl(self, v: Variant, config: Path) -> None:
        self.reset()
        m = run_measured(zrepl_argv("--config", str(config), "run", "push"), env=self.shim.env)
        if m.returncode != 0:
            raise SystemExit(f"zrepl.py run push exited {m.returncode}:\n{m.stderr[-3000:]}")
        self._verify(self.zrepl_target)
        self._timeline(v)
        v.wall.add(m.wall)
        v.hwm_kib.add(m.hwm_kib)
        v.cpu.add(m.cpu)
        spawns = self.shim.spawns()
        v.argv = ["zfs " + s.argv for s in spawns if s.end is not None]
        t = self.shim.stream_timeline()
        assert t is not None
        v.cpu_transfer.add(m.cpu_between(max(t.send_start, t.recv_start), max(t.send_end, t.recv_end)))
        v.while_send_waited = [f"zfs {s.argv}" for s in spawns
                               if s.end is None and s.start is not None and t.send_start <= s.start <= t.recv_start]

    def close(self) -> None:
        self.pools.destroy_all()


def startup_baseline(runs: int = 2) -> tuple[float, int]:
    """Median wall seconds and peak RSS (KiB) of `zrepl.py version`: interpreter start-up and
    compiling zrepl.py, which every zrepl.py command pays."""
    walls, hwms = [], []
    for _ in range(runs):
        m = run_measured(zrepl_argv("version"))
        walls.append(m.wall)
        hwms.append(m.hwm_kib)
    return benchlib.median(walls), max(hwms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M", help="data in the snapshot, e.g. 256M, 1G (default 512M)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; every variant runs once per round (default 3)")
    ap.add_argument("--no-copy", action="store_true", help="skip the zrepl-copy variant")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    benchlib.require_guest()
    size = zrepl.parse_size(args.size)
    if size < BLOCK:
        ap.error(f"--size must be at least {BLOCK // MiB} MiB")

    # Both pools' data live in RAM (tmpfs), on top of the ARC and the system.
    need = 2 * (size + size // 8) + 192 * MiB
    avail = benchlib.meminfo()["MemAvailable"] * 1024
    if avail < need + 512 * MiB:
        sys.exit(f"not enough guest RAM for --size {args.size}: need about {(need + 512 * MiB) // MiB} MiB "
                 f"available, have {avail // MiB} MiB; raise ZREPL_VM_MEMORY (MiB) or lower --size")

    print(benchlib.environment(), flush=True)
    tmpfs = benchlib.Tmpfs(need + 256 * MiB)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"zrepl-bench-{os.getpid()}"
    workdir.mkdir(parents=True)
    bench = Bench(size, workdir, tmpfs.path)
    try:
        took = bench.populate()
        print(f"populated {bench.snap}: {zrepl.format_size(size)} of data, stream {bench.stream_bytes / 1e6:.0f} MB "
              f"({took:.1f} s)", flush=True)
        configs = bench.write_configs()
        startup, startup_hwm = startup_baseline()
        print(f"zrepl.py start-up (`zrepl.py version`): {startup:.2f} s, peak RSS {startup_hwm / 1024:.1f} MiB",
              flush=True)
        variants = {
            "raw": Variant("raw", "zfs send | zfs recv -u (two Popen, one pipe)"),
            "raw-zflags": Variant("raw-zflags", "the same with zrepl.py's flags: send -v -P, "
                                  "recv -s -o zrepl:placeholder=off"),
            "zrepl": Variant("zrepl", "zrepl.py run push -> sink, local transport, fd handed to zfs recv"),
        }
        if not args.no_copy:
            variants["zrepl-copy"] = Variant("zrepl-copy",
                                             "same, send.bandwidth_limit set: stream copied through Python")
        actions = {"raw": bench.raw, "raw-zflags": lambda v: bench.raw(v, zrepl_flags=True),
                   "zrepl": lambda v: bench.zrepl(v, configs["zrepl"]),
                   "zrepl-copy": lambda v: bench.zrepl(v, configs["zrepl-copy"])}
        warm = Variant("warm-up", "")
        bench.raw(warm)  # the first transfer pays for cold caches; not counted
        print(f"warm-up raw run: stream {warm.stream.values[0]:.2f} s", flush=True)
        names = list(variants)
        for r in range(args.runs):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always goes first
            for name in order:
                v = variants[name]
                actions[name](v)
                extra = (f"; zrepl.py peak RSS {v.hwm_kib.values[-1] / 1024:.1f} MiB, CPU {v.cpu.values[-1]:.1f} s "
                         f"({v.cpu_transfer.values[-1]:.2f} s during the transfer)") if v.hwm_kib.values else ""
                print(f"round {r + 1} {name:10} stream {v.stream.values[-1]:6.2f} s (recv started after "
                      f"{v.recv_delay.values[-1]:.2f} s, transfer {v.transfer.values[-1]:6.2f} s)  "
                      f"wall {v.wall.values[-1]:6.2f} s{extra}", flush=True)
        bench.reset()
    finally:
        bench.close()
        tmpfs.close()
    report(variants, bench.stream_bytes, size, args, startup, startup_hwm)
    return 0


def report(variants: dict[str, Variant], stream_bytes: int, size: int, args: argparse.Namespace,
           startup: float, startup_hwm: int) -> None:
    mb = stream_bytes / 1e6
    raw = variants["raw"]
    print()
    print(f"{zrepl.format_size(size)} per run, {args.runs} rounds, median (min-max); MB/s = stream MB / stream s")
    print(f"  {'variant':11} {'stream s':>18} {'MB/s':>6} {'recv delay s':>12} {'transfer s':>10} "
          f"{'wall s':>18} {'RSS MiB':>8} {'CPU s':>6} {'CPU in transfer':>15}")
    results = {}
    for v in variants.values():
        rss = f"{max(v.hwm_kib.values) / 1024:8.1f}" if v.hwm_kib.values else f"{'':8}"
        cpu = f"{v.cpu.median:6.1f} {v.cpu_transfer.median:15.2f}" if v.cpu.values else ""
        print(f"  {v.name:11} {v.stream.median:7.2f} ({v.stream.spread():>9}) {mb / v.stream.median:6.1f} "
              f"{v.recv_delay.median:12.2f} {v.transfer.median:10.2f} "
              f"{v.wall.median:7.2f} ({v.wall.spread():>9}) {rss} {cpu}")
        results[v.name] = {"what": v.what, "argv": v.argv, "stream_s": v.stream.values,
                           "transfer_s": v.transfer.values, "recv_delay_s": v.recv_delay.values,
                           "wall_s": v.wall.values, "peak_rss_kib": v.hwm_kib.values, "cpu_s": v.cpu.values,
                           "cpu_during_transfer_s": v.cpu_transfer.values,
                           "stream_MBps_median": mb / v.stream.median,
                           "zfs_while_send_waited": v.while_send_waited}
    print()
    for v in variants.values():
        if not v.name.startswith("zrepl"):
            print(f"  {v.name}: {' | '.join(v.argv)}")
    for v in variants.values():
        if v is raw or not v.name.startswith("zrepl"):
            continue
        ratio = raw.stream.median / v.stream.median
        ratio_transfer = raw.transfer.median / v.transfer.median
        print(f"  {v.name}: {' | '.join(v.argv)}")
        print(f"    stream throughput {ratio:.3f} x raw ({(ratio - 1) * 100:+.1f}%); transfer only "
              f"{ratio_transfer:.3f} x raw ({(ratio_transfer - 1) * 100:+.1f}%); "
              f"wall {v.wall.median / raw.wall.median:.2f}"
              f" x raw (start-up {startup:.1f} s included)")
        same = variants.get("raw-zflags")
        if same is not None:
            r2, t2 = same.stream.median / v.stream.median, same.transfer.median / v.transfer.median
            print(f"    against raw with zrepl.py's flags: stream {r2:.3f} x ({(r2 - 1) * 100:+.1f}%), "
                  f"transfer only {t2:.3f} x ({(t2 - 1) * 100:+.1f}%)")
            results[v.name]["throughput_ratio_vs_raw_zflags"] = r2
            results[v.name]["transfer_ratio_vs_raw_zflags"] = t2
        if v.while_send_waited:
            print(f"    while zfs send waited for zfs recv: {'; '.join(v.while_send_waited)}")
        results[v.name]["throughput_ratio_vs_raw"] = ratio
        results[v.name]["transfer_ratio_vs_raw"] = ratio_transfer
    print(f"  zrepl.py start-up alone (`zrepl.py version`): {startup:.2f} s, peak RSS {startup_hwm / 1024:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": benchlib.environment(), "size": size, "stream_bytes": stream_bytes,
            "runs": args.runs, "startup_s": startup, "startup_peak_rss_kib": startup_hwm, "variants": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
