"""A tiny in-process ZFS for snap-job tests of the command line (status, logging, threads).

Filesystems and their snapshots, `zfs list` and `zfs snapshot`/`destroy` only: enough for snap
jobs. A pool's listing can be held (`gate(pool, event)`) until an event is set, so a test can keep
one job busy while another one must go on. For push, pull and sinks use tests/fakezfs.py.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import zrepl


class TinyZfs(zrepl.Zfs):
    def __init__(self, *filesystems: str):
        super().__init__()
        self.snapshots: dict[str, list[tuple[str, int, int]]] = {fs: [] for fs in filesystems}  # name, txg, time
        self.txg = 100
        self.lock = threading.Lock()
        self.gates: dict[str, tuple[threading.Event, float]] = {}
        self.gate_results: dict[str, bool] = {}  # pool -> whether the event came before the timeout
        self.snapshotted: dict[str, threading.Event] = {}
        self.calls: list[list[str]] = []

    def gate(self, pool: str, event: threading.Event, timeout: float = 60.0) -> None:
        """Hold every listing of `pool` until `event` is set (or the timeout passed)."""
        self.gates[pool] = (event, timeout)

    def snapshot_event(self, pool: str) -> threading.Event:
        """Set when a snapshot in `pool` was taken."""
        return self.snapshotted.setdefault(pool, threading.Event())

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        argv = list(argv)
        with self.lock:
            self.calls.append(argv)
        verb = argv[1]
        if verb == "list":
            roots = argv[argv.index("-o") + 2:]
            for pool in {r.split("/")[0] for r in roots}:
                if pool in self.gates:
                    event, limit = self.gates[pool]
                    self.gate_results[pool] = event.wait(limit)
            return self._done(argv, self._listing(roots))
        if verb == "snapshot":
            with self.lock:
                for full in argv[2:]:
                    fs, _, name = full.partition("@")
                    self.txg += 1
                    self.snapshots[fs].append((name, self.txg, int(time.time())))
            for full in argv[2:]:
                self.snapshot_event(full.split("/")[0]).set()
            return self._done(argv, "")
        if verb == "destroy":
            fs, _, names = argv[-1].partition("@")
            with self.lock:
                gone = set(names.split(","))
                self.snapshots[fs] = [s for s in self.snapshots[fs] if s[0] not in gone]
            return self._done(argv, "")
        raise AssertionError(f"TinyZfs does not do {argv}")

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        raise AssertionError(f"TinyZfs does not stream: {argv}")

    def _listing(self, roots: list[str]) -> str:
        lines = []
        with self.lock:
            for fs in sorted(self.snapshots):
                if roots and not any(fs == r or fs.startswith(r + "/") for r in roots):
                    continue
                lines.append(f"{fs}\tfilesystem\t{abs(hash(fs)) % 10**12}\t10\t1700000000\t-\t-\toff\t-\t-")
                for name, txg, when in self.snapshots[fs]:
                    lines.append(f"{fs}@{name}\tsnapshot\t{abs(hash(fs + name)) % 10**12}\t{txg}\t{when}\t0\t-\t"
                                 f"off\t-\t-")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _done(argv: list[str], out: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(argv, 0, out.encode(), b"")


def snap_config(tmp_path: Any, jobs: dict[str, str], extra_global: str = "", keep: str = "[]") -> str:
    """A config of snap jobs, job name -> filesystem, hourly, status and runtime dir in tmp_path."""
    text = (f'[global]\nstatus_file = "{tmp_path}/status/status.json"\nruntime_dir = "{tmp_path}/run"\n'
            f'{extra_global}\n')
    for name, fs in jobs.items():
        text += (f'[[jobs]]\nname = "{name}"\ntype = "snap"\nfilesystems = {{ "{fs}<" = true }}\n'
                 f'snapshotting = {{ type = "periodic", prefix = "zrepl_", interval = "1h" }}\n'
                 f'pruning = {{ keep = {keep} }}\n')
    path = f"{tmp_path}/zrepl.toml"
    with open(path, "w") as f:
        f.write(text)
    return path
