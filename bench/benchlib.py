"""Shared helpers of the real-ZFS benchmarks (bench/replication_throughput.py, bench/spawn_count.py).

They run inside the test guest (tests/vm/run-in-guest) as root, next to real OpenZFS, and reuse the
test bed's helpers (tests/zfs/zfstest.py: pools on file vdevs, `zfs`/`zpool` runners).

- `require_guest()`: refuse to run anywhere but a throwaway guest (the benchmarks create and
  destroy pools).
- `SpawnLog`: a PATH shim in front of the real zfs that logs every spawn (verb, argv) and, for
  stream commands (`zfs send`/`zfs recv` without -n), their start and end times. Written in sh:
  a Python shim costs ~0.2 s per spawn under emulation and would distort the wall times.
- `run_measured(argv, env)`: run a command, return its wall time, exit code, output and peak RSS
  (VmHWM sampled from /proc while it runs, and wait4's ru_maxrss, which also covers children).
- `Tmpfs`: a dedicated RAM-backed mount for vdev files (guest /tmp is only half the RAM).
- `environment()`: one line about the machine, for the figures.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests" / "zfs", REPO / "tests", REPO):  # zfstest, support, zrepl
    sys.path.insert(0, str(_path))

import support  # noqa: E402,F401  (after the sys.path set-up above; re-exported)
import zfstest  # noqa: E402,F401
from zfstest import REAL_ZFS, run, zfs, zpool  # noqa: E402,F401

# ZREPL_BENCH_DIR=<checkout> measures another checkout's zrepl.py (before/after comparisons)
ZREPL_PY = Path(os.environ.get("ZREPL_BENCH_DIR") or REPO) / "zrepl.py"


def require_guest() -> None:
    """Exit unless we run as root in the test guest: the benchmarks create and destroy pools."""
    if os.environ.get("ZREPL_TEST_GUEST") != "1" or os.geteuid() != 0:
        sys.exit("run this inside the test guest: tests/vm/run-in-guest python3 " + " ".join(sys.argv))


# ------------------------------------------------------------------------------------------------
# Spawn log: a sh shim in front of zfs
# ------------------------------------------------------------------------------------------------

# Fields per line, tab separated: verb, start, end, argv (space joined). Timed: send/recv without
# -n; the shim waits for them, so the times bracket exactly the real zfs process. Other commands
# are exec'd, with an empty end and (unless stamp_all) an empty start. Lines stay below PIPE_BUF in practice, so the
# appends of concurrent spawns (send and recv) do not interleave.
_SHIM = r"""#!/bin/sh
LOG=@LOG@
REAL=@REAL@
verb=$1
[ "$verb" = receive ] && verb=recv
timed=0
case "$verb" in
  send|recv) timed=1
    for a in "$@"; do [ "$a" = -n ] && timed=0; done ;;
esac
if [ $timed = 1 ]; then
  start=$(@NOW@)
  "$REAL" "$@"
  rc=$?
  end=$(@NOW@)
  printf '%s\t%s\t%s\t%s\n' "$verb" "$start" "$end" "$*" >>"$LOG"
  exit $rc
