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

Usage: python3 bench/proto_throughput.py [--size 1G] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes to move, e.g. 256M, 1G (default 1G)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
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
    print(f"moving {zrepl.format_size(size)} per case ({os.cpu_count()} CPUs)")
    for name, fn in cases.items():
        if args.only and args.only not in name:
            continue
        elapsed, used = fn()
        per_gib = "" if used is None else f"  {used / (size / (1 << 30)):6.2f} CPU s/GiB"
        print(f"  {name:20} {elapsed:7.2f} s  {size / elapsed / 1e6:8.0f} MB/s{per_gib}")


if __name__ == "__main__":
    main()
