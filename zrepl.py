#!/usr/bin/env python3
"""zrepl.py: ZFS snapshots, replication and pruning in one file.

A zrepl-compatible job runner (snap, push, sink, pull, source) for admins who copy one file to a
server and run it from cron, a systemd timer, or as a daemon. Python 3.11+ standard library only;
ZFS is driven exclusively through `zfs`/`zpool` subprocesses with argument lists, never a shell.

Map of this file (sections in dependency order; a section only uses those above it):

    1. Utilities            durations, sizes, ring buffer, errors, logging
    2. Filters and naming   filesystems filter, timestamp formats, cron specs, abstraction names
    3. Keep rules           last_n, grid, regex, not_replicated: pure prune decisions
    4. Config               TOML loading and strict validation with key paths
    5. ZFS command layer    argv builders, listing parser, error classification, the one runner
    6. Planner              pure replication planning from two listings
    7. Protocol             framed wire protocol, handshake, transports (local, stdio/ssh)
    8. Endpoints            sender/receiver on top of the ZFS layer, client confinement
    9. Replication runner   drives steps between two endpoints, protection, retries
   10. Snapshotter, hooks   due-ness, one-command snapshots, command/postgres/mysql hooks
   11. Pruner               applies keep-rule decisions with batched destroys
   12. Jobs and watchdog    job runs, locks, wakeups, progress watchdog
   13. Status               atomic JSON status file, summaries, Nagios codes
   14. CLI                  argument parsing and commands
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

__version__ = "0.1.0"

log = logging.getLogger("zrepl")


# =================================================================================================
# 1. Utilities
# =================================================================================================

class ZreplError(Exception):
    """Base of every error we expect and report without a traceback."""


class ConfigError(ZreplError):
    """A config problem: names the file, the key path and what is wrong (exit code 2)."""

    def __init__(self, message: str, path: str = "", file: str = "", line: int | None = None):
        self.message, self.path, self.file, self.line = message, path, file, line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")


def parse_duration(text: str | int | float) -> float:
    """`30s`, `10m`, `1h`, `1d`, `1w` (or a bare number of seconds) -> seconds. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like '10m', got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"duration must not be negative, got {text!r}")
        return float(text)
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ValueError(f"expected a duration like '30s', '10m', '1h', '1d' or '1w', got {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """Short human form: 90 -> '1m30s', 7200 -> '2h'."""
    seconds = int(round(seconds))
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """`512`, `10 MiB`, `1.5G`, `100KB` -> bytes (binary multiples). Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size like '10 MiB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"expected a size like '512', '64 KiB', '10 MiB' or '1 GiB', got {text!r}")
    unit = (m.group(2) or "B").upper()[0]
    return int(float(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def format_size(n: float) -> str:
    """Bytes in IEC units, e.g. 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class RingBuffer:
    """Keeps the last `capacity` bytes written (hook output, stderr tails). Thread-safe."""

    def __init__(self, capacity: int = 1 << 20):
        self.capacity = capacity
        self._buf = bytearray()
        self._dropped = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            excess = len(self._buf) - self.capacity
            if excess > 0:
                del self._buf[:excess]
                self._dropped += excess

    @property
    def dropped(self) -> int:
        return self._dropped

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._buf)

    def text(self) -> str:
        prefix = f"[... {self._dropped} bytes dropped ...]\n" if self._dropped else ""
        return prefix + self.getvalue().decode("utf-8", "replace")


def utcnow() -> float:
    """Wall-clock seconds; one place so tests can reason about time."""
    return time.time()


def iso_time(ts: float | None) -> str | None:
    """Unix seconds -> RFC 3339 UTC string (None stays None)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# =================================================================================================
# 2. Filters and naming
# =================================================================================================

# (section 2 body)


# ---- abstraction names (holds and bookmarks that protect replication) ----

# (section 2b body)


# =================================================================================================
# 3. Keep rules
# =================================================================================================

# (section 3 body)


# =================================================================================================
# 4. Config
# =================================================================================================

# (section 4 body)


# =================================================================================================
# 5. ZFS command layer
# =================================================================================================

@dataclass(frozen=True)
class Version:
    """One snapshot or bookmark of a dataset, as listed by `zfs list -Hp -t snapshot,bookmark`."""

    dataset: str
    name: str  # the part after '@' or '#'
    kind: str  # "snapshot" or "bookmark"
    guid: int
    createtxg: int
    creation: int  # unix seconds
    userrefs: int = 0  # number of holds (snapshots only)

    @property
    def full_name(self) -> str:
        return f"{self.dataset}{'@' if self.kind == 'snapshot' else '#'}{self.name}"

    @property
    def is_snapshot(self) -> bool:
        return self.kind == "snapshot"


@dataclass
class DatasetInfo:
    """A filesystem or volume with the properties we use and its versions (createtxg order)."""

    name: str
    type: str  # "filesystem" or "volume"
    guid: int = 0
    createtxg: int = 0
    props: dict[str, str] = field(default_factory=dict)
    versions: list[Version] = field(default_factory=list)

    def snapshots(self) -> list[Version]:
        return [v for v in self.versions if v.kind == "snapshot"]

    def bookmarks(self) -> list[Version]:
        return [v for v in self.versions if v.kind == "bookmark"]


# (section 5 body)


# =================================================================================================
# 6. Planner
# =================================================================================================

# (section 6 body)


# =================================================================================================
# 7. Protocol
# =================================================================================================

# (section 7 body)


# =================================================================================================
# 8. Endpoints
# =================================================================================================

# (section 8 body)


# =================================================================================================
# 9. Replication runner
# =================================================================================================

# (section 9 body)


# =================================================================================================
# 10. Snapshotter and hooks
# =================================================================================================

# (section 10 body)


# =================================================================================================
# 11. Pruner
# =================================================================================================

# (section 11 body)


# =================================================================================================
# 12. Jobs and watchdog
# =================================================================================================

# (section 12 body)


# =================================================================================================
# 13. Status
# =================================================================================================

# (section 13 body)


# =================================================================================================
# 14. CLI
# =================================================================================================

# (section 14 body)


if __name__ == "__main__":
    sys.exit(main())
