#!/usr/bin/env python3
"""Throughput of zrepl.py's protocol transports versus plain `cat` piping.

Pumps SIZE bytes of /dev/zero (via `head -c`, standing in for `zfs send`) into `cat > /dev/null`
(standing in for `zfs recv`) through:

  raw 1 hop        head | cat > /dev/null
  raw 2 hops       head | cat | cat > /dev/null     (what an ssh-like middle process costs)
  pipes/splice     head -> client -> pipe -> stdinserver stand-in -> cat    (ssh_connect + from_stdio)
  pipes/read-write same, with os.splice disabled on both ends (the fallback path)
  pipes pull       the stdinserver stand-in produces, the client consumes
  .../16k relay    the same through `dd bs=16k` on both pipes, which reads and writes in small
                   pieces as ssh does (raw 16k relay: head | dd bs=16k | cat)
  local/fd-pass    local transport: the `head` stdout fd itself is passed to `cat` (no copies)
  local/copy       local transport with fd passing off: DATA frames over the socketpair

Besides the rate, each zrepl case prints the CPU seconds zrepl.py itself spent per GiB moved (the
client process and, over pipes, the stdinserver stand-in; not head, cat or dd): on a shared machine
the rate swings with the load, the CPU cost much less.

A before/after of a change: `--against DIR` runs every case alternately with DIR's zrepl.py (e.g.
an unpacked `git archive main`) and this checkout's, each run in a fresh process, `--repeat N`
times in alternating order, and prints the medians.

Usage: python3 bench/proto_throughput.py [--size 1G] [--only NAME] [--against DIR [--repeat 5]]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# --against runs the cases of another checkout's zrepl.py through this variable (the --serve child inherits it)
ZREPL_DIR = os.environ.get("ZREPL_BENCH_DIR") or str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ZREPL_DIR)
import zrepl  # noqa: E402


def sink(body: dict, ctx: zrepl.RequestContext) -> dict:
    assert ctx.stream is not None
    fd = ctx.stream.open_fd()
    proc = subprocess.Popen(["cat"], stdin=fd, stdout=subprocess.DEVNULL)
    os.close(fd)
    rc = proc.wait()
    n = ctx.stream.finish()
    return {"rc": rc, "bytes": n}


def source(body: dict, ctx: zrepl.RequestContext) -> zrepl.Reply:
    proc = subprocess.Popen(["head", "-c", str(body["size"]), "/dev/zero"], stdout=subprocess.PIPE)
    return zrepl.Reply({}, zrepl.OutgoingStream.from_process(proc, "head"))


def cpu_seconds() -> float:
    """CPU time of this process, all threads (children such as head and cat not included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu(body: dict, ctx: zrepl.RequestContext) -> dict:
    return {"cpu": cpu_seconds()}


HANDLERS = {"sink": sink, "source": source, "cpu": cpu}


def serve_stdio(no_splice: bool) -> None:
    if no_splice and hasattr(os, "splice"):
        del os.splice  # zrepl checks hasattr(os, "splice") and falls back to read/write
    conn = zrepl.Connection.from_stdio()
    try:
        zrepl.serve_connection(conn, HANDLERS, identity="bench")
    except zrepl.ZreplError as e:
        sys.stderr.write(f"bench server: {e}\n")
        sys.exit(1)


def producer(size: int) -> zrepl.OutgoingStream:
    proc = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    return zrepl.OutgoingStream.from_process(proc, "head")


def consume_with_cat(body: dict, stream: zrepl.IncomingStream) -> None:
    fd = stream.open_fd()
    proc = subprocess.Popen(["cat"], stdin=fd, stdout=subprocess.DEVNULL)
    os.close(fd)
    proc.wait()


def run_shell(pipeline: str) -> tuple[float, None]:
    start = time.perf_counter()
    subprocess.run(["sh", "-c", pipeline], check=True)
    return time.perf_counter() - start, None


# ssh reads and writes its stdio in small pieces (channel packets of 16-32 KiB); dd stands in for it.
RELAY = "dd bs=16k status=none"


def run_pipes(size: int, *, no_splice: bool = False, pull: bool = False,
              relay: bool = False) -> tuple[float, float]:
    argv = [sys.executable, __file__, "--serve"] + (["--no-splice"] if no_splice else [])
    if relay:
        argv = ["sh", "-c", f"{RELAY} | {' '.join(argv)} | {RELAY}"]
    saved = getattr(os, "splice", None)
    if no_splice and saved is not None:
        del os.splice
    try:
        with zrepl.ssh_connect(argv, name="bench server") as conn:
            conn.handshake_client("bench")
            server_cpu, client_cpu = conn.request("cpu")["cpu"], cpu_seconds()
            start = time.perf_counter()
            if pull:
                conn.request("source", {"size": size}, stream_out=consume_with_cat)
                assert conn.stats.stream_bytes_received == size
            else:
                body = conn.request("sink", {}, stream_in=producer(size))
                assert body == {"rc": 0, "bytes": size}, body
            elapsed = time.perf_counter() - start
            client_cpu = cpu_seconds() - client_cpu
            return elapsed, client_cpu + conn.request("cpu")["cpu"] - server_cpu
    finally:
        if saved is not None:
            os.splice = saved


def run_local(size: int, *, fd_passing: bool) -> tuple[float, float]:
    client, server = zrepl.local_pair()
    client.fd_passing = fd_passing
    t = threading.Thread(target=zrepl.serve_connection, args=(server, HANDLERS), daemon=True)
    t.start()
    try:
        client.handshake_client("bench")
        start, used = time.perf_counter(), cpu_seconds()  # both sides run in this process
        body = client.request("sink", {}, stream_in=producer(size))
        elapsed, used = time.perf_counter() - start, cpu_seconds() - used
        assert body["rc"] == 0 and (body["bytes"] == (0 if fd_passing else size)), body
        assert (client.stats.fds_sent == 1) == fd_passing
        return elapsed, used
    finally:
        client.close()
        t.join(5)
        server.close()


def compare(names: list[str], size: str, against: str, repeat: int) -> None:
    """Each case alternately with `against`'s zrepl.py and ours, fresh processes, medians."""
    variants = {"before": against, "after": str(Path(__file__).resolve().parents[1])}
    runs: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    for r in range(repeat):
        for name in names:
            for variant in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                out = subprocess.run([sys.executable, __file__, "--size", size, "--case", name],
                                     env=dict(os.environ, ZREPL_BENCH_DIR=variants[variant]),
                                     check=True, capture_output=True, text=True).stdout
                elapsed, mb_s, cpu = json.loads(out.splitlines()[-1])
                runs.setdefault((name, variant), []).append((mb_s, cpu))
        print(f"  round {r + 1} of {repeat} done", file=sys.stderr)
    print(f"medians of {repeat} runs, before = {against}, after = this checkout")
    print(f"  {'case':20} {'MB/s before':>11} {'after':>6} {'ratio':>6}   {'CPU s/GiB before':>16} {'after':>6}")
    for name in names:
        (b, cb), (a, ca) = (_medians(runs[(name, v)]) for v in variants)
        cpu = f"{cb:16.2f} {ca:6.2f}" if cb is not None and ca is not None else ""
        print(f"  {name:20} {b:11.0f} {a:6.0f} {a / b:6.2f}   {cpu}")


def _medians(runs: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    cpus = [c for _, c in runs if c is not None]
    return statistics.median(m for m, _ in runs), statistics.median(cpus) if cpus else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes to move, e.g. 256M, 1G (default 1G)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    ap.add_argument("--against", metavar="DIR", help="compare with the zrepl.py in DIR (before/after)")
    ap.add_argument("--repeat", type=int, default=5, help="with --against: runs per case and variant (default 5)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, exactly; prints a JSON result line
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-splice", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_stdio(args.no_splice)
        return
    size = zrepl.parse_size(args.size)
    cases = {
        "raw 1 hop": lambda: run_shell(f"head -c {size} /dev/zero | cat > /dev/null"),
        "raw 2 hops": lambda: run_shell(f"head -c {size} /dev/zero | cat | cat > /dev/null"),
        "raw 16k relay": lambda: run_shell(f"head -c {size} /dev/zero | {RELAY} | cat > /dev/null"),
        "pipes/16k relay": lambda: run_pipes(size, relay=True),
        "pipes pull/16k relay": lambda: run_pipes(size, pull=True, relay=True),
        "pipes/splice": lambda: run_pipes(size),
        "pipes/read-write": lambda: run_pipes(size, no_splice=True),
        "pipes pull": lambda: run_pipes(size, pull=True),
        "local/fd-pass": lambda: run_local(size, fd_passing=True),
        "local/copy": lambda: run_local(size, fd_passing=False),
    }
    names = [name for name in cases if not args.only or args.only in name]
    if args.case:
        elapsed, used = cases[args.case]()
        print(json.dumps([elapsed, size / elapsed / 1e6, None if used is None else used / (size / (1 << 30))]))
        return
    if args.against:
        compare(names, args.size, args.against, args.repeat)
        return
    print(f"moving {zrepl.format_size(size)} per case ({os.cpu_count()} CPUs)")
    for name in names:
        fn = cases[name]
        elapsed, used = fn()
        per_gib = "" if used is None else f"  {used / (size / (1 << 30)):6.2f} CPU s/GiB"
        print(f"  {name:20} {elapsed:7.2f} s  {size / elapsed / 1e6:8.0f} MB/s{per_gib}")


if __name__ == "__main__":
    main()
