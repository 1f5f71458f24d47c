#!/usr/bin/env python3
"""`zrepl.py daemon` at rest: its CPU seconds and RSS over a window with nothing to do (issue 11).

Runs inside the test guest, as root, on throwaway pools (file vdevs on a RAM-backed tmpfs):

    tests/vm/run-in-guest python3 bench/daemon_idle.py [--filesystems 100] [--minutes 10]

Set-up (not measured): N filesystems SRC/data/fsNNNN below SRC/data, each with the snapshot
@zrepl_base, and the state an initial push leaves on both sides (received copies, cursor bookmarks,
last-received holds; built directly as bench/spawn_count.py --seed raw does, an initial replication
of 100 filesystems takes minutes under emulation). The daemon runs a push job (periodic
snapshotting every 1h, so @zrepl_base is the newest and nothing is due for an hour; keep rules that
keep everything) into a sink in the same process (local transport), with the control socket.
The daemon's first pass (at start: nothing due, nothing to send) is awaited over the socket, then
the window starts: no request reaches the daemon during it.

Measured over the window, from /proc/PID of the daemon process every 5 s: its own CPU seconds
(utime + stime) and those of children it reaped (zfs spawns), RSS (VmRSS) at the start, at the end
and its largest sample, VmHWM, threads; zfs spawns counted by the sh shim in PATH (benchlib.SpawnLog).
At rest the daemon should spawn nothing, keep its RSS flat and use a small fraction of a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import spawn_count  # noqa: E402  (create_datasets, seed_raw)
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import SpawnLog, zfs, zrepl_argv  # noqa: E402

import zrepl  # noqa: E402  (benchlib put the repository root on sys.path)

MiB = 1 << 20
SNAPSHOT = "zrepl_base"  # the push job's prefix: the newest snapshot the periodic schedule counts
WAIT = 1800.0  # seconds for the daemon's first pass (100 filesystems under emulation: well under a minute)


@dataclass
class ProcSample:
    """One look at /proc/PID."""

    when: float
    cpu: float  # own utime + stime, seconds
    children_cpu: float  # cutime + cstime of reaped children, seconds
    rss_kib: int
    hwm_kib: int
    threads: int


def sample(pid: int) -> ProcSample:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    return ProcSample(time.time(), (int(fields[11]) + int(fields[12])) / tick,
                      (int(fields[13]) + int(fields[14])) / tick, int(status["VmRSS"][0]), int(status["VmHWM"][0]),
                      int(status["Threads"][0]))


def write_config(workdir: Path, src: str, dst: str, sockpath: str) -> Path:
    fs = {f"{src}/data<": True}
    return support.write_config(
        workdir,
        support.push_job(filesystems=fs, client_identity=spawn_count.IDENTITY, snapshotting=support.periodic("1h"),
                         keep_sender=[support.not_replicated(), support.last_n(3)], keep_receiver=[support.last_n(3)]),
        support.sink_job(root_fs=f"{dst}/sink"),
        global_={"control": {"sockpath": sockpath}})


def first_pass_done(sockpath: str) -> bool:
    try:
        code, doc = zrepl.control_request(sockpath, "GET", "/status", timeout=60)
    except zrepl.ZreplError:
        return False
    entry = (doc.get("jobs") or {}).get("push") or {} if code == 200 else {}
    return (entry.get("daemon") or {}).get("state") == "waiting" and bool(entry.get("last_run"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filesystems", type=int, default=100, help="filesystems below SRC/data (default 100)")
    ap.add_argument("--minutes", type=float, default=10.0, help="the idle window (default 10)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    benchlib.require_guest()
    print(benchlib.environment(), flush=True)
    tmpfs = benchlib.Tmpfs(benchlib.meminfo()["MemTotal"] * 1024 // 2)
    pools = benchlib.zfstest.PoolFactory(tmpfs.path / "vdevs")
    workdir = Path(tempfile.mkdtemp(prefix="zrepl-idle-"))
    sockdir = Path(tempfile.mkdtemp(prefix="zi", dir="/tmp"))
    daemon: subprocess.Popen | None = None
    try:
        n = args.filesystems
        vdev = str(256 * MiB + n * 2 * MiB)  # sparse: only what is written takes RAM
        src, dst = pools.create("src", size=vdev), pools.create("dst", size=vdev)
        zfs("create", "-o", "mountpoint=none", f"{src}/data")
        zfs("create", "-o", "mountpoint=none", f"{dst}/sink")
        start = time.perf_counter()
        spawn_count.create_datasets(f"{src}/data", n)
        zfs("snapshot", "-r", f"{src}/data@{SNAPSHOT}")
        spawn_count.seed_raw(src, dst, SNAPSHOT)
        print(f"{n} filesystems (+ SRC/data) created and their replicated state seeded in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        sockpath = str(sockdir / "control")
        config = write_config(workdir, src, dst, sockpath)
        shim = SpawnLog(workdir / "shim")
        with open(workdir / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(zrepl_argv("--config", str(config), "--log-level", "info", "daemon"),
                                      env=shim.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        started = time.perf_counter()
        deadline = time.monotonic() + WAIT
        while not first_pass_done(sockpath):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon's first pass did not end (exit {daemon.poll()}):\n"
                                 f"{(workdir / 'daemon.log').read_text()[-3000:]}")
            time.sleep(1.0)
        first = shim.per_verb()
        print(f"daemon up and its first pass done in {time.perf_counter() - started:.0f} s "
              f"(zfs spawns: {first})", flush=True)

        shim.reset()
        window = args.minutes * 60
        samples = [sample(daemon.pid)]
        end = samples[0].when + window
        while time.time() < end:
            time.sleep(min(5.0, max(0.0, end - time.time())))
            samples.append(sample(daemon.pid))
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited during the window ({daemon.returncode})")
        first_s, last_s = samples[0], samples[-1]
        span = last_s.when - first_s.when
        cpu = last_s.cpu - first_s.cpu
        children = last_s.children_cpu - first_s.children_cpu
        spawns = shim.per_verb()
        rss = [s.rss_kib for s in samples]
        result = {
            "environment": benchlib.environment(), "filesystems": n, "window_s": round(span, 1),
            "cpu_s": round(cpu, 2), "cpu_percent": round(100 * cpu / span, 3),
            "children_cpu_s": round(children, 2), "zfs_spawns": spawns,
            "rss_kib": {"start": rss[0], "end": rss[-1], "max": max(rss)}, "hwm_kib": last_s.hwm_kib,
            "threads": last_s.threads, "samples": len(samples),
        }
        print()
        print(f"idle window {span / 60:.1f} min, {n} filesystems (push + sink in one daemon):")
        print(f"  daemon CPU        {cpu:.2f} s ({100 * cpu / span:.3f}% of one CPU); reaped children {children:.2f} s")
        print(f"  zfs spawns        {sum(spawns.values())} {spawns or ''}")
        print(f"  RSS               start {rss[0] / 1024:.1f} MiB, end {rss[-1] / 1024:.1f} MiB, "
              f"max {max(rss) / 1024:.1f} MiB (VmHWM {last_s.hwm_kib / 1024:.1f} MiB)")
        print(f"  threads           {last_s.threads}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(WAIT)
        print(f"  SIGTERM: exit {code}", flush=True)
        return 0 if code == 0 else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        pools.destroy_all()
        tmpfs.close()


if __name__ == "__main__":
    sys.exit(main())