fi
printf '%s\t%s\t\t%s\n' "$verb" "@STAMP@" "$*" >>"$LOG"
exec "$REAL" "$@"
"""


@dataclass
class Spawn:
    """One logged `zfs` spawn; start/end (Unix seconds) only for timed stream commands."""

    verb: str
    argv: str
    start: float | None = None  # send/recv streams always, other verbs with stamp_all
    end: float | None = None  # send/recv streams only


class SpawnLog:
    """A directory with a `zfs` shim that logs every spawn; put `env` into the runs to count."""

    def __init__(self, directory: Path, stamp_all: bool = False):
        """stamp_all: log the start time of every spawn, not only of send/recv (one more spawn
        of `date` each: use it where the order matters more than the wall time)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "spawns.tsv"
        self.log.touch()
        # `date +%s.%N` costs one extra spawn of date, but only around send/recv, outside the
        # timed zfs process. sh (dash) starts ~5x faster than python under emulation.
        text = (_SHIM.replace("@LOG@", shlex.quote(str(self.log)))
                .replace("@REAL@", shlex.quote(REAL_ZFS)).replace("@NOW@", "date +%s.%N")
                .replace("@STAMP@", "$(date +%s.%N)" if stamp_all else ""))
        shim = self.dir / "zfs"
        shim.write_text(text)
        shim.chmod(0o755)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def reset(self) -> None:
        self.log.write_text("")

    def spawns(self) -> list[Spawn]:
        out = []
        for line in self.log.read_text().splitlines():
            verb, start, end, argv = line.split("\t", 3)
            out.append(Spawn(verb, argv, float(start) if start else None, float(end) if end else None))
        out.sort(key=lambda s: s.start if s.start is not None else 0.0)
        return out

    def per_verb(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.spawns():
            counts[s.verb] = counts.get(s.verb, 0) + 1
        return dict(sorted(counts.items()))

    def stream_timeline(self) -> StreamTimeline | None:
        """When the (single) timed send and recv ran, or None if either is missing."""
        timed = {s.verb: s for s in self.spawns() if s.end is not None}
        if "send" not in timed or "recv" not in timed:
            return None
        send, recv = timed["send"], timed["recv"]
        return StreamTimeline(send.start, send.end, recv.start, recv.end)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StreamTimeline:
    """Start and end (Unix seconds) of one `zfs send` and the `zfs recv` it fed."""

    send_start: float
    send_end: float
    recv_start: float
    recv_end: float

    @property
    def window(self) -> float:
        """First start to last end: the whole time the stream was under way."""
        return max(self.send_end, self.recv_end) - min(self.send_start, self.recv_start)

    @property
    def transfer(self) -> float:
        """From the later start to the last end: both ends running, bytes flowing."""
        return max(self.send_end, self.recv_end) - max(self.send_start, self.recv_start)

    @property
    def recv_delay(self) -> float:
        """How long `zfs send` waited (on a full pipe) for `zfs recv` to start."""
        return self.recv_start - self.send_start


# ------------------------------------------------------------------------------------------------
# Measured runs
# ------------------------------------------------------------------------------------------------

@dataclass
class Measured:
    """A finished command: exit code, wall seconds, peak RSS in KiB, captured output."""

    returncode: int
    wall: float
    hwm_kib: int  # the process's own peak (VmHWM), sampled while it ran
    maxrss_kib: int  # wait4: the largest of the process and its reaped descendants
    cpu: float  # the process's own user+system CPU seconds (last sample before it exited)
    stdout: str = ""
    stderr: str = ""
    samples: list[tuple[float, float]] = field(default_factory=list)  # (Unix time, own CPU seconds)

    def cpu_between(self, start: float, end: float) -> float:
        """The process's own CPU seconds between two Unix times (at the sampling resolution)."""
        before = [c for t, c in self.samples if t <= start]
        upto = [c for t, c in self.samples if t <= end]
        return (upto[-1] if upto else 0.0) - (before[-1] if before else 0.0)


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_measured(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 3600,
                 interval: float = 0.25) -> Measured:
    """Run argv (no shell) with output to temp files; sample its peak RSS and CPU every `interval`
    seconds from a thread (sparse: the sampler's own CPU must not slow down what it measures)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None)
        peak = {"hwm": 0, "cpu": 0.0}
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            while True:
                hwm, cpu = _vm_hwm(proc.pid), _cpu_seconds(proc.pid)
                if cpu is not None:  # gone once reaped
                    peak["hwm"] = max(peak["hwm"], hwm)
                    peak["cpu"] = max(peak["cpu"], cpu)
                    samples.append((time.time(), peak["cpu"]))
                if done.wait(interval):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen consistent
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, wall, int(peak["hwm"]), usage.ru_maxrss, float(peak["cpu"]),
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"), samples)


class MachineCpu:
    """How busy the machine's CPUs were between start() and busy() (from /proc/stat: everything but
    idle and iowait), as a fraction of all of them: a run that keeps the guest's 2 vCPUs at 0.9 can
    gain at most about 1/0.9 from doing its work in parallel, whatever it overlaps."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user nice system idle iowait irq softirq steal (not guest)

    def busy(self) -> float:
        total, idle = self._read()
        elapsed = total - self._start[0]
        return 1.0 - (idle - self._start[1]) / elapsed if elapsed > 0 else 0.0


def zrepl_argv(*args: str) -> list[str]:
    return [sys.executable, str(ZREPL_PY), *args]


# ------------------------------------------------------------------------------------------------
# Environment, RAM-backed scratch space, small statistics
# ------------------------------------------------------------------------------------------------

class Tmpfs:
    """A tmpfs of a given size mounted on a fresh directory; `close()` unmounts and removes it."""

    def __init__(self, size_bytes: int):
        self.path = Path(tempfile.mkdtemp(prefix="zrepl-bench-"))
        run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(self.path)])

    def close(self) -> None:
        run(["umount", str(self.path)], check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


def environment() -> str:
    """One line: where the figures were taken."""
    zfs_version = run([REAL_ZFS, "version"], check=False).stdout.splitlines()
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {zfs_version[0] if zfs_version else 'zfs ?'}; "
            f"kernel {platform.release()}; Python {platform.python_version()}; {os.cpu_count()} vCPUs; "
            f"{meminfo()['MemTotal'] // 1024} MiB RAM; cpu: {_cpu_model()}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Series:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self) -> str:
        return f"{min(self.values):.2f}-{max(self.values):.2f}"
