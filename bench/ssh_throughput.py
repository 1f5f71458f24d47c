#!/usr/bin/env python3
"""Throughput of a `zrepl.py` push over ssh+stdinserver versus raw `zfs send | ssh zfs recv`.

Run as root inside the test guest (real OpenZFS, sshd on 127.0.0.1 started here):

    tests/vm/run-in-guest python3 bench/ssh_throughput.py [--size 256] [--rounds 2]

It writes SIZE MiB of random (incompressible) data into a fresh filesystem, snapshots it, then per
round replicates the snapshot into a fresh target twice (odd rounds raw first, even rounds zrepl first):

  raw     zfs send POOL/data@s | ssh -T -o BatchMode=yes [-o opt]... -i KEY -p PORT root@127.0.0.1 zfs recv -u T
  zrepl   zrepl.py run push, connect = ssh+stdinserver with the same ssh options; the key's
          authorized_keys line forces `zrepl.py stdinserver bench`

and reports two ratios (zrepl / raw throughput):

  stream      bytes / time of the transfer itself: for raw, the pipeline's time minus the median time
              of `ssh ... true` (connection setup); for zrepl, the `seconds` the sink recorded for the
              receive (from the request's arrival to `zfs recv` done)
  end-to-end  the raw pipeline's wall time / `zrepl.py run push` wall time (which also pays for
              starting Python twice, listing, holds, the estimate and bookmarks)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests" / "zfs", REPO / "tests", REPO):  # zfstest, support, zrepl
    sys.path.insert(0, str(_path))
import support  # noqa: E402
import zrepl  # noqa: E402
from zfstest import PoolFactory, SshServer, get, release_holds, zfs  # noqa: E402

MiB = 1 << 20


def say(text: str) -> None:
    print(text, flush=True)  # run-in-guest streams the output live


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="MiB of data to replicate (default 256)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of raw + zrepl (default 2)")
    args = ap.parse_args()
    if os.environ.get("ZREPL_TEST_GUEST") != "1":
        print("run this inside the test guest: tests/vm/run-in-guest python3 bench/ssh_throughput.py", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="zrepl-bench-", dir="/tmp"))
    pools = PoolFactory()
    server = SshServer(work / "sshd")
    try:
        pool_size = f"{args.size * 2 + 512}M"
        src, dst = pools.create("src", size=pool_size), pools.create("dst", size=pool_size)
        zfs("create", f"{src}/data")
        zfs("create", f"{dst}/raw")
        zfs("create", f"{dst}/sink")
        with open(Path(get(f"{src}/data", "mountpoint")) / "payload", "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        zfs("snapshot", f"{src}/data@s")
        stream_bytes = int(get(f"{src}/data@s", "used")) or args.size * MiB

        server.start()
        options = server.option_list()
        conf = zrepl.ConnectConfig(type="ssh+stdinserver", host=server.host, user=server.user, port=server.port,
                                   identity_file=str(server.identity_file), options=options)
        ssh = zrepl.ssh_argv(conf)  # exactly what zrepl runs, here with the unrestricted root key

        sink_dir, push_dir = work / "sink", work / "push"
        for d in (sink_dir, push_dir):
            d.mkdir()
        sink_cfg = support.write_config(sink_dir, support.sink_job(root_fs=f"{dst}/sink",
                                                                   serve=support.stdinserver("bench")))
        key = server.authorize(command=f"python3 {REPO / 'zrepl.py'} --config {sink_cfg} stdinserver bench")
        connect = {"type": "ssh+stdinserver", "host": server.host, "user": "root", "port": server.port,
                   "identity_file": str(key), "options": options}
        push_cfg = support.write_config(push_dir, support.push_job(filesystems={f"{src}/data": True}, connect=connect))

        setup = statistics.median(timed(lambda: subprocess.run(ssh + ["true"], check=True)) for _ in range(3))
        say(f"{args.size} MiB of random data, stream {stream_bytes / MiB:.1f} MiB; ssh connection setup "
              f"{setup:.2f}s (median of 3)")
        say(f"ssh argv: {' '.join(ssh)}")
        results = []
        for rnd in range(1, args.rounds + 1):
            target = f"{dst}/raw/data"

            def raw(target: str = target) -> None:
                send = subprocess.Popen(["zfs", "send", f"{src}/data@s"], stdout=subprocess.PIPE)
                recv = subprocess.run(ssh + ["zfs", "recv", "-u", target], stdin=send.stdout, capture_output=True)
                send.stdout.close()
                if send.wait() or recv.returncode:
                    raise SystemExit(f"raw pipeline failed: {recv.stderr.decode()}")

            def clean_raw(target: str = target) -> None:
                zfs("destroy", "-r", target)

            def push() -> None:
                proc = subprocess.run(["python3", str(REPO / "zrepl.py"), "--config", str(push_cfg), "run", "push"],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"zrepl.py run push failed:\n{proc.stderr}")

            # Alternate who goes first: the first reader of the snapshot may find a colder ARC.
            if rnd % 2:
                t_raw = timed(raw)
                clean_raw()
                t_run = timed(push)
            else:
                t_run = timed(push)
                t_raw = timed(raw)
                clean_raw()
            doc = json.loads((sink_dir / "status.json").read_text())
            transfer = doc["jobs"]["sink"]["clients"]["bench"]["last_transfer"]
            t_xfer, nbytes = transfer["seconds"], transfer["bytes"]
            release_holds(f"{dst}/sink/bench")  # the sink holds the last received snapshot
            zfs("destroy", "-r", f"{dst}/sink/bench")
            release_holds(f"{src}/data@s")
            for line in zfs("list", "-H", "-o", "name", "-t", "bookmark", "-r", f"{src}/data").splitlines():
                zfs("destroy", line)  # the cursor: the next round starts with a full send again
            raw_rate = stream_bytes / max(t_raw - setup, 1e-3)
            zrepl_rate = nbytes / max(t_xfer, 1e-3)
            results.append((zrepl_rate / raw_rate, t_raw / t_run))
            say(f"round {rnd}: raw {t_raw:.2f}s ({raw_rate / MiB:.1f} MiB/s without setup); "
                  f"zrepl stream {t_xfer:.2f}s for {nbytes / MiB:.1f} MiB ({zrepl_rate / MiB:.1f} MiB/s), "
                  f"run {t_run:.2f}s; stream ratio {zrepl_rate / raw_rate:.1%}, end-to-end {t_raw / t_run:.1%}")
        stream = statistics.median(r[0] for r in results)
        e2e = statistics.median(r[1] for r in results)
        say(f"median over {len(results)} round(s): stream throughput ratio zrepl/raw = {stream:.1%}; "
              f"end-to-end = {e2e:.1%}")
        return 0
    finally:
        server.stop()
        pools.destroy_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
