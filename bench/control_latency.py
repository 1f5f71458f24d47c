#!/usr/bin/env python3
"""Control-socket request latency of a real `zrepl.py daemon` process (issue 11): median, 99th
percentile and maximum over 1,000 requests each of GET /version, GET /status and POST /signal
wakeup.

    tests/vm/run-in-guest python3 bench/control_latency.py [--requests 1000]   (real ZFS)
    python3 bench/control_latency.py --stub-zfs [--requests 1000]              (host, no ZFS)

The daemon runs one snap job with manual snapshotting (passes start only on wakeup) on one
filesystem, with a keep rule that keeps everything: a pass lists and prunes nothing. In the guest
the filesystem is on a throwaway pool; with --stub-zfs a `zfs` script in PATH answers every command
with an empty listing (no pool needed; a pass finds no filesystem).

The client is zrepl.py's own (`zrepl.control_request`, what `zrepl.py status` and `wakeup` use): one
connection per request, sequential, timed from before connect() to the parsed JSON reply, after 20
unmeasured requests per endpoint. GET /status returns the live document (the job's entry and the
daemon's record, about 1-2 KiB). The wakeups come last: the first starts a pass, the ones that
arrive while it runs are queued (one more pass right after), so the daemon runs passes back to back
while they are measured: that is the latency a wakeup sees on a busy daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import support  # noqa: E402  (benchlib put tests/ on sys.path)
from benchlib import zrepl_argv  # noqa: E402

import zrepl  # noqa: E402  (benchlib put the repository root on sys.path)

WARMUP = 20
STUB_ZFS = "#!/bin/sh\nexit 0\n"  # every zfs command succeeds with no output: an empty listing


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def measure(sockpath: str, method: str, target: str, body: dict | None, count: int) -> list[float]:
    for _ in range(WARMUP):
        zrepl.control_request(sockpath, method, target, body, timeout=60)
    out = []
    for _ in range(count):
        start = time.perf_counter()
        code, reply = zrepl.control_request(sockpath, method, target, body, timeout=60)
        out.append(time.perf_counter() - start)
        if code != 200:
            raise SystemExit(f"{method} {target}: HTTP {code} {reply}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="requests per endpoint (default 1000)")
    ap.add_argument("--stub-zfs", action="store_true", help="no ZFS: a zfs stub in PATH (runs on the host)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    if not args.stub_zfs:
        benchlib.require_guest()
    workdir = Path(tempfile.mkdtemp(prefix="zrepl-latency-"))
    sockdir = Path(tempfile.mkdtemp(prefix="zl", dir="/tmp"))  # unix socket paths: 107 bytes
    sockpath = str(sockdir / "control")
    env = dict(os.environ)
    pools = None
    if args.stub_zfs:
        (workdir / "bin").mkdir()
        (workdir / "bin" / "zfs").write_text(STUB_ZFS)
        (workdir / "bin" / "zfs").chmod(0o755)
        env["PATH"] = f"{workdir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        fs = "stub/data"
        where = (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; zfs stub; kernel {platform.release()}; "
                 f"Python {platform.python_version()}; {os.cpu_count()} CPUs; cpu: {benchlib._cpu_model()}")
    else:
        pools = benchlib.zfstest.PoolFactory()
        fs = f"{pools.create('src')}/data"
        benchlib.zfs("create", fs)
        where = benchlib.environment()
    print(where, flush=True)
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    config = support.write_config(
        workdir, support.snap_job("snap", filesystems={fs: True}, keep=[support.regex(".*")]),
        global_={"control": {"sockpath": sockpath}})
    daemon = None
    try:
        with open(workdir / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(zrepl_argv("--config", str(config), "daemon"), env=env, stdout=log,
                                      stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while True:
            try:
                zrepl.control_request(sockpath, "GET", "/version", timeout=60)
                break
            except zrepl.ZreplError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    log_tail = (workdir / "daemon.log").read_text()[-3000:]
                    raise SystemExit(f"the daemon did not come up:\n{log_tail}") from None
                time.sleep(0.2)
        results = {}
        for name, method, target, body in (("GET /version", "GET", "/version", None),
                                           ("GET /status", "GET", "/status", None),
                                           ("POST /signal wakeup", "POST", "/signal", {"job": "snap", "op": "wakeup"})):
            times = measure(sockpath, method, target, body, args.requests)
            results[name] = {"median_ms": statistics.median(times) * 1000, "p99_ms": percentile(times, 0.99) * 1000,
                             "max_ms": max(times) * 1000, "requests": len(times)}
            r = results[name]
            print(f"  {name:22} median {r['median_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms   "
                  f"max {r['max_ms']:7.2f} ms   ({len(times)} requests)", flush=True)
        status_size = len(json.dumps(zrepl.control_request(sockpath, "GET", "/status", timeout=60)[1]))
        print(f"  (GET /status reply: {status_size} bytes of JSON)")
        if args.json:
            Path(args.json).write_text(json.dumps({"where": where, "results": results}, indent=2) + "\n")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(600)
        return 0 if code == 0 else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if pools is not None:
            pools.destroy_all()


if __name__ == "__main__":
    sys.exit(main())
