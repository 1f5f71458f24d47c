#!/usr/bin/env python3
"""Start-up cost of `python3 zrepl.py` (compiled on every start) against `python3 -P -m zrepl`
(bytecode cached in __pycache__; -P: the working directory is not put on sys.path), and the bare
interpreter for the floor.

Runs anywhere (host or guest, no ZFS needed):

    python3 bench/startup.py [--rounds 15]
    tests/vm/run-in-guest python3 bench/startup.py --rounds 7

Python never caches the bytecode of the script it is given (`python3 zrepl.py`): it compiles the
whole ~650 KB file before the first line runs, on every start. A module run with `-m` (or
imported) is loaded through the import system, which writes and reuses
`__pycache__/zrepl.cpython-3XX.pyc` next to the file. The first `-m` run writes the cache; the
script warms it before measuring, so the figures are those of every later start.

Each round runs the variants in rotating order (`version` does no ZFS work: it is the start-up
alone); wall and CPU (user+system of the child, from wait4) are reported as medians. CPU is the
figure to read on a shared machine: the load moves wall times, much less the CPU a start needs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ZREPL_DIR = Path(os.environ.get("ZREPL_BENCH_DIR") or Path(__file__).resolve().parents[1])


def variants() -> dict[str, tuple[list[str], dict[str, str]]]:
    plain_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    module_env = dict(plain_env, PYTHONPATH=str(ZREPL_DIR))
    return {
        "python3 -c pass (interpreter alone)": ([sys.executable, "-c", "pass"], plain_env),
        "python3 zrepl.py version": ([sys.executable, str(ZREPL_DIR / "zrepl.py"), "version"], plain_env),
        "python3 -P -m zrepl version (cached bytecode)": ([sys.executable, "-P", "-m", "zrepl", "version"],
                                                          module_env),
    }


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{argv} failed: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    cases = variants()
    for argv, env in cases.values():  # warm: page cache, and the -m variant writes its .pyc
        run_once(argv, env)
    pyc = sorted((ZREPL_DIR / "__pycache__").glob("zrepl.*.pyc"))
    names = list(cases)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = run_once(*cases[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; Python {platform.python_version()}; {os.cpu_count()} CPUs; "
          f"load {load[0]:.1f}; zrepl.py {(ZREPL_DIR / 'zrepl.py').stat().st_size // 1024} KiB; "
          f"cache {pyc[0].name if pyc else 'NOT WRITTEN'}; {args.rounds} rounds")
    print(f"{'variant':45} {'wall s median (min-max)':>26} {'CPU s median':>13}")
    for name in names:
        w, c = walls[name], cpus[name]
        print(f"{name:45} {statistics.median(w):8.3f} ({min(w):.3f}-{max(w):.3f}) {statistics.median(c):13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
