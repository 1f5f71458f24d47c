#!/usr/bin/env python3
"""Initial replication of many small filesystems with replication.concurrency.steps = 1 vs N.

Runs inside the test guest, as root, on throwaway pools:

    tests/vm/run-in-guest python3 bench/parallel_steps.py [--filesystems 100] [--steps 4] [--rounds 2]
                                                          [--transports local,ssh]

SRC/data/fs0000... (FILESYSTEMS of them, 64 KiB of random data and one snapshot @s each) are pushed
into a sink by `zrepl.py run push`, once per round and steps value (the order alternates per round:
the first run of a round may find colder caches). Transports:

  local  push -> sink over the local transport (lanes: a connection each, in-process)
  ssh    push -> sink over ssh+stdinserver to an sshd on 127.0.0.1 started here (the key's
         authorized_keys line forces `zrepl.py stdinserver ID`), as bench/ssh_throughput.py

Every run starts from the same state: a fresh client identity on the sink (so a fresh, empty
target tree) and a fresh push job name (so no cursor bookmarks or holds of its own on the sender;
the earlier runs' cursors belong to other jobs and are left alone). Wall time is `zrepl.py run`
from start to exit, checked for exit 0 and every filesystem received. Printed: each run, then per
transport the median wall per steps value and the speed-up (median at steps=1 / median at steps=N).
Each run also shows how busy the machine's CPUs were (/proc/stat, all CPUs, also the sink's and
sshd's work) and zrepl.py's own CPU seconds: a steps=1 run that already keeps the CPUs busy has
little left for parallel steps to overlap (under emulation every `zfs` spawn costs CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import REPO, MachineCpu, Series, SpawnLog, require_guest, run_measured, zfs, zrepl_argv  # noqa: E402
from spawn_count import create_datasets  # noqa: E402
from zfstest import PoolFactory, SshServer  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)  # run-in-guest streams the output live


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--filesystems", type=int, default=100)
    ap.add_argument("--steps", type=int, default=4, help="the parallel setting compared with 1 (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per steps value and transport (default 2)")
    ap.add_argument("--transports", default="local,ssh", help="comma-separated: local, ssh (default both)")
    args = ap.parse_args()
    require_guest()
    transports = [t for t in args.transports.split(",") if t]
    if not set(transports) <= {"local", "ssh"}:
        ap.error("--transports: local and/or ssh")
    say(benchlib.environment())

    work = Path(tempfile.mkdtemp(prefix="zrepl-bench-par-", dir="/tmp"))
    pools = PoolFactory()
    server = SshServer(work / "sshd")
    try:
        src, dst = pools.create("src", size="1G"), pools.create("dst", size="2G")
        zfs("create", f"{src}/data")
        zfs("create", f"{dst}/sink")
        names = create_datasets(f"{src}/data", args.filesystems)
        for name in names:
            with open(Path(benchlib.zfstest.get(name, "mountpoint")) / "payload", "wb") as f:
                f.write(os.urandom(64 << 10))
        zfs("snapshot", "-r", f"{src}/data@s")
        filesystems = {f"{src}/data<": True, f"{src}/data": False}
        say(f"{args.filesystems} filesystems of 64 KiB with one snapshot each; steps 1 vs {args.steps}; "
            f"{args.rounds} round(s); transports {', '.join(transports)}")

        identities = [f"r{t}{i}" for t in transports for i in range(args.rounds * 2)]
        sink_dir = work / "sink"
        sink_dir.mkdir()
        sink_cfg = support.write_config(sink_dir, support.sink_job(root_fs=f"{dst}/sink",
                                                                   serve=support.stdinserver(*identities)))
        if "ssh" in transports:
            server.start()

        def connect_for(transport: str, identity: str) -> dict | None:
            if transport == "local":
                return None  # push_job's default: local to the sink listener, with client_identity
            key = server.authorize(command=f"python3 {REPO / 'zrepl.py'} --config {sink_cfg} stdinserver {identity}")
            return {"type": "ssh+stdinserver", "host": server.host, "user": "root", "port": server.port,
                    "identity_file": str(key), "options": server.option_list()}

        shim = SpawnLog(work / "shim")
        walls: dict[tuple[str, int], Series] = {}
        used = iter(identities)
        for transport in transports:
            for rnd in range(args.rounds):
                order = (1, args.steps) if rnd % 2 == 0 else (args.steps, 1)
                for steps in order:
                    identity = next(used)
                    run_dir = work / f"push-{identity}"
                    run_dir.mkdir()
                    job = f"push{identity}"
                    push = support.push_job(job, filesystems=filesystems, client_identity=identity,
                                            connect=connect_for(transport, identity),
                                            replication={"concurrency": {"steps": steps}})
                    jobs = [push] if transport == "ssh" else [push, support.sink_job(root_fs=f"{dst}/sink")]
                    cfg = support.write_config(run_dir, *jobs)
                    shim.reset()  # zfs spawns of the local side (over ssh the sink's run on the far side)
                    cpu = MachineCpu()
                    m = run_measured(zrepl_argv("--config", str(cfg), "run", job), env=shim.env, timeout=7200)
                    busy = cpu.busy()
                    spawns = len(shim.spawns())
                    received = zfs("list", "-H", "-o", "name", "-t", "filesystem", "-r",
                                   f"{dst}/sink/{identity}/{src}/data", check=False).split()
                    if m.returncode != 0 or len(received) != args.filesystems + 1:  # + the placeholder data
                        say(f"  ! {transport} steps={steps}: exit {m.returncode}, {len(received) - 1} received:\n"
                            f"{m.stderr[-3000:]}")
                        return 1
                    lanes = "1 lane (ssh)" if "one at a time" in m.stderr else ""
                    say(f"{transport:5} steps={steps}: {m.wall:7.1f} s  {spawns} zfs spawns  "
                        f"machine CPU {busy:.0%} busy, zrepl.py {m.cpu:.1f} CPU s  {lanes}")
                    walls.setdefault((transport, steps), Series()).add(m.wall)

        say("")
        say(f"{'transport':10} {'steps=1 (median)':>18} {f'steps={args.steps} (median)':>18} {'speed-up':>9}")
        for transport in transports:
            one, many = walls[(transport, 1)], walls[(transport, args.steps)]
            say(f"{transport:10} {one.median:16.1f} s {many.median:16.1f} s {one.median / many.median:8.2f}x"
                f"   (runs: {one.spread()} / {many.spread()})")
        return 0
    finally:
        server.stop()
        pools.destroy_all()


if __name__ == "__main__":
    sys.exit(main())
