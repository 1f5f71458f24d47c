#!/usr/bin/env python3
"""zrepl.py: ZFS snapshots, replication and pruning in one file.

A zrepl-compatible job runner (snap, push, sink, pull, source) for admins who copy one file to a
server and run it from cron, a systemd timer, or as a daemon. Python 3.11+ standard library only;
ZFS is driven exclusively through `zfs`/`zpool` subprocesses with argument lists, never a shell.

Map of this file (sections in dependency order; a section only uses those above it):

    1. Utilities            durations, sizes and data rates, ring buffer, errors, clock, logging,
                            a throttle for calls that may be skipped
    2. Filters and naming   filesystems filter, timestamp formats, cron specs, abstraction names,
                            config regexes (Go RE2 syntax, translated)
    3. Keep rules           last_n, grid, regex, not_replicated: pure prune decisions
    4. Config               TOML loading and strict validation with key paths
    5. ZFS command layer    argv builders, listing parser and its snapshots_changed cache, error kinds,
                            resume tokens, the one runner
    6. Planner              pure replication planning from two listings
    7. Protocol             framed wire protocol, handshake, requests, streams
    8. Endpoints            the Sender/Receiver roles, local endpoints, remote proxies, confinement
    9. Transports           local and ssh+stdinserver wiring, redialing, what a passive job serves
   10. Replication runner   drives steps between a Sender and a Receiver, retries, the watchdog
   11. Snapshotter, hooks   due-ness, one-command snapshots, command/postgres/mysql hooks
   12. Pruner               keep-rule decisions applied to either side, batched destroys
   13. Jobs                 job runs, push/pull modes, locks, wakeups, the passive side's records
   14. Status               atomic JSON status file, summaries, Nagios codes
   15. Metrics              Prometheus exposition from the status document and counters; outlets
   16. Daemon               scheduler, signals, systemd notify, the control socket
   17. CLI                  argument parsing and commands

Where things happen:

    push run         cmd_run -> JobRunner.run_pass -> _active_pass: PushMode.sides (SenderEndpoint +
                     RemoteReceiver over connect_peer) -> Replication.run (plan_filesystems;
                     Sender.protect_all once; _run_step: prepare, Sender.send -> Receiver.receive;
                     Sender.complete_all once) -> prune_both_sides
    pull run         the same with PullMode (RemoteSender + ReceiverEndpoint); the cursor is named by
                     the source (PeerInfo.abstraction_job from its `endpoint.info` reply)
    receiver pruning prune_receiver (section 12) through the Receiver role
    resume handling  receive_resume_token -> Zfs.decode_resume_token -> _plan_resume -> send -t
    listing cache    Zfs.list_datasets(cache=...) -> _list_with_cache (stale_snapshot_lists); the files:
                     JobRunner._listing_cache, client_listing_cache; Zfs.hold/release -> ListingCache.forget
    placeholders     ReceiverEndpoint._ensure_parents / _receive (the -F check), is_placeholder
    stdinserver      cmd_stdinserver -> stdinserver_job -> passive_handlers -> serve_connection;
                     SIGTERM/SIGHUP: CancelOnSignals (a watcher thread cancels, not the handler)
    status document  written by JobRunner (publish; while replicating throttled: Throttle, StatusTicker)
                     and ClientRecorder (merge) through StatusStore (status_text);
                     read by cmd_status -> evaluate_status -> render_status (status --watch:
                     watch_status -> watch_lines); an interactive run's line: TerminalProgress
    daemon           cmd_daemon -> Daemon.serve -> tick (next_pass_time) -> _pass -> JobRunner.run; signals:
                     Daemon.on_signal (SIGTERM -> JobRunner.cancel, SIGHUP -> reload); control socket:
                     ControlServer -> Daemon.control; clients: control_request (status, wakeup, signal)
"""

from __future__ import annotations

import sys

# Before the imports and definitions that need 3.11 (tomllib, enum.StrEnum): one line, not a traceback.
# (Python 3.7 and older stop earlier, at a syntax error, before any line of this file runs.)
if sys.version_info < (3, 11):  # noqa: UP036
    sys.stderr.write(f"zrepl.py needs Python 3.11+ (found {sys.version_info[0]}.{sys.version_info[1]})\n")
    sys.exit(2)

import argparse
import array
import bisect
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime as dt
import enum
import errno
import fractions
import fcntl
import json
import logging
import math
import os
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
import tomllib
import warnings
import weakref
import zlib
import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, get_type_hints
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, ValuesView

__version__ = "0.1.0"

log = logging.getLogger("zrepl")
# The job a log line belongs to: set by the command for each job's thread; the threads a job starts
# run in a copy of its context (copy_context below), so their lines name the job too.
LOG_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("zrepl_log_job", default=None)


# =================================================================================================
# 1. Utilities
# =================================================================================================

class ZreplError(Exception):
    """Base of every error we expect and report without a traceback.

    `temporary` (declared once here, set where an error is made) tells the replication runner
    whether retrying may help: a lost connection or a busy dataset is temporary, a refusal is not."""

    temporary: bool = False


class UsageError(ZreplError):
    """Bad command-line input (exit code 2)."""


class SetupError(ZreplError):
    """The environment is not usable as configured (runtime dir, lock files): exit code 2, with the
    path and what to do."""


def shorten(value: Any, limit: int = 80) -> str:
    """repr() of a value for an error message, cut when long: a 100 kB value must not flood the
    terminal (the cut form says how long the value was)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"  # repr() of a huge int may even raise
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes, list, dict)) else f"{len(text)} characters"
    return f"{text[:limit - 20]}... ({size})"


_MESSAGE_LIMIT = 2000  # a safety net for messages that quote values without shorten()


class ConfigError(ZreplError):
    """A config problem: names the file, the key path and what is wrong (exit code 2)."""

    def __init__(self, message: str, path: str = "", file: str = "", line: int | None = None):
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT - 40] + f"... ({len(message)} characters)"
        self.message, self.path, self.file, self.line = message, path, file, line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


class ConfigErrors(ConfigError):
    """Every problem found in one pass over a config. Reads as its first error (path, message,
    line) followed by the others, one per line, so each keeps its key path."""

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.message, first.path, first.file, first.line)

    def __str__(self) -> str:
        head = ConfigError.__str__(self)
        rest = self.errors[1:]
        if not rest:
            return head
        return f"{head} (and {len(rest)} more)\n" + "\n".join(f"  {e}" for e in rest)


# Durations: zrepl's `10m`, `1d`, `1w`, Go's compound `1h30m` and `500ms` (zrepl's timeouts are Go
# durations), decimals (`1.5h`) and bare seconds as TOML numbers.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400,
                   "w": 7 * 86400}
_DURATION_PART = r"(\d+(?:\.\d+)?)\s*(ns|us|\u00b5s|ms|s|m|h|d|w)"
_DURATION_RE = re.compile(rf"\s*\+?\s*(?:{_DURATION_PART}\s*)+")
_DURATION_PART_RE = re.compile(_DURATION_PART)
# 100 years: far beyond any sensible interval or timeout, and due times stay inside datetime's range
# (an interval of 7000 years made every run fail with "year 9999 is out of range").
MAX_DURATION = 100 * 365.25 * 86400


def parse_duration(text: str | int | float) -> float:
    """`30s`, `10m`, `1h`, `1d`, `1w`, `1h30m`, `500ms` (or a bare number of seconds) -> seconds,
    at most 100 years. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like '10m', got {text!r}")
    if isinstance(text, (int, float)):
        if text != text:
            raise ValueError("expected a duration like '10m', got nan")
        if text < 0:
            raise ValueError(f"duration must not be negative, got {shorten(text)}")
        if text > MAX_DURATION:
            raise ValueError(f"duration {shorten(text)} is too long (at most 100 years)")
        return float(text)
    value = str(text)
    if value.strip() == "0":  # zrepl accepts a bare 0
        return 0.0
    if not _DURATION_RE.fullmatch(value):
        raise ValueError(f"expected a duration like '30s', '10m', '1h', '1d', '1w' or '1h30m', got {shorten(value)}")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(value))
    if not seconds <= MAX_DURATION:  # also catches inf from a number of 309 digits
        raise ValueError(f"duration {shorten(value)} is too long (at most 100 years)")
    return seconds


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


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
MAX_SIZE = (1 << 63) - 1  # what ZFS and zrepl's int64 fields can hold


def parse_size(text: str | int) -> int:
    """zrepl.py's own sizes: `512`, `10 MiB`, `1.5G`, `100KB` -> bytes, binary multiples, any case.
    (Bandwidth limits use zrepl's data-rate units instead: parse_data_rate.) Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size like '10 MiB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {shorten(text)}")
        if text > MAX_SIZE:
            raise ValueError(f"size {shorten(text)} is too large (at most 2^63-1 bytes)")
        return text
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise ValueError(f"expected a size like '512', '64 KiB', '10 MiB' or '1 GiB', got {shorten(text)}")
    unit = (m.group(2) or "B").upper()[0]
    if len(m.group(1)) > 40:
        raise ValueError(f"size {shorten(text)} is too large (at most 2^63-1 bytes)")
    size = int(fractions.Fraction(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
    if size > MAX_SIZE:
        raise ValueError(f"size {shorten(text)} is too large (at most 2^63-1 bytes)")
    return size


# zrepl's data-rate grammar (bandwidth_limit.max and .bucket_capacity), exactly: a number, optional
# blanks, then `bit`, or an optional prefix (K M G T decimal, Ki Mi Gi Ti binary) and `b` (bits) or
# `B` (bytes). Case matters: `1 Mb` is 125000 bytes, `1 MB` a million, `1 MiB` 1048576.
_DATA_RATE_RE = re.compile(r"([-0-9.]*)[ \t\n\f\r]*(bit|(|K|Ki|M|Mi|G|Gi|T|Ti)([bB]))")
_DATA_RATE_PREFIX = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
                     "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def parse_data_rate(text: str | int) -> float:
    """zrepl's data sizes -> bytes (a float: `23 bit` is 2.875 bytes). A TOML integer is a number of
    bytes. Negative means "no limit" in zrepl; the caller decides. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"expected a data size like '10 MiB' or '100 Mb', got {text!r}")
    if isinstance(text, int):
        if abs(text) > MAX_SIZE:
            raise ValueError(f"{shorten(text)} is too large (at most 2^63-1 bytes)")
        return float(text)
    m = _DATA_RATE_RE.fullmatch(text)
    hint = ("expected a number and a unit: 'bit', or 'b' (bits) / 'B' (bytes) with an optional prefix "
            "K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024), e.g. '10 MiB', '100 Mb'; "
            "units are case-sensitive")
    if not m:
        raise ValueError(f"{hint}, got {shorten(text)}")
    try:
        number = float(m.group(1))
    except ValueError:
        raise ValueError(f"{hint}, got {shorten(text)}") from None
    if m.group(2) == "bit":
        if number != round(number):
            raise ValueError(f"{shorten(text)}: a number of bits must be a whole number")
        bits = number
    else:
        bits = number * _DATA_RATE_PREFIX[m.group(3)] * (8 if m.group(4) == "B" else 1)
    if not math.isfinite(bits) or abs(bits / 8) > MAX_SIZE:
        raise ValueError(f"{shorten(text)} is too large (at most 2^63-1 bytes)")
    return bits / 8


def format_size(n: float) -> str:
    """Bytes in IEC units, e.g. 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class RingBuffer:
    """Keeps the last `capacity` bytes written (hook output, stderr tails). Thread-safe.

    Like zrepl's hook output log: never more than `capacity` bytes (1 MiB by default); when older
    output was dropped, the kept bytes start with the marker `(...)` in place of their first bytes."""

    CUT_MARK = b"(...)"

    def __init__(self, capacity: int = 1 << 20):
        if capacity <= 0:
            raise ValueError(f"ring buffer capacity must be positive, got {capacity}")
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
            data = bytes(self._buf)
        if self._dropped and len(data) >= len(self.CUT_MARK):
            data = self.CUT_MARK + data[len(self.CUT_MARK):]
        return data

    def text(self) -> str:
        return self.getvalue().decode("utf-8", "replace")


class PeriodicThread:
    """A daemon thread that calls `tick()` every `interval` seconds while used as a context manager.

    `tick()` returning True ends the thread early (e.g. a watchdog that fired)."""

    def __init__(self, interval: float, name: str):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,), name=name,
                                        daemon=True)

    def __enter__(self) -> PeriodicThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.tick():
                return

    def tick(self) -> bool | None:
        raise NotImplementedError


class Throttle:
    """Calls that may be skipped when they come too often: `call(fn)` runs fn unless the last run
    ended less than a gap ago (or one is running in another thread), the gap being `min_gap` or
    `1/share` times what the last run took, whichever is longer, so fn never takes more than about
    `share` of the time. Skipping is only right where something runs fn again soon anyway (a
    status ticker): a call that must happen uses `call(fn, force=True)`, which waits its turn."""

    def __init__(self, min_gap: float = 1.0, share: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.min_gap, self.share, self._clock = min_gap, share, clock
        self._lock = threading.Lock()
        self._next = float("-inf")

    def call(self, fn: Callable[[], None], force: bool = False) -> bool:
        """Run fn now or skip it; True if it ran."""
        if not self._lock.acquire(blocking=force):
            return False
        try:
            if not force and self._clock() < self._next:
                return False
            start = self._clock()
            try:
                fn()
            finally:
                end = self._clock()
                self._next = end + max(self.min_gap, (end - start) / self.share)
            return True
        finally:
            self._lock.release()


def copy_json(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, tuples and scalars), as dataclasses.asdict
    copies a field's value: what one thread hands another to serialise is not changed under it."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_json(v) for v in value)
    return value


def utcnow() -> float:
    """Wall-clock seconds; one place so tests can reason about time."""
    return time.time()


class Clock:
    """Time as a parameter (the model is CPython's `sched(timefunc, delayfunc)`): wall-clock time,
    monotonic time for durations and deadlines, and sleeping. Retries, lock waits, dial retries, the
    watchdog and progress take one, so tests drive them with a fake clock instead of waiting."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


SYSTEM_CLOCK = Clock()


def iso_time(ts: float | None) -> str | None:
    """Unix seconds -> RFC 3339 UTC string (None stays None)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str | None) -> float | None:
    """iso_time's inverse: None for anything that is not such a time."""
    if not text or not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


@dataclass
class Histogram:
    """Observations counted into cumulative buckets (Prometheus' histogram: the count of values
    <= each upper bound, plus the sum and count of all). Not locked: its owner locks."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


# =================================================================================================
# 2. Filters and naming
# =================================================================================================

# ---- ZFS names ----

ZFS_NAME_MAX = 255  # ZFS_MAX_DATASET_NAME_LEN is 256 including the terminating NUL

# ZFS's valid_char(): ASCII letters, digits and these four punctuation characters plus space.
_ZFS_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-:. ")
_ZFS_ALLOWED_TEXT = "letters, digits, '_', '-', ':', '.' and space"


def _check_name_chars(what: str, name: str, also_allowed: str = "") -> None:
    """Raise ValueError naming the first character ZFS would refuse (control chars called out)."""
    for ch in name:
        if ch in _ZFS_NAME_CHARS or ch in also_allowed:
            continue
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"{what} {shorten(name)} contains a control character ({shorten(ch)})")
        if ch in "@#":
            raise ValueError(f"{what} {shorten(name)} contains {shorten(ch)}, which separates a dataset from a "
                             f"{'snapshot' if ch == '@' else 'bookmark'} name")
        raise ValueError(f"{what} {shorten(name)} contains {shorten(ch)}; ZFS allows only {_ZFS_ALLOWED_TEXT}")


def validate_dataset_name(name: str) -> str:
    """Return `name` if it is a valid ZFS filesystem/volume name (pool/a/b), else raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("dataset name must not be empty")
    if len(name) > ZFS_NAME_MAX:
        raise ValueError(f"dataset name {name[:40]!r}... is {len(name)} characters long; "
                         f"ZFS allows at most {ZFS_NAME_MAX}")
    if name.startswith("/") or name.endswith("/"):
        raise ValueError(f"dataset name {shorten(name)} must not start or end with '/' "
                         f"(write 'pool/fs', not a mountpoint path)")
    _check_name_chars("dataset name", name, also_allowed="/")
    components = name.split("/")
    for comp in components:
        if comp == "":
            raise ValueError(f"dataset name {shorten(name)} contains an empty component ('//')")
        if comp in (".", ".."):
            raise ValueError(f"dataset name {shorten(name)} contains the component {shorten(comp)}, which ZFS refuses")
        if len(comp) > ZFS_NAME_MAX:  # unreachable with the total limit, kept for clarity of intent
            raise ValueError(f"dataset name component {comp[:40]!r}... is longer than {ZFS_NAME_MAX} characters")
    pool = components[0]
    if not ("a" <= pool[0].lower() <= "z"):
        raise ValueError(f"pool name {shorten(pool)} (in dataset name {shorten(name)}) must start with a letter")
    return name


def validate_snapshot_short_name(name: str) -> str:
    """Return `name` (the part after '@' or '#') if ZFS accepts it, else raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"snapshot name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("snapshot name must not be empty")
    if len(name) > ZFS_NAME_MAX:
        raise ValueError(f"snapshot name {name[:40]!r}... is {len(name)} characters long; "
                         f"ZFS allows at most {ZFS_NAME_MAX}")
    if name in (".", ".."):
        raise ValueError(f"snapshot name {shorten(name)} is not allowed")
    if "/" in name:
        raise ValueError(f"snapshot name {shorten(name)} contains '/'; ZFS allows only {_ZFS_ALLOWED_TEXT}")
    _check_name_chars("snapshot name", name)
    return name


def split_version_name(full: str) -> tuple[str, str, str]:
    """'pool/fs@snap' -> ('pool/fs', '@', 'snap'); 'pool/fs#bm' -> ('pool/fs', '#', 'bm').
    Both parts are validated; ValueError if invalid."""
    if not isinstance(full, str):
        raise ValueError(f"snapshot or bookmark name must be a string, got {type(full).__name__}")
    seps = [i for i, ch in enumerate(full) if ch in "@#"]
    if not seps:
        raise ValueError(f"{shorten(full)} is not a snapshot or bookmark name "
                         f"(expected 'pool/fs@name' or 'pool/fs#name')")
    if len(seps) > 1:
        raise ValueError(f"{shorten(full)} contains more than one '@' or '#'")
    i = seps[0]
    dataset, sep, short = full[:i], full[i], full[i + 1:]
    validate_dataset_name(dataset)
    validate_snapshot_short_name(short)
    if len(full) > ZFS_NAME_MAX:
        raise ValueError(f"{full[:40]!r}... is {len(full)} characters long; ZFS allows at most {ZFS_NAME_MAX}")
    return dataset, sep, short


def is_descendant(name: str, ancestor: str, include_self: bool = False) -> bool:
    """True if dataset `name` lies below `ancestor`, comparing whole components
    (tank/foo is under tank, tank/foobar is not under tank/foo). `include_self` also accepts equality."""
    if name == ancestor:
        return include_self
    return name.startswith(ancestor + "/")


# ---- filesystems filter ----

class DatasetFilter:
    """zrepl's `filesystems` filter: a map of patterns to accept (true) / reject (false).

    `pool/fs` matches exactly that dataset; `pool/fs<` matches it and every descendant; `<` alone
    matches everything. An exact pattern equal to the dataset wins; otherwise the longest matching
    subtree pattern decides; a dataset no pattern matches is rejected.
    """

    def __init__(self, mapping: dict[str, bool]):
        if not isinstance(mapping, dict):
            raise ValueError(f"filesystems filter must be a table of pattern = true/false, "
                             f"got {type(mapping).__name__}")
        self._exact: dict[str, tuple[bool, str]] = {}
        self._subtree: dict[str, tuple[bool, str]] = {}  # "" is the root ("<" alone)
        for pattern, value in mapping.items():
            if not isinstance(pattern, str):
                raise ValueError(f"filesystems pattern {shorten(pattern)} must be a string")
            if not isinstance(value, bool):
                raise ValueError(f"filesystems pattern {shorten(pattern)}: value must be true or false, "
                                 f"got {shorten(value)}")
            if pattern.count("<") > 1 or ("<" in pattern and not pattern.endswith("<")):
                raise ValueError(f"filesystems pattern {shorten(pattern)}: '<' is allowed only once, at the end "
                                 f"('pool/fs<' means pool/fs and everything below it)")
            if pattern.endswith("<"):
                path = pattern[:-1]
                if path:
                    self._check_path(pattern, path)
                self._subtree[path] = (value, pattern)
            else:
                self._check_path(pattern, pattern)
                self._exact[pattern] = (value, pattern)
        self._mapping = dict(mapping)

    @staticmethod
    def _check_path(pattern: str, path: str) -> None:
        try:
            validate_dataset_name(path)
        except ValueError as e:
            raise ValueError(f"filesystems pattern {shorten(pattern)} is not a valid dataset pattern: {e}") from None

    @classmethod
    def accept_all(cls) -> DatasetFilter:
        """The filter `{"<": true}`: every dataset."""
        return cls({"<": True})

    @property
    def patterns(self) -> dict[str, bool]:
        return dict(self._mapping)

    def explain(self, name: str) -> tuple[bool, str | None]:
        """(accepted?, the pattern that decided or None when no pattern matched)."""
        if name in self._exact:
            value, pattern = self._exact[name]
            return value, pattern
        # Walk from the dataset itself up to the root: the first hit is the longest subtree match.
        path = name
        while True:
            if path in self._subtree:
                value, pattern = self._subtree[path]
                return value, pattern
            if path == "":
                return False, None
            path = path.rpartition("/")[0]

    def accepts(self, name: str) -> bool:
        return self.explain(name)[0]

    def filter(self, names: Iterable[str]) -> list[str]:
        """The accepted names, in the given order."""
        return [n for n in names if self.accepts(n)]

    def unmatched(self, accepted: Iterable[str]) -> list[str]:
        """The accepting patterns that selected nothing among the accepted names (a renamed or
        destroyed dataset, a typo): `pool/fs` without pool/fs, `pool/fs<` without pool/fs or
        anything below it. zrepl counts these in zrepl_zfs_list_unmatched_user_specified_dataset_count."""
        names = set(accepted)
        unmatched = []
        for pattern, accept in self._mapping.items():
            path = pattern.removesuffix("<")
            if not accept or not path:
                continue
            below = pattern.endswith("<") and any(is_descendant(n, path) for n in names)
            if path not in names and not below:
                unmatched.append(pattern)
        return sorted(unmatched)

    def __repr__(self) -> str:
        return f"DatasetFilter({self._mapping!r})"


# ---- time zones and timestamp formats ----

def resolve_zone(location: str = "UTC") -> dt.tzinfo:
    """'UTC', 'Local' (the host's zone) or an IANA name like 'Europe/Berlin' -> tzinfo. ValueError if unknown."""
    if not isinstance(location, str) or not location:
        raise ValueError(f"time zone must be 'UTC', 'Local' or an IANA name like 'Europe/Berlin', "
                         f"got {shorten(location)}")
    if location == "UTC":
        return dt.UTC
    if location == "Local":
        return _local_zone()
    try:
        return zoneinfo.ZoneInfo(location)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {shorten(location)}: use 'UTC', 'Local' or an IANA name "
                         f"like 'Europe/Berlin'") from None


def _local_zone() -> dt.tzinfo:
    """The host's zone with its DST rules ($TZ, then /etc/localtime), else today's fixed offset."""
    tz_env = os.environ.get("TZ", "").lstrip(":")
    if tz_env:
        try:
            return zoneinfo.ZoneInfo(tz_env)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return zoneinfo.ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return dt.datetime.now().astimezone().tzinfo or dt.UTC


TIMESTAMP_FORMATS = ("dense", "human", "iso-8601", "unix-seconds")
# Formats without a zone offset would collide or go backwards across DST changes, so zrepl
# refuses them with any location but UTC; we do the same.
_UTC_ONLY_FORMATS = ("dense", "human", "unix-seconds")


def format_timestamp(fmt: str, when: float, location: str = "UTC") -> str:
    """Format unix time `when` the way zrepl names snapshots.

    dense `20060102_150405_000`, human `2006-01-02_15:04:05`, iso-8601 `2006-01-02T15:04:05.999Z`
    (milliseconds; `Z` in UTC, else the offset as `_0200` / `-0500`), unix-seconds, or any other
    string as a strftime pattern (zrepl takes a Go time layout there). A '+' of a zone offset becomes
    '_' (ZFS does not allow '+'); a literal '+' in a custom pattern is refused because it would be
    indistinguishable from that.
    """
    if not isinstance(fmt, str) or not fmt:
        raise ValueError("timestamp format must be a non-empty string")
    tz = resolve_zone(location)
    kind = fmt.lower()
    if kind in _UTC_ONLY_FORMATS and location != "UTC":
        raise ValueError(f"timestamp format {shorten(fmt)} contains no zone offset and requires location 'UTC' "
                         f"(got {shorten(location)}); use 'iso-8601' or a custom format with %z for local time")
    moment = dt.datetime.fromtimestamp(when, tz)
    if kind == "dense":
        return moment.strftime("%Y%m%d_%H%M%S") + "_000"  # zrepl's `_000` is literal, not milliseconds
    if kind == "human":
        return moment.strftime("%Y-%m-%d_%H:%M:%S")
    if kind == "unix-seconds":
        return str(math.floor(when))
    if kind == "iso-8601":
        offset = moment.utcoffset() or dt.timedelta(0)
        zone = "Z" if offset == dt.timedelta(0) else moment.strftime("%z")
        millis = f".{moment.microsecond // 1000:03d}"
        return (moment.strftime("%Y-%m-%dT%H:%M:%S") + millis + zone).replace("+", "_")
    if "+" in fmt:
        raise ValueError(f"timestamp format {shorten(fmt)} contains '+', which ZFS does not allow in names "
                         f"(a '+' of a zone offset from %z is replaced by '_' automatically)")
    bad = next((ch for ch in fmt if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:  # strftime stops at a NUL; ZFS refuses control characters anyway
        raise ValueError(f"timestamp format {shorten(fmt)} contains a control character ({bad!r})")
    try:
        text = moment.strftime(fmt)
    except ValueError as e:
        raise ValueError(f"timestamp format {shorten(fmt)} is not a valid strftime pattern: {e}") from None
    return text.replace("+", "_")


def snapshot_name(prefix: str, fmt: str, when: float, location: str = "UTC") -> str:
    """prefix + timestamp, checked to be a valid snapshot name (the part after '@')."""
    name = prefix + format_timestamp(fmt, when, location)
    try:
        validate_snapshot_short_name(name)
    except ValueError as e:
        raise ValueError(f"prefix {shorten(prefix)} with timestamp format {shorten(fmt)} gives an invalid "
                         f"snapshot name: {e}") from None
    return name


# Go time layout tokens (what zrepl takes as a custom format) and their strftime equivalents, for
# the hint when a zrepl layout was carried over unchanged.
_GO_LAYOUT_TOKENS = (("2006", "%Y"), ("-0700", "%z"), ("Z0700", "%z"), ("15", "%H"), ("01", "%m"), ("02", "%d"),
                     ("04", "%M"), ("05", "%S"), ("Jan", "%b"), ("Mon", "%a"))
# Steps after which two snapshot names must differ: a format that repeats within a year (no year,
# no month, 12-hour clock without am/pm, ...) or is coarser than a second would make a later
# snapshot fail with "dataset already exists".
_TIMESTAMP_PROBE_STEPS = (1, 60, 3600, 12 * 3600, 86400, 7 * 86400, 31 * 86400, 365 * 86400)


def _go_layout_hint(fmt: str) -> str:
    if "%" in fmt or "2006" not in fmt:
        return ""
    translated = fmt
    for token, directive in _GO_LAYOUT_TOKENS:
        translated = translated.replace(token, directive)
    return (f"; this looks like a Go time layout (what zrepl takes): zrepl.py uses strftime, "
            f"e.g. {translated!r}")


def validate_timestamp_format(fmt: str, location: str = "UTC") -> None:
    """Raise ValueError unless `fmt`/`location` produce valid snapshot names that differ for every
    second (two snapshots of one minute, or one year apart, must not collide)."""
    sample = 1136163845.0  # 2006-01-02 01:04:05 UTC, a Monday: 12 hours later is the same day
    first = format_timestamp(fmt, sample, location)
    try:
        validate_snapshot_short_name(first)
    except ValueError as e:
        raise ValueError(f"timestamp format {shorten(fmt)} gives an invalid snapshot name: {e}") from None
    for step in _TIMESTAMP_PROBE_STEPS:
        if format_timestamp(fmt, sample + step, location) == first:
            what = "contains no date or time field" if step == 1 and "%" not in fmt else (
                "is coarser than one second" if step == 1 else f"repeats after {format_duration(step)}")
            raise ValueError(f"timestamp format {shorten(fmt)} {what}: snapshots "
                             f"{format_duration(step)} apart would both be named {shorten(first)}; include the "
                             f"year, month, day, hour (%H), minute and second{_go_layout_hint(fmt)}")


# ---- cron specs ----

_MONTH_NAMES = {m: i + 1 for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}
_WEEKDAY_NAMES = {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
_CRON_FIELDS = (  # name, low, high, names
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, _MONTH_NAMES),
    ("day-of-week", 0, 7, _WEEKDAY_NAMES),  # 7 is Sunday too (zrepl refuses 7; Vixie cron takes it)
)
# Not in zrepl (it turns robfig/cron's descriptors off): an extension, so `@daily` works as in crontab.
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_MONTH_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MINUTE = dt.timedelta(minutes=1)
_CRON_SEARCH_YEARS = 12  # Feb 29 schedules fire at least every 8 years


def _parse_cron_field(spec: str, text: str, index: int) -> tuple[frozenset[int], bool]:
    """One cron field -> (values, unrestricted?). Unrestricted as in robfig/cron (zrepl's parser):
    some list element is `*` or `?` without a step above 1 (so `*/2` restricts, unlike Vixie cron)."""
    name, low, high, names = _CRON_FIELDS[index]
    where = f"(in cron spec {shorten(spec)})"

    def number(tok: str) -> int:
        up = tok.upper()
        if names and up in names:
            return names[up]
        if not (tok.isascii() and tok.isdigit()):
            raise ValueError(f"{name} field {shorten(tok)} is not a number{' or name' if names else ''} {where}")
        if len(tok) > 3 or not low <= int(tok) <= high:
            raise ValueError(f"{name} field {shorten(tok)} out of range {low}-{high} {where}")
        return int(tok)

    values: set[int] = set()
    unrestricted = False
    for part in text.split(","):
        if part == "":
            raise ValueError(f"{name} field {shorten(text)} has an empty list element {where}")
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()) or len(step_text) > 3 or int(step_text) == 0:
                raise ValueError(f"{name} field {shorten(part)}: step must be a positive number {where}")
            step = int(step_text)
        if rng in ("*", "?"):
            start, end = low, high
            unrestricted = unrestricted or step == 1
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start, end = number(a), number(b)
            if start > end:
                raise ValueError(f"{name} field {shorten(part)}: range start is after its end {where}")
        else:
            start = number(rng)
            end = high if slash else start  # 'a/n' means a-max/n
        values.update(range(start, end + 1, step))
    if index == 5 and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values), unrestricted


@dataclass(frozen=True)
class CronSpec:
    """A cron schedule, evaluated in a time zone: 5 fields (minute hour day-of-month month
    day-of-week) or zrepl's 6 with seconds first, optionally after `TZ=Zone ` or `CRON_TZ=Zone `.

    robfig/cron semantics (zrepl's parser): when both day fields are restricted, a day matches if
    EITHER matches. A fire time is every matching local wall-clock second (a repeated hour after a
    DST fall-back fires again); wall-clock times skipped by a DST jump forward fire once, at the
    instant of the jump, so a daily snapshot is never lost.
    """

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_unrestricted: bool
    weekdays_unrestricted: bool
    seconds: frozenset[int] = frozenset({0})
    zone: str | None = None  # from a TZ= prefix; overrides the location callers pass

    @classmethod
    def parse(cls, text: str) -> CronSpec:
        if not isinstance(text, str):
            raise ValueError(f"cron spec must be a string, got {type(text).__name__}")
        spec = text.strip()
        zone = None
        if spec.startswith(("TZ=", "CRON_TZ=")):
            assignment, _, spec = spec.partition(" ")
            zone = assignment.partition("=")[2]
            resolve_zone(zone)
            spec = spec.strip()
        expanded = _CRON_MACROS.get(spec.lower(), spec)
        if expanded.startswith("@"):
            raise ValueError(f"cron spec {shorten(text)}: {shorten(spec.split()[0])} is not supported (zrepl supports "
                             f"no @ shortcuts; zrepl.py knows {', '.join(_CRON_MACROS)})")
        fields = expanded.split()
        if len(fields) == 5:
            fields.insert(0, "0")
        elif len(fields) != 6:
            raise ValueError(f"cron spec {shorten(text)} must have 5 fields (minute hour day-of-month month "
                             f"day-of-week) or 6 with seconds first, got {len(fields)}")
        parsed = [_parse_cron_field(spec, f, i) for i, f in enumerate(fields)]
        self = cls(spec if zone is None else text.strip(), parsed[1][0], parsed[2][0], parsed[3][0], parsed[4][0],
                   parsed[5][0], parsed[3][1], parsed[5][1], parsed[0][0], zone)
        # A day-of-month list that never exists in the chosen months would never fire (e.g. '0 0 31 2 *').
        # (With a restricted day-of-week, weekdays fire on their own, so only this case can be empty.)
        if self.weekdays_unrestricted:
            if not any(d <= _MONTH_MAX_DAYS[m - 1] for m in self.months for d in self.days):
                raise ValueError(f"cron spec {shorten(text)} never fires: none of its days of the month exist "
                                 f"in its months")
        return self

    def __str__(self) -> str:
        return self.text

    # -- matching on naive local wall-clock times --

    def _day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_unrestricted or self.weekdays_unrestricted:
            return dom and dow
        return dom or dow

    def _matches(self, wall: dt.datetime) -> bool:
        return wall.minute in self.minutes and wall.hour in self.hours and self._day_matches(wall.date())

    def _next_wall(self, wall: dt.datetime) -> dt.datetime | None:
        """The first matching wall-clock minute strictly after `wall` (None if none within years)."""
        minutes, hours = sorted(self.minutes), sorted(self.hours)
        c = wall.replace(second=0, microsecond=0) + _MINUTE
        limit_year = wall.year + _CRON_SEARCH_YEARS
        while c.year <= limit_year:
            if c.month not in self.months:
                c = dt.datetime(c.year + c.month // 12, c.month % 12 + 1, 1)
                continue
            if not self._day_matches(c.date()):
                c = dt.datetime.combine(c.date() + dt.timedelta(days=1), dt.time())
                continue
            i = bisect.bisect_left(hours, c.hour)
            if i == len(hours):
                c = dt.datetime.combine(c.date() + dt.timedelta(days=1), dt.time())
                continue
            if hours[i] != c.hour:
                c = c.replace(hour=hours[i], minute=0)
            j = bisect.bisect_left(minutes, c.minute)
            if j == len(minutes):
                c = c.replace(minute=0) + dt.timedelta(hours=1)
                continue
            return c.replace(minute=minutes[j])
        return None

    def _prev_wall(self, wall: dt.datetime) -> dt.datetime | None:
        """The last matching wall-clock minute strictly before `wall` (None if none within years)."""
        minutes, hours = sorted(self.minutes), sorted(self.hours)
        c = wall.replace(second=0, microsecond=0)
        if c == wall:
            c -= _MINUTE
        limit_year = wall.year - _CRON_SEARCH_YEARS
        while c.year >= limit_year:
            if c.month not in self.months:
                c = dt.datetime(c.year, c.month, 1) - _MINUTE
                continue
            if not self._day_matches(c.date()):
                c = dt.datetime.combine(c.date(), dt.time()) - _MINUTE
                continue
            i = bisect.bisect_right(hours, c.hour)
            if i == 0:
                c = dt.datetime.combine(c.date(), dt.time()) - _MINUTE
                continue
            if hours[i - 1] != c.hour:
                c = c.replace(hour=hours[i - 1], minute=59)
            j = bisect.bisect_right(minutes, c.minute)
            if j == 0:
                c = c.replace(minute=0) - _MINUTE
                continue
            return c.replace(minute=minutes[j - 1])
        return None

    # -- mapping wall-clock times to instants --

    @staticmethod
    def _wall(t: float, tz: dt.tzinfo) -> dt.datetime:
        return dt.datetime.fromtimestamp(t, tz).replace(tzinfo=None)

    @staticmethod
    def _offset(t: float, tz: dt.tzinfo) -> dt.timedelta:
        return dt.datetime.fromtimestamp(t, tz).utcoffset() or dt.timedelta(0)

    def _instants(self, wall: dt.datetime, tz: dt.tzinfo) -> list[float]:
        """Instants whose local time is `wall` (two in a repeated hour), or, for a wall-clock time
        skipped by a jump forward, the single instant of that jump."""
        cands = sorted({wall.replace(tzinfo=tz, fold=f).timestamp() for f in (0, 1)})
        real = [t for t in cands if self._wall(t, tz) == wall]
        if real:
            return real
        # In a gap: fold=1 maps before the jump, fold=0 after it; bisect (whole minutes) for the jump.
        lo, hi = cands[0], cands[-1]
        after = self._offset(hi, tz)
        while hi - lo > 60:
            mid = lo + ((hi - lo) // 120) * 60
            if self._offset(mid, tz) == after:
                hi = mid
            else:
                lo = mid
        return [hi]

    def _backward_jump(self, a: float, b: float, tz: dt.tzinfo) -> float | None:
        """The instant in (a, b] where the offset drops (a DST fall-back), assuming at most one."""
        if self._offset(b, tz) >= self._offset(a, tz):
            return None
        before = self._offset(a, tz)
        lo, hi = a, b
        while hi - lo > 60:
            mid = lo + ((hi - lo) // 120) * 60
            if self._offset(mid, tz) == before:
                lo = mid
            else:
                hi = mid
        return hi

    def _fires_at(self, t: float, tz: dt.tzinfo) -> bool:
        """Whether minute-aligned instant `t` is a fire time (including skipped-by-DST fire times)."""
        wall = self._wall(t, tz)
        if self._matches(wall):
            return True
        jump = self._offset(t, tz) - self._offset(t - 60, tz)
        if jump > dt.timedelta(0):  # t is the first instant after a jump forward
            skipped = self._next_wall(wall - jump - _MINUTE)
            return skipped is not None and skipped < wall
        return False

    def next_after(self, ts: float, location: str = "UTC") -> float:
        """The first fire time strictly after unix time `ts`, evaluated in `location` (or the
        spec's own TZ= zone)."""
        tz = resolve_zone(self.zone or location)
        minute = math.floor(ts / 60) * 60.0
        if self._fires_at(minute, tz):
            later = [sec for sec in self.seconds if minute + sec > ts]
            if later:
                return minute + min(later)
        return self._next_fire_minute(ts, tz) + min(self.seconds)

    def last_at_or_before(self, ts: float, location: str = "UTC", max_days: int = 366) -> float | None:
        """The latest fire time <= unix time `ts` in `location` (or the spec's own TZ= zone),
        looking back at most `max_days`."""
        tz = resolve_zone(self.zone or location)
        minute = math.floor(ts / 60) * 60.0
        if self._fires_at(minute, tz):
            earlier = [sec for sec in self.seconds if minute + sec <= ts]
            if earlier:
                return minute + max(earlier)
        found = self._last_fire_minute(minute - 60, ts - max_days * 86400, tz)
        return None if found is None else found + max(self.seconds)

    def _next_fire_minute(self, ts: float, tz: dt.tzinfo) -> float:
        """The first minute-aligned fire instant strictly after `ts`."""
        t = (math.floor(ts / 60) + 1) * 60.0
        for _ in range(100_000):
            if self._fires_at(t, tz):
                return t
            wall = self._wall(t, tz)
            target = self._next_wall(wall)
            if target is None:
                break
            later = [x for x in self._instants(target, tz) if x > t]
            if not later:
                t += 60
                continue
            cand = later[0]
            # If we stand in the first pass of a repeated hour, the second pass may come first.
            jump = self._backward_jump(t, min(cand, t + 4 * 3600), tz)
            if jump is not None and jump < cand:
                t = jump
                continue
            return cand
        raise ValueError(f"cron spec {self.text!r} does not fire within {_CRON_SEARCH_YEARS} years")

    def _last_fire_minute(self, ts: float, horizon: float, tz: dt.tzinfo) -> float | None:
        """The latest minute-aligned fire instant <= `ts`, not before `horizon`."""
        t = math.floor(ts / 60) * 60.0
        for _ in range(100_000):
            if t < horizon:
                return None
            if self._fires_at(t, tz):
                return t
            wall = self._wall(t, tz)
            target = self._prev_wall(wall)
            if target is None:
                return None
            earlier = [x for x in self._instants(target, tz) if x < t]
            if not earlier:
                t -= 60
                continue
            cand = earlier[-1]
            # If we stand in the second pass of a repeated hour, the first pass may hold a later one.
            jump = self._backward_jump(max(cand, t - 4 * 3600), t, tz)
            if jump is not None and jump > cand:
                t = jump - 60
                continue
            return cand if cand >= horizon else None
        return None


# ---- abstraction names (holds and bookmarks that protect replication) ----

# Holds and bookmarks that protect replication carry the job name, so several jobs can share a
# dataset and each only ever touches its own. Names are byte-compatible with zrepl (v0.4+), so a
# pool moved from zrepl keeps its cursors. zrepl spells the tentative prefix `zrepl_CURSORTENTATIVE_`
# and then appends `_G_`, hence the double underscore.

ABSTRACTION_STEP_HOLD = "step-hold"
ABSTRACTION_LAST_RECEIVED_HOLD = "last-received-hold"
ABSTRACTION_CURSOR = "replication-cursor-bookmark-v2"
ABSTRACTION_TENTATIVE_CURSOR = "tentative-replication-cursor-bookmark-v2"
ABSTRACTION_TYPES = (ABSTRACTION_STEP_HOLD, ABSTRACTION_LAST_RECEIVED_HOLD, ABSTRACTION_CURSOR,
                     ABSTRACTION_TENTATIVE_CURSOR)

_STEP_HOLD_PREFIX = "zrepl_STEP_J_"
_LAST_RECEIVED_HOLD_PREFIX = "zrepl_last_received_J_"
_CURSOR_PREFIX = "zrepl_CURSOR"
_TENTATIVE_CURSOR_PREFIX = "zrepl_CURSORTENTATIVE_"
# Greedy first group like zrepl's parser: the prefix is everything before the last `_G_<16 hex>_J_`.
_JOB_AND_GUID_RE = re.compile(r"(.+)_G_([0-9a-f]{16})_J_(.+)")
# Characters ZFS accepts in a dataset/snapshot/bookmark name component.
_ZFS_COMPONENT_RE = re.compile(r"[A-Za-z0-9_\-:. ]+")
# zrepl's job-name check also builds a tentative cursor bookmark on `pool/ds`: 52 characters plus
# the job name must fit ZFS's 255, so job names are at most 203 characters.
JOB_NAME_MAX = ZFS_NAME_MAX - len("pool/ds#" + _TENTATIVE_CURSOR_PREFIX + "_G_" + "0" * 16 + "_J_")


def _job_name_problem(job: str) -> str | None:
    """Why ZFS could not carry `job` in hold tags and bookmark names (zrepl's job-id check), or None."""
    if not isinstance(job, str) or not job:
        return "must not be empty"
    if job in (".", ".."):
        return f"must not be {job!r}"
    if not _ZFS_COMPONENT_RE.fullmatch(job):
        bad = next((ch for ch in job if not _ZFS_COMPONENT_RE.fullmatch(ch)), "")
        return f"contains {bad!r}; ZFS allows only {_ZFS_ALLOWED_TEXT}"
    if len(job) > JOB_NAME_MAX:
        return (f"is {len(job)} characters long; at most {JOB_NAME_MAX} fit into ZFS's 255-character "
                f"bookmark names")
    return None


def _check_job_for_names(job: str) -> None:
    """Job names end up inside hold tags and bookmark names: refuse ones ZFS would reject."""
    problem = _job_name_problem(job)
    if problem:
        raise ValueError(f"job name {shorten(job)} cannot be used in ZFS hold tags and bookmark names: {problem}")


def step_hold_tag(job: str) -> str:
    """Hold tag on `from`/`to` (and -I intermediates) of a step in flight: `zrepl_STEP_J_<job>`."""
    _check_job_for_names(job)
    return _STEP_HOLD_PREFIX + job


def last_received_hold_tag(job: str) -> str:
    """Receiver-side hold on the newest received snapshot: `zrepl_last_received_J_<job>`."""
    _check_job_for_names(job)
    return _LAST_RECEIVED_HOLD_PREFIX + job


def _job_and_guid_name(prefix: str, guid: int, job: str) -> str:
    _check_job_for_names(job)
    if not 0 <= guid < 1 << 64:
        raise ValueError(f"guid {guid} is not a 64-bit unsigned integer")
    return f"{prefix}_G_{guid:016x}_J_{job}"


def cursor_bookmark_name(guid: int, job: str) -> str:
    """Sender bookmark marking the last snapshot the job replicated: `zrepl_CURSOR_G_<hex16>_J_<job>`."""
    return _job_and_guid_name(_CURSOR_PREFIX, guid, job)


def tentative_cursor_bookmark_name(guid: int, job: str) -> str:
    """Sender bookmark protecting a step's versions (guarantee_incremental):
    `zrepl_CURSORTENTATIVE__G_<hex16>_J_<job>`."""
    return _job_and_guid_name(_TENTATIVE_CURSOR_PREFIX, guid, job)


def parse_hold_tag(tag: str) -> tuple[str, str] | None:
    """Hold tag -> (abstraction type, job), or None for a tag that is not ours (including tags whose
    job part no job could have, e.g. with a backslash or a newline, as zrepl does)."""
    for prefix, kind in ((_STEP_HOLD_PREFIX, ABSTRACTION_STEP_HOLD),
                         (_LAST_RECEIVED_HOLD_PREFIX, ABSTRACTION_LAST_RECEIVED_HOLD)):
        if tag.startswith(prefix) and _job_name_problem(tag[len(prefix):]) is None:
            return kind, tag[len(prefix):]
    return None


def parse_bookmark_abstraction(short_name: str) -> tuple[str, int, str] | None:
    """Bookmark name (after '#'; a full `fs#name` is accepted too) -> (type, guid, job), or None for
    names that are not ours or whose job part no job could have."""
    name = short_name.rsplit("#", 1)[-1]
    m = _JOB_AND_GUID_RE.fullmatch(name)
    if not m or _job_name_problem(m.group(3)) is not None:
        return None
    kind = {_CURSOR_PREFIX: ABSTRACTION_CURSOR, _TENTATIVE_CURSOR_PREFIX: ABSTRACTION_TENTATIVE_CURSOR}.get(m.group(1))
    if kind is None:
        return None
    return kind, int(m.group(2), 16), m.group(3)


@dataclass(frozen=True)
class Abstraction:
    """One replication hold or bookmark owned by a job (zrepl's "zfs abstraction").

    Holds: `name` is the held snapshot, `tag` the hold tag. Bookmarks: `name` is the bookmark and
    `tag` is None. `createtxg` is the snapshot's (or bookmarked snapshot's) createtxg."""

    type: str
    job: str
    dataset: str
    name: str
    guid: int | None = None
    createtxg: int | None = None
    tag: str | None = None

    @property
    def is_hold(self) -> bool:
        return self.type in (ABSTRACTION_STEP_HOLD, ABSTRACTION_LAST_RECEIVED_HOLD)

    @property
    def full_name(self) -> str:
        """The snapshot a hold sits on (`fs@snap`) or the bookmark itself (`fs#bm`)."""
        return f"{self.dataset}{'@' if self.is_hold else '#'}{self.name}"

    def __str__(self) -> str:
        return f"{self.type} {self.full_name}" + (f" (tag {self.tag})" if self.tag else "")


def stale_abstractions(abstractions: Iterable[Abstraction], job: str) -> list[Abstraction]:
    """zrepl's release-stale for ONE job: which of its holds/bookmarks are obsolete. Pure.

    Per dataset, for `job` only (other jobs' abstractions are never returned):
    - replication cursors: all but the newest (createtxg);
    - last-received holds: all but the newest;
    - step holds: those at or before the newest cursor (zrepl: once the cursor exists, the holds
      on both `from` and `to` are redundant). Without a cursor (initial replication) all but the
      newest step hold, which may belong to an interrupted initial send that will be resumed;
    - tentative cursors: those at or before the newest cursor (the cursor bookmark is itself a
      valid incremental source, so an equal-createtxg tentative one is redundant too). Without a
      cursor they are kept: they may protect a step in flight.
    Abstractions with unknown createtxg are kept (cannot be judged safely).
    Caller's duty: do not run this while a step of the same job is in flight on that dataset, as
    zrepl's rule cannot see a send that has placed holds but not yet moved the cursor.
    """
    by_dataset: dict[str, list[Abstraction]] = {}
    for a in abstractions:
        if a.job == job and a.createtxg is not None:
            by_dataset.setdefault(a.dataset, []).append(a)
    stale: list[Abstraction] = []
    for items in by_dataset.values():
        def of(kind: str, group: list[Abstraction] = items) -> list[Abstraction]:
            return sorted((a for a in group if a.type == kind), key=lambda a: (a.createtxg or 0, a.name))
        cursors, last_received = of(ABSTRACTION_CURSOR), of(ABSTRACTION_LAST_RECEIVED_HOLD)
        steps, tentative = of(ABSTRACTION_STEP_HOLD), of(ABSTRACTION_TENTATIVE_CURSOR)
        stale += cursors[:-1] + last_received[:-1]
        if cursors:
            cut = cursors[-1].createtxg
            stale += [a for a in steps + tentative if a.createtxg <= cut]  # type: ignore[operator]
        elif steps:
            newest = steps[-1].createtxg
            stale += [a for a in steps if a.createtxg < newest]  # type: ignore[operator]
    return stale


# ---- regular expressions: Go RE2 syntax, as zrepl configs use it ----

# zrepl compiles config regexes with Go's regexp (RE2). Python's `re` reads most of them the same
# way, but not all: `[[:digit:]]` is a POSIX class in RE2 and a plain set (with a FutureWarning) in
# Python, `$` also matches before a final newline in Python, `\s` differs, `{,3}` is a literal in
# RE2 and a repeat in Python. So config regexes are translated, token by token, into a Python
# pattern with the RE2 meaning; RE2 syntax Python lacks is translated too (`\Q..\E`, `\x{..}`,
# `(?<name>`, flags in mid-pattern); what RE2 refuses (backreferences, lookarounds, possessive and
# atomic forms, `\Z`) or what has no Python equivalent (`\C`, `\pN`, `(?U)`) is refused with why.

_RE2_MAX_REPEAT = 1000  # RE2 refuses larger repeat counts
_RE2_MAX_NESTING = 100  # RE2 allows 1000; Python's compiler recurses and gives up near 500
_RE2_PERL_CLASSES = {"d": ((48, 57),), "s": ((9, 10), (12, 13), (32, 32)),
                     "w": ((48, 57), (65, 90), (95, 95), (97, 122))}
_RE2_POSIX_CLASSES = {
    "alnum": ((48, 57), (65, 90), (97, 122)), "alpha": ((65, 90), (97, 122)), "ascii": ((0, 127),),
    "blank": ((9, 9), (32, 32)), "cntrl": ((0, 31), (127, 127)), "digit": ((48, 57),), "graph": ((33, 126),),
    "lower": ((97, 122),), "print": ((32, 126),), "punct": ((33, 47), (58, 64), (91, 96), (123, 126)),
    "space": ((9, 13), (32, 32)), "upper": ((65, 90),), "word": ((48, 57), (65, 90), (95, 95), (97, 122)),
    "xdigit": ((48, 57), (65, 70), (97, 102)),
}
_RE2_CHAR_ESCAPES = {"a": 7, "f": 12, "t": 9, "n": 10, "r": 13, "v": 11}
_RE2_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")
Ranges = tuple[tuple[int, int], ...]


def _class_char(code: int) -> str:
    ch = chr(code)
    if ch.isascii() and ch.isalnum():
        return ch
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _class_text(ranges: Ranges, negate: bool = False) -> str:
    body = "".join(_class_char(lo) + (f"-{_class_char(hi)}" if hi > lo else "") for lo, hi in ranges)
    return f"[{'^' if negate else ''}{body}]"


class _Re2Translator:
    """One pass over an RE2 pattern, writing the Python equivalent. ValueError names what is wrong."""

    def __init__(self, pattern: str):
        self.src, self.i, self.start = pattern, 0, 0
        self.out: list[str] = []
        # One entry per open group: [multi-line flag, flag groups opened in it by a mid-pattern
        # `(?i)`, which Python only has in the scoped form]; the outermost entry is the pattern.
        self.groups: list[tuple[list[bool], list[str]]] = [([False], [])]

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{what} (at offset {self.start}); zrepl's regexes are Go RE2 syntax")

    def translate(self) -> str:
        while self.i < len(self.src):
            self.token()
        if len(self.groups) > 1:
            raise self.fail("missing closing )")
        return "".join(self.out) + ")" * len(self.groups[0][1])

    def token(self) -> None:
        self.start = self.i
        ch = self.src[self.i]
        if ch == "\\":
            self.escape()
        elif ch == "[":
            self.i += 1
            self.out.append(self.char_class())
        elif ch == "(":
            self.open_group()
        elif ch == ")":
            if len(self.groups) == 1:
                raise self.fail("unexpected )")
            self.i += 1
            self.out.append(")" * (len(self.groups.pop()[1]) + 1))
        elif ch == "|":
            # `x(?i)a|b` is `x(?i:a)|(?i:b)` in RE2: a flag reaches across the alternation.
            self.i += 1
            pending = self.groups[-1][1]
            self.out.append(")" * len(pending) + "|" + "".join(pending))
        elif ch in "*+?":
            self.i += 1
            self.out.append(ch)
            self.quantifier_suffix()
        elif ch == "{" and (m := _RE2_REPEAT.match(self.src, self.i)):
            low, high = int(m.group(1)), m.group(3)
            if low > _RE2_MAX_REPEAT or (high and int(high) > _RE2_MAX_REPEAT):
                raise self.fail(f"repeat count in {shorten(m.group(0))} is larger than {_RE2_MAX_REPEAT}")
            if high and int(high) < low:
                raise self.fail(f"invalid repeat count {shorten(m.group(0))}")
            self.i = m.end()
            self.out.append(m.group(0))
            self.quantifier_suffix()
        elif ch == "$":
            self.i += 1
            # RE2's `$` is the end of the text (without m); Python's also matches before a final \n.
            self.out.append("$" if self.groups[-1][0][0] else r"\Z")
        elif ch in "^.":
            self.i += 1
            self.out.append(ch)
        else:
            self.i += 1
            self.out.append(re.escape(ch))

    def quantifier_suffix(self) -> None:
        if self.src.startswith("?", self.i):
            self.i += 1
            self.out.append("?")
        if self.src.startswith(("+", "*", "?", "{"), self.i) and (
                self.src[self.i] != "{" or _RE2_REPEAT.match(self.src, self.i)):
            raise self.fail("invalid nested repetition operator (possessive quantifiers like 'a++' are not RE2)")

    def open_group(self) -> None:
        if len(self.groups) > _RE2_MAX_NESTING:
            raise self.fail(f"groups nested more than {_RE2_MAX_NESTING} deep")
        multiline = self.groups[-1][0][0]
        rest = self.src[self.i + 1:self.i + 200]  # enough for any group name or flag set
        opening, length = ("(", 1) if not rest.startswith("?") else ("(?:", 3) if rest.startswith("?:") else ("", 0)
        if not opening and (m := re.match(r"\?P?<([A-Za-z0-9_]+)>", rest)):
            opening, length = f"(?P<{m.group(1)}>", 1 + m.end()
        if opening:
            self.i += length
            self.out.append(opening)
            self.groups.append(([multiline], []))
            return
        m = re.match(r"\?([imsU]*)(?:-([imsU]*))?([:)])", rest)
        if not m:
            kinds = {"?=": "lookahead", "?!": "lookahead", "?<=": "lookbehind", "?<!": "lookbehind",
                     "?>": "atomic groups", "?#": "comments", "?(": "conditionals", "?P=": "backreferences"}
            kind = next((k for p, k in kinds.items() if rest.startswith(p)), "this group syntax")
            raise self.fail(f"{kind} ('({rest[:3]}') not supported by RE2 (invalid or unsupported Perl syntax)")
        on, off, end = m.group(1), m.group(2) or "", m.group(3)
        if "U" in on + off:
            raise self.fail("the (?U) flag (ungreedy) has no Python equivalent: write lazy quantifiers "
                            "like '*?' instead")
        if not on and not off:
            raise self.fail("missing flags in '(?' group")
        self.i += 1 + m.end()
        scoped = f"(?{on}{'-' + off if off else ''}:"
        multiline = ("m" in on) or (multiline and "m" not in off)
        self.out.append(scoped)
        if end == ":":
            self.groups.append(([multiline], []))
        else:  # (?i) applies to the rest of the enclosing group
            self.groups[-1][0][0] = multiline
            self.groups[-1][1].append(scoped)

    def escape(self) -> None:
        if self.i + 1 >= len(self.src):
            raise self.fail("trailing backslash")
        c = self.src[self.i + 1]
        if c in "AbBdDwW":
            self.i += 2
            self.out.append("\\" + c)  # with re.ASCII these mean what RE2 means
        elif c == "z":
            self.i += 2
            self.out.append(r"\Z")
        elif c in "sS":
            self.i += 2
            self.out.append(_class_text(_RE2_PERL_CLASSES["s"], negate=c == "S"))
        elif c == "Q":
            end = self.src.find(r"\E", self.i + 2)
            literal = self.src[self.i + 2:] if end < 0 else self.src[self.i + 2:end]
            self.i = len(self.src) if end < 0 else end + 2
            self.out.append(re.escape(literal))
        elif c == "Z":
            raise self.fail(r"'\Z' is not RE2 (RE2's end of text is '\z' or '$')")
        elif c == "C":
            raise self.fail(r"'\C' (any byte) has no Python equivalent")
        elif c in "pP":
            raise self.fail(rf"Unicode classes ('\{c}...') are not supported; snapshot and dataset names "
                            "are ASCII: write [0-9], [A-Za-z] or [[:alpha:]]")
        else:
            self.out.append(re.escape(chr(self.char_escape())))

    def char_escape(self) -> int:
        """A backslash escape that stands for one character (outside or inside a class)."""
        c = self.src[self.i + 1]
        self.i += 2
        if c in _RE2_CHAR_ESCAPES:
            return _RE2_CHAR_ESCAPES[c]
        if c in "01234567":
            digits = re.match(r"[0-7]{0,2}", self.src[self.i:self.i + 2])
            assert digits is not None
            if c != "0" and not digits.group(0):
                raise self.fail(f"backreferences ('\\{c}') are not supported by RE2")
            self.i += len(digits.group(0))
            return int(c + digits.group(0), 8)
        if c == "x":
            m = re.match(r"\{([0-9A-Fa-f]{1,8})\}|([0-9A-Fa-f]{2})", self.src[self.i:self.i + 10])
            if not m or int(m.group(1) or m.group(2), 16) > 0x10FFFF:
                raise self.fail(r"invalid '\x' escape (RE2: '\x7F' or '\x{10FFFF}')")
            self.i += m.end()
            return int(m.group(1) or m.group(2), 16)
        if c.isascii() and not c.isalnum():
            return ord(c)
        if c in "89":
            raise self.fail(f"backreferences ('\\{c}') are not supported by RE2")
        raise self.fail(f"invalid escape '\\{c}'")

    def char_class(self) -> str:
        """After '[': a class with RE2 semantics, as a Python class or a small alternation."""
        negate = self.src.startswith("^", self.i)
        self.i += negate
        positive: list[tuple[int, int]] = []
        negated: list[Ranges] = []  # [[:^alpha:]], \D, \S, \W: complements inside the class
        first = True
        while True:
            if self.i >= len(self.src):
                raise self.fail("missing closing ] of a character class")
            ch = self.src[self.i]
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            if ch == "[" and (m := re.match(r"\[:(\^?)([a-z]*):\]", self.src[self.i:self.i + 40])):
                if m.group(2) not in _RE2_POSIX_CLASSES:
                    raise self.fail(f"unknown POSIX class {shorten(m.group(0))}")
                self.i += m.end()
                if m.group(1):
                    negated.append(_RE2_POSIX_CLASSES[m.group(2)])
                else:
                    positive.extend(_RE2_POSIX_CLASSES[m.group(2)])
                continue
            if ch == "\\" and self.src[self.i + 1:self.i + 2] in tuple("dDsSwWpP"):
                c = self.src[self.i + 1]
                if c in "pP":
                    self.escape()  # refuses with the explanation
                self.i += 2
                if c.isupper():
                    negated.append(_RE2_PERL_CLASSES[c.lower()])
                else:
                    positive.extend(_RE2_PERL_CLASSES[c])
                continue
            low = self.class_char()
            high = low
            if self.src.startswith("-", self.i) and not self.src.startswith("-]", self.i):
                self.i += 1
                high = self.class_char()
                if high < low:
                    raise self.fail(f"invalid character class range {chr(low)!r}-{chr(high)!r}")
            positive.append((low, high))
        return self.class_pattern(tuple(positive), negated, negate)

    def class_char(self) -> int:
        if self.i >= len(self.src):
            raise self.fail("missing closing ] of a character class")
        if self.src[self.i] == "\\":
            if self.i + 1 >= len(self.src):
                raise self.fail("trailing backslash")
            if self.src[self.i + 1] in "AbBzZQC":
                raise self.fail(f"'\\{self.src[self.i + 1]}' is not allowed in a character class")
            return self.char_escape()
        self.i += 1
        return ord(self.src[self.i - 1])

    @staticmethod
    def class_pattern(positive: Ranges, negated: list[Ranges], negate: bool) -> str:
        if not negated:
            return _class_text(positive, negate)
        if not negate:  # P or not N1 or not N2 ...
            parts = ([_class_text(positive)] if positive else []) + [_class_text(n, True) for n in negated]
            return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
        # not (P or not N1 ...) = N1 and N2 ... and not P
        checks = "".join(f"(?={_class_text(n)})" for n in negated[1:])
        last = _class_text(negated[0])
        return f"(?:{checks}(?!{_class_text(positive)}){last})" if positive else f"(?:{checks}{last})"


def translate_re2(pattern: str) -> str:
    """The Python `re` pattern (to compile with re.ASCII) that means what RE2 pattern `pattern`
    means. ValueError for syntax RE2 refuses or Python cannot express."""
    return _Re2Translator(pattern).translate()


def compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile a config regex (Go RE2 syntax, as zrepl; searched unanchored). ValueError says why not."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a FutureWarning would mean the translation is incomplete
            return re.compile(translate_re2(pattern), re.ASCII)
    except (ValueError, re.error) as e:
        raise ValueError(f"invalid regular expression {shorten(pattern)}: {e}") from None
    except (OverflowError, RecursionError, Warning) as e:
        raise ValueError(f"invalid regular expression {shorten(pattern)}: too complex ({e})") from None


# =================================================================================================
# 3. Keep rules
# =================================================================================================

# ---- retention grid ----

@dataclass(frozen=True)
class GridInterval:
    """`count` adjacent buckets of `length` seconds, each keeping its `keep` oldest snapshots (None = all)."""

    count: int
    length: float
    keep: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count <= 0:
            raise ValueError(f"grid interval count must be a positive integer, got {self.count!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, (int, float)) or not self.length > 0:
            raise ValueError(f"grid interval length must be a positive duration, got {self.length!r}")
        bad_keep = isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep <= 0
        if self.keep is not None and bad_keep:
            raise ValueError(f"grid keep must be a positive integer or all, got {self.keep!r}")

    def __str__(self) -> str:
        text = f"{self.count}x{_exact_duration(self.length)}"
        if self.keep != 1:
            text += f"(keep={'all' if self.keep is None else self.keep})"
        return text


def _exact_duration(seconds: float) -> str:
    """Seconds in the largest unit that divides them evenly (86400 -> '1d', 5400 -> '90m')."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and float(seconds) % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


_GRID_ENTRY_RE = re.compile(r"\s*(\d+)\s*x\s*([^()]*?)\s*(?:\((.*)\))?\s*")
GRID_MAX_COUNT = 1_000_000  # buckets per entry; no real schedule comes near it


def _check_grid_order(intervals: Sequence[GridInterval], labels: Sequence[str]) -> None:
    """zrepl's rule: bucket lengths must not decrease, unless every bucket before is keep=all."""
    longest: float = 0
    all_keep_all = True
    for interval, label in zip(intervals, labels, strict=True):
        if interval.length < longest and not all_keep_all:
            raise ValueError(f"grid entry {label}: interval {_exact_duration(interval.length)} is shorter than "
                             f"the {_exact_duration(longest)} before it; lengths must not decrease "
                             f"(only leading keep=all entries may be longer)")
        longest = interval.length
        all_keep_all = all_keep_all and interval.keep is None


def parse_grid(spec: str) -> list[GridInterval]:
    """Parse zrepl's grid syntax, e.g. `1x1h(keep=all) | 24x1h | 14x1d`. ValueError names the bad entry."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("grid must be a non-empty string like '1x1h(keep=all) | 24x1h | 14x1d'")
    entries = spec.split("|")
    intervals: list[GridInterval] = []
    labels: list[str] = []
    for n, raw in enumerate(entries, 1):
        label = f"{n} of {len(entries)} ({shorten(raw.strip())})"
        m = _GRID_ENTRY_RE.fullmatch(raw)
        if not m:
            raise ValueError(f"grid entry {label}: expected 'N x DURATION' with an optional '(keep=K)' "
                             f"or '(keep=all)', e.g. '24x1h'")
        if len(m.group(1)) > 7 or int(m.group(1)) > GRID_MAX_COUNT:
            raise ValueError(f"grid entry {label}: the count before 'x' must be at most {GRID_MAX_COUNT}")
        count = int(m.group(1))
        if count <= 0:
            raise ValueError(f"grid entry {label}: the count before 'x' must be at least 1")
        try:
            length = parse_duration(m.group(2))
        except ValueError as e:
            raise ValueError(f"grid entry {label}: {e}") from None
        if length <= 0:
            raise ValueError(f"grid entry {label}: the interval length must be positive")
        keep: int | None = 1
        if m.group(3) is not None:
            pm = re.fullmatch(r"\s*keep\s*=\s*(\S+?)\s*", m.group(3))
            if not pm:
                raise ValueError(f"grid entry {label}: the only parameter is 'keep=K' or 'keep=all'")
            value = pm.group(1)
            if value == "all":
                keep = None
            elif value.isascii() and value.isdigit() and len(value) <= 9:
                keep = int(value)
                if keep == 0:
                    raise ValueError(f"grid entry {label}: keep=0 is not allowed (a bucket must keep at "
                                     f"least 1 snapshot; leave the interval out instead)")
            else:
                raise ValueError(f"grid entry {label}: keep must be a positive number or 'all', got {shorten(value)}")
        intervals.append(GridInterval(count, length, keep))
        labels.append(label)
    _check_grid_order(intervals, labels)
    return intervals


# ---- keep rules ----

@dataclass
class PruneContext:
    """Facts about the filesystem that rules may need: the sender's replication cursor (if any)
    and `now`, the caller's clock (unix seconds; None = not known, then the grid trusts the
    snapshots' dates as zrepl does). Rules append human-readable notes (e.g. why nothing could be
    pruned)."""

    cursor_guid: int | None = None
    cursor_createtxg: int | None = None
    now: float | None = None
    notes: list[str] = field(default_factory=list)


class KeptSnapshots(Mapping[str, list[str]]):
    """The snapshots that stay on one dataset, read as full snapshot name -> descriptions of the
    rules that keep it, in the order they were added.

    Stored for memory: a pruning run holds this for every filesystem of both sides until it ends
    (100,000 kept snapshots per side at 1,000 x 100), and a full-name string plus a reasons list
    per snapshot cost about 20 MiB a side. So a snapshot of `dataset` is stored under its short
    name (the listing's own string; one of another dataset under its full name: a short name never
    contains '@'), and every snapshot kept by the same rules shares ONE reasons list: never change
    a list read from here; `add` another."""

    __slots__ = ("dataset", "_reasons")

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._reasons: dict[str, list[str]] = {}

    def add(self, dataset: str, name: str, reasons: list[str]) -> None:
        """`dataset@name` stays, for `reasons` (a list that may be shared with other snapshots)."""
        self._reasons[name if dataset == self.dataset else f"{dataset}@{name}"] = reasons

    def by_short_name(self) -> Iterator[tuple[str, list[str]]]:
        """(name after '@', reasons) in order, without building a full name each."""
        for key, reasons in self._reasons.items():
            yield (key.partition("@")[2] if "@" in key else key), reasons

    def __getitem__(self, full_name: str) -> list[str]:
        dataset, at, name = full_name.partition("@")
        if not at:
            raise KeyError(full_name)
        return self._reasons[name if dataset == self.dataset else full_name]

    def __iter__(self) -> Iterator[str]:
        return (key if "@" in key else f"{self.dataset}@{key}" for key in self._reasons)

    def __len__(self) -> int:
        return len(self._reasons)

    def values(self) -> ValuesView[list[str]]:
        return self._reasons.values()

    def __repr__(self) -> str:
        return f"KeptSnapshots({dict(self.items())!r})"


@dataclass
class PruneDecision:
    """Outcome for one filesystem: what stays (and which rules keep it), what goes, and notes."""

    keep: KeptSnapshots  # full snapshot name -> descriptions of rules that keep it
    destroy: list[Version]  # in createtxg order
    notes: list[str] = field(default_factory=list)


class KeepRule:
    """A keep rule returns the full names of the snapshots it keeps; unkept snapshots may be destroyed."""

    def keep(self, snapshots: list[Version], ctx: PruneContext) -> set[str]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _only_snapshots(versions: Iterable[Version]) -> list[Version]:
    return [v for v in versions if v.kind == "snapshot"]


def _init_regex(rule: Any, pattern: str | None) -> None:
    """Compile once into the frozen dataclass's hidden `_re` field (raises ValueError early)."""
    object.__setattr__(rule, "_re", None if pattern is None else compile_regex(pattern))


@dataclass(frozen=True)
class KeepLastN(KeepRule):
    """last_n: the newest `count` snapshots whose name matches `regex` (all if no regex).
    Newest = latest creation; snapshots made in the same second are ordered by createtxg (the
    order ZFS made them), then by name descending as zrepl does. zrepl breaks creation ties by
    name alone, which keeps the wrong snapshot when several are taken within one second."""

    count: int
    regex: str | None = None
    _re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count <= 0:
            raise ValueError(f"last_n count must be a positive integer, got {self.count!r}")
        _init_regex(self, self.regex)

    def keep(self, snapshots: list[Version], ctx: PruneContext) -> set[str]:
        matching = [s for s in _only_snapshots(snapshots) if self._re is None or self._re.search(s.name)]
        # Sort ascending, then take from the end: newest first.
        matching.sort(key=lambda s: (s.creation, s.createtxg or 0, s.name))
        return {s.full_name for s in matching[-self.count:]}

    def describe(self) -> str:
        return f"last_n(count={self.count}" + (f", regex={self.regex!r})" if self.regex is not None else ")")


# A youngest snapshot dated more than this after `now` does not anchor the grid: one snapshot from
# a sender whose clock ran years ahead would otherwise make every real snapshot "too old".
GRID_FUTURE_SLACK = 3600.0


def fit_grid(intervals: Sequence[GridInterval], anchor: float,
             entries: Iterable[tuple[float, int, str]]) -> set[str]:
    """zrepl's retention grid, pure: buckets laid back from `anchor`; `entries` are (creation,
    createtxg, name). Returns the names kept: entries younger than the anchor, and per bucket its
    `keep` oldest. Bucket i covers (edge_i - length_i, edge_i], so an entry exactly on an edge
    belongs to the older bucket; entries at or beyond the oldest edge are not kept. Arithmetic per
    interval, so a count of a million buckets costs nothing."""
    kept: set[str] = set()
    buckets: dict[tuple[int, int], list[tuple[float, int, str]]] = {}
    for entry in entries:
        age = anchor - entry[0]
        if age < 0:
            kept.add(entry[2])
            continue
        offset = 0.0
        for index, interval in enumerate(intervals):
            span = interval.count * interval.length
            if age < offset + span:
                bucket = (index, int((age - offset) // interval.length))
                buckets.setdefault(bucket, []).append(entry)
                break
            offset += span
    for (index, _), members in buckets.items():
        keep = intervals[index].keep
        members.sort()  # oldest first: creation, then createtxg, then name
        kept.update(name for _, _, name in (members if keep is None else members[:keep]))
    return kept


@dataclass(frozen=True)
class KeepGrid(KeepRule):
    """grid: fits snapshots matching `regex` into buckets laid backwards from the youngest match.

    Bucket i covers (edge_i - length_i, edge_i]: a snapshot exactly on a boundary belongs to the older
    bucket. Each bucket keeps its `keep` oldest snapshots; matches older than the last bucket are not
    kept; non-matching snapshots are not kept by this rule (zrepl's algorithm). When the caller's
    clock (`ctx.now`) says the youngest match lies more than GRID_FUTURE_SLACK in the future, the
    rule keeps every snapshot of the filesystem and says why in a note.
    """

    intervals: tuple[GridInterval, ...]
    regex: str
    _re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        intervals = parse_grid(self.intervals) if isinstance(self.intervals, str) else tuple(self.intervals)
        if not intervals:
            raise ValueError("grid must have at least one interval")
        for i in intervals:
            if not isinstance(i, GridInterval):
                raise ValueError(f"grid intervals must be GridInterval values, got {i!r}")
        _check_grid_order(intervals, [repr(str(i)) for i in intervals])
        object.__setattr__(self, "intervals", tuple(intervals))
        if not isinstance(self.regex, str) or not self.regex:
            raise ValueError("grid rule needs a regex (e.g. '^zrepl_') so it only thins out your own snapshots")
        _init_regex(self, self.regex)

    def keep(self, snapshots: list[Version], ctx: PruneContext) -> set[str]:
        assert self._re is not None
        snaps = _only_snapshots(snapshots)
        matching = [s for s in snaps if self._re.search(s.name)]
        if not matching:
            return set()
        youngest = max(matching, key=lambda s: (s.creation, s.createtxg))
        if ctx.now is not None and youngest.creation > ctx.now + GRID_FUTURE_SLACK:
            ctx.notes.append(
                f"grid: the youngest matching snapshot {youngest.name} is dated "
                f"{iso_time(youngest.creation)}, {format_duration(youngest.creation - ctx.now)} after now "
                f"({iso_time(ctx.now)}): a clock was wrong when it was made. The grid would measure every "
                f"age from it, so nothing is pruned on this filesystem until it is gone or the clock is right")
            return {s.full_name for s in snaps}
        return fit_grid(self.intervals, youngest.creation,
                        ((s.creation, s.createtxg, s.full_name) for s in matching))

    def describe(self) -> str:
        return f"grid({' | '.join(str(i) for i in self.intervals)}, regex={self.regex!r})"


@dataclass(frozen=True)
class KeepRegex(KeepRule):
    """regex: keeps snapshots whose name (after '@') matches `regex` anywhere; `negate` keeps the others."""

    regex: str
    negate: bool = False
    _re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.negate, bool):
            raise ValueError(f"regex rule: negate must be true or false, got {self.negate!r}")
        _init_regex(self, self.regex)

    def keep(self, snapshots: list[Version], ctx: PruneContext) -> set[str]:
        assert self._re is not None
        return {s.full_name for s in _only_snapshots(snapshots)
                if (self._re.search(s.name) is not None) != self.negate}

    def describe(self) -> str:
        return f"regex(regex={self.regex!r}" + (", negate=true)" if self.negate else ")")


@dataclass(frozen=True)
class KeepNotReplicated(KeepRule):
    """not_replicated: keeps sender snapshots newer than the replication cursor (and the cursor's own
    snapshot unless keep_snapshot_at_cursor=false). Without a cursor nothing is provably replicated,
    so everything is kept."""

    keep_snapshot_at_cursor: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.keep_snapshot_at_cursor, bool):
            raise ValueError(f"not_replicated: keep_snapshot_at_cursor must be true or false, "
                             f"got {self.keep_snapshot_at_cursor!r}")

    def keep(self, snapshots: list[Version], ctx: PruneContext) -> set[str]:
        snaps = _only_snapshots(snapshots)
        cursor_txg = ctx.cursor_createtxg
        if cursor_txg is None and ctx.cursor_guid is not None:
            at = [s for s in snaps if s.guid == ctx.cursor_guid]
            if at:
                cursor_txg = at[0].createtxg
        if cursor_txg is None:
            if ctx.cursor_guid is None:
                ctx.notes.append("not_replicated: no replication cursor (nothing replicated yet, or "
                                 "guarantee_nothing protection); keeping every snapshot")
            else:
                ctx.notes.append(f"not_replicated: the snapshot of replication cursor guid "
                                 f"{ctx.cursor_guid:#x} is gone and its createtxg is unknown; "
                                 f"keeping every snapshot")
            return {s.full_name for s in snaps}
        kept = set()
        for s in snaps:
            at_cursor = s.guid == ctx.cursor_guid if ctx.cursor_guid is not None else s.createtxg == cursor_txg
            if at_cursor:
                if self.keep_snapshot_at_cursor:
                    kept.add(s.full_name)
            elif s.createtxg > cursor_txg:
                kept.add(s.full_name)
        return kept

    def describe(self) -> str:
        if self.keep_snapshot_at_cursor:
            return "not_replicated"
        return "not_replicated(keep_snapshot_at_cursor=false)"


def decide_prune(snapshots: list[Version], rules: Sequence[KeepRule],
                 ctx: PruneContext | None = None) -> PruneDecision:
    """Decide for ONE filesystem which snapshots to destroy: those no rule keeps.

    Bookmarks in `snapshots` are ignored (never destroyed); an empty rule list keeps everything.
    Pure: no I/O, no clock of its own (the grid measures age from the youngest matching snapshot,
    and checks it against `ctx.now` when the caller passes one).
    """
    ctx = ctx if ctx is not None else PruneContext()
    snaps = sorted(_only_snapshots(snapshots), key=lambda s: (s.createtxg, s.name))
    keep = KeptSnapshots(snaps[0].dataset if snaps else "")
    if not rules:
        ctx.notes.append("no keep rules: keeping every snapshot")
        everything = ["no keep rules"]
        for s in snaps:
            keep.add(s.dataset, s.name, everything)
        return PruneDecision(keep, [], list(ctx.notes))
    # The rules answer in full names; which of them keep a snapshot is a bit each while they run,
    # and each combination of bits becomes one reasons list, shared (see KeptSnapshots).
    names = [s.full_name for s in snaps]
    kept_by = dict.fromkeys(names, 0)
    descriptions = []
    for bit, rule in enumerate(rules):
        descriptions.append(rule.describe())
        for name in rule.keep(snaps, ctx):
            if name in kept_by:
                kept_by[name] |= 1 << bit
    shared: dict[int, list[str]] = {}
    destroy = []
    for s, name in zip(snaps, names, strict=True):
        bits = kept_by[name]
        if not bits:
            destroy.append(s)
            continue
        why = shared.get(bits)
        if why is None:
            why = shared[bits] = [d for bit, d in enumerate(descriptions) if bits >> bit & 1]
        keep.add(s.dataset, s.name, why)
    return PruneDecision(keep, destroy, list(ctx.notes))


# =================================================================================================
# 4. Config
# =================================================================================================

CONFIG_SEARCH_PATH = ("/etc/zrepl/zrepl.toml", "/usr/local/etc/zrepl/zrepl.toml")
JOB_TYPES = ("snap", "push", "sink", "pull", "source")
PROTECTION_LEVELS = ("guarantee_resumability", "guarantee_incremental", "guarantee_nothing")
INITIAL_REPLICATION = ("most_recent", "all", "fail")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("human", "logfmt", "json")
SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
                     "ftp", *(f"local{i}" for i in range(8)))
_REQUIRED = object()
_MAX_TOML_NESTING = 64  # arrays and inline tables; tomllib itself recurses (and dies) near 500


@dataclass
class LoggingConfig:
    """One log outlet: stderr (zrepl's `stdout` is accepted and also written to stderr) in a format,
    or syslog. `time`, `color` and `retry_interval` are zrepl's keys, accepted for compatibility."""

    type: str = "stderr"
    level: str = "warn"  # zrepl's default: quiet when all is well (cron mails every line it prints)
    format: str = "human"
    facility: str = "local0"  # zrepl's default
    time: bool = True
    color: bool = True
    retry_interval: float = 10.0


@dataclass
class StatusThresholds:
    """`[global.status]`: thresholds for `zrepl.py status` exit codes (Nagios style). The freshness
    ages are off at 0; `crit_replication_failing_after` 0 means crit_no_success_after."""

    warn_no_success_after: float = 2 * 3600
    crit_no_success_after: float = 6 * 3600
    warn_snapshot_older_than: float = 0.0  # the newest snapshot of a selected filesystem (snap, push, source)
    crit_snapshot_older_than: float = 0.0
    warn_received_older_than: float = 0.0  # the newest snapshot the receiver has (push, pull)
    crit_received_older_than: float = 0.0
    crit_replication_failing_after: float = 0.0  # a push or pull filesystem failing to replicate this long

    @property
    def replication_failing_limit(self) -> float:
        return self.crit_replication_failing_after or self.crit_no_success_after


MonitoringConfig = StatusThresholds  # the old name, still used in annotations and by older callers


@dataclass
class MonitoringOutlet:
    """One `global.monitoring` entry: zrepl's `prometheus` (listen, listen_freebind) or zrepl.py's
    `textfile` (path). Parsed and stored; serving them is the daemon's job."""

    type: str
    listen: str = ""
    listen_freebind: bool = False
    path: str = ""


@dataclass
class ControlConfig:
    """`global.control`: zrepl's control socket (parsed and stored for the daemon)."""

    sockpath: str = "/var/run/zrepl/control"


@dataclass
class GlobalServeConfig:
    """`global.serve`: zrepl's `stdinserver.sockdir` (parsed and stored for the daemon)."""

    stdinserver_sockdir: str = "/var/run/zrepl/stdinserver"


@dataclass
class GlobalConfig:
    """The `[global]` table."""

    status_file: str = "/var/lib/zrepl/status.json"  # world-readable, outside the 0700 runtime dir (status)
    runtime_dir: str = "/run/zrepl"
    logging: list[LoggingConfig] = field(default_factory=lambda: [LoggingConfig()])
    monitoring: list[MonitoringOutlet] = field(default_factory=list)
    status_thresholds: StatusThresholds = field(default_factory=StatusThresholds)
    control: ControlConfig = field(default_factory=ControlConfig)
    serve: GlobalServeConfig = field(default_factory=GlobalServeConfig)


@dataclass
class HookConfig:
    """A snapshot hook: `command`, `postgres-checkpoint` or `mysql-lock-tables`."""

    type: str
    filesystems: DatasetFilter
    err_is_fatal: bool = False
    timeout: float = 30.0
    path: str = ""
    dsn: str = ""


@dataclass
class SnapshottingConfig:
    """`snapshotting`: periodic (interval), cron (5- or 6-field spec) or manual."""

    type: str = "manual"
    prefix: str = ""
    interval: float = 0.0
    cron: CronSpec | None = None
    timestamp_format: str = "dense"
    timestamp_location: str = "UTC"
    hooks: list[HookConfig] = field(default_factory=list)


@dataclass
class BandwidthLimit:
    """Token bucket: `max` bytes per second (fractional: `23 bit` is 2.875), `bucket_capacity` bytes of burst."""

    max: float
    bucket_capacity: int


@dataclass
class SendConfig:
    """`send` options of push and source jobs (zfs send flags)."""

    encrypted: bool = False
    raw: bool = False
    send_properties: bool = False
    backup_properties: bool = False
    large_blocks: bool = False
    compressed: bool = False
    embedded_data: bool = False
    saved: bool = False
    bandwidth_limit: BandwidthLimit | None = None


@dataclass
class RecvConfig:
    """`recv` options of sink and pull jobs. `safe_properties` (recv.properties.safe, default on):
    what a received stream may not decide on this host (see receive_property_args)."""

    inherit: list[str] = field(default_factory=list)
    override: dict[str, str] = field(default_factory=dict)
    safe_properties: bool = True
    placeholder_encryption: str = "unspecified"
    bandwidth_limit: BandwidthLimit | None = None


@dataclass
class ReplicationConfig:
    """`replication`: protection levels, concurrency and the watchdog timeout."""

    protection_initial: str = "guarantee_resumability"
    protection_incremental: str = "guarantee_resumability"
    concurrency_steps: int = 1
    concurrency_size_estimates: int = 4
    timeout: float = 600.0
    # zrepl.py's (push): no new snapshots while a filesystem has failed to replicate for this long
    # (zrepl #808: snapshots piling up by the ten thousand); 0 keeps snapshotting
    pause_snapshotting_after: float = 0.0


@dataclass
class ConnectConfig:
    """`connect` of push and pull jobs: `local` or `ssh+stdinserver`."""

    type: str
    listener_name: str = ""
    client_identity: str = ""
    host: str = ""
    user: str = "root"
    port: int = 22
    identity_file: str = ""
    options: list[str] = field(default_factory=list)
    dial_timeout: float = 10.0
    ssh_command: str = "ssh"
    transport_open_command: list[str] = field(default_factory=list)  # zrepl's key, unused there too


@dataclass
class ServeConfig:
    """`serve` of sink and source jobs: `local` or `stdinserver`. `read_only` (sources): refuse every
    destroy a client asks for, so a compromised backup server cannot prune production."""

    type: str
    listener_name: str = ""
    client_identities: list[str] = field(default_factory=list)
    read_only: bool = False


@dataclass
class JobConfig:
    """One `[[jobs]]` entry. Fields that do not apply to the job's type keep their defaults."""

    name: str
    type: str
    filesystems: DatasetFilter | None = None
    snapshotting: SnapshottingConfig = field(default_factory=SnapshottingConfig)
    keep: list[Any] = field(default_factory=list)
    keep_sender: list[Any] = field(default_factory=list)
    keep_receiver: list[Any] = field(default_factory=list)
    connect: ConnectConfig | None = None
    serve: ServeConfig | None = None
    root_fs: str = ""
    interval: float | None = None  # pull jobs; None means manual
    send: SendConfig = field(default_factory=SendConfig)
    recv: RecvConfig = field(default_factory=RecvConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    initial_replication: str = "most_recent"
    path: str = ""  # key path, e.g. jobs[2], for messages


@dataclass
class Config:
    """A loaded, validated configuration."""

    file: str
    global_: GlobalConfig
    jobs: list[JobConfig]

    def job(self, name: str) -> JobConfig:
        for job in self.jobs:
            if job.name == name:
                return job
        raise ConfigError(f"no job named {shorten(name)} (jobs: {', '.join(j.name for j in self.jobs) or 'none'})",
                          file=self.file)


def source_abstraction_job(job: JobConfig, identity: str) -> str:
    """The job name a source writes into its holds and bookmarks for one client. With one client it
    is the job's own name (as zrepl does, so a source taken over from zrepl keeps its cursors);
    with several, each client gets `<job>:<identity>`, so one client's progress never releases
    another's cursor or step holds (zrepl shares them, zrepl issue #380)."""
    clients = job.serve.client_identities if job.serve is not None and job.serve.type == "stdinserver" else []
    return f"{job.name}:{identity}" if len(clients) > 1 else job.name


def replication_guards(config: Config) -> list[str]:
    """Every job name on this host whose unreplicated snapshots no pruning may destroy: push jobs
    with not_replicated in keep_sender, and each client of every source (see unreplicated_by)."""
    guards = []
    for job in config.jobs:
        if job.type == "push" and any(isinstance(r, KeepNotReplicated) for r in job.keep_sender):
            guards.append(job.name)
        elif job.type == "source" and job.serve is not None:
            clients = job.serve.client_identities if job.serve.type == "stdinserver" else [job.name]
            guards += sorted({source_abstraction_job(job, c) for c in clients})
    return guards


class _Table:
    """Reads one TOML table strictly: tracks the key path, checks types, rejects unknown keys.

    Errors are collected, not fatal: `collect()` records a ConfigError in the list shared by the
    whole config and goes on with the next key, so one pass reports every problem. Each table
    declares its keys (`allow`), so "valid keys here" lists all of them."""

    def __init__(self, data: Any, path: str, file: str, errors: list[ConfigError] | None = None):
        if not isinstance(data, dict):
            raise ConfigError(f"must be a table, got {_describe(data)}", path, file)
        self.data, self.path, self.file = data, path, file
        self.errors: list[ConfigError] = [] if errors is None else errors
        self.seen: set[str] = set()
        self.valid: set[str] = set()
        self.hints: dict[str, str] = {}

    def allow(self, *keys: str) -> None:
        self.valid.update(keys)

    def hint(self, key: str, message: str) -> None:
        """What to say when `key` is present but not valid here (a common mix-up)."""
        self.hints[key] = message

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as exc:
            self.errors.extend(exc.errors if isinstance(exc, ConfigErrors) else [exc])

    def key_path(self, key: str) -> str:
        shown = key if len(key) <= 60 and key.isprintable() else shorten(key, 40)
        return f"{self.path}.{shown}" if self.path else shown

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, self.key_path(key), self.file)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_TOML_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"must be {names}, got {_describe(value)}")
        return value

    def convert(self, key: str, kind: type | tuple[type, ...], fn: Callable[[Any], Any],
                default: Any = _REQUIRED) -> Any:
        if key not in self.data and default is not _REQUIRED:
            self.seen.add(key)
            return default
        value = self.get(key, kind)
        try:
            return fn(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        except (OverflowError, RecursionError) as exc:  # a value far outside any sensible range
            raise self.error(key, f"cannot be used: {shorten(value)} ({type(exc).__name__})") from None

    def choice(self, key: str, choices: Sequence[str], default: Any = _REQUIRED) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {shorten(value)}")
        return value

    def table(self, key: str) -> _Table | None:
        self.seen.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            header = _toml_header(self.key_path(key))
            raise self.error(key, f"must be a table, got an array of tables: write [{header}] (one pair of "
                                  f"brackets) or {key} = {{ ... }}")
        return _Table(value, self.key_path(key), self.file, self.errors)

    def tables(self, key: str) -> list[_Table]:
        """An array of tables; an entry that is not a table is an error of its own."""
        self.seen.add(key)
        if key not in self.data:
            return []
        items = self.data[key]
        if isinstance(items, dict):
            header = _toml_header(self.key_path(key))
            raise self.error(key, f"must be an array of tables, not a table: write [[{header}]] (two pairs of "
                                  f"brackets) before each entry, or {key} = [{{ ... }}, ...]")
        if not isinstance(items, list):
            raise self.error(key, f"must be an array of tables, got {_describe(items)}")
        tables = []
        for i, item in enumerate(items):
            with self.collect():
                tables.append(_Table(item, f"{self.key_path(key)}[{i}]", self.file, self.errors))
        return tables

    def finish(self, what: str = "") -> None:
        """Record an error for each key that is not valid here."""
        valid = self.valid | self.seen
        for key in self.data:
            if key not in valid:
                message = self.hints.get(key) or (
                    f"unknown key{what} (valid keys here: {', '.join(sorted(valid)) or 'none'})")
                self.errors.append(self.error(key, message))


_TOML_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "a table"}


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    names = {str: "string", int: "integer", float: "float", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    """A value for an error message in TOML words: `string 'x'`, `integer 5`, `an array`, `a table`."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, (str, int, float)):
        return f"{_toml_type(value)} {shorten(value)}"
    return f"a TOML {type(value).__name__} ({shorten(str(value))})"


def _toml_header(key_path: str) -> str:
    """jobs[2].snapshotting.hooks -> jobs.snapshotting.hooks (how a TOML table header spells it)."""
    return re.sub(r"\[\d+\]", "", key_path)


def find_config_file(explicit: str | None) -> str:
    """--config, then $ZREPL_CONFIG, then the standard locations."""
    if explicit is not None:
        if not explicit:
            raise ConfigError("--config: the file name is empty")
        return explicit
    if os.environ.get("ZREPL_CONFIG"):
        return os.environ["ZREPL_CONFIG"]
    for candidate in CONFIG_SEARCH_PATH:
        if os.path.exists(candidate):
            return candidate
    raise ConfigError(f"no config file found (tried --config, $ZREPL_CONFIG, {', '.join(CONFIG_SEARCH_PATH)})")


def load_config(path: str) -> Config:
    """Read and validate a config file; every problem is a ConfigError naming file and key path."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config: {getattr(exc, 'strerror', None) or exc}", file=path) from None
    return parse_config(raw.decode("utf-8", "replace"), path)


_YAML_LINE = re.compile(r"\s*(---\s*|-\s+\S.*|[A-Za-z_][\w-]*:(\s.*)?)")


def _looks_like_yaml(text: str, file: str) -> bool:
    if file.endswith((".yml", ".yaml")):
        return True
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return bool(_YAML_LINE.fullmatch(line))
    return False


def _nesting_too_deep(text: str) -> tuple[int, str] | None:
    """Where arrays/inline tables nest deeper than _MAX_TOML_NESTING: (line, key path of that
    line's key), else None. A light scan (strings and comments skipped), run before tomllib."""
    depth, line, i, n = 0, 1, 0, len(text)
    header, key, counts = "", "", dict[str, int]()
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j) and (len(quote) == 3 or text[j] != "\n"):
                j += 2 if c == '"' and text[j] == "\\" else 1
            line += text.count("\n", i, j)
            i = j if j >= n or text[j] == "\n" else j + len(quote)  # an unclosed string ends at its line
            continue
        elif depth == 0 and c == "[" and text[text.rfind("\n", 0, i) + 1:i].strip() == "":
            end = text.find("\n", i)
            raw = text[i:n if end < 0 else end].split("#")[0].strip()
            header = raw.strip("[] ")
            if raw.startswith("[["):
                counts[header] = counts.get(header, -1) + 1
            i = n if end < 0 else end
            continue
        elif depth == 0 and c == "=":
            key = text[text.rfind("\n", 0, i) + 1:i].strip().strip("\"'")
        elif c in "[{":
            depth += 1
            if depth > _MAX_TOML_NESTING:
                parts = header.split(".") if header else []
                where = ".".join(part + (f"[{counts[prefix]}]" if (prefix := ".".join(parts[:i + 1])) in counts else "")
                                 for i, part in enumerate(parts))
                return line, f"{where}.{key}" if where else key
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None


def _load_toml(text: str, file: str) -> dict[str, Any]:
    deep = _nesting_too_deep(text)
    if deep is not None:
        raise ConfigError(f"nested more than {_MAX_TOML_NESTING} levels deep (arrays or inline tables)",
                          deep[1], file, deep[0])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = int(m.group(1)) if m else None
        yaml = "this looks like YAML; zrepl.py reads TOML (see README: Coming from zrepl). " if _looks_like_yaml(
            text, file) else ""
        raise ConfigError(f"{yaml}TOML syntax error: {exc}", file=file, line=line) from None
    except RecursionError:
        raise ConfigError("TOML values nested too deeply", file=file) from None
    except ValueError as exc:  # tomllib: an integer of more than 4300 digits
        m = re.search(r"\d{4300}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
        raise ConfigError(f"a number is far too long: {str(exc).split(';')[0]}", file=file, line=line) from None


def parse_config(text: str, file: str = "<config>") -> Config:
    """Parse TOML text into a validated Config. Every problem is reported, each on its key path:
    one ConfigError, or a ConfigErrors with all of them."""
    data = _load_toml(text, file)
    errors: list[ConfigError] = []
    top = _Table(data, "", file, errors)
    top.allow("global", "jobs")
    top.hint("include", "zrepl's include is not supported: zrepl.py reads one file; copy the jobs of the "
                        "included files into it")
    global_ = GlobalConfig()
    with top.collect():
        gtable = top.table("global")
        if gtable:
            global_ = _parse_global(gtable)
    jobs: list[JobConfig] = []
    clean: list[JobConfig] = []  # jobs without errors: only they take part in cross-checks
    tables = 0
    with top.collect():
        for jt in top.tables("jobs"):
            tables += 1
            before = len(errors)
            with top.collect():
                job = _parse_job(jt)
                jobs.append(job)
                if len(errors) == before:
                    clean.append(job)
    top.finish()
    seen: dict[str, str] = {}
    for job in jobs:
        if job.name and job.name in seen:
            errors.append(ConfigError(f"job name {shorten(job.name)} is already used by {seen[job.name]}",
                                      f"{job.path}.name", file))
        seen.setdefault(job.name, job.path)
    errors += _check_replication_layout(clean, file)
    listed = top.data.get("jobs", [])
    every_job_read = isinstance(listed, list) and len(jobs) == tables == len(listed)
    errors += _check_local_listeners(clean, jobs, file, every_job_read)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return Config(file=file, global_=global_, jobs=jobs)


def _parse_global(t: _Table) -> GlobalConfig:
    g = GlobalConfig()
    t.allow("status_file", "runtime_dir", "logging", "monitoring", "status", "control", "serve")
    with t.collect():
        g.status_file = t.convert("status_file", str, _absolute_path, g.status_file)
    with t.collect():
        g.runtime_dir = t.convert("runtime_dir", str, _absolute_path, g.runtime_dir)
    with t.collect():
        if t.has("logging"):
            g.logging = []
            for lt in t.tables("logging"):
                with t.collect():
                    g.logging.append(_parse_logging_outlet(lt))
    with t.collect():
        g.monitoring = _parse_monitoring(t)
    with t.collect():
        st = t.table("status")
        if st:
            g.status_thresholds = _parse_status_thresholds(st)
    with t.collect():
        ct = t.table("control")
        if ct:
            ct.allow("sockpath")
            g.control.sockpath = ct.convert("sockpath", str, _absolute_path, g.control.sockpath)
            ct.finish()
    with t.collect():
        sv = t.table("serve")
        if sv:
            sv.allow("stdinserver")
            with sv.collect():
                si = sv.table("stdinserver")
                if si:
                    si.allow("sockdir")
                    g.serve.stdinserver_sockdir = si.convert("sockdir", str, _absolute_path,
                                                             g.serve.stdinserver_sockdir)
                    si.finish()
            sv.finish()
    t.finish()
    return g


def _parse_logging_outlet(t: _Table) -> LoggingConfig:
    t.allow("type", "level", "format")
    if t.get("type", str, "stderr") == "tcp":
        raise t.error("type", "zrepl's tcp log outlet is not supported by zrepl.py: use type = \"syslog\" (a local "
                              "syslog daemon can forward to a log server) or \"stderr\"")
    o = LoggingConfig(type=t.choice("type", ("stderr", "stdout", "syslog"), "stderr"))
    with t.collect():
        o.level = t.choice("level", LOG_LEVELS, o.level)
    with t.collect():
        o.format = t.choice("format", LOG_FORMATS, o.format)
    if o.type == "syslog":
        t.allow("facility", "retry_interval")
        with t.collect():
            o.facility = t.choice("facility", SYSLOG_FACILITIES, o.facility)
        with t.collect():
            o.retry_interval = t.convert("retry_interval", (str, int), _positive_duration, o.retry_interval)
    else:
        t.allow("time", "color")
        with t.collect():
            o.time = t.get("time", bool, True)
        with t.collect():
            o.color = t.get("color", bool, True)
    t.finish()
    return o


_THRESHOLDS_MOVED = ("the status thresholds moved to [global.status] (warn_no_success_after, crit_no_success_after); "
                     "global.monitoring is zrepl's array of monitoring outlets, e.g. "
                     "monitoring = [{ type = \"prometheus\", listen = \":9811\" }]")


def _parse_monitoring(t: _Table) -> list[MonitoringOutlet]:
    t.seen.add("monitoring")
    value = t.data.get("monitoring")
    if value is None:
        return []
    if isinstance(value, dict):
        if set(value) & {"warn_no_success_after", "crit_no_success_after"}:
            raise t.error("monitoring", _THRESHOLDS_MOVED)
        raise t.error("monitoring", "must be an array of monitoring outlets: write [[global.monitoring]] before each, "
                                    "or monitoring = [{ type = \"prometheus\", listen = \":9811\" }]")
    outlets = []
    for mt in t.tables("monitoring"):
        with t.collect():
            outlets.append(_parse_monitoring_outlet(mt))
    return outlets


def _parse_monitoring_outlet(t: _Table) -> MonitoringOutlet:
    t.allow("type")
    m = MonitoringOutlet(type=t.choice("type", ("prometheus", "textfile")))
    if m.type == "prometheus":
        t.allow("listen", "listen_freebind")
        with t.collect():
            m.listen = t.convert("listen", str, _host_port)
        with t.collect():
            m.listen_freebind = t.get("listen_freebind", bool, False)
    else:
        t.allow("path")
        with t.collect():
            m.path = t.convert("path", str, _absolute_path)
    t.finish()
    return m


_FRESHNESS_PAIRS = (("warn_snapshot_older_than", "crit_snapshot_older_than"),
                    ("warn_received_older_than", "crit_received_older_than"))


def _parse_status_thresholds(t: _Table) -> StatusThresholds:
    m = StatusThresholds()
    keys = [f.name for f in dataclasses.fields(StatusThresholds)]
    t.allow(*keys)
    for key in keys:
        with t.collect():
            setattr(m, key, t.convert(key, (str, int), parse_duration, getattr(m, key)))
    if m.crit_no_success_after < m.warn_no_success_after:
        t.errors.append(t.error("crit_no_success_after", "must not be shorter than warn_no_success_after"))
    for warn, crit in _FRESHNESS_PAIRS:
        if getattr(m, warn) and getattr(m, crit) and getattr(m, crit) < getattr(m, warn):
            t.errors.append(t.error(crit, f"must not be shorter than {warn}"))
    t.finish()
    return m


def _host_port(value: str) -> str:
    """zrepl's `listen` form: host:port, the host may be empty (all addresses) or [IPv6]."""
    host, colon, port = value.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port with a port from 1 to 65535 (e.g. ':9811'), got {shorten(value)}")
    if any(ch.isspace() or ord(ch) < 32 for ch in host) or ("]" in host and not host.startswith("[")):
        raise ValueError(f"invalid host in {shorten(value)}")
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {shorten(value)}")
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"must not contain control characters, got {shorten(value)}")
    return value


def _job_name(value: str) -> str:
    """zrepl's rule: a name ZFS accepts as a component of hold tags and bookmark names (spaces are
    fine), not reserved (no leading '_')."""
    problem = _job_name_problem(value)
    if problem:
        raise ValueError(f"job name {shorten(value)} is not usable as part of a ZFS name: {problem} "
                         "(it becomes part of hold tags and bookmark names)")
    if value.startswith("_"):
        raise ValueError(f"job name {shorten(value)} must not start with '_' (reserved for internal use, as in zrepl)")
    return value


_JOB_KEYS = {
    "snap": {"filesystems", "snapshotting", "pruning"},
    "push": {"connect", "filesystems", "send", "snapshotting", "pruning", "replication", "conflict_resolution"},
    "sink": {"serve", "root_fs", "recv"},
    "pull": {"connect", "root_fs", "interval", "recv", "pruning", "replication", "conflict_resolution"},
    "source": {"serve", "filesystems", "send", "snapshotting"},
}


def _parse_job(t: _Table) -> JobConfig:
    t.allow("name", "type")
    name = ""
    with t.collect():
        name = t.convert("name", str, _job_name)
    if not name and isinstance(t.data.get("name"), str):
        name = t.data["name"]  # for duplicate checks; its error is recorded
    jtype = t.choice("type", JOB_TYPES)  # without a type, nothing else can be judged
    job = JobConfig(name=name, type=jtype, path=t.path)
    allowed = _JOB_KEYS[jtype]
    t.allow(*allowed)
    if "filesystems" in allowed:
        with t.collect():
            job.filesystems = t.convert("filesystems", dict, DatasetFilter)
    if "root_fs" in allowed:
        with t.collect():
            job.root_fs = t.convert("root_fs", str, validate_dataset_name)
    if "snapshotting" in allowed:
        with t.collect():
            st = t.table("snapshotting")
            if st is None:
                raise t.error("snapshotting", "is required (use type = \"manual\" to take no snapshots)")
            job.snapshotting = _parse_snapshotting(st)
    if "pruning" in allowed:
        with t.collect():
            _parse_pruning(t, job)
    if "connect" in allowed:
        with t.collect():
            ct = t.table("connect")
            if ct is None:
                raise t.error("connect", "is required")
            job.connect = _parse_connect(ct)
    if "serve" in allowed:
        with t.collect():
            sv = t.table("serve")
            if sv is None:
                raise t.error("serve", "is required")
            job.serve = _parse_serve(sv, jtype)
    if "send" in allowed:
        with t.collect():
            se = t.table("send")
            if se:
                job.send = _parse_send(se)
    if "recv" in allowed:
        with t.collect():
            rt = t.table("recv")
            if rt:
                job.recv = _parse_recv(rt)
    if "replication" in allowed:
        with t.collect():
            rp = t.table("replication")
            if rp:
                job.replication = _parse_replication(rp, job.type)
    if "conflict_resolution" in allowed:
        with t.collect():
            cr = t.table("conflict_resolution")
            if cr:
                cr.allow("initial_replication")
                job.initial_replication = cr.choice("initial_replication", INITIAL_REPLICATION, "most_recent")
                cr.finish()
    if "interval" in allowed:
        with t.collect():
            value = t.get("interval", (str, int))
            job.interval = None if value == "manual" else t.convert("interval", (str, int), _positive_duration)
    t.finish(f" for a {jtype} job (valid keys: name, type, {', '.join(sorted(allowed))})")
    return job


def _parse_pruning(t: _Table, job: JobConfig) -> None:
    pt = t.table("pruning")
    if pt is None:
        raise t.error("pruning", "is required (an empty keep list keeps everything)")
    if job.type == "snap":
        pt.allow("keep")
        for key in ("keep_sender", "keep_receiver"):
            pt.hint(key, "snap jobs keep snapshots with `keep` (keep_sender and keep_receiver are for push and "
                         "pull jobs, which prune two sides)")
        with pt.collect():
            job.keep = _parse_keep_rules(pt, "keep", allow_not_replicated=False, job_type=job.type)
    else:
        pt.allow("keep_sender", "keep_receiver")
        pt.hint("keep", f"{job.type} jobs prune both sides: use keep_sender and keep_receiver "
                        "(`keep` is for snap jobs)")
        with pt.collect():
            job.keep_sender = _parse_keep_rules(pt, "keep_sender", allow_not_replicated=True, job_type=job.type)
        with pt.collect():
            job.keep_receiver = _parse_keep_rules(pt, "keep_receiver", allow_not_replicated=False,
                                                  job_type=job.type)
    pt.finish()


def _positive_duration(value: str | int) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {shorten(value)}")
    return seconds


def _zone_name(value: str) -> str:
    resolve_zone(value)
    return value


def _parse_snapshotting(t: _Table) -> SnapshottingConfig:
    t.allow("type")
    s = SnapshottingConfig(type=t.choice("type", ("periodic", "cron", "manual")))
    if s.type == "manual":
        t.finish(" (manual snapshotting takes no other key)")
        return s
    t.allow("prefix", "timestamp_format", "timestamp_location", "hooks", "interval" if s.type == "periodic" else "cron")
    prefix_ok = location_ok = False
    with t.collect():
        s.prefix = t.get("prefix", str)
        if not s.prefix:
            raise t.error("prefix", "must not be empty")
        try:
            validate_snapshot_short_name(s.prefix)
        except ValueError as exc:
            raise t.error("prefix", str(exc)) from None
        prefix_ok = True
    with t.collect():
        if s.type == "periodic":
            s.interval = t.convert("interval", (str, int), _positive_duration)
        else:
            s.cron = t.convert("cron", str, CronSpec.parse)
    with t.collect():
        s.timestamp_location = t.convert("timestamp_location", str, _zone_name, "UTC")
        location_ok = True
    with t.collect():
        s.timestamp_format = t.get("timestamp_format", str, "dense")
        if location_ok:
            try:
                validate_timestamp_format(s.timestamp_format, s.timestamp_location)
                if prefix_ok:
                    snapshot_name(s.prefix, s.timestamp_format, 0.0, s.timestamp_location)
            except ValueError as exc:
                raise t.error("timestamp_format", str(exc)) from None
    with t.collect():
        for h in t.tables("hooks"):
            with t.collect():
                s.hooks.append(_parse_hook(h))
    t.finish(f" for {s.type} snapshotting")
    return s


def _parse_hook(t: _Table) -> HookConfig:
    t.allow("type", "filesystems", "err_is_fatal", "timeout")
    htype = t.choice("type", ("command", "postgres-checkpoint", "mysql-lock-tables"))
    t.allow("path" if htype == "command" else "dsn")
    hook = HookConfig(type=htype, filesystems=DatasetFilter.accept_all())
    with t.collect():
        if htype != "command" and not t.has("filesystems"):
            raise t.error("filesystems", f"is required for {htype} hooks")
        hook.filesystems = t.convert("filesystems", dict, DatasetFilter, None) or DatasetFilter.accept_all()
    with t.collect():
        hook.err_is_fatal = t.get("err_is_fatal", bool, False)
    with t.collect():
        hook.timeout = t.convert("timeout", (str, int), _positive_duration, 30.0)
    with t.collect():
        if htype == "command":
            hook.path = t.convert("path", str, _absolute_path)
        else:
            hook.dsn = t.get("dsn", str)
    t.finish(f" for a {htype} hook")
    return hook


_KEEP_RULE_KEYS = {"not_replicated": ("keep_snapshot_at_cursor",), "last_n": ("count", "regex"),
                   "grid": ("grid", "regex"), "regex": ("regex", "negate")}


def _parse_keep_rules(t: _Table, key: str, allow_not_replicated: bool, job_type: str) -> list[Any]:
    if not t.has(key):
        t.seen.add(key)
        raise t.error(key, "is required (an empty list keeps every snapshot)")
    rules: list[KeepRule] = []
    for rt in t.tables(key):
        with t.collect():
            rules.append(_parse_keep_rule(rt, allow_not_replicated, job_type))
    return rules


def _parse_keep_rule(rt: _Table, allow_not_replicated: bool, job_type: str) -> KeepRule:
    rt.allow("type")
    rtype = rt.choice("type", tuple(_KEEP_RULE_KEYS))
    rt.allow(*_KEEP_RULE_KEYS[rtype])
    rule: KeepRule
    try:
        if rtype == "not_replicated":
            if not allow_not_replicated:
                where = "snap jobs (nothing is replicated)" if job_type == "snap" else "keep_receiver"
                raise rt.error("type", f"not_replicated is not allowed in {where}")
            rule = KeepNotReplicated(keep_snapshot_at_cursor=rt.get("keep_snapshot_at_cursor", bool, True))
        elif rtype == "last_n":
            count = rt.get("count", int)
            if count <= 0:
                raise rt.error("count", f"must be greater than 0, got {shorten(count)}")
            regex = rt.convert("regex", str, _regex, None)
            rule = KeepLastN(count=count, regex=regex)
        elif rtype == "grid":
            intervals = rt.convert("grid", str, parse_grid)
            rule = KeepGrid(intervals=tuple(intervals), regex=rt.convert("regex", str, _regex))
        else:
            rule = KeepRegex(regex=rt.convert("regex", str, _regex), negate=rt.get("negate", bool, False))
    except ValueError as exc:
        raise rt.error("type", str(exc)) from None
    rt.finish(f" for a {rtype} rule")
    return rule


def _regex(value: str) -> str:
    compile_regex(value)
    return value


_UNSUPPORTED_TRANSPORT = ("zrepl's {kind} transport is not supported by zrepl.py: use type = \"ssh+stdinserver\" "
                          "(see README: Remote replication over SSH) or \"local\"")


def _parse_connect(t: _Table) -> ConnectConfig:
    t.allow("type")
    if t.get("type", str) in ("tcp", "tls"):
        raise t.error("type", _UNSUPPORTED_TRANSPORT.format(kind=t.data["type"]))
    c = ConnectConfig(type=t.choice("type", ("local", "ssh+stdinserver")))
    if c.type == "local":
        t.allow("listener_name", "client_identity", "dial_timeout")
        with t.collect():
            c.listener_name = t.get("listener_name", str)
        with t.collect():
            c.client_identity = t.convert("client_identity", str, _identity)
        with t.collect():
            c.dial_timeout = t.convert("dial_timeout", (str, int), _positive_duration, 2.0)
        t.finish(" for a local connect")
        return c
    t.allow("host", "user", "port", "identity_file", "options", "dial_timeout", "ssh_command",
            "transport_open_command")
    with t.collect():
        c.host = t.convert("host", str, lambda v: _ssh_word("host", v))
    with t.collect():
        c.user = t.convert("user", str, lambda v: _ssh_word("user", v), "root")
    with t.collect():
        c.port = t.get("port", int, 22)
        if not 0 < c.port < 65536:
            raise t.error("port", f"must be between 1 and 65535, got {shorten(c.port)}")
    with t.collect():
        c.identity_file = t.convert("identity_file", str, _absolute_path)
    with t.collect():
        c.options = _string_list(t, "options", "a string like 'Compression=yes'")
    with t.collect():
        c.dial_timeout = t.convert("dial_timeout", (str, int), _positive_duration, 10.0)
    with t.collect():
        c.ssh_command = t.get("ssh_command", str, "ssh")
    with t.collect():
        c.transport_open_command = _string_list(t, "transport_open_command", "a string")
    t.finish(" for an ssh+stdinserver connect")
    return c


def _ssh_word(key: str, value: str) -> str:
    if not value or value.startswith("-") or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise ValueError(f"invalid {key} {shorten(value)}")
    return value


def _string_list(t: _Table, key: str, what: str) -> list[str]:
    items = t.get(key, list, [])
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"must be {what}, got {_describe(item)}", f"{t.key_path(key)}[{i}]", t.file)
    return list(items)


def _identity(value: str) -> str:
    """Client identities become a dataset name component on the sink."""
    if not value or "/" in value:
        raise ValueError(f"client identity {shorten(value)} must be a single dataset name component")
    validate_snapshot_short_name(value)  # same character rules as a single component
    return value


def _parse_serve(t: _Table, job_type: str) -> ServeConfig:
    t.allow("type")
    if t.get("type", str) in ("tcp", "tls"):
        raise t.error("type", _UNSUPPORTED_TRANSPORT.format(kind=t.data["type"]).replace(
            "ssh+stdinserver", "stdinserver"))
    s = ServeConfig(type=t.choice("type", ("local", "stdinserver")))
    if job_type == "source":
        t.allow("read_only")
        with t.collect():
            s.read_only = t.get("read_only", bool, False)
    if s.type == "local":
        t.allow("listener_name")
        with t.collect():
            s.listener_name = t.get("listener_name", str)
    else:
        t.allow("client_identities")
        with t.collect():
            ids = _string_list(t, "client_identities", "a string")
            if not ids:
                raise t.error("client_identities", "must list at least one identity")
            for i, ident in enumerate(ids):
                try:
                    _identity(ident)
                except ValueError as exc:
                    raise ConfigError(str(exc), f"{t.key_path('client_identities')}[{i}]", t.file) from None
            s.client_identities = ids
    t.finish(f" for a {s.type} serve")
    return s


def _parse_bandwidth(t: _Table | None) -> BandwidthLimit | None:
    """zrepl's bandwidth_limit: data-rate units (see parse_data_rate); a negative max means no limit."""
    if t is None:
        return None
    t.allow("max", "bucket_capacity")
    rate = t.convert("max", (str, int), parse_data_rate)
    capacity = t.convert("bucket_capacity", (str, int), parse_data_rate, None)
    if capacity is not None and capacity < 1:
        raise t.error("bucket_capacity", f"must be at least 1 byte, got {shorten(t.data['bucket_capacity'])}")
    t.finish()
    if rate < 0:
        return None
    if rate == 0:
        raise t.error("max", "must not be 0 (leave bandwidth_limit out, or set a negative value like '-1 B', "
                             "for no limit)")
    if rate < 1:
        raise t.error("max", f"is too small: at least one byte per second, got {shorten(t.data['max'])} "
                             f"({rate:g} bytes)")
    # zrepl's default burst is 128 KiB; at high rates 1/8 s of data keeps the pacer's wake-ups few.
    default_capacity = max(int(rate / 8), 128 * 1024)
    return BandwidthLimit(max=rate, bucket_capacity=default_capacity if capacity is None else int(capacity))


def _parse_send(t: _Table) -> SendConfig:
    s = SendConfig()
    flags = ("encrypted", "raw", "send_properties", "backup_properties", "large_blocks", "compressed",
             "embedded_data", "saved")
    t.allow(*flags, "bandwidth_limit")
    for key in flags:
        with t.collect():
            setattr(s, key, t.get(key, bool, False))
    with t.collect():
        s.bandwidth_limit = _parse_bandwidth(t.table("bandwidth_limit"))
    t.finish()
    return s


_PROPERTY_RE = re.compile(r"[a-z0-9_.:\-]+")


def _parse_recv(t: _Table) -> RecvConfig:
    r = RecvConfig()
    t.allow("properties", "placeholder", "bandwidth_limit")
    with t.collect():
        pt = t.table("properties")
        if pt:
            _parse_recv_properties(pt, r)
    with t.collect():
        ph = t.table("placeholder")
        if ph:
            ph.allow("encryption")
            r.placeholder_encryption = ph.choice("encryption", ("unspecified", "inherit", "off"), "unspecified")
            ph.finish()
    with t.collect():
        r.bandwidth_limit = _parse_bandwidth(t.table("bandwidth_limit"))
    t.finish()
    return r


def _parse_recv_properties(pt: _Table, r: RecvConfig) -> None:
    pt.allow("inherit", "override", "safe")
    with pt.collect():
        r.safe_properties = pt.get("safe", bool, True)
    with pt.collect():
        inherit = pt.get("inherit", list, [])
        for i, prop in enumerate(inherit):
            if not isinstance(prop, str) or not _PROPERTY_RE.fullmatch(prop):
                raise ConfigError(f"invalid property name {shorten(prop)}", f"{pt.key_path('inherit')}[{i}]", pt.file)
        r.inherit = list(inherit)
    with pt.collect():
        override = pt.get("override", dict, {})
        for prop, value in override.items():
            if not _PROPERTY_RE.fullmatch(prop):
                raise ConfigError(f"invalid property name {shorten(prop)}", pt.key_path("override"), pt.file)
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ConfigError(f"value must be a string or integer, got {_describe(value)}",
                                  f"{pt.key_path('override')}.{prop}", pt.file)
        r.override = {k: str(v) for k, v in override.items()}
    pt.finish()


def _parse_replication(t: _Table, job_type: str) -> ReplicationConfig:
    r = ReplicationConfig()
    t.allow("protection", "concurrency", "timeout")
    if job_type == "push":
        t.allow("pause_snapshotting_after")
        with t.collect():
            r.pause_snapshotting_after = t.convert("pause_snapshotting_after", (str, int), parse_duration, 0.0)
    with t.collect():
        pt = t.table("protection")
        if pt:
            pt.allow("initial", "incremental")
            with pt.collect():
                r.protection_initial = pt.choice("initial", PROTECTION_LEVELS, r.protection_initial)
            with pt.collect():
                r.protection_incremental = pt.choice("incremental", PROTECTION_LEVELS, r.protection_incremental)
            pt.finish()
    with t.collect():
        ct = t.table("concurrency")
        if ct:
            ct.allow("steps", "size_estimates")
            for key, attr in (("steps", "concurrency_steps"), ("size_estimates", "concurrency_size_estimates")):
                with ct.collect():
                    value = ct.get(key, int, getattr(r, attr))
                    if value < 1:
                        raise ct.error(key, f"must be at least 1, got {shorten(value)}")
                    setattr(r, attr, value)
            ct.finish()
    with t.collect():
        r.timeout = t.convert("timeout", (str, int), _positive_duration, r.timeout)
    t.finish()
    return r


def _filter_reaches(filt: DatasetFilter, root: str) -> bool:
    """Whether a filesystems filter accepts `root` or could accept something below it that no
    pattern names: a child decided by the longest subtree pattern above it (so `"<" = true` with
    `"root<" = false` does not reach). Datasets an accepting pattern names below root are a
    deliberate relay, see _filter_names_below."""
    return filt.accepts(root) or filt.accepts(f"{root}/\x00")  # NUL: a child no pattern can name


def _filter_names_below(filt: DatasetFilter, root: str) -> bool:
    """Whether an accepting pattern names a dataset below `root` (a relay of received replicas)."""
    return any(accept and is_descendant(pattern.rstrip("<"), root) for pattern, accept in filt.patterns.items())


def _check_replication_layout(jobs: list[JobConfig], file: str) -> list[ConfigError]:
    """Refuse layouts where one job's replicas can be mistaken for, or pruned as, another's (checked
    for the jobs that parsed without errors)."""
    errors: list[ConfigError] = []
    receivers = [(j, j.root_fs) for j in jobs if j.type in ("sink", "pull") and j.root_fs]
    for i, (a, ra) in enumerate(receivers):
        for b, rb in receivers[i + 1:]:
            if is_descendant(ra, rb, include_self=True) or is_descendant(rb, ra, include_self=True):
                errors.append(ConfigError(
                    f"root_fs {shorten(rb)} overlaps root_fs {shorten(ra)} of {a.type} job {shorten(a.name)}: two "
                    f"jobs receiving into one subtree would take each other's replicas for their own",
                    f"{b.path}.root_fs", file))
    for job in jobs:
        if job.filesystems is None or job.type not in ("push", "snap", "source"):
            continue
        for receiver, root in receivers:
            if _filter_reaches(job.filesystems, root):
                errors.append(ConfigError(
                    f"the filter selects datasets at or below {shorten(root)}, the root_fs of {receiver.type} job "
                    f"{shorten(receiver.name)}: this job would snapshot, send or prune its replicas; add "
                    f"\"{root}<\" = false", f"{job.path}.filesystems", file))
                break
            # Naming replicas explicitly relays them onward (A -> B -> C); a snapshot taken on a
            # replica would make its next incremental receive fail, so a relay must not snapshot.
            if _filter_names_below(job.filesystems, root) and job.snapshotting.type != "manual":
                errors.append(ConfigError(
                    f"the filter names datasets below {shorten(root)}, the root_fs of {receiver.type} job "
                    f"{shorten(receiver.name)}, and snapshotting is {shorten(job.snapshotting.type)}: a snapshot "
                    f"taken on a replica breaks its next receive; relay replicas with snapshotting type = \"manual\"",
                    f"{job.path}.snapshotting.type", file))
                break
    served: dict[str, JobConfig] = {}
    connected: dict[str, JobConfig] = {}
    for job in jobs:
        if job.serve is not None and job.serve.type == "local":
            name = job.serve.listener_name
            if name in served:
                errors.append(ConfigError(f"listener {shorten(name)} is already served by job "
                                          f"{shorten(served[name].name)}", f"{job.path}.serve.listener_name", file))
            served.setdefault(name, job)
        if job.connect is not None and job.connect.type == "local":
            # The served side keys a client's subtree (sink) or holds (source) by its identity.
            key = f"{job.connect.listener_name}\x00{job.connect.client_identity}"
            if key in connected:
                errors.append(ConfigError(f"job {shorten(connected[key].name)} already connects to local listener "
                                          f"{shorten(job.connect.listener_name)} as client "
                                          f"{shorten(job.connect.client_identity)}: two jobs with one identity would "
                                          f"share one subtree and set of holds; give each its own client_identity",
                                          f"{job.path}.connect.client_identity", file))
            connected.setdefault(key, job)
    names = {j.name: j for j in jobs}
    for job in jobs:
        if job.type == "source" and job.serve is not None and job.serve.type == "stdinserver":
            for ident in job.serve.client_identities:
                derived = source_abstraction_job(job, ident)
                if derived != job.name and derived in names:
                    errors.append(ConfigError(f"client {shorten(ident)} gets the hold and bookmark name "
                                              f"{shorten(derived)}, which is also the name of job {shorten(derived)}: "
                                              f"rename one", f"{job.path}.serve.client_identities", file))
    return errors


def _check_local_listeners(clean: list[JobConfig], jobs: list[JobConfig], file: str,
                           every_job_read: bool) -> list[ConfigError]:
    """Every local connect must name a local serve in the same config. Checked for jobs that parsed
    without errors; a listener that a job with errors may serve is not judged."""
    errors = []
    listeners = {j.serve.listener_name: j for j in clean if j.serve and j.serve.type == "local"}
    clean_paths = {j.path for j in clean}
    broken = [j for j in jobs if j.path not in clean_paths]
    unsure = not every_job_read or any(j.type in ("sink", "source") and j.serve is None for j in broken)
    maybe_served = {j.serve.listener_name for j in broken if j.serve}
    for job in clean:
        if not (job.connect and job.connect.type == "local"):
            continue
        name = job.connect.listener_name
        target = listeners.get(name)
        if target is None:
            if not unsure and name not in maybe_served:
                errors.append(ConfigError(f"no sink or source job serves local listener {shorten(name)}",
                                          f"{job.path}.connect.listener_name", file))
            continue
        wanted = "sink" if job.type == "push" else "source"
        if target.type != wanted:
            errors.append(ConfigError(f"a {job.type} job must connect to a {wanted}, but listener {shorten(name)} "
                                      f"is served by {target.type} job {shorten(target.name)}",
                                      f"{job.path}.connect.listener_name", file))
    return errors


# =================================================================================================
# 5. ZFS command layer
# =================================================================================================

class VersionKind(enum.StrEnum):
    SNAPSHOT = "snapshot"
    BOOKMARK = "bookmark"


@dataclass(frozen=True, slots=True)
class Version:
    """One snapshot or bookmark of a dataset, as listed by `zfs list -Hp -t snapshot,bookmark`.
    Slotted: a listing of 100,000 snapshots holds 100,000 of them (no __dict__ each)."""

    dataset: str
    name: str  # the part after '@' or '#'
    kind: str  # a VersionKind ("snapshot" or "bookmark"; plain strings compare equal)
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


class ZfsErrorKind(enum.StrEnum):
    """What a failed zfs command says, as far as callers decide on it (classify_zfs_error)."""

    NOT_EXIST = "not-exist"
    EXISTS = "exists"
    BUSY = "busy"
    NO_SPACE = "no-space"
    PERMISSION = "permission"
    RESUME_TOKEN = "resume-token"
    DIVERGED = "diverged"
    MODIFIED = "modified"  # the receiver was written to since its newest snapshot
    ENCRYPTED_OVERWRITE = "encrypted-overwrite"  # recv -F would replace an encrypted dataset
    BAD_TOKEN = "bad-token"  # a resume token zfs cannot decode
    TIMEOUT = "timeout"
    OTHER = "other"


# Retrying within the run cannot help these: a human has to act (or space has to be freed).
_PERMANENT_ZFS_KINDS = frozenset({ZfsErrorKind.PERMISSION, ZfsErrorKind.NO_SPACE, ZfsErrorKind.DIVERGED,
                                  ZfsErrorKind.MODIFIED, ZfsErrorKind.ENCRYPTED_OVERWRITE, ZfsErrorKind.BAD_TOKEN})


class ZfsError(ZreplError):
    """A failed zfs/zpool command, classified (`kind`, a ZfsErrorKind) so callers can decide."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, kind: str = ""):
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr.strip()
        self.kind = ZfsErrorKind(kind) if kind else classify_zfs_error(self.stderr)
        self.temporary = self.kind not in _PERMANENT_ZFS_KINDS
        super().__init__(str(self))

    def __str__(self) -> str:
        status = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return f"`{shlex.join(self.argv)}` failed ({status}, {self.kind}): {self.stderr or '(no stderr)'}"


_ERROR_PATTERNS = (
    # `zfs recv -F` refusing to replace an encrypted dataset (OpenZFS 2.x libzfs_sendrecv.c):
    # "cannot receive new filesystem stream: zfs receive -F cannot be used to destroy an encrypted
    # filesystem or overwrite an unencrypted one with an encrypted one"
    ("encrypted-overwrite", ("cannot be used to destroy an encrypted filesystem",
                             "overwrite an unencrypted one with an encrypted one")),
    # "destination 'p/x' has been modified since most recent snapshot"
    ("modified", ("has been modified since most recent snapshot",)),
    # `zfs release` of a tag that is not there: "cannot release hold from snapshot ...: no such tag on
    # this dataset" (the hold is gone already: for a release that is success)
    ("not-exist", ("does not exist", "no such pool", "no such dataset", "could not find any snapshots",
                   "no such file or directory", "no such tag on this dataset")),
    # a held snapshot: "cannot destroy snapshot ...: it's being held. Run 'zfs holds -r ...'" (2.1, 2.3)
    ("busy", ("dataset is busy", "pool or dataset is busy", "is busy", "being held")),
    ("exists", ("already exists", "bookmark exists")),
    ("no-space", ("out of space", "no space left", "quota exceeded")),
    ("permission", ("permission denied", "operation not permitted", "insufficient privileges")),
    ("resume-token", ("resume token", "kernel modules must be upgraded to receive this stream",
                      "resuming stream", "contains partially-complete state")),
    ("diverged", ("has been modified", "destination has snapshots", "most recent snapshot of",
                  "does not match incremental source")),
)


def says_only_not_exist(stderr: str) -> bool:
    """Whether every line of a failed command's stderr says "not there" (a batched release names
    each snapshot on a line of its own; one "no such tag" must not hide a permission error)."""
    patterns = dict(_ERROR_PATTERNS)["not-exist"]
    lines = [line for line in stderr.lower().splitlines() if line.strip()]
    return bool(lines) and all(any(p in line for p in patterns) for line in lines)


def classify_zfs_error(stderr: str) -> ZfsErrorKind:
    """Map zfs stderr text to an error kind (first matching pattern wins). Whitespace is folded:
    OpenZFS breaks some messages across lines ("has been modified\nsince most recent snapshot")."""
    text = " ".join(stderr.lower().split())
    for kind, patterns in _ERROR_PATTERNS:
        if any(p in text for p in patterns):
            return ZfsErrorKind(kind)
    return ZfsErrorKind.OTHER


PLACEHOLDER_PROPERTY = "zrepl:placeholder"  # `on`, set locally: an empty stand-in a receive may replace

# Properties read by the one listing. No user property among them: `zfs list -H` prints values
# raw, so a value with a TAB or a NEWLINE (anyone with `zfs allow userprop`, or a received stream,
# can set one) would shift the columns or forge whole rows (fake snapshots that push real ones
# out of last_n). Every column here is constrained by ZFS itself; placeholders are asked for
# separately (Zfs.local_placeholders), in a form a value cannot forge.
# Only what a decision reads: name, guid, createtxg (OpenZFS's fast path), type (filesystem or
# volume), creation (keep rules, due-ness), userrefs (held snapshots), receive_resume_token and
# encryption (the receiver's resume and -F checks). No column beyond the fast path's three is free,
# so none rides along for display (bench/listing_cost.py measures each).
LIST_PROPERTIES = ("name", "type", "guid", "createtxg", "creation", "userrefs", "receive_resume_token",
                   "encryption")


def zfs_list_argv(roots: Sequence[str], properties: Sequence[str] = LIST_PROPERTIES,
                  types: str = "filesystem,volume,snapshot,bookmark", depth: int | None = None) -> list[str]:
    """One recursive listing of everything under the given roots (all pools when roots is empty).
    depth=1 stops at each root's own snapshots and bookmarks (and its direct children)."""
    limit = ["-d", str(depth)] if depth is not None else ["-r"]
    return ["zfs", "list", "-H", "-p", *limit, "-t", types, "-o", ",".join(properties), *roots]


class ListingValues:
    """One object per distinct value a listing repeats, so 100,000 versions do not carry 100,000
    copies of it. A recursive snapshot gives every filesystem the same short name, createtxg and
    creation, and a replica has its sender's names: names are interned process-wide (the sender's
    listing, the sink's and the client's copy of it share them; sys.intern forgets a string once
    nothing uses it), numbers within one listing (a dict that goes with it). Values only, never
    decisions: an equal object stands in for an equal object."""

    def __init__(self) -> None:
        self._numbers: dict[int, int] = {}

    @staticmethod
    def name(text: str) -> str:
        return sys.intern(text)

    def number(self, value: int) -> int:
        return self._numbers.setdefault(value, value)


# str.splitlines() breaks lines at these as well as at "\n"; zfs never prints them, and a text
# that has one is split by splitlines() itself, so every text is cut exactly as before
_OTHER_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _lines(text: str) -> Iterator[str]:
    """text.splitlines(), a line at a time: 100,000 lines are not held as a list beside the text."""
    if _OTHER_LINE_BREAKS.search(text):
        yield from text.splitlines()
        return
    start = 0
    while (end := text.find("\n", start)) >= 0:
        yield text[start:end]
        start = end + 1
    if start < len(text):
        yield text[start:]


def sort_versions(ds: DatasetInfo) -> None:
    """The one order of a dataset's versions: createtxg, a bookmark before its snapshot, then name."""
    ds.versions.sort(key=lambda v: (v.createtxg, v.kind == "snapshot", v.name))


def parse_zfs_list(output: str, properties: Sequence[str] = LIST_PROPERTIES) -> dict[str, DatasetInfo]:
    """Parse `zfs list -Hp` output into datasets with their versions sorted by createtxg.

    Unset properties ("-") are omitted from props. Versions of datasets not in the listing are
    dropped (they cannot happen with -r, but a racing create must not crash the parser).
    """
    datasets: dict[str, DatasetInfo] = {}
    versions: list[Version] = []
    dataset_names: dict[str, str] = {}
    shared = ListingValues()
    for line in _lines(output):
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != len(properties):
            raise ValueError(f"unexpected zfs list line with {len(cols)} columns, wanted {len(properties)}: {line!r}")
        row = dict(zip(properties, cols, strict=True))
        name, kind = row["name"], row["type"]
        if not _plausible_row(row):
            log.warning("ignoring an unexpected zfs list line: %.200r", line)
            continue
        if kind in ("filesystem", "volume"):
            props = {k: v for k, v in row.items() if k not in ("name", "type", "guid", "createtxg") and v != "-"}
            datasets[name] = DatasetInfo(name=name, type=kind, guid=_int(row.get("guid")),
                                         createtxg=_int(row.get("createtxg")), props=props)
        elif kind in ("snapshot", "bookmark"):
            kind = "snapshot" if kind == "snapshot" else "bookmark"  # the constant, not the row's copy
            sep = "@" if kind == "snapshot" else "#"
            dataset, _, short = name.partition(sep)
            dataset = dataset_names.setdefault(dataset, dataset)  # one string per dataset, not per row
            versions.append(Version(dataset=dataset, name=shared.name(short), kind=kind, guid=_int(row.get("guid")),
                                    createtxg=shared.number(_int(row.get("createtxg"))),
                                    creation=shared.number(_int(row.get("creation"))),
                                    userrefs=_int(row.get("userrefs"))))
    for v in versions:
        if v.dataset in datasets:
            datasets[v.dataset].versions.append(v)
    for ds in datasets.values():
        sort_versions(ds)
    return datasets


_NUMERIC_COLUMNS = ("guid", "createtxg", "creation", "userrefs")


def _plausible_row(row: dict[str, str]) -> bool:
    """Every column of a row is what ZFS can print there (a name, a number or "-", a token)."""
    try:
        if row["type"] in ("filesystem", "volume"):
            validate_dataset_name(row["name"])
        elif row["type"] in ("snapshot", "bookmark"):
            split_version_name(row["name"])
        else:
            return False
    except ValueError:
        return False
    if any(not (row[c] == "-" or row[c].isdigit()) for c in _NUMERIC_COLUMNS if c in row):
        return False
    token = row.get("receive_resume_token", "-")
    return token in ("-", "") or re.fullmatch(r"[0-9a-zA-Z-]+", token) is not None


def _int(text: str | None) -> int:
    try:
        return int(text) if text not in (None, "-", "") else 0
    except ValueError:
        return 0


# -- the snapshots_changed listing cache -----------------------------------------------------------
# OpenZFS 2.2 added `snapshots_changed`: when a dataset's own list of snapshots last changed. A run
# then lists the filesystems (and the bookmarks, which are never cached) in one cheap command and
# the snapshots only of the datasets whose value moved since a cached listing; the others' come
# from a file of the runtime dir. What tests/zfs/test_listing_cache_zfs.py found on OpenZFS 2.3
# decides what the cache may answer:
# - the value moves when a snapshot is created, destroyed, renamed, received or rolled back, to the
#   whole second of the change; two changes in one second leave one value, so a cached list is
#   trusted only if its value is OLDER than the second its listing began;
# - it does not move for holds or bookmarks: bookmarks are listed fresh every time; the cached
#   snapshots that were held are asked `zfs holds` again (our own holds and releases drop the
#   dataset from the cache before they run, so a crash cannot leave a stale answer); a hold placed
#   by another tool since shows up where it matters, as "dataset is busy" when pruning;
# - a promote moves the old origin's value, not the clone's (which gained snapshots): the clone's
#   `origin` changes, so the stamp includes it; a renamed or re-created dataset is another name or
#   another guid.
# A missing, corrupt or foreign file means a full listing, and so does OpenZFS before 2.2.
LISTING_CACHE_FORMAT = "zrepl.py listing cache 1"
LISTING_CACHE_COLUMNS = (*LIST_PROPERTIES, "origin", "snapshots_changed")
# Below this many snapshots one plain listing costs less than the cache's extra commands (the
# snapshots of changed datasets and `zfs holds`), so small pools keep their one spawn per side.
LISTING_CACHE_MIN_SNAPSHOTS = 1000


def listing_cache_min_snapshots() -> int:
    """LISTING_CACHE_MIN_SNAPSHOTS, unless ZREPL_LISTING_CACHE_MIN_SNAPSHOTS says otherwise (the
    real-ZFS tests: a cached side at a size the test guest builds in seconds)."""
    text = os.environ.get("ZREPL_LISTING_CACHE_MIN_SNAPSHOTS", "")
    return int(text) if text.isdigit() else LISTING_CACHE_MIN_SNAPSHOTS


@dataclass(frozen=True, slots=True)
class SnapshotsStamp:
    """What the cheap listing says about one dataset's own list of snapshots."""

    guid: int
    snapshots_changed: int  # unix seconds of the last change; 0 for "-" (never changed)
    origin: str  # "" unless a clone


@dataclass(slots=True)
class CachedSnapshots:
    """One dataset's snapshots as a listing that began at `listed_at` saw them, with its stamp."""

    stamp: SnapshotsStamp
    listed_at: float
    snapshots: list[Version]


def stale_snapshot_lists(cached: dict[str, CachedSnapshots], current: dict[str, SnapshotsStamp],
                         now: float) -> set[str]:
    """The datasets of `current` whose snapshots the cache cannot answer: they are listed again.
    Trusted: the same stamp (guid, value, origin) with a value older than the second in which the
    cached listing began. A clock gone back since that listing trusts nothing of it."""
    stale = set()
    for name, stamp in current.items():
        entry = cached.get(name)
        if (entry is None or entry.stamp != stamp or now < entry.listed_at
                or stamp.snapshots_changed >= int(entry.listed_at)):
            stale.add(name)
    return stale


def take_stamps(listing: dict[str, DatasetInfo]) -> dict[str, SnapshotsStamp]:
    """Move the cache's two columns out of a LISTING_CACHE_COLUMNS listing's props (no decision
    reads them there) into stamps."""
    stamps = {}
    for name, ds in listing.items():
        changed, origin = ds.props.pop("snapshots_changed", "-"), ds.props.pop("origin", "")
        stamps[name] = SnapshotsStamp(ds.guid, _int(changed), origin)
    return stamps


class ListingCache:
    """The snapshots of each dataset as a run last listed them, in one file per job and side
    below the runtime dir. It only ever saves work: every answer it gives is checked against the
    stamps of the current listing (stale_snapshot_lists) and its held snapshots against `zfs
    holds`; anything unexpected in the file (another format or owner, a bad line) discards it all.

    JSON lines: a header naming the format and the owner, one line per dataset, and lines
    `{"forget": [...]}` appended (and synced) before our own holds or releases on those datasets
    (Zfs.hold and friends call forget). A read-only cache (a dry run) answers but never writes."""

    def __init__(self, path: str, owner: str, *, writable: bool = True, min_snapshots: int | None = None):
        self.path, self.owner, self.writable = path, owner, writable
        self.min_snapshots = listing_cache_min_snapshots() if min_snapshots is None else min_snapshots
        self._lock = threading.Lock()
        self._in_file: set[str] = set()
        self._forgotten: list[str] = []  # every dataset forget() was told of, in order (see mark)

    @classmethod
    def for_owner(cls, runtime_dir: str, owner: str, *, writable: bool = True) -> ListingCache:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", owner)[:80]
        name = f"{safe}-{zlib.crc32(owner.encode()):08x}.jsonl"
        return cls(os.path.join(runtime_dir, "listings", name), owner, writable=writable)

    def load(self) -> dict[str, CachedSnapshots]:
        """The cached entries; {} for a missing, unreadable, corrupt or foreign file."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "r", encoding="utf-8") as f:
                    entries = self._parse(f)
            except FileNotFoundError:
                entries = {}
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                log.info("ignoring the listing cache %s (a full listing instead): %s", self.path, exc)
                entries = {}
            self._in_file = set(entries)
            return entries

    def _parse(self, lines: Iterable[str]) -> dict[str, CachedSnapshots]:
        it = iter(lines)
        header = json.loads(next(it, "null"))
        if header != {"format": LISTING_CACHE_FORMAT, "owner": self.owner}:
            raise ValueError(f"not this job's cache (header {str(header)[:200]})")
        entries: dict[str, CachedSnapshots] = {}
        for line in it:
            row = json.loads(line)
            if set(row) == {"forget"}:
                for name in row["forget"]:
                    entries.pop(str(name), None)
                continue
            name = validate_dataset_name(row["name"])
            stamp = SnapshotsStamp(_count(row["guid"]), _count(row["changed"]), str(row["origin"]))
            if stamp.origin:
                split_version_name(stamp.origin)
            snaps = [Version(dataset=name, name=validate_snapshot_short_name(s), kind="snapshot", guid=_count(g),
                             createtxg=_count(t), creation=_count(c), userrefs=_count(u))
                     for s, g, t, c, u in row["snapshots"]]
            listed_at = row["listed_at"]
            if not isinstance(listed_at, (int, float)) or listed_at <= 0:
                raise ValueError(f"bad listed_at for {name}")
            entries[name] = CachedSnapshots(stamp, float(listed_at), snaps)
        return entries

    def mark(self) -> int:
        """Taken before a listing's commands: store(entries, mark) leaves out the datasets whose
        holds changed since (a parallel lane's hold between this listing and its store)."""
        with self._lock:
            return len(self._forgotten)

    def store(self, entries: dict[str, CachedSnapshots], mark: int | None = None) -> None:
        """Replace the file (atomically) with these entries. A failure costs the next run a full
        listing, nothing else: it is logged, not raised."""
        if not self.writable:
            return
        with self._lock:
            if mark is not None and mark < len(self._forgotten):
                changed = set(self._forgotten[mark:])
                entries = {name: e for name, e in entries.items() if name not in changed}
            tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps({"format": LISTING_CACHE_FORMAT, "owner": self.owner}) + "\n")
                    for name, e in entries.items():
                        f.write(json.dumps({"name": name, "guid": e.stamp.guid, "changed": e.stamp.snapshots_changed,
                                            "origin": e.stamp.origin, "listed_at": e.listed_at,
                                            "snapshots": [[v.name, v.guid, v.createtxg, v.creation, v.userrefs]
                                                          for v in e.snapshots]}) + "\n")
                os.replace(tmp, self.path)
                self._in_file = set(entries)
            except OSError as exc:
                log.warning("cannot write the listing cache %s (the next run lists everything): %s", self.path, exc)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def forget(self, datasets: Iterable[str]) -> None:
        """Drop datasets from the file before their holds change (holds do not move
        snapshots_changed): appended and synced, so a crash right after still lists them again."""
        with self._lock:
            datasets = set(datasets)
            self._forgotten.extend(datasets)
            gone = sorted(self._in_file.intersection(datasets))
            if not gone or not self.writable:
                return
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.write(fd, (json.dumps({"forget": gone}) + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._in_file.difference_update(gone)
            except FileNotFoundError:
                self._in_file.clear()
            except OSError as exc:  # the cache must not outlive a hold it does not know: remove it
                log.warning("cannot update the listing cache %s, removing it: %s", self.path, exc)
                try:
                    os.unlink(self.path)
                    self._in_file.clear()
                except FileNotFoundError:
                    self._in_file.clear()
                except OSError:
                    raise ZreplError(f"the listing cache {self.path} can be neither updated nor removed: "
                                     f"{exc}") from exc


def _count(value: Any) -> int:
    """A non-negative integer from a cache file (JSON), or ValueError."""
    if type(value) is not int or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


class _NoSnapshotsChanged(Exception):
    """`zfs list` does not know snapshots_changed (userland older than 2.2): list without a cache."""


def openzfs_module_version(path: str = "/sys/module/zfs/version") -> tuple[int, int] | None:
    """The loaded OpenZFS kernel module's (major, minor) on Linux, None where it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            m = re.match(r"(\d+)\.(\d+)", f.read())
    except (OSError, ValueError):
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_roots_for_filter(filt: DatasetFilter | None, extra: Iterable[str] = ()) -> list[str]:
    """The smallest set of roots whose recursive listing covers every dataset a filter can accept.

    An empty list means all pools. Roots are pool names: listing a whole pool in one spawn is cheap,
    and covering patterns at pool level keeps the spawn count independent of the dataset count.
    """
    names: set[str] = set(extra)
    if filt is not None:
        for pattern, accept in filt.patterns.items():
            if not accept:
                continue
            if pattern == "<":
                return []
            names.add(pattern.rstrip("<"))
    return sorted({n.split("/")[0] for n in names})


def snapshot_argv(full_names: Sequence[str]) -> list[str]:
    """`zfs snapshot` of several datasets in one pool: atomic, one transaction group."""
    return ["zfs", "snapshot", *full_names]


def destroy_snapshots_argv(dataset: str, short_names: Sequence[str], dry_run: bool = False) -> list[str]:
    """`zfs destroy fs@a,b,c`: one command for a batch of one dataset's snapshots."""
    argv = ["zfs", "destroy"]
    if dry_run:
        argv.append("-nv")
    return argv + [f"{dataset}@{','.join(short_names)}"]


def holds_argv(full_names: Sequence[str]) -> list[str]:
    return ["zfs", "holds", "-H", *full_names]


def parse_holds(output: str) -> dict[str, list[str]]:
    """`zfs holds -H` lines (name, tag, timestamp) -> snapshot -> tags."""
    holds: dict[str, list[str]] = {}
    for line in output.splitlines():
        cols = line.split("\t")
        if len(cols) >= 2:
            holds.setdefault(cols[0], []).append(cols[1])
    return holds


def hold_argv(tag: str, full_names: Sequence[str]) -> list[str]:
    return ["zfs", "hold", tag, *full_names]


def release_argv(tag: str, full_names: Sequence[str]) -> list[str]:
    return ["zfs", "release", tag, *full_names]


def bookmark_argv(source: str, bookmark: str) -> list[str]:
    return ["zfs", "bookmark", source, bookmark]


@dataclass(frozen=True)
class SendFlags:
    """zfs send flags from a job's `send` settings (zrepl's key names)."""

    raw: bool = False  # -w
    send_properties: bool = False  # -p
    backup_properties: bool = False  # -b
    large_blocks: bool = False  # -L
    compressed: bool = False  # -c
    embedded_data: bool = False  # -e
    saved: bool = False  # -S

    def argv(self) -> list[str]:
        pairs = (("-w", self.raw), ("-p", self.send_properties), ("-b", self.backup_properties),
                 ("-L", self.large_blocks), ("-c", self.compressed), ("-e", self.embedded_data),
                 ("-S", self.saved))
        return [flag for flag, on in pairs if on]


def send_argv(to: str, from_: str | None = None, *, multi: bool = False, flags: SendFlags = SendFlags(),
              resume_token: str | None = None, estimate: bool = False) -> list[str]:
    """`zfs send` for a full (no from_), incremental (-i) or multi-snapshot (-I) stream, or a resume (-t).

    With estimate, `-n -v -P` prints the expected size instead of sending.
    """
    argv = ["zfs", "send"]
    if estimate:
        argv += ["-n", "-v", "-P"]
    if resume_token:
        # Flags are part of the token; -t takes none of the stream options.
        return argv + ["-t", resume_token]
    argv += flags.argv()
    if from_ is not None:
        argv += ["-I" if multi else "-i", from_]
    return argv + [to]


def parse_send_estimate(output: str) -> int | None:
    """Bytes from `zfs send -nvP` output (the `size` line; older releases print only per-snapshot lines)."""
    total = None
    for line in output.splitlines():
        cols = line.split("\t")
        if cols[0] == "size" and len(cols) >= 2 and cols[1].isdigit():
            return int(cols[1])
        if cols[0] in ("full", "incremental") and cols[-1].isdigit():
            total = (total or 0) + int(cols[-1])
    return total


def recv_argv(target: str, *, resumable: bool = True, force: bool = False, inherit: Sequence[str] = (),
              override: dict[str, str] | None = None) -> list[str]:
    """`zfs recv` into a filesystem (snapshot names come from the stream), never mounted by us.

    -F is only passed when the caller proved the target holds no user data (a placeholder).
    """
    argv = ["zfs", "recv", "-u"]
    if resumable:
        argv.append("-s")
    if force:
        argv.append("-F")
    for prop in inherit:
        argv += ["-x", prop]
    for prop, value in (override or {}).items():
        argv += ["-o", f"{prop}={value}"]
    return argv + [target]


def recv_abort_argv(target: str) -> list[str]:
    """`zfs recv -A`: discard the partial state of an interrupted resumable receive."""
    return ["zfs", "recv", "-A", target]


@dataclass(frozen=True)
class DecodedToken:
    """What a receive_resume_token continues (decode_resume_token). `flags` are the token's send
    options (`rawok`, `compressok`, `embedok`, `largeblockok`): `zfs send -t` takes them from the
    token, not from its command line."""

    toguid: int
    toname: str
    fromguid: int | None
    bytes: int | None
    flags: frozenset[str] = frozenset()

    @property
    def raw(self) -> bool:
        return "rawok" in self.flags


# A resume token is `<version>-<checksum>-<packed length>-<hex of zlib(packed nvlist)>` (OpenZFS
# get_receive_resume_token_impl). It comes from a receiver, which may be the hostile side, and
# `zfs send -t` obeys it (flags included, the snapshot found by guid anywhere in the pool), so we
# decode it ourselves, byte for byte as libnvpair would, and accept only what ZFS itself writes: a
# flat NV_ENCODE_NATIVE little-endian nvlist of known keys with the right types, no duplicates.
_TOKEN_RE = re.compile(r"(\d{1,3})-([0-9a-f]{1,16})-([0-9a-f]{1,16})-((?:[0-9a-f]{2})+)")
_TOKEN_MAX_PACKED = 1 << 16
_NV_BOOLEAN, _NV_UINT64, _NV_STRING = 1, 8, 9  # data_type_t values
_TOKEN_KEYS = {"fromguid": _NV_UINT64, "object": _NV_UINT64, "offset": _NV_UINT64, "bytes": _NV_UINT64,
               "toguid": _NV_UINT64, "toname": _NV_STRING, "largeblockok": _NV_BOOLEAN,
               "embedok": _NV_BOOLEAN, "compressok": _NV_BOOLEAN, "rawok": _NV_BOOLEAN}


def _nv_align(n: int) -> int:
    return (n + 7) & ~7


def _fletcher4_first_word(data: bytes) -> int:
    """zc_word[0] of fletcher_4_native_varsize: the sum of the little-endian 32-bit words."""
    words = len(data) // 4
    return sum(struct.unpack_from(f"<{words}I", data)) & ((1 << 64) - 1) if words else 0


def _parse_token_nvlist(packed: bytes) -> dict[str, int | str | bool]:
    """A flat native nvlist (header, version and flags, pairs, four zero bytes) -> name -> value."""
    if len(packed) < 16 or packed[:4] != b"\x00\x01\x00\x00":  # NV_ENCODE_NATIVE, little endian
        raise ValueError("not a native little-endian nvlist")
    pos = 12
    out: dict[str, int | str | bool] = {}
    while True:
        if pos + 4 > len(packed):
            raise ValueError("truncated nvlist")
        (size,) = struct.unpack_from("<i", packed, pos)
        if size == 0:
            if pos + 4 != len(packed):
                raise ValueError("data after the end of the nvlist")
            return out
        if size < 24 or pos + size > len(packed) or size % 8:
            raise ValueError(f"bad nvpair size {size}")
        name_sz, _reserve, nelem, dtype = struct.unpack_from("<hhii", packed, pos + 4)
        name_end = pos + 16 + name_sz
        if name_sz < 2 or name_end > pos + size or packed[name_end - 1] != 0:
            raise ValueError("bad nvpair name")
        name = packed[pos + 16:name_end - 1].decode("ascii", "strict")
        if "\x00" in name or name not in _TOKEN_KEYS or _TOKEN_KEYS[name] != dtype:
            raise ValueError(f"unexpected nvpair {name!r} of type {dtype}")
        if name in out:
            raise ValueError(f"duplicate nvpair {name!r}")
        value_at, pair_end = pos + _nv_align(16 + name_sz), pos + size
        if dtype == _NV_BOOLEAN:
            if nelem != 0:
                raise ValueError(f"{name}: a boolean carries no value")
            out[name] = True
        elif dtype == _NV_UINT64:
            if nelem != 1 or value_at + 8 > pair_end:
                raise ValueError(f"{name}: bad uint64")
            out[name] = struct.unpack_from("<Q", packed, value_at)[0]
        else:
            nul = packed.find(b"\x00", value_at, pair_end)
            if nelem != 1 or nul < 0:
                raise ValueError(f"{name}: unterminated string")
            out[name] = packed[value_at:nul].decode("utf-8", "strict")
        pos = pair_end


def decode_resume_token(token: str) -> DecodedToken:
    """Decode a receive_resume_token without running zfs. Raises ValueError for anything that is
    not exactly what ZFS writes (see _TOKEN_RE's comment)."""
    if not isinstance(token, str):
        raise ValueError("a resume token is a string")
    m = _TOKEN_RE.fullmatch(token)
    if not m or int(m.group(1)) != 1:
        raise ValueError("not a version 1 resume token")
    compressed, packed_len = bytes.fromhex(m.group(4)), int(m.group(3), 16)
    if _fletcher4_first_word(compressed) != int(m.group(2), 16):
        raise ValueError("resume token checksum mismatch")
    if packed_len > _TOKEN_MAX_PACKED:
        raise ValueError("resume token too large")
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(compressed, packed_len + 1)
    except zlib.error as exc:
        raise ValueError(f"resume token does not decompress: {exc}") from None
    if len(packed) != packed_len or not inflater.eof or inflater.unused_data:
        raise ValueError("resume token length mismatch")
    fields = _parse_token_nvlist(packed)
    toguid, toname = fields.get("toguid"), fields.get("toname")
    if not isinstance(toguid, int) or not isinstance(toname, str):
        raise ValueError("resume token lacks toguid or toname")
    dataset, sep, _ = split_version_name(toname)
    if sep != "@":
        raise ValueError(f"resume token names {toname!r}, not a snapshot")
    fromguid, nbytes = fields.get("fromguid"), fields.get("bytes")
    return DecodedToken(toguid=toguid, toname=toname,
                        fromguid=fromguid if isinstance(fromguid, int) and not isinstance(fromguid, bool) else None,
                        bytes=nbytes if isinstance(nbytes, int) and not isinstance(nbytes, bool) else None,
                        flags=frozenset(k for k, v in fields.items() if v is True))


def encode_resume_token(fields: dict[str, int | str | bool]) -> str:
    """The inverse of decode_resume_token (tests and the test-token command build tokens with it)."""
    pairs = b""
    for name, value in fields.items():
        raw_name = name.encode() + b"\x00"
        if value is True:
            dtype, nelem, data = _NV_BOOLEAN, 0, b""
        elif isinstance(value, int):
            dtype, nelem, data = _NV_UINT64, 1, struct.pack("<Q", value)
        else:
            dtype, nelem, data = _NV_STRING, 1, str(value).encode() + b"\x00"
        size = _nv_align(16 + len(raw_name)) + _nv_align(len(data))
        pair = struct.pack("<ihhii", size, len(raw_name), 0, nelem, dtype) + raw_name
        pair += b"\x00" * (_nv_align(len(pair)) - len(pair)) + data
        pairs += pair + b"\x00" * (size - len(pair))
    packed = b"\x00\x01\x00\x00" + struct.pack("<ii", 0, 1) + pairs + b"\x00" * 4
    compressed = zlib.compress(packed, 6)
    return f"1-{_fletcher4_first_word(compressed):x}-{len(packed):x}-{compressed.hex()}"


def create_placeholder_argv(dataset: str, encryption_off: bool) -> list[str]:
    """A placeholder: an empty, unmounted filesystem marked so a later receive may replace it."""
    argv = ["zfs", "create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none"]
    if encryption_off:
        argv += ["-o", "encryption=off"]
    return argv + [dataset]


ZFSCMD_BUCKETS = (0.01, 0.1, 0.2, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 60.0)  # zrepl's zfscmd histogram buckets


@dataclass
class ZfsCounters:
    """zfs spawns per verb (benchmarks and tests count them), and how long each command took by
    (job, binary, verb), streams (send/recv) included: zrepl's zrepl_zfscmd_runtime metric."""

    spawns: dict[str, int] = field(default_factory=dict)
    runtimes: dict[tuple[str, str, str], Histogram] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, argv: Sequence[str]) -> None:
        verb = argv[1] if len(argv) > 1 else argv[0]
        with self.lock:
            self.spawns[verb] = self.spawns.get(verb, 0) + 1

    def observe(self, argv: Sequence[str], seconds: float, job: str | None = None) -> None:
        key = (job or LOG_JOB.get() or "_nojobid", argv[0], argv[1] if len(argv) > 1 else "")
        with self.lock:
            self.runtimes.setdefault(key, Histogram(ZFSCMD_BUCKETS)).observe(seconds)

    @property
    def total(self) -> int:
        return sum(self.spawns.values())


class _TimedPopen(subprocess.Popen):
    """A stream command (zfs send/recv) whose runtime, from its start until a wait or poll first
    saw it exit, goes into the counters as zrepl's zfscmd does for every command. The job is the
    one that started it: the stream may be waited for in a thread that runs no job."""

    def __init__(self, argv: Sequence[str], counters: ZfsCounters, resolved: list[str], **popen_kwargs: Any):
        self._timing: tuple[ZfsCounters, list[str], str | None, float] | None = None
        super().__init__(resolved, **popen_kwargs)
        self._timing = (counters, list(argv), LOG_JOB.get(), time.monotonic())

    def _observe_exit(self) -> None:
        timing = self._timing
        if self.returncode is not None and timing is not None:
            self._timing = None
            counters, argv, job, started = timing
            counters.observe(argv, time.monotonic() - started, job)

    def poll(self) -> int | None:
        code = super().poll()
        self._observe_exit()
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self._observe_exit()
        return code


def _describe_argv(args: object) -> str:
    """A Popen's args as a shell-quoted line, for log messages."""
    if isinstance(args, (list, tuple)):
        return shlex.join(str(a) for a in args)
    return str(args)


class Zfs:
    """The one place that runs zfs and zpool. Every command is an argv list, never a shell string.

    Names are validated before they reach zfs. Failures raise ZfsError carrying argv and stderr.
    """

    def __init__(self, zfs_bin: str = "zfs", zpool_bin: str = "zpool", env: dict[str, str] | None = None):
        self.zfs_bin, self.zpool_bin = zfs_bin, zpool_bin
        self.env = env
        self.counters = ZfsCounters()
        # Whether `zfs list` knows snapshots_changed (OpenZFS 2.2+); None: ask the kernel module.
        self.snapshots_changed: bool | None = None
        self._caches: weakref.WeakSet[ListingCache] = weakref.WeakSet()  # told before holds change
        self._caches_lock = threading.Lock()

    def _resolve(self, argv: Sequence[str]) -> list[str]:
        argv = list(argv)
        if argv[0] == "zfs":
            argv[0] = self.zfs_bin
        elif argv[0] == "zpool":
            argv[0] = self.zpool_bin
        return argv

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a short zfs command to completion and capture its output."""
        self.counters.add(argv)
        log.debug("exec %s", shlex.join(argv))
        started = time.monotonic()
        try:
            proc = subprocess.run(self._resolve(argv), input=input, capture_output=True, timeout=timeout,
                                  env=self.env)
        except subprocess.TimeoutExpired as exc:
            raise ZfsError(argv, None, (exc.stderr or b"").decode("utf-8", "replace"), kind="timeout") from None
        except OSError as exc:
            raise ZfsError(argv, 127, f"cannot execute {argv[0]}: {exc.strerror}") from None
        finally:
            self.counters.observe(argv, time.monotonic() - started)
        if check and proc.returncode != 0:
            raise ZfsError(argv, proc.returncode, proc.stderr.decode("utf-8", "replace"))
        return proc

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start a long-running zfs command (send/recv streams); the caller owns the process."""
        self.counters.add(argv)
        log.debug("spawn %s", shlex.join(argv))
        try:
            return _TimedPopen(argv, self.counters, self._resolve(argv), env=self.env, **popen_kwargs)
        except OSError as exc:
            raise ZfsError(argv, 127, f"cannot execute {argv[0]}: {exc.strerror}") from None

    def list_datasets(self, roots: Sequence[str], properties: Sequence[str] = LIST_PROPERTIES,
                      depth: int | None = None, cache: ListingCache | None = None) -> dict[str, DatasetInfo]:
        """One recursive listing of the roots. Roots that do not exist are skipped, not fatal.
        With a cache (and OpenZFS 2.2+), the snapshots of unchanged datasets come from it: the
        same answer, for less (see ListingCache)."""
        for root in roots:
            validate_dataset_name(root)
        if cache is not None and depth is None and tuple(properties) == LIST_PROPERTIES and self._knows_changes():
            try:
                return self._list_with_cache(roots, cache)
            except _NoSnapshotsChanged:
                self.snapshots_changed = False
        return self._list(zfs_list_argv(roots, properties, depth=depth), properties)

    def wall_time(self) -> float:
        """The clock ZFS stamps snapshots_changed with: this host's wall clock."""
        return time.time()

    def _knows_changes(self) -> bool:
        if self.snapshots_changed is None:
            version = openzfs_module_version()
            self.snapshots_changed = version is not None and version >= (2, 2)
        return self.snapshots_changed

    def _list_with_cache(self, roots: Sequence[str], cache: ListingCache) -> dict[str, DatasetInfo]:
        """The cheap listing (filesystems, volumes, bookmarks and the stamps), then the snapshots
        of the stale datasets only; the rest from the cache, their held snapshots checked with one
        `zfs holds`. When the cache is empty or small: one full listing, as without it."""
        with self._caches_lock:
            self._caches.add(cache)
        mark = cache.mark()
        cached = cache.load()
        started = self.wall_time()
        if not cached or sum(len(e.snapshots) for e in cached.values()) < cache.min_snapshots:
            listing = self._list(zfs_list_argv(roots, LISTING_CACHE_COLUMNS), LISTING_CACHE_COLUMNS)
            stamps = take_stamps(listing)
            fresh = set(listing)
        else:
            listing = self._list(zfs_list_argv(roots, LISTING_CACHE_COLUMNS, types="filesystem,volume,bookmark"),
                                 LISTING_CACHE_COLUMNS)
            stamps = take_stamps(listing)
            fresh = stale_snapshot_lists(cached, stamps, started)
            if fresh:
                self._add_snapshots(listing, fresh, roots)
            trusted = [name for name in listing if name not in fresh]
            held = [v.full_name for name in trusted for v in cached[name].snapshots if v.userrefs > 0]
            tags = self.holds(held) if held else {}
            for name in trusted:
                snaps = [v if v.userrefs == 0 else dataclasses.replace(v, userrefs=len(tags.get(v.full_name, [])))
                         for v in cached[name].snapshots]
                listing[name].versions.extend(snaps)
                sort_versions(listing[name])
            log.debug("listing cache %s: %d of %d dataset(s) listed again", cache.path, len(fresh), len(listing))
        cache.store({name: CachedSnapshots(stamps[name], started if name in fresh else cached[name].listed_at,
                                           ds.snapshots())
                     for name, ds in listing.items()}, mark)
        return listing

    def _add_snapshots(self, listing: dict[str, DatasetInfo], stale: set[str], roots: Sequence[str]) -> None:
        """List the snapshots of the stale datasets (each with -d 1; all roots again when most are
        stale) into the listing, whose bookmarks came from the cheap listing."""
        if len(stale) * 2 > len(listing):
            argv = zfs_list_argv(roots, LIST_PROPERTIES, types="filesystem,volume,snapshot")
        else:
            argv = zfs_list_argv(sorted(stale), LIST_PROPERTIES, types="filesystem,volume,snapshot", depth=1)
        snapshots = self._list(argv, LIST_PROPERTIES)
        for name in stale:
            ds, got = listing[name], snapshots.get(name)
            if got is not None:
                ds.versions.extend(got.snapshots())
            sort_versions(ds)

    def _list(self, argv: list[str], properties: Sequence[str]) -> dict[str, DatasetInfo]:
        proc = self.run(argv, check=False)
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0:
            missing_only = all("does not exist" in line or not line.strip() for line in stderr.splitlines())
            if not (missing_only and stderr.strip()):
                if "snapshots_changed" in properties and ("invalid property" in stderr or "bad property" in stderr):
                    raise _NoSnapshotsChanged(stderr)
                raise ZfsError(argv, proc.returncode, stderr)
            log.debug("zfs list: %s", stderr.strip())
        try:
            return parse_zfs_list(proc.stdout.decode("utf-8", "replace"), properties)
        except ValueError as exc:
            raise ZfsError(argv, proc.returncode, f"cannot parse the listing: {exc}") from None

    def local_placeholders(self, datasets: Sequence[str]) -> set[str]:
        """The datasets whose `zrepl:placeholder` is `on` and set LOCALLY (as zrepl checks it): an
        inherited `on` is a dataset an admin created below a placeholder, with data of its own.

        One `zfs get` for all. Its values are printed raw, so a value with a NEWLINE could forge a
        line: the answer is trusted only if it has exactly one well-formed line per dataset asked
        for (a forged line always adds one); otherwise each dataset is asked for on its own, where
        only the exact output `on<TAB>local` counts."""
        names = [validate_dataset_name(d) for d in dict.fromkeys(datasets)]
        if not names:
            return set()
        argv = ["zfs", "get", "-H", "-p", "-o", "name,source,value", PLACEHOLDER_PROPERTY, *names]
        proc = self.run(argv, check=False)
        lines = proc.stdout.decode("utf-8", "replace").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        rows = [line.split("\t", 2) for line in lines]
        if (proc.returncode == 0 and len(rows) == len(names) and all(len(r) == 3 for r in rows)
                and sorted(r[0] for r in rows) == sorted(names)):
            return {r[0] for r in rows if r[1] == "local" and r[2] == "on"}
        return {n for n in names if self._is_local_placeholder(n)}

    def _is_local_placeholder(self, dataset: str) -> bool:
        argv = ["zfs", "get", "-H", "-p", "-o", "value,source", PLACEHOLDER_PROPERTY, dataset]
        proc = self.run(argv, check=False)
        return proc.returncode == 0 and proc.stdout == b"on\tlocal\n"

    def list_one(self, dataset: str) -> DatasetInfo | None:
        """One dataset with its snapshots and bookmarks, None if it does not exist. Not recursive:
        a parent's step must not pay for listing a thousand children and their snapshots."""
        return self.list_datasets([dataset], depth=1).get(dataset)

    def snapshot(self, full_names: Sequence[str]) -> None:
        for name in full_names:
            split_version_name(name)
        self.run(snapshot_argv(full_names))

    def destroy_snapshots(self, dataset: str, short_names: Sequence[str]) -> None:
        """Destroy snapshots of one dataset in one command. Only ever snapshots: the '@' is ours."""
        validate_dataset_name(dataset)
        for short in short_names:
            validate_snapshot_short_name(short)
        if short_names:
            self.run(destroy_snapshots_argv(dataset, short_names))

    def holds(self, full_names: Sequence[str]) -> dict[str, list[str]]:
        if not full_names:
            return {}
        proc = self.run(holds_argv(full_names), check=False)
        return parse_holds(proc.stdout.decode("utf-8", "replace"))

    def _holds_changing(self, full_names: Sequence[str]) -> None:
        """Before any hold or release: the listing caches drop those datasets (holds do not move
        snapshots_changed, so only this keeps a cached userrefs from going stale)."""
        with self._caches_lock:
            caches = list(self._caches)
        if caches:
            datasets = {n.partition("@")[0] for n in full_names}
            for cache in caches:
                cache.forget(datasets)

    def hold(self, tag: str, full_names: Sequence[str]) -> None:
        if full_names:
            self._holds_changing(full_names)
            self.run(hold_argv(tag, full_names))

    def hold_idempotent(self, tag: str, full_names: Sequence[str]) -> None:
        """Hold every snapshot with tag; snapshots that already carry it are fine.

        One `zfs hold` for all; only if that fails because a tag exists, one per snapshot."""
        if not full_names:
            return
        try:
            self.hold(tag, full_names)
        except ZfsError as exc:
            if "tag already exists" not in exc.stderr:
                raise
            for name in full_names:
                try:
                    self.hold(tag, [name])
                except ZfsError as one:
                    if "tag already exists" not in one.stderr:
                        raise

    def release(self, tag: str, full_names: Sequence[str]) -> None:
        if full_names:
            self._holds_changing(full_names)
            self.run(release_argv(tag, full_names))

    def hold_many(self, tag: str, full_names: Sequence[str]) -> dict[str, str]:
        """Hold snapshots of any datasets in ONE `zfs hold` (zfs goes on past a snapshot it cannot
        hold); returns those it could not hold with zfs's reason. One that carries the tag already
        is held. Raises when zfs failed without naming the snapshots."""
        return self._per_snapshot(hold_argv(tag, full_names), "cannot hold snapshot ", ("tag already exists",))

    def release_many(self, tag: str, full_names: Sequence[str]) -> dict[str, str]:
        """Release a tag on snapshots of any datasets in ONE `zfs release`; a snapshot without the
        tag (or gone) counts as released. Returns the failures by snapshot, like hold_many."""
        return self._per_snapshot(release_argv(tag, full_names), "cannot release hold from snapshot ",
                                  ("no such tag on this dataset", "does not exist"))

    def _per_snapshot(self, argv: list[str], prefix: str, fine: tuple[str, ...]) -> dict[str, str]:
        """zfs hold/release report each snapshot they skip on a line `<prefix>'<name>': <reason>`."""
        if len(argv) <= 3:
            return {}
        self._holds_changing(argv[3:])
        proc = self.run(argv, check=False)
        if proc.returncode == 0:
            return {}
        stderr = proc.stderr.decode("utf-8", "replace")
        failed: dict[str, str] = {}
        for line in stderr.splitlines():
            # a dataset gone since the listing: "cannot open '<dataset>': dataset does not exist"
            opened = line.startswith("cannot open '")
            name, sep, reason = line.removeprefix("cannot open " if opened else prefix).partition("': ")
            if not (opened or line.startswith(prefix + "'")) or not sep:
                raise ZfsError(argv, proc.returncode, stderr)
            if not any(f in reason for f in fine):
                names = [a for a in argv[3:] if a.startswith(name[1:] + "@")] if opened else [name[1:]]
                failed.update(dict.fromkeys(names, reason.strip()))
        if not failed and not stderr.strip():
            raise ZfsError(argv, proc.returncode, stderr)
        return failed

    def bookmark(self, source: str, bookmark: str) -> None:
        split_version_name(source)
        split_version_name(bookmark)
        self.run(bookmark_argv(source, bookmark))

    def destroy_bookmark(self, full_name: str) -> None:
        dataset, sep, _ = split_version_name(full_name)
        if sep != "#":
            raise ValueError(f"not a bookmark: {full_name!r}")
        self.run(["zfs", "destroy", full_name])

    def get_property(self, dataset: str, prop: str) -> str:
        validate_dataset_name(dataset)
        out = self.run(["zfs", "get", "-H", "-p", "-o", "value", prop, dataset]).stdout.decode()
        return out.strip()

    def decode_resume_token(self, token: str) -> DecodedToken:
        """What a receive_resume_token would resume, decoded here (no spawn: decode_resume_token).
        Raises ZfsError (kind bad-token) when it is not a token as ZFS writes it."""
        try:
            return decode_resume_token(token)
        except ValueError as exc:
            raise ZfsError(["zfs", "send", "-t", f"{token[:40]}..."], None, f"invalid resume token: {exc}",
                           kind=ZfsErrorKind.BAD_TOKEN) from None


def destroy_with_bisect(zfs: Zfs, dataset: str, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Destroy snapshots of one dataset in one command; on failure split the batch in halves.

    Returns (destroyed, errors by name). A snapshot that is already gone counts as destroyed.
    """
    if not names:
        return [], {}
    try:
        zfs.destroy_snapshots(dataset, names)
        return list(names), {}
    except ZfsError as exc:
        if len(names) == 1:
            if exc.kind == "not-exist":
                return list(names), {}
            return [], {names[0]: exc.stderr or str(exc)}
    half = len(names) // 2
    left_done, left_err = destroy_with_bisect(zfs, dataset, names[:half])
    right_done, right_err = destroy_with_bisect(zfs, dataset, names[half:])
    return left_done + right_done, {**left_err, **right_err}



# =================================================================================================
# 6. Planner
# =================================================================================================

# Pure: listings in, decisions out. No subprocess, no I/O, nothing is ever destroyed here; when a
# human has to act, the plan carries the exact commands (shlex-quoted) in PlanError.details.
#
# Why pending snapshots travel in ONE `zfs send -I from to` step (zrepl sends one step per
# snapshot, its issues #354/#480) and why that is safe at every protection level:
# - guarantee_resumability: the runner holds from, to and every intermediate with the step hold
#   tag in one `zfs hold` call, so nothing the package needs can be pruned mid-send.
# - guarantee_incremental: the runner must place tentative cursor bookmarks on to AND every
#   intermediate (not only from/to as zrepl does): a package interrupted half-way leaves the
#   receiver at an intermediate snapshot, and that bookmark keeps it a usable incremental source
#   even if the sender prunes the snapshot before the next run.
# - guarantee_nothing: nothing is protected anyway; batching changes nothing.
# An interrupted package is resumable: `zfs send -t` finishes only the snapshot that was being
# received (openzfs/zfs#16764), and plan_filesystem then continues from it with another -I step.
# `-I` cannot start from a bookmark: zfs-send(8) documents bookmarks only for `-i` (synopsis
# `zfs send [-i snapshot|bookmark] ...` vs `[[-I|-i] snapshot] snapshot`), and ZFS refuses with
# "multiple snapshots cannot be sent from a bookmark" (openzfs/zfs#12415). So from a bookmark the
# plan is `-i #bookmark -> first pending` followed by `-I first -> newest`.

INITIAL_REPLICATION_CHOICES = ("most_recent", "all", "fail")
PROTECTION_CHOICES = ("guarantee_resumability", "guarantee_incremental", "guarantee_nothing")


@dataclass(frozen=True)
class ResumeToken:
    """A receiver's `receive_resume_token`, decoded by the ZFS layer (`zfs send -nvt TOKEN`).
    fromguid is None for an interrupted full send."""

    fromguid: int | None
    toguid: int
    toname: str
    raw: str


@dataclass(frozen=True)
class PlanSettings:
    """The job settings planning depends on (replication.* and send.* config keys).

    `receiving_job` (optional) names the job that holds received snapshots; it only improves the
    recovery commands of a diverged plan (release our last-received hold before rolling back)."""

    initial: str = "most_recent"  # conflict_resolution.initial_replication
    protection_initial: str = "guarantee_resumability"
    protection_incremental: str = "guarantee_resumability"
    encrypted: bool = False  # send.encrypted: send raw, refuse unencrypted datasets
    raw: bool = False  # send.raw
    receiving_job: str | None = None
    sending_job: str | None = None  # the job name in the sender's bookmarks (for name length checks)

    def __post_init__(self) -> None:
        if self.initial not in INITIAL_REPLICATION_CHOICES:
            raise ValueError(f"initial replication must be one of {', '.join(INITIAL_REPLICATION_CHOICES)}, "
                             f"got {self.initial!r}")
        for name in ("protection_initial", "protection_incremental"):
            if getattr(self, name) not in PROTECTION_CHOICES:
                raise ValueError(f"{name} must be one of {', '.join(PROTECTION_CHOICES)}, "
                                 f"got {getattr(self, name)!r}")

    @property
    def send_raw(self) -> bool:
        """Whether sends use `zfs send -w` (encrypted=true implies a raw send)."""
        return self.encrypted or self.raw

    def protection_for(self, step: Step) -> str:
        """The guarantee that applies to a step: initial for full sends, incremental otherwise."""
        return self.protection_initial if step.from_version is None else self.protection_incremental


@dataclass
class Step:
    """One `zfs send | zfs recv`.

    from_version None = full send. multi=True = one `zfs send -I from to` stream carrying every
    snapshot in `intermediates` (oldest first) plus `to`; the runner holds/bookmarks them all and
    moves the cursor to `to` at the end. resume_token set = `zfs send -t TOKEN` (from/to are the
    sender's versions the token refers to)."""

    from_version: Version | None
    to_version: Version
    resume_token: str | None = None
    intermediates: list[Version] = field(default_factory=list)
    multi: bool = False

    @property
    def is_full(self) -> bool:
        return self.from_version is None

    @property
    def oldest_pending(self) -> Version:
        """The oldest snapshot this step delivers (ordering key across filesystems)."""
        return self.intermediates[0] if self.intermediates else self.to_version

    def received_versions(self) -> list[Version]:
        """Every snapshot the receiver gets from this step, oldest first (for GUID checks)."""
        return [*self.intermediates, self.to_version]

    def versions_to_protect(self) -> list[Version]:
        """Sender versions a step hold/tentative bookmark should cover: from, intermediates, to."""
        return ([self.from_version] if self.from_version else []) + self.received_versions()

    def describe(self) -> str:
        to = self.to_version.full_name
        if self.from_version is None:
            text = f"full send of {to}"
        else:
            src = self.from_version.full_name + ("" if self.from_version.is_snapshot else " (bookmark)")
            text = f"incremental send {src} -> {to}"
            if self.multi:
                names = ", ".join(v.name for v in self.received_versions())
                text += f" (-I, {len(self.intermediates) + 1} snapshots: {names})"
        if self.resume_token:
            text = "resume " + text
        return text

    def __str__(self) -> str:
        return self.describe()


class PlanProblem(enum.StrEnum):
    """Why a filesystem cannot be replicated now (PlanError.kind)."""

    DIVERGED = "diverged"
    NO_COMMON_BASE = "no-common-base"
    RECEIVER_HAS_DATA = "receiver-has-data"
    CONFLICT_FAIL = "conflict-fail"
    ENCRYPTION = "encryption"
    NAME_TOO_LONG = "name-too-long"


@dataclass
class PlanError:
    """Why a filesystem cannot be replicated now (`kind`, a PlanProblem). details always has
    `recovery_commands` (commands for a human, run on the receiver unless the message says
    otherwise; may be empty)."""

    message: str
    kind: PlanProblem
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


@dataclass
class FilesystemPlan:
    """The decision for one filesystem: steps to run, or an error, or a single action.

    clear_resume_token: the resume token's source is gone; the runner runs `zfs recv -A` and
    replans. replace_placeholder: the first (full) step receives with -F into a placeholder.
    depends_on: a parent whose initial replication must run first; blocked_by: a parent whose
    plan failed, so this (not yet existing) child cannot be created now. common / receiver_common:
    the newest snapshot both sides have (the sender's version, possibly a bookmark, and the
    receiver's snapshot), set when the plan continues incrementally or is up to date; the runner
    uses them to restore a cursor or last-received hold whose placement was lost."""

    sender_fs: str
    receiver_fs: str
    receiver_exists: bool = False
    sender_type: str = "filesystem"
    steps: list[Step] = field(default_factory=list)
    error: PlanError | None = None
    clear_resume_token: bool = False
    replace_placeholder: bool = False
    up_to_date: bool = False
    note: str = ""
    blocked_by: str | None = None
    depends_on: str | None = None
    common: Version | None = None
    receiver_common: Version | None = None

    @property
    def runnable(self) -> bool:
        return bool(self.steps) and self.error is None and self.blocked_by is None

    @property
    def oldest_pending(self) -> Version | None:
        return self.steps[0].oldest_pending if self.steps else None

    def describe(self) -> str:
        head = f"{self.sender_fs} -> {self.receiver_fs}"
        if self.blocked_by:
            return f"{head}: blocked by {self.blocked_by}" + (f": {self.note}" if self.note else "")
        if self.error:
            return f"{head}: error ({self.error.kind}): {self.error.message}"
        if self.clear_resume_token:
            return f"{head}: {self.note}"
        if self.up_to_date:
            return f"{head}: up to date"
        if not self.steps:
            return f"{head}: {self.note or 'nothing to do'}"
        replacing = " (replacing placeholder)" if self.replace_placeholder else ""
        lines = [f"{head}: {len(self.steps)} step(s){replacing}"]
        lines += [f"  {i + 1}. {s.describe()}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


@dataclass
class FilesystemInput:
    """One filesystem for plan_filesystems: both listings and the decoded resume token."""

    sender: DatasetInfo
    receiver: DatasetInfo | None
    receiver_fs: str
    resume_token: ResumeToken | None = None


def check_send_encryption(encrypted: bool, raw: bool, fs_encrypted: bool) -> str | None:
    """zrepl's send checks: an error message, or None when the send is allowed."""
    if encrypted and not fs_encrypted:
        return ("send.encrypted = true but the filesystem is not encrypted: refusing to send it "
                "(set send.encrypted = false to replicate unencrypted filesystems)")
    if raw and fs_encrypted and not encrypted:
        return ("send.raw = true on an encrypted filesystem while send.encrypted = false: refusing "
                "(set send.encrypted = true to replicate it encrypted)")
    return None


def dataset_is_encrypted(info: DatasetInfo) -> bool:
    """From the `encryption` property; unknown/absent counts as unencrypted."""
    return info.props.get("encryption", "off") not in ("off", "-", "")


def is_placeholder(info: DatasetInfo) -> bool:
    return info.props.get(PLACEHOLDER_PROPERTY) == "on"


def _by_txg(versions: Iterable[Version]) -> list[Version]:
    # createtxg is the only trustworthy order; creation and name just make ties deterministic.
    return sorted(versions, key=lambda v: (v.createtxg, v.creation, v.name))


def _sender_version_with_guid(sender: DatasetInfo, guid: int) -> Version | None:
    """The sender's incremental source for a GUID: the snapshot if it still exists, else a bookmark
    (a replication cursor rather than a tentative one, which a stale sweep may remove)."""
    snaps = [v for v in sender.versions if v.guid == guid and v.is_snapshot]
    if snaps:
        return snaps[0]
    marks = [v for v in sender.versions if v.guid == guid and not v.is_snapshot]
    if not marks:
        return None

    def rank(v: Version) -> tuple[int, str]:
        parsed = parse_bookmark_abstraction(v.name)
        return (0 if parsed and parsed[0] == ABSTRACTION_CURSOR else 2 if parsed else 1), v.name
    return min(marks, key=rank)


def _incremental_steps(source: Version, pending: list[Version]) -> list[Step]:
    """Steps from `source` to the newest of `pending` (sender snapshots newer than source)."""
    if not pending:
        return []
    if len(pending) == 1:
        return [Step(source, pending[0])]
    if not source.is_snapshot:  # -I cannot start from a bookmark (see section comment)
        return [Step(source, pending[0])] + _incremental_steps(pending[0], pending[1:])
    return [Step(source, pending[-1], intermediates=list(pending[:-1]), multi=True)]


def _newer_than(snaps: list[Version], v: Version) -> list[Version]:
    return [s for s in snaps if s.createtxg > v.createtxg]


def _q(*argv: str) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _aside_name(receiver_fs: str) -> str:
    return f"{receiver_fs}-zrepl-aside"


def plan_filesystem(sender: DatasetInfo, receiver: DatasetInfo | None, settings: PlanSettings, *,
                    receiver_fs: str | None = None, resume_token: ResumeToken | None = None) -> FilesystemPlan:
    """Plan one filesystem. `receiver` None = the receiving dataset does not exist;
    `receiver_fs` defaults to receiver.name (required when receiver is None)."""
    target = receiver_fs or (receiver.name if receiver else None)
    if not target:
        raise ValueError("plan_filesystem needs receiver_fs when the receiver does not exist")
    plan = FilesystemPlan(sender_fs=sender.name, receiver_fs=target, receiver_exists=receiver is not None,
                          sender_type=sender.type)

    problem = check_send_encryption(settings.encrypted, settings.raw, dataset_is_encrypted(sender))
    if problem:
        plan.error = PlanError(f"{sender.name}: {problem}", PlanProblem.ENCRYPTION, {"recovery_commands": []})
        return plan
    too_long = _names_too_long(sender, target, settings)
    if too_long:
        plan.error = PlanError(too_long, PlanProblem.NAME_TOO_LONG, {"recovery_commands": []})
        return plan

    snaps = _by_txg(sender.snapshots())
    rsnaps = _by_txg(receiver.snapshots()) if receiver else []
    into_placeholder = receiver is not None and not rsnaps and is_placeholder(receiver)

    if resume_token is not None:
        return _plan_resume(plan, sender, snaps, resume_token, into_placeholder)

    if not snaps:
        plan.note = "sender has no snapshots: nothing to replicate"
        plan.up_to_date = bool(rsnaps) and _sender_version_with_guid(sender, rsnaps[-1].guid) is not None
        return plan

    if receiver is None or into_placeholder:
        plan.replace_placeholder = into_placeholder
        return _plan_initial(plan, snaps, settings)

    if not rsnaps:
        aside = _aside_name(target)
        plan.error = PlanError(
            f"{target} exists, has no snapshots and is not a zrepl placeholder: refusing to overwrite it "
            f"with {sender.name}. Nothing was changed. Move it aside to keep its data "
            f"(`{_q('zfs', 'rename', target, aside)}`), or, if it holds nothing you need, mark it as a "
            f"placeholder so the next run replaces it (`{_q('zfs', 'set', PLACEHOLDER_PROPERTY + '=on', target)}`).",
            PlanProblem.RECEIVER_HAS_DATA,
            {"recovery_commands": [_q("zfs", "rename", target, aside)],
             "alternative_commands": [_q("zfs", "set", PLACEHOLDER_PROPERTY + "=on", target)]})
        return plan

    common_recv = next((r for r in reversed(rsnaps) if _sender_version_with_guid(sender, r.guid)), None)
    if common_recv is None:
        aside = _aside_name(target)
        plan.error = PlanError(
            f"{target} has snapshots but none of them exists on {sender.name} (compared by GUID): no "
            f"incremental replication is possible. Nothing was changed. To start over with a full "
            f"replication while keeping the old copy, move it aside: `{_q('zfs', 'rename', target, aside)}`.",
            PlanProblem.NO_COMMON_BASE,
            {"receiver_snapshots": [r.name for r in rsnaps], "sender_snapshots": [s.name for s in snaps],
             "recovery_commands": [_q("zfs", "rename", target, aside)]})
        return plan

    source = _sender_version_with_guid(sender, common_recv.guid)
    assert source is not None
    pending = _newer_than(snaps, source)
    if common_recv is not rsnaps[-1]:
        plan.error = _diverged_error(plan, source, common_recv, pending, _newer_than(rsnaps, common_recv), settings)
        return plan

    plan.common, plan.receiver_common = source, common_recv
    if not pending:
        plan.up_to_date = True
        plan.note = f"up to date at {common_recv.name}"
        return plan
    plan.steps = _incremental_steps(source, pending)
    return plan


def _names_too_long(sender: DatasetInfo, target: str, settings: PlanSettings) -> str | None:
    """Why the names this filesystem needs exceed ZFS's 255 characters, or None: the sender's cursor
    (and tentative cursor) bookmarks carry the job name, the receiver gets target@snapshot."""
    longest = max((len(v.name) for v in sender.snapshots()), default=0)
    if len(target) + 1 + longest > ZFS_NAME_MAX:
        return (f"{target}: the replica's snapshot names would be longer than {ZFS_NAME_MAX} characters "
                f"(ZFS's limit); use a shorter root_fs or dataset path")
    if settings.sending_job:
        tentative = "guarantee_incremental" in (settings.protection_initial, settings.protection_incremental)
        name = (tentative_cursor_bookmark_name if tentative else cursor_bookmark_name)((1 << 64) - 1,
                                                                                      settings.sending_job)
        if len(sender.name) + 1 + len(name) > ZFS_NAME_MAX:
            return (f"{sender.name}: the replication bookmark {sender.name}#{name} would be longer than "
                    f"{ZFS_NAME_MAX} characters (ZFS's limit); a shorter job name or dataset path is needed")
    return None


def _plan_initial(plan: FilesystemPlan, snaps: list[Version], settings: PlanSettings) -> FilesystemPlan:
    what = "is a placeholder" if plan.replace_placeholder else "does not exist"
    if settings.initial == "fail":
        plan.error = PlanError(
            f"{plan.receiver_fs} {what} and conflict_resolution.initial_replication = 'fail': not "
            f"replicating {plan.sender_fs}. Set it to 'most_recent' or 'all' to allow a full send.",
            PlanProblem.CONFLICT_FAIL, {"sender_snapshots": [s.name for s in snaps], "recovery_commands": []})
        return plan
    if settings.initial == "most_recent":
        plan.steps = [Step(None, snaps[-1])]
    else:  # all: full send of the oldest, then everything after it
        plan.steps = [Step(None, snaps[0])] + _incremental_steps(snaps[0], snaps[1:])
    return plan


def _plan_resume(plan: FilesystemPlan, sender: DatasetInfo, snaps: list[Version], token: ResumeToken,
                 into_placeholder: bool) -> FilesystemPlan:
    to = next((s for s in snaps if s.guid == token.toguid), None)
    source = None if token.fromguid is None else _sender_version_with_guid(sender, token.fromguid)
    if to is None or (token.fromguid is not None and source is None):
        missing = f"{token.toname}" if to is None else f"the incremental source (guid {token.fromguid})"
        plan.clear_resume_token = True
        plan.note = (f"interrupted receive of {token.toname} cannot be resumed: {missing} no longer "
                     f"exists on the sender; clearing the partial receive state and planning again")
        return plan
    plan.replace_placeholder = into_placeholder and source is None
    plan.steps = [Step(source, to, resume_token=token.raw)] + _incremental_steps(to, _newer_than(snaps, to))
    return plan


def _diverged_error(plan: FilesystemPlan, source: Version, common: Version, sender_only: list[Version],
                    receiver_only: list[Version], settings: PlanSettings) -> PlanError:
    target = plan.receiver_fs
    commands: list[str] = []
    held = [r for r in receiver_only if r.userrefs > 0]
    if held and settings.receiving_job:
        tag = last_received_hold_tag(settings.receiving_job)
        commands += [_q("zfs", "release", tag, r.full_name) for r in held]
    commands.append(_q("zfs", "rollback", "-r", common.full_name))
    msg = (f"{plan.sender_fs} -> {target}: diverged. The last common snapshot is {common.name}; after it "
           f"the receiver has snapshots the sender does not have ({', '.join(r.name for r in receiver_only)})"
           + (f" and the sender has {', '.join(s.name for s in sender_only)}" if sender_only else "")
           + ". Nothing was changed. To continue, discard the receiver-only snapshots on the receiver: "
           + "; ".join(f"`{c}`" for c in commands))
    if held:
        msg += (f". Snapshots with holds ({', '.join(r.name for r in held)}) must be released first "
                f"(`zfs holds` lists the tags)")
    msg += f". To keep them instead, move the receiver aside: `{_q('zfs', 'rename', target, _aside_name(target))}`."
    return PlanError(msg, PlanProblem.DIVERGED, {
        "common": common.name,
        "sender_source": source.full_name,
        "sender_only": [s.name for s in sender_only],
        "receiver_only": [r.name for r in receiver_only],
        "held_receiver_only": [r.name for r in held],
        "recovery_commands": commands,
        "alternative_commands": [_q("zfs", "rename", target, _aside_name(target))],
    })


# ---- many filesystems: parents first, blocked children, step order ----

def _nearest_ancestor(name: str, names: set[str]) -> str | None:
    parts = name.split("/")
    for i in range(len(parts) - 1, 0, -1):
        candidate = "/".join(parts[:i])
        if candidate in names:
            return candidate
    return None


def _pending_key(plan: FilesystemPlan, error_counts: dict[str, int]) -> tuple:
    oldest = plan.oldest_pending
    when = (oldest.creation, oldest.createtxg) if oldest else (float("inf"), 0)
    return (error_counts.get(plan.sender_fs, 0), when, plan.sender_fs)


def plan_filesystems(inputs: Iterable[FilesystemInput], settings: PlanSettings,
                     error_counts: dict[str, int] | None = None) -> list[FilesystemPlan]:
    """Plan every filesystem, then: a child that needs initial replication waits for a parent that
    needs it too (depends_on) and is blocked (no steps, blocked_by) when that parent's plan failed.
    Result order: healthy before erroring (error_counts: sender fs -> consecutive failures), then
    oldest pending snapshot first, parents always before their dependent children."""
    counts = error_counts or {}
    plans = {i.sender.name: plan_filesystem(i.sender, i.receiver, settings, receiver_fs=i.receiver_fs,
                                            resume_token=i.resume_token) for i in inputs}
    names = set(plans)
    for name in sorted(names, key=lambda n: (n.count("/"), n)):  # parents are decided first
        plan, parent_name = plans[name], _nearest_ancestor(name, names)
        if parent_name is None or plan.receiver_exists:
            continue
        parent = plans[parent_name]
        if parent.receiver_exists:
            continue
        if parent.error is not None or parent.blocked_by is not None:
            cause = parent.error.kind if parent.error else f"blocked by {parent.blocked_by}"
            plan.blocked_by, plan.steps = parent_name, []
            plan.note = f"waiting for the initial replication of {parent_name}, which cannot run ({cause})"
        elif parent.steps:
            plan.depends_on = parent_name
    ordered: list[FilesystemPlan] = []
    done: set[str] = set()
    waiting: dict[str, list[FilesystemPlan]] = {}

    def emit(p: FilesystemPlan) -> None:
        ordered.append(p)
        done.add(p.sender_fs)
        for child in waiting.pop(p.sender_fs, []):
            emit(child)
    for p in sorted(plans.values(), key=lambda p: _pending_key(p, counts)):
        if p.depends_on and p.depends_on not in done:
            waiting.setdefault(p.depends_on, []).append(p)
        else:
            emit(p)
    return ordered


def order_steps(plans: Iterable[FilesystemPlan],
                error_counts: dict[str, int] | None = None) -> list[tuple[FilesystemPlan, Step]]:
    """All runnable steps in execution order (zrepl's rule: the oldest pending snapshot across
    filesystems first), filesystems with more errors behind healthy ones, each filesystem's own
    steps in order, and a dependent child only after its parent's first (creating) step."""
    counts = error_counts or {}
    queues = {p.sender_fs: (p, list(p.steps)) for p in plans if p.runnable}
    started: set[str] = set()
    out: list[tuple[FilesystemPlan, Step]] = []
    while True:
        ready = [(counts.get(fs, 0), (q[0].oldest_pending.creation, q[0].oldest_pending.createtxg), fs)
                 for fs, (p, q) in queues.items()
                 if q and (p.depends_on is None or p.depends_on in started or p.depends_on not in queues)]
        if not ready:
            return out
        fs = min(ready)[2]
        plan, queue = queues[fs]
        out.append((plan, queue.pop(0)))
        started.add(fs)


# ---- receiver placement ----

def receiver_path(root_fs: str, sender_fs: str, client_identity: str | None = None) -> str:
    """Where a sender filesystem lands: sink `root_fs/<identity>/<sender path incl. pool>`,
    pull `root_fs/<sender path>`."""
    root, src = root_fs.strip("/"), sender_fs.strip("/")
    if not root or not src:
        raise ValueError("root_fs and the sender filesystem must not be empty")
    if client_identity is None:
        return f"{root}/{src}"
    if not client_identity or "/" in client_identity or client_identity in (".", ".."):
        raise ValueError(f"client identity {client_identity!r} must be a single dataset name component")
    return f"{root}/{client_identity}/{src}"


def placeholders_needed(target: str, root_fs: str, existing: set[str]) -> list[str]:
    """Missing datasets strictly between root_fs and target, top-down (created as placeholders).
    Never anything at or above root_fs; target must lie below root_fs."""
    root = root_fs.strip("/")
    if not target.startswith(root + "/"):
        raise ValueError(f"{target} is not below root_fs {root}")
    parts = target[len(root) + 1:].split("/")
    between = [f"{root}/{'/'.join(parts[:i])}" for i in range(1, len(parts))]
    return [d for d in between if d not in existing]


# ---- abstractions from listings (see section 2 for names and the stale rule) ----

def bookmark_abstractions(info: DatasetInfo) -> list[Abstraction]:
    """Cursor and tentative-cursor bookmarks of any job on a dataset. Like zrepl, a bookmark whose
    name encodes a different GUID than its own is ignored (tampered with, not ours)."""
    out = []
    for v in info.bookmarks():
        parsed = parse_bookmark_abstraction(v.name)
        if parsed and parsed[1] == v.guid:
            out.append(Abstraction(parsed[0], parsed[2], v.dataset, v.name, v.guid, v.createtxg))
    return out


def hold_abstractions(snapshot: Version, tags: Iterable[str]) -> list[Abstraction]:
    """Our holds among a snapshot's hold tags (as listed by `zfs holds`)."""
    out = []
    for tag in tags:
        parsed = parse_hold_tag(tag)
        if parsed:
            out.append(Abstraction(parsed[0], parsed[1], snapshot.dataset, snapshot.name,
                                   snapshot.guid, snapshot.createtxg, tag))
    return out


def replication_cursor(info: DatasetInfo, job: str) -> Version | None:
    """The job's newest replication cursor bookmark on a sender dataset (None before the first
    successful step): what not_replicated pruning compares against."""
    cursors = [v for v in info.bookmarks()
               if (p := parse_bookmark_abstraction(v.name)) and p[0] == ABSTRACTION_CURSOR
               and p[2] == job and p[1] == v.guid]
    return _by_txg(cursors)[-1] if cursors else None


def sender_needs_cleanup(info: DatasetInfo, job: str) -> bool:
    """Whether the sender's listing shows what a crash during a step's completion can leave behind
    for `job`: more than one cursor, a tentative cursor at or before the cursor, or a held snapshot
    at or before it (maybe our step hold). No spawn; only then is it worth asking for hold tags."""
    cursor = replication_cursor(info, job)
    if cursor is None:
        return False
    ours = [p for v in info.bookmarks() if (p := parse_bookmark_abstraction(v.name)) and p[2] == job]
    return (len(ours) > 1 or any(v.userrefs > 0 and v.createtxg <= cursor.createtxg for v in info.snapshots()))


def sender_cleanup_holds(info: DatasetInfo, job: str) -> list[str]:
    """The held snapshots (short names) whose hold tags decide whether sender_has_stale: those at
    or before the cursor, where a crash can leave our step holds."""
    cursor = replication_cursor(info, job)
    if cursor is None:
        return []
    return [v.name for v in info.snapshots() if v.userrefs > 0 and v.createtxg <= cursor.createtxg]


def sender_has_stale(info: DatasetInfo, job: str, tags: dict[str, list[str]]) -> bool:
    """Whether the sender's release_stale would drop anything of `job` on this dataset, given the
    tags of its held snapshots (only another tool's holds: nothing to do, nothing to spawn)."""
    abstractions = bookmark_abstractions(info)
    for v in info.snapshots():
        abstractions += hold_abstractions(v, tags.get(v.name, []))
    return any(a.type != ABSTRACTION_LAST_RECEIVED_HOLD for a in stale_abstractions(abstractions, job))


def receiver_cleanup_holds(info: DatasetInfo) -> list[str]:
    """The held snapshots besides the newest (short names): where an older last-received hold of
    ours can be left (receiver_needs_cleanup)."""
    return [v.name for v in _by_txg(info.snapshots())[:-1] if v.userrefs > 0]


def receiver_needs_cleanup(info: DatasetInfo) -> bool:
    """Whether a receiver dataset has held snapshots besides its newest (maybe an older
    last-received hold of ours, left by a crash between placing the new one and releasing it)."""
    snaps = _by_txg(info.snapshots())
    return any(v.userrefs > 0 for v in snaps[:-1])


def unreplicated_by(info: DatasetInfo, jobs: Iterable[str]) -> dict[str, str]:
    """Snapshots that other replicating jobs still need (full name -> why): for each job with a
    replication cursor on this dataset, the snapshot at its cursor and every newer one. A job
    without a cursor here has not started replicating this dataset (its step holds protect a
    first transfer in flight). Pruning by one job never destroys what another has not received."""
    out: dict[str, str] = {}
    for job in jobs:
        cursor = replication_cursor(info, job)
        if cursor is None:
            continue
        for v in info.snapshots():
            if v.createtxg >= cursor.createtxg:
                out.setdefault(v.full_name, f"not yet replicated by job {job}")
    return out


def replica_protection(sender: DatasetInfo | None, receiver: DatasetInfo) -> dict[str, str] | None:
    """Whether a receiver dataset is established as the replica of this sender's filesystem, and
    what pruning must keep on it (full name -> why). None: not this sender's replica (no common
    snapshot or bookmark guid: another job's data that happens to share the name) or diverged
    (snapshots after the common one that the sender does not have): never pruned then.
    Otherwise the common snapshot (the next incremental base) and the receiver's newest snapshot
    stay, whatever the keep rules say."""
    rsnaps = _by_txg(receiver.snapshots())
    if sender is None or not rsnaps:
        return None
    guids = {v.guid for v in sender.versions}
    common = next((r for r in reversed(rsnaps) if r.guid in guids), None)
    if common is None or common is not rsnaps[-1]:
        return None
    return {common.full_name: "incremental base (the newest snapshot the sender has too)"}


# =================================================================================================
# 7. Protocol
# =================================================================================================

# One framed protocol for every transport. Design in short:
#
# * Every frame is `FRAME_HEADER` (magic, type, payload length) + payload. Control frames carry a JSON
#   object (at most MAX_HEADER_SIZE bytes, nested at most MAX_JSON_DEPTH levels); DATA frames carry
#   raw stream bytes; HEARTBEAT is empty.
# * A connection starts with a HELLO exchange (protocol name, version, identity, fd acceptance).
#   Then the active side sends REQUESTs and the passive side answers each with RESPONSE or ERROR,
#   one request at a time. Over ssh the HELLOs may agree on lanes (LaneMux): several such sessions
#   at once on the one connection, each its own request/answer sequence.
# * A request may carry a stream (push: `zfs send` output for the peer's `zfs recv`) and a
#   response may carry one (pull). A stream is either FDPASS (over AF_UNIX: the pipe fd itself
#   travels with SCM_RIGHTS, zero copies in Python) or DATA frames (over pipes: copied with
#   os.splice in chunks of up to STREAM_CHUNK), and always ends with an END frame whose status says
#   whether the producer succeeded.
# * The receiving side of a stream may send ABORT(id) ("stop, I no longer consume the stream of
#   request id"; the id lets a late ABORT for an older stream be ignored); the sender then
#   ends the stream with END(status="aborted"). A server may answer a request before its stream has
#   ended; the client then stops sending and ends with END(aborted). The reader discards DATA until
#   END, so the connection stays usable either way.
# * Each side sends HEARTBEAT frames when it has written nothing for `heartbeat_interval`, from a
#   thread, so a busy handler or a slow `zfs recv` still shows life. Whoever waits for the peer
#   gives up after `timeout` seconds without receiving a single byte (PeerTimeout).
# * Everything that waits goes through the channel's one long-lived selector, which also watches a
#   wake-up pipe, so cancel() from another thread makes the blocked call raise Cancelled promptly.
# * bandwidth limits (TokenBucket) apply to copying. A limited sender never passes its fd (it
#   copies DATA frames even over AF_UNIX) and a side with a receive limit announces in its HELLO /
#   REQUEST that it does not accept fds: forcing the copying path keeps one code path for limiting
#   instead of a limiter thread interposed between two pipes.
#
# Layers, bottom up; each uses only the public API of the ones below it (zrepl's
# internal/rpc/dataconn splits frameconn, heartbeatconn and stream the same way):
#
#   FrameChannel     the fds (a socket, or a pipe pair with a TransportProcess behind it), waiting,
#                    cancel, the frame codec, errors that name the peer; Heartbeat keeps it alive
#   StreamCopier     the one copy loop of both stream directions: splice or read/write, token
#                    bucket, pacer, byte counting
#   StreamSender     an outgoing stream (FDPASS or DATA frames, then END), serving ABORT meanwhile
#   IncomingStream   an arriving stream: the passed fd, or DATA frames pumped into a consumer
#   LaneMux          lanes: sessions multiplexed on one channel, each a Connection over local pipes
#   Connection       the session: handshake, request(), serve(); serve_connection, ProtocolServer

PROTOCOL_NAME = "zrepl.py"
# 2: endpoint.info, paged listings, placeholders, holds and release_stale requests (an older peer
# would fail on the first of them mid-run; the handshake says so up front instead)
PROTOCOL_VERSION = 2
FRAME_MAGIC = b"ZRPL"
FRAME_HEADER = struct.Struct(">4sBI")  # magic, frame type, payload length
MAX_HEADER_SIZE = 1 << 20  # JSON payload limit of control frames, both ways (FrameTooLarge)
MAX_JSON_DEPTH = 32  # nesting limit of a control frame's JSON (our frames need 5)
MAX_DATA_SIZE = 4 << 20  # payload limit of DATA frames (we send at most STREAM_CHUNK)
STREAM_CHUNK = 1 << 20  # bytes moved per DATA frame at most
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_PEER_TIMEOUT = 60.0
_PROTO_LIMIT_GRANULE = 128 << 10  # smallest grant worth waiting for under a bandwidth limit
_PROTO_MAX_FDS = 4  # ancillary space per read; a peer sending more is garbage
_PROTO_ERROR_TEXT = 16 << 10  # an error message we put in an ERROR frame is cut to this

FRAME_HELLO = 1
FRAME_REQUEST = 2
FRAME_RESPONSE = 3
FRAME_ERROR = 4
FRAME_DATA = 5
FRAME_END = 6
FRAME_HEARTBEAT = 7
FRAME_FDPASS = 8
FRAME_ABORT = 9
FRAME_LANE = 10  # payload: the lane id (>H), then a slice of that lane's own byte stream
FRAME_LANE_CTL = 11  # JSON {"op": "open" | "credit" | "close", "lane": id[, "bytes": n]}
FRAME_NAMES = {
    FRAME_HELLO: "HELLO", FRAME_REQUEST: "REQUEST", FRAME_RESPONSE: "RESPONSE", FRAME_ERROR: "ERROR",
    FRAME_DATA: "DATA", FRAME_END: "END", FRAME_HEARTBEAT: "HEARTBEAT", FRAME_FDPASS: "FDPASS",
    FRAME_ABORT: "ABORT", FRAME_LANE: "LANE", FRAME_LANE_CTL: "LANE_CTL",
}
_HEARTBEAT_FRAME = FRAME_HEADER.pack(FRAME_MAGIC, FRAME_HEARTBEAT, 0)

# ssh stderr lines that mean "retrying will not help" (the rest of connection losses are temporary)
_PROTO_PERMANENT_MARKERS = (
    "Permission denied", "Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "command not found", "Bad configuration option", "No such file or directory",
)


class ProtocolError(ZreplError):
    """The conversation with the peer broke: garbage, version mismatch, or a lost connection.

    The connection is unusable afterwards. `kind` is the request in progress (if any) and `peer`
    names the other side. Permanent unless made with temporary=True (a refusal the peer marked
    temporary); ConnectionLost is temporary by default.
    """

    def __init__(self, message: str, *, kind: str | None = None, peer: str | None = None,
                 temporary: bool | None = None):
        self.message, self.kind, self.peer = message, kind, peer
        if temporary is not None:  # else the class default
            self.temporary = temporary
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.peer}: " if self.peer else ""
        what = f"request {self.kind!r}: " if self.kind else ""
        return f"{where}{what}{self.message}"


class ConnectionLost(ProtocolError):
    """The peer went away (EOF, reset, transport process died) or stopped answering: a network-type
    error, temporary unless the transport said something permanent (e.g. ssh 'Permission denied')."""

    temporary = True


class PeerTimeout(ConnectionLost):
    """Nothing (not even a heartbeat) arrived from the peer within the I/O timeout."""


class Cancelled(ZreplError):
    """Connection.cancel() was called (watchdog, `signal reset`, shutdown) while a call was blocked.
    Permanent: cancel means stop."""


class RemoteError(ZreplError):
    """The peer handled our request and reported a failure (an ERROR frame); the connection stays
    usable. Carries the request kind, the peer's error type and message and its `temporary` flag."""

    def __init__(self, message: str, *, kind: str | None = None, peer: str | None = None,
                 remote_type: str = "", temporary: bool = False):
        self.message, self.kind, self.peer = message, kind, peer
        self.remote_type, self.temporary = remote_type, temporary
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.peer}: " if self.peer else ""
        what = f"request {self.kind!r} failed: " if self.kind else ""
        return f"{where}{what}{self.message}"


class StreamError(ZreplError):
    """A replication stream did not arrive whole: the producer on the other side failed (its END
    said so) or the local consumer stopped reading. The connection stays usable. Whoever raises it
    says whether a retry may help."""

    def __init__(self, message: str, *, kind: str | None = None, temporary: bool):
        self.message, self.kind, self.temporary = message, kind, temporary
        super().__init__(f"request {kind!r}: {message}" if kind else message)


class FrameTooLarge(ZreplError):
    """A control frame we were about to send is over MAX_HEADER_SIZE. Nothing was sent, so the
    connection stays usable; the same request would fail again (permanent)."""

    def __init__(self, frame: str, size: int, *, kind: str | None = None, peer: str | None = None):
        self.frame, self.size, self.limit = frame, size, MAX_HEADER_SIZE
        where = f"{peer}: " if peer else ""
        what = f" for request {kind!r}" if kind else ""
        super().__init__(f"{where}refusing to send a {frame} frame of {size} bytes{what}: a control frame "
                         f"may have at most {MAX_HEADER_SIZE} bytes (MAX_HEADER_SIZE)")


@dataclass
class WireFrame:
    """One decoded frame. DATA frames leave their payload (`length` bytes) unread in the channel."""

    type: int
    body: dict[str, Any] | None
    length: int
    fd: int | None = None  # FDPASS: the received descriptor

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.type, str(self.type))


@dataclass
class ConnectionStats:
    """Counters for tests, status and benchmarks (frames by type name, stream bytes, passed fds)."""

    frames_sent: dict[str, int] = field(default_factory=dict)
    frames_received: dict[str, int] = field(default_factory=dict)
    stream_bytes_sent: int = 0
    stream_bytes_received: int = 0
    fds_sent: int = 0
    fds_received: int = 0
    spliced_bytes: int = 0  # stream bytes moved by os.splice (never entered Python)

    def count(self, table: dict[str, int], name: str) -> None:
        table[name] = table.get(name, 0) + 1


class TokenBucket:
    """Bandwidth limit: `rate` bytes/s on average, bursts up to `capacity` bytes.

    Thread-safe. `clock` is injectable so tests can check the math deterministically. The bucket
    starts full.
    """

    def __init__(self, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"bandwidth rate must be positive, got {rate!r}")
        if capacity <= 0:
            raise ValueError(f"bucket capacity must be positive, got {capacity!r}")
        self.rate, self.capacity, self._clock = float(rate), int(capacity), clock
        self._tokens = float(capacity)
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(float(self.capacity), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens

    def take(self, want: int, minimum: int | None = None) -> tuple[int, float]:
        """Grant up to `want` bytes now. Returns (granted, 0.0) when at least `minimum` (default
        min(want, capacity)) tokens are there, else (0, seconds until they will be)."""
        if want <= 0:
            return 0, 0.0
        need = min(want, self.capacity) if minimum is None else max(1, min(minimum, want, self.capacity))
        with self._lock:
            self._refill()
            if self._tokens + 1e-6 >= need:  # float refill lands a hair below round numbers
                granted = min(want, int(self._tokens + 1e-6))
                self._tokens -= granted
                return granted, 0.0
            return 0, max(1e-3, (need - self._tokens) / self.rate)  # no busy-waiting on crumbs

    def give_back(self, n: int) -> None:
        """Return tokens granted but not used (a read came up short)."""
        if n > 0:
            with self._lock:
                self._tokens = min(float(self.capacity), self._tokens + n)


@dataclass
class OutgoingStream:
    """A stream to send: `fd` is readable (e.g. `zfs send` stdout); the protocol takes ownership
    and closes it. After EOF (or, when the fd itself was passed, right away) `finish()` is called;
    it waits for the producer and returns None on success or an error message that the peer gets in
    the END frame."""

    fd: int
    finish: Callable[[], str | None] | None = None

    @classmethod
    def from_process(cls, proc: subprocess.Popen, describe: str,
                     stderr: RingBuffer | None = None) -> OutgoingStream:
        """Stream a subprocess's stdout (which must be subprocess.PIPE); finish() waits for it and
        reports a non-zero exit with `describe` and the tail of `stderr` if given."""
        assert proc.stdout is not None
        fd = os.dup(proc.stdout.fileno())
        proc.stdout.close()

        def finish() -> str | None:
            rc = proc.wait()
            if rc == 0:
                return None
            tail = stderr.text().strip()[-2000:] if stderr is not None else ""
            return f"{describe} exited with status {rc}" + (f": {tail}" if tail else "")

        return cls(fd, finish)


@dataclass
class Reply:
    """What a handler returns when its response carries a stream (pull: `zfs send` output)."""

    body: dict[str, Any]
    stream: OutgoingStream | None = None


@dataclass
class RequestContext:
    """Passed to handlers with the request body: who asks, and the incoming stream (if any)."""

    kind: str
    identity: str
    conn: Connection
    stream: IncomingStream | None = None
    accept_fd: bool = False  # the client accepts a response stream as a passed fd


Handler = Callable[[dict, RequestContext], "dict | Reply | None"]


def encode_control(ftype: int, body: dict[str, Any], *, kind: str | None = None,
                   peer: str | None = None) -> bytes:
    """The JSON payload of a control frame.

    Raises:
    FrameTooLarge if it is over MAX_HEADER_SIZE
    TypeError, ValueError if body is not JSON-encodable (ValueError also for cycles and nesting
      too deep for the encoder)
    """
    try:
        payload = json.dumps(body, separators=(",", ":")).encode()
    except RecursionError:
        raise ValueError("the frame's JSON is nested too deeply to encode") from None
    if len(payload) > MAX_HEADER_SIZE:
        raise FrameTooLarge(FRAME_NAMES.get(ftype, str(ftype)), len(payload), kind=kind, peer=peer)
    return payload


def decode_control(payload: bytes) -> dict[str, Any]:
    """A control frame's JSON object, the nesting bounded by MAX_JSON_DEPTH (a hostile peer's
    100,000 brackets must not reach the decoder's recursion limit, nor our code).

    Raises:
    ValueError saying why: invalid JSON, too deeply nested, or not a JSON object
    """
    too_deep = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        body = json.loads(payload)
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError(f"header is not a JSON object but {type(body).__name__}")
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH and not _json_depth_within(body, MAX_JSON_DEPTH):
        raise ValueError(too_deep)
    return body


def _json_depth_within(value: dict[str, Any] | list[Any], limit: int) -> bool:
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return True


def _proto_fionread(fd: int) -> int | None:
    """Bytes readable without blocking (pipes, sockets, files), None where the kernel can't tell."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return None
    return buf[0]


def _proto_grow_pipe(fd: int, size: int = STREAM_CHUNK) -> None:
    """Bigger pipe buffers mean bigger DATA frames and fewer wake-ups; best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError):
        pass


def _proto_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    for fd in (r, w):
        os.set_inheritable(fd, False)
    return r, w


def _proto_close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _proto_cut(text: str, limit: int = _PROTO_ERROR_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


MAX_PACE_DELAY = 0.005  # seconds a stream copy loop may wait for a bigger batch


class _StreamPacer:
    """Lets a stream copy loop wake up less often on a pipe.

    ssh reads and writes its stdio in 16-32 KiB pieces. A loop that wakes for each piece spends more
    CPU on wake-ups than on moving bytes, CPU that the ssh next to it needs for encryption. Before a
    move, pace() sleeps about as long as the other end needs to make a quarter of the pipe ready
    (bytes to read in it, or room to write), judged from the rate seen so far and never longer than
    MAX_PACE_DELAY; the pipe (1 MiB) holds far more than that, so the other end never waits for us."""

    def __init__(self, fd: int, *, size: int, reading: bool, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.fd, self.size, self.reading = fd, size, reading
        self.batch = max(size // 4, 16 << 10)
        self.rate = 0.0  # bytes/s, smoothed
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    @classmethod
    def for_pipe(cls, fd: int, *, reading: bool, **kwargs: Any) -> _StreamPacer | None:
        """A pacer for the pipe we read from (`reading`) or write to; None if fd is no pipe (a
        socket wakes us per segment, and a stdio file needs no pacing)."""
        try:
            size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except (OSError, AttributeError):
            return None
        return cls(fd, size=size, reading=reading, **kwargs)

    def moved(self, n: int) -> None:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if n > 0 and elapsed > 0:
            rate = n / elapsed
            self.rate = rate if not self.rate else 0.75 * self.rate + 0.25 * rate

    def pace(self, want: int, *, first: bool) -> None:
        """`want` bytes are to move: sleep first if waiting for a bigger batch pays off. Into a pipe
        the `first` move of a frame goes at once: only after a move that filled it is waiting known
        to pay off."""
        if first and not self.reading:
            return
        pending = _proto_fionread(self.fd) or 0
        self.pause(pending if self.reading else self.size - pending, want)

    def pause(self, ready: int, want: int) -> None:
        """`ready` bytes can move now and `want` are wanted: sleep if waiting pays off."""
        goal = min(self.batch, want)
        if ready >= goal or self.rate <= 0:
            return
        delay = min(MAX_PACE_DELAY, (goal - ready) / self.rate)
        if delay >= 0.0005:
            self._sleep(delay)


class _OwnedLock:
    """A lock that knows its holder, so an error path never waits for a lock its own thread holds
    (and never writes an ERROR frame into the middle of a half-written frame)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking, timeout):
            self.owner = threading.get_ident()
            return True
        return False

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def __enter__(self) -> _OwnedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_SPLICE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


# ---- the frame channel --------------------------------------------------------------------------

@dataclass
class TransportProcess:
    """The process behind a pipe channel (ssh): its stderr is kept and quoted in errors, and
    closing the channel stops it."""

    proc: subprocess.Popen
    stderr: RingBuffer | None = None
    stderr_thread: threading.Thread | None = None

    def report(self) -> tuple[str, bool]:
        """What the process said, to append to an error, and whether that looks permanent."""
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            rc = None
        if self.stderr_thread is not None:
            self.stderr_thread.join(timeout=1)
        tail = self.stderr.text().strip()[-2000:] if self.stderr is not None else ""
        args = self.proc.args
        what = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args))
        state = "is still running" if rc is None else f"exited with status {rc}"
        permanent = any(m in tail for m in _PROTO_PERMANENT_MARKERS)
        return f"; {what} {state}" + (f": {tail}" if tail else ""), permanent

    def close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def stop(self) -> None:
        """Wait for the process (ssh exits by itself once its stdin is closed), else end it. The
        wait is generous: a loaded host may take seconds to tear a process down, and ending ssh
        early turns a clean exit into a signal in the logs."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stderr_thread is not None:
            self.stderr_thread.join(timeout=2)


class _ChannelSelector:
    """One PollSelector for a channel's life. A wait changes only the registrations that differ
    from the previous wait: no poll object per wait, and poll(2) itself takes the fd set each time,
    so changing it costs no system call."""

    def __init__(self) -> None:
        self._selector = selectors.PollSelector()
        self._masks: dict[int, int] = {}
        self.lock = threading.Lock()  # held by the one thread that waits with it

    def select(self, masks: dict[int, int], timeout: float | None) -> list[tuple[int, int]]:
        for fd in self._masks.keys() - masks.keys():
            self._selector.unregister(fd)
        for fd, mask in masks.items():
            old = self._masks.get(fd)
            if old is None:
                self._selector.register(fd, mask)
            elif old != mask:
                self._selector.modify(fd, mask)
        self._masks = masks
        return [(key.fd, events) for key, events in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()
        self._masks = {}


class FrameChannel:
    """The bottom layer of a connection: a connected AF_UNIX socket (fds can be passed) or a pair
    of pipe fds (stdio, ssh) with the TransportProcess behind them.

    It waits (one long-lived selector, woken by cancel()), reads and writes frames, keeps the peer's
    liveness (the last byte received; a Heartbeat when we were idle) and makes the errors, which
    name the peer (`name`) and the request in progress (`kind`, set by the session).

    Threads: one thread reads at a time (the session, or an IncomingStream's pump); writers
    serialise on `send_lock`, which send_frame takes and which a caller writing a frame in pieces
    (send_data_frame, write_all) holds itself. cancel() may come from any thread.

    Public attributes: `name`, `timeout` (seconds of silence after which the peer counts as gone),
    `heartbeat_interval`, `stats`, `kind`; read-only: `sock`, `rfd`, `wfd`, `process`, `send_lock`.
    """

    def __init__(self, *, sock: socket.socket | None = None, rfd: int | None = None,
                 wfd: int | None = None, name: str = "peer", timeout: float = DEFAULT_PEER_TIMEOUT,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 process: TransportProcess | None = None, restore_blocking: bool = False):
        self.sock = sock
        if sock is not None:
            sock.setblocking(False)
            self.rfd = self.wfd = sock.fileno()
        elif rfd is None or wfd is None:
            raise ValueError("a channel needs a socket or both rfd and wfd")
        else:
            self.rfd, self.wfd = rfd, wfd
        fds = {self.rfd, self.wfd}
        self._restore = [(fd, os.get_blocking(fd)) for fd in fds] if restore_blocking else []
        for fd in fds:
            os.set_blocking(fd, False)
            if sock is None:
                # ssh's stdio pipes default to 64 KiB: at 1 MiB a DATA frame moves in one splice
                # and the copy loop wakes far less often (measured: 82% -> 97% of raw ssh).
                _proto_grow_pipe(fd)
        self.name, self.timeout, self.heartbeat_interval = name, timeout, heartbeat_interval
        self.process = process
        self.stats = ConnectionStats()
        self.kind: str | None = None
        self.send_lock = _OwnedLock()
        self._wake_r, self._wake_w = _proto_pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = _ChannelSelector()
        self._fd_queue: list[int] = []  # received with SCM_RIGHTS, waiting for their FDPASS frames
        self._last_recv = self._last_write = time.monotonic()
        self._cancel_reason: str | None = None
        self._broken: ZreplError | None = None
        self._closed = False
        self._heartbeat: Heartbeat | None = None
        # a lane's channel: why the connection carrying it broke (None while it works)
        self.carrier: Callable[[], ProtocolError | None] | None = None

    @property
    def is_socket(self) -> bool:
        """True when fds can travel (a connected AF_UNIX socket)."""
        return self.sock is not None and self.sock.family == socket.AF_UNIX

    # ---- lifecycle and state ------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Neither cancelled, closed nor broken."""
        return self._cancel_reason is None and not self._closed and self._broken is None

    def check_usable(self) -> None:
        """Raises:
        Cancelled if cancel() was called
        ProtocolError if the channel is closed or broke earlier (temporary as that error was)
        """
        if self._cancel_reason is not None:
            raise self.cancelled_error()
        if self._closed:
            raise ProtocolError("connection is closed", peer=self.name)
        if self._broken is not None:
            raise ProtocolError(f"connection unusable after an earlier error: {self._broken}",
                                peer=self.name, temporary=self._broken.temporary)

    def mark_broken(self, err: ZreplError) -> None:
        """Remember why the channel became unusable (the first reason wins)."""
        if self._broken is None:
            self._broken = err

    def cancel(self, reason: str = "cancelled") -> None:
        """Abort whatever the channel is doing, from any thread: every blocked call raises
        Cancelled promptly (the wake-up pipe stays readable). The channel is unusable after."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        if self._heartbeat is not None:
            self._heartbeat.stop()
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def close(self) -> None:
        """Cancel, close the fds and stop the transport process if there is one. Call it from the
        owning thread once nothing uses the channel; other threads use cancel()."""
        if self._closed:
            return
        self.cancel("connection closed")
        self._closed = True
        st = self.stats
        if st.stream_bytes_sent or st.stream_bytes_received:
            log.debug("%s: closed; stream bytes sent %d, received %d, spliced %d; DATA frames sent %d, received %d",
                      self.name, st.stream_bytes_sent, st.stream_bytes_received, st.spliced_bytes,
                      st.frames_sent.get("DATA", 0), st.frames_received.get("DATA", 0))
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2)
        for fd in self._fd_queue:
            _proto_close(fd)
        self._fd_queue.clear()
        for fd, blocking in self._restore:
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
        if self.sock is not None:
            self.sock.close()
        elif self.process is not None:
            self.process.close_pipes()
        else:
            for fd in {self.rfd, self.wfd}:
                _proto_close(fd)
        if self.process is not None:
            self.process.stop()
        for fd in (self._wake_r, self._wake_w):
            _proto_close(fd)
        self._selector.close()

    def start_heartbeat(self) -> None:
        """Start the Heartbeat thread (once; not at all with heartbeat_interval 0)."""
        if self._heartbeat is None and self.heartbeat_interval > 0:
            self._heartbeat = Heartbeat(self)
            self._heartbeat.start()

    def write_some(self, data: bytes | memoryview, fds: list[int] | None = None) -> int:
        """One non-blocking write (write_all's, and a LaneMux's, which never blocks on the peer);
        returns the bytes written, 0 if the peer is not reading now.

        Raises: ConnectionLost, Cancelled as write_all
        """
        try:
            n = self._write_once(data, fds)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError):
            raise self.lost("connection closed by the peer while sending") from None
        except OSError as e:
            if self._cancel_reason is not None:
                raise self.cancelled_error() from None
            raise self.lost(f"writing to the peer failed: {e.strerror}") from None
        if n:
            self._last_write = time.monotonic()
        return n

    # ---- errors -------------------------------------------------------------------------------

    def cancelled_error(self) -> Cancelled:
        return Cancelled(f"{self.name}: {self._cancel_reason or 'cancelled'}")

    def lost(self, message: str, cls: type[ConnectionLost] = ConnectionLost) -> ConnectionLost:
        """The error for a peer that went away, with what the transport process said (permanent if
        that looks permanent); marks the channel broken.

        Raises:
        Cancelled instead, when cancel() was called (a cancelled channel's fds fail too)
        """
        if self._cancel_reason is not None:
            raise self.cancelled_error()
        carried = self.carrier() if self.carrier is not None else None
        if carried is not None:  # the lane's end is a symptom: say what broke the connection
            cls = type(carried) if isinstance(carried, ConnectionLost) else ConnectionLost
            err = cls(carried.message, kind=self.kind, peer=carried.peer, temporary=carried.temporary)
            self.mark_broken(err)
            return err
        extra, permanent = self.process.report() if self.process is not None else ("", False)
        err = cls(message + extra, kind=self.kind, peer=self.name, temporary=False if permanent else None)
        self.mark_broken(err)
        return err

    def fail(self, message: str) -> ProtocolError:
        """The peer broke the protocol: tell it (a fatal ERROR frame, best effort), mark the channel
        broken and return the (permanent) error to raise."""
        message = _proto_cut(message)
        err = ProtocolError(message, kind=self.kind, peer=self.name)
        if self._broken is None:
            self._broken = err
            self._send_error_best_effort({"error": message, "type": "ProtocolError", "fatal": True,
                                          "temporary": False, "kind": self.kind and self.kind[:200]})
        return err

    def timeout_error(self, deadline_hit: bool = False) -> ConnectionLost:
        """The PeerTimeout for a silent peer (or, `deadline_hit`, a request deadline); as lost().

        Raises:
        Cancelled instead, when cancel() was called
        """
        if deadline_hit:
            return self.lost("no answer within the request timeout", PeerTimeout)
        return self.lost(f"nothing (not even a heartbeat) received from the peer for {self.timeout:g}s; "
                         "the peer or the network is gone", PeerTimeout)

    def _send_error_best_effort(self, body: dict[str, Any]) -> None:
        if self.send_lock.owner == threading.get_ident() or not self.send_lock.acquire(timeout=1):
            return  # never into the middle of our own half-written frame
        try:
            frame = self._pack(FRAME_ERROR, encode_control(FRAME_ERROR, body))
            self.write_all(frame, deadline=time.monotonic() + 1)
            self.stats.count(self.stats.frames_sent, "ERROR")
        except ZreplError:
            pass
        finally:
            self.send_lock.release()

    # ---- waiting and liveness -----------------------------------------------------------------

    def wait(self, reads: Iterable[int], writes: Iterable[int], timeout: float | None, *,
             wake: int | None = None) -> tuple[set[int], set[int]]:
        """Block until one of the fds is ready, `timeout` seconds pass (None: no limit) or cancel()
        is called. `wake`: one more fd whose readability ends the wait (a stream's abandon()).

        Returns:
        (readable, writable): the ready ones of reads and writes; both empty after the timeout

        Raises:
        Cancelled if cancel() was called before or during the wait
        """
        if self._cancel_reason is not None:
            raise self.cancelled_error()
        masks = {self._wake_r: selectors.EVENT_READ}
        for fd in reads:
            masks[fd] = masks.get(fd, 0) | selectors.EVENT_READ
        for fd in writes:
            masks[fd] = masks.get(fd, 0) | selectors.EVENT_WRITE
        if wake is not None:
            masks[wake] = masks.get(wake, 0) | selectors.EVENT_READ
        timeout = None if timeout is None else max(0.0, timeout)
        if self._selector.lock.acquire(blocking=False):
            try:
                ready = self._selector.select(masks, timeout)
            finally:
                self._selector.lock.release()
        else:
            # a second thread waits meanwhile (a heartbeat finishing its frame while the reader
            # waits): it gets a selector for this one wait
            spare = _ChannelSelector()
            try:
                ready = spare.select(masks, timeout)
            finally:
                spare.close()
        if self._cancel_reason is not None:
            raise self.cancelled_error()
        return ({fd for fd, ev in ready if ev & selectors.EVENT_READ},
                {fd for fd, ev in ready if ev & selectors.EVENT_WRITE})

    def wait_readable(self, deadline: float | None = None) -> None:
        """Wait until bytes from the peer are readable.

        Raises:
        PeerTimeout if the peer stays silent for `timeout` seconds, or at `deadline`
        Cancelled if cancel() was called
        """
        now = time.monotonic()
        alive_until = self._last_recv + self.timeout
        limit = alive_until if deadline is None else min(alive_until, deadline)
        if limit <= now:
            raise self.timeout_error(deadline_hit=deadline is not None and deadline <= alive_until)
        self.wait([self.rfd], [], limit - now)

    def time_left(self) -> float:
        """Seconds until the peer, silent since its last byte, counts as gone."""
        return self._last_recv + self.timeout - time.monotonic()

    def idle_for(self) -> float:
        """Seconds since we last wrote anything."""
        return time.monotonic() - self._last_write

    def credit_peer(self) -> None:
        """We were not listening (a handler or consumer ran): don't blame the peer for that time."""
        self._last_recv = max(self._last_recv, time.monotonic())

    def pending(self) -> int | None:
        """Bytes from the peer readable now (None where the kernel can't tell)."""
        return _proto_fionread(self.rfd)

    def record_sent(self, n: int, *, spliced: bool) -> None:
        """n stream bytes went out past the channel (spliced into `wfd` or written by write_all)."""
        self._last_write = time.monotonic()
        self.stats.stream_bytes_sent += n
        if spliced:
            self.stats.spliced_bytes += n

    def record_received(self, n: int, *, spliced: bool) -> None:
        """n stream bytes came in past the channel (spliced from `rfd` or read with read_some)."""
        self._last_recv = time.monotonic()
        self.stats.stream_bytes_received += n
        if spliced:
            self.stats.spliced_bytes += n

    # ---- reading ------------------------------------------------------------------------------

    def read_some(self, n: int) -> bytes | None:
        """One non-blocking read of up to n bytes; fds passed along are kept for FDPASS frames.

        Returns:
        the bytes; b'' at EOF; None if nothing is there yet

        Raises:
        ConnectionLost if the peer reset the connection or reading failed
        ProtocolError if the peer passed more fds than fit in one message
        Cancelled if cancel() was called
        """
        try:
            if self.sock is not None:
                data, anc, flags, _ = self.sock.recvmsg(
                    n, socket.CMSG_SPACE(_PROTO_MAX_FDS * 4), getattr(socket, "MSG_CMSG_CLOEXEC", 0))
                for level, ctype, cdata in anc:
                    if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                        self._fd_queue.extend(fds)
                        self.stats.fds_received += len(fds)
                if flags & socket.MSG_CTRUNC:
                    raise self.fail("peer sent more file descriptors than fit in one message")
            else:
                data = os.read(self.rfd, n)
        except BlockingIOError:
            return None
        except (ConnectionResetError, BrokenPipeError):
            raise self.lost("connection reset by peer") from None
        except OSError as e:
            if self._cancel_reason is not None:
                raise self.cancelled_error() from None
            raise self.lost(f"reading from the peer failed: {e.strerror}") from None
        if data:
            self._last_recv = time.monotonic()
        return data

    def skip(self, n: int) -> None:
        """Read and drop n bytes (the rest of a DATA payload nobody consumes).

        Raises:
        ConnectionLost at EOF; PeerTimeout, Cancelled as wait_readable
        """
        while n:
            data = self.read_some(min(n, STREAM_CHUNK))
            if data is None:
                self.wait_readable()
                continue
            if not data:
                raise self.lost("connection closed by the peer in the middle of a stream")
            n -= len(data)

    def _read_exact(self, n: int, *, deadline: float | None, allow_eof: bool = False,
                    what: str = "frame") -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            data = self.read_some(n - len(buf))
            if data is None:
                self.wait_readable(deadline)
                continue
            if not data:
                if not buf and allow_eof:
                    return None
                raise self.lost("connection closed by the peer"
                                + (f" in the middle of a {what} (truncated frame)" if buf or what != "frame" else ""))
            buf += data
        return bytes(buf)

    def _garbage_hint(self, head: bytes) -> str:
        try:
            more = self.read_some(72) or b""
        except ZreplError:
            more = b""
        sample = (head + more).decode("utf-8", "replace")
        hint = ("the peer does not speak the zrepl.py protocol; over ssh make sure nothing (a shell rc "
                "file, a motd) prints to stdout before the forced command runs")
        return f"bad frame magic: expected {FRAME_MAGIC!r}, got {head[:4]!r} (data starts with {sample!r}): {hint}"

    def read_frame(self, *, deadline: float | None = None, skip_heartbeats: bool = True) -> WireFrame:
        """The next frame. A DATA frame's payload stays unread: the caller moves exactly `length`
        bytes (read_some, skip, or splice from `rfd`) before reading the next frame.

        Raises:
        ProtocolError for garbage (bad magic, unknown type, a frame over its size limit, invalid
          JSON or JSON nested deeper than MAX_JSON_DEPTH, an FDPASS without fd): the peer gets a
          fatal ERROR frame, the channel is broken, the error is permanent
        ConnectionLost at EOF or a reset ("truncated frame" in the middle of one)
        PeerTimeout if the peer is silent for `timeout` seconds, or at `deadline`
        Cancelled if cancel() was called
        """
        frame = self.read_frame_or_eof(deadline=deadline, skip_heartbeats=skip_heartbeats)
        if frame is None:
            raise self.lost("connection closed by the peer")
        return frame

    def read_frame_or_eof(self, *, deadline: float | None = None,
                          skip_heartbeats: bool = True) -> WireFrame | None:
        """As read_frame, but None when the peer closed the connection between two frames.

        Raises: as read_frame (ConnectionLost only for an EOF inside a frame)
        """
        while True:
            frame = self._read_frame(deadline)
            if frame is None or frame.type != FRAME_HEARTBEAT or not skip_heartbeats:
                return frame

    def _read_frame(self, deadline: float | None) -> WireFrame | None:
        if self._cancel_reason is not None:
            raise self.cancelled_error()
        head = self._read_exact(FRAME_HEADER.size, deadline=deadline, allow_eof=True)
        if head is None:
            return None
        magic, ftype, length = FRAME_HEADER.unpack(head)
        if magic != FRAME_MAGIC:
            raise self.fail(self._garbage_hint(head))
        name = FRAME_NAMES.get(ftype)
        if name is None:
            raise self.fail(f"unknown frame type {ftype}")
        self.stats.count(self.stats.frames_received, name)
        if ftype == FRAME_DATA:
            if not 0 < length <= MAX_DATA_SIZE:
                raise self.fail(f"DATA frame of {length} bytes (allowed 1..{MAX_DATA_SIZE})")
            return WireFrame(ftype, None, length)
        if length > MAX_HEADER_SIZE:
            raise self.fail(f"oversized {name} frame: {length} bytes, over the limit of {MAX_HEADER_SIZE} "
                            "bytes for one control frame (MAX_HEADER_SIZE)")
        if ftype == FRAME_HEARTBEAT:
            if length:
                raise self.fail(f"HEARTBEAT frame with a {length} byte payload")
            return WireFrame(ftype, None, 0)
        payload = self._read_exact(length, deadline=deadline, what=f"{name} frame") if length else b""
        assert payload is not None  # allow_eof is off: EOF raised ConnectionLost
        try:
            body = decode_control(payload)
        except ValueError as e:
            raise self.fail(f"{name} frame: {e}") from None
        frame = WireFrame(ftype, body, length)
        if ftype == FRAME_FDPASS:
            if not self._fd_queue:
                raise self.fail("FDPASS frame arrived without a file descriptor")
            frame.fd = self._fd_queue.pop(0)
        return frame

    # ---- writing ------------------------------------------------------------------------------

    @staticmethod
    def _pack(ftype: int, payload: bytes) -> bytes:
        return FRAME_HEADER.pack(FRAME_MAGIC, ftype, len(payload)) + payload

    def send_frame(self, ftype: int, body: dict[str, Any] | bytes, *, fds: list[int] | None = None,
                   on_blocked: Callable[[], bool] | None = None) -> None:
        """Write one whole frame under send_lock. `body`: a control frame's JSON object, or its
        payload already encoded (encode_control), or a DATA payload. `fds` travel with the first
        byte (AF_UNIX only). `on_blocked`: as write_all.

        Raises:
        FrameTooLarge if a control frame is over MAX_HEADER_SIZE (nothing was sent)
        ConnectionLost, PeerTimeout, Cancelled as write_all
        """
        name = FRAME_NAMES[ftype]
        payload = body if isinstance(body, bytes) else encode_control(ftype, body, kind=self.kind, peer=self.name)
        if len(payload) > (MAX_DATA_SIZE if ftype == FRAME_DATA else MAX_HEADER_SIZE):
            raise FrameTooLarge(name, len(payload), kind=self.kind, peer=self.name)
        with self.send_lock:
            self.write_all(self._pack(ftype, payload), fds=fds, on_blocked=on_blocked)
        self.stats.count(self.stats.frames_sent, name)
        if fds:
            self.stats.fds_sent += len(fds)

    def send_data_frame(self, n: int, move: Callable[[int], object], *,
                        on_blocked: Callable[[], bool] | None = None) -> None:
        """A DATA frame of n payload bytes that `move(n)` puts into `wfd` itself (a splice) right
        after we wrote the header; all under send_lock.

        Raises:
        ConnectionLost, PeerTimeout, Cancelled as write_all; whatever move() raises
        """
        with self.send_lock:
            self.write_all(FRAME_HEADER.pack(FRAME_MAGIC, FRAME_DATA, n), on_blocked=on_blocked)
            move(n)
        self.stats.count(self.stats.frames_sent, "DATA")

    def _write_once(self, data: bytes | memoryview, fds: list[int] | None = None) -> int:
        if fds:
            assert self.sock is not None  # only sockets pass fds
            return self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if self.sock is not None:
            return self.sock.send(data)
        return os.write(self.wfd, data)

    def write_all(self, data: bytes | memoryview, *, fds: list[int] | None = None,
                  on_blocked: Callable[[], bool] | None = None, deadline: float | None = None) -> None:
        """Write all of data; the caller holds send_lock. When the peer does not read, `on_blocked()`
        (if given) waits and returns True (a stream sender serving the peer's control frames
        meanwhile), or returns False to have us wait ourselves: until the peer reads or shows life
        (its unread bytes to us change), for up to `timeout` seconds, or until `deadline`.

        Raises:
        ConnectionLost if the peer closed the connection or writing failed
        PeerTimeout if the peer read nothing and said nothing for `timeout` seconds (or by `deadline`)
        Cancelled if cancel() was called
        """
        view = memoryview(data)
        alive_mark, probe = time.monotonic(), None
        probe_unset = True
        while view:
            if self._cancel_reason is not None:
                raise self.cancelled_error()
            n = self.write_some(view, fds)
            if n:
                view = view[n:]
                fds = None  # the descriptors travel with the first byte
                alive_mark = self._last_write
                continue
            if on_blocked is not None and on_blocked():
                continue
            now = time.monotonic()
            pending = self.pending()
            if probe_unset:
                probe, probe_unset = pending, False
            elif pending is not None and pending != probe:
                probe, alive_mark = pending, now  # the peer keeps talking: alive, just not reading yet
            limit = alive_mark + self.timeout if deadline is None else deadline
            if now >= limit:
                raise self.lost(f"the peer has not read anything for {limit - alive_mark:g}s", PeerTimeout)
            self.wait([], [self.wfd], limit - now)

    def send_heartbeat(self) -> bool:
        """Write one HEARTBEAT frame, unless another thread is writing (a sign of life already) or
        the peer is not reading (then it is not waiting for us either).

        Returns:
        False once the channel is unusable (the owner notices that itself), else True
        """
        if not self.send_lock.acquire(blocking=False):
            return True
        try:
            try:
                n = self._write_once(_HEARTBEAT_FRAME)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if n < len(_HEARTBEAT_FRAME):
                self.write_all(_HEARTBEAT_FRAME[n:], deadline=time.monotonic() + self.timeout)
            self._last_write = time.monotonic()
            self.stats.count(self.stats.frames_sent, "HEARTBEAT")
            return True
        except ZreplError:
            return False
        finally:
            self.send_lock.release()


class Heartbeat:
    """Keeps a channel alive: a thread that sends a HEARTBEAT frame whenever the channel has written
    nothing for its heartbeat_interval, so a busy handler or a slow consumer still shows life."""

    def __init__(self, channel: FrameChannel):
        self.channel = channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat {channel.name}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        ch = self.channel
        while not self._stop.wait(min(1.0, ch.heartbeat_interval / 2)):
            if not ch.usable:
                return
            if ch.idle_for() >= ch.heartbeat_interval and not ch.send_heartbeat():
                return


# ---- the copy loop ------------------------------------------------------------------------------

class CopySource(Protocol):
    """Where a StreamCopier reads: the peer's channel, or a producer's pipe."""

    fd: int

    def read(self, n: int) -> bytes | None:
        """Up to n bytes without blocking: b'' at EOF, None if nothing is there yet."""

    def wait(self) -> None:
        """Until the source is readable."""

    def ended(self) -> ZreplError:
        """The error for an EOF before the bytes the copy was promised."""


class CopySink(Protocol):
    """Where a StreamCopier writes: the peer's channel, or a consumer's pipe."""

    fd: int

    @property
    def open(self) -> bool:
        """False once the sink is gone or abandoned: the copy stops."""

    def write(self, data: bytes) -> None:
        """All of data (waiting as needed), unless the sink goes away meanwhile."""

    def wait(self) -> None:
        """Until the sink can take bytes."""


class StreamCopier:
    """The one copy loop of both stream directions (producer pipe -> channel, channel -> consumer
    pipe): os.splice moves the bytes kernel-side, read/write takes over where splice refuses (e.g.
    socket -> regular file) or is missing; an optional token bucket limits the rate, a pacer
    batches wake-ups on pipes, `count(n, spliced)` sees every byte. The ends say how to wait and
    what an early end means; `on_splice_error` decides about a splice error other than "unsupported"
    (it raises, or notes that the sink is gone); `pause(seconds)` waits for tokens."""

    def __init__(self, source: CopySource, sink: CopySink, *, count: Callable[[int, bool], None],
                 on_splice_error: Callable[[OSError], None], limit: TokenBucket | None = None,
                 pause: Callable[[float], None] = time.sleep, pacer: _StreamPacer | None = None):
        self.source, self.sink, self.limit, self.pacer = source, sink, limit, pacer
        self._count, self._on_splice_error, self._pause = count, on_splice_error, pause
        self.use_splice = hasattr(os, "splice")

    def grant(self, want: int) -> int:
        """How many of `want` bytes the bandwidth limit lets move now (all without a limit; under a
        limit at least min(want, 128 KiB)).

        Returns:
        the grant; 0 after pausing until enough tokens should be there (ask again)

        Raises:
        whatever `pause` raises (Cancelled)
        """
        if self.limit is None:
            return want
        granted, delay = self.limit.take(want, min(want, _PROTO_LIMIT_GRANULE))
        if not granted:
            self._pause(delay)
        return granted

    def give_back(self, n: int) -> None:
        """Return n granted bytes that did not move."""
        if self.limit is not None:
            self.limit.give_back(n)

    def move(self, n: int, *, limited: bool = False) -> int:
        """Move n bytes from source to sink; with `limited`, each step takes its grant first.

        Returns:
        the bytes left unmoved because the sink went away (0: all arrived)

        Raises:
        source.ended() if the source ends first; whatever the ends' waits, `pause` and
        `on_splice_error` raise
        """
        left = n
        while left and self.sink.open:
            step = self.grant(left) if limited else left
            if not step:
                continue
            k = self._splice(step, first=left == n) if self.use_splice else self._read_write(step)
            if limited:
                self.give_back(step - k)
            left -= k
        return left

    def _splice(self, n: int, *, first: bool) -> int:
        """One splice of up to n bytes; returns the bytes moved (0 after waiting)."""
        if self.pacer is not None:
            self.pacer.pace(n, first=first)
        try:
            k = os.splice(self.source.fd, self.sink.fd, n, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            if (_proto_fionread(self.source.fd) or 0) > 0:
                self.sink.wait()
            else:
                self.source.wait()
            return 0
        except OSError as e:
            if e.errno in _SPLICE_UNSUPPORTED or e.errno is None:
                self.use_splice = False
            else:
                self._on_splice_error(e)
            return 0
        if k == 0:
            raise self.source.ended()
        if self.pacer is not None:
            self.pacer.moved(k)
        self._count(k, True)
        return k

    def _read_write(self, n: int) -> int:
        """One read of up to n bytes, written whole; returns the bytes taken (0 after waiting)."""
        data = self.source.read(n)
        if data is None:
            self.source.wait()
            return 0
        if not data:
            raise self.source.ended()
        self.sink.write(data)
        self._count(len(data), False)
        return len(data)


# ---- outgoing streams ---------------------------------------------------------------------------

class _ProducerSource:
    """The producer's pipe (`zfs send` stdout) of a stream we send in DATA frames."""

    def __init__(self, fd: int, sender: StreamSender):
        self.fd, self._sender = fd, sender

    def read(self, n: int) -> bytes | None:
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None
        except OSError as e:  # in the middle of a frame: its header promised these bytes
            raise self._sender.channel.fail(f"reading the stream source failed: {e.strerror}") from None

    def wait(self) -> None:
        self._sender.wait(read_fd=self.fd)

    def ended(self) -> ZreplError:
        # the frame header promised the bytes FIONREAD showed; the framing can't be repaired
        return self._sender.channel.fail("the stream source shrank while being sent")


class _ChannelSink:
    """The channel as the sink of a stream we send: writes wait while serving the peer."""

    open = True

    def __init__(self, sender: StreamSender):
        self.fd, self._sender = sender.channel.wfd, sender

    def write(self, data: bytes) -> None:
        self._sender.channel.write_all(data, on_blocked=self._sender.serve_while_blocked)

    def wait(self) -> None:
        self._sender.wait(write_fd=self.fd)


class StreamSender:
    """Sends the stream of one request or response: the fd itself in an FDPASS frame (zero
    copies) or its bytes in DATA frames, then END with the producer's verdict. Meanwhile it serves
    the peer's control frames: heartbeats, ABORT of this stream (we stop, END says "aborted") and,
    on the client side (`answer_may_come`), an answer that comes before the stream ended (we stop
    too and hand it to the session)."""

    def __init__(self, channel: FrameChannel, rid: int, *, answer_may_come: bool,
                 limit: TokenBucket | None = None, progress: Callable[[int], None] | None = None):
        self.channel, self.rid, self.answer_may_come = channel, rid, answer_may_come
        self.limit, self.progress = limit, progress
        self.stopped = False  # the peer asked us to stop (ABORT), or answered already
        self.early: WireFrame | None = None  # that answer

    def send(self, out: OutgoingStream, mode: str) -> WireFrame | None:
        """Send out's stream ("fd": pass it; "data": DATA frames) and its END; out.fd is closed.

        Returns:
        the answer (RESPONSE or ERROR) that arrived while sending, else None

        Raises:
        ProtocolError, ConnectionLost, PeerTimeout if the connection broke
        Cancelled if cancel() was called
        """
        fd_open = True
        try:
            total: int | None = None
            src_error: str | None = None
            if mode == "fd":
                self.channel.send_frame(FRAME_FDPASS, {}, fds=[out.fd], on_blocked=self.serve_while_blocked)
                os.close(out.fd)  # the peer holds its own reference now
                fd_open = False
            else:
                total, src_error = self._copy(out.fd)
            status, error = self._verdict(out, src_error)
            self.channel.send_frame(FRAME_END, {"status": status, "error": error, "bytes": total},
                                    on_blocked=self.serve_while_blocked)
            return self.early
        finally:
            if fd_open:
                os.close(out.fd)

    def _verdict(self, out: OutgoingStream, src_error: str | None) -> tuple[str, str | None]:
        if self.stopped:
            return "aborted", "the receiving side stopped the stream"
        if src_error is not None:
            return "error", src_error
        if out.finish is None:
            return "ok", None
        done, error = self._call_serving(out.finish)
        if not done:
            return "aborted", None
        return ("error" if error else "ok"), error

    def _copy(self, src: int) -> tuple[int, str | None]:
        """DATA frames from src until EOF or until the peer stops us. Returns (bytes sent, the
        error reading the source or None)."""
        ch = self.channel
        os.set_blocking(src, False)
        _proto_grow_pipe(src)
        counted = _proto_fionread(src) is not None  # know the frame size before moving the bytes
        copier = StreamCopier(_ProducerSource(src, self), _ChannelSink(self), count=self._count,
                              on_splice_error=self._splice_failed, limit=self.limit, pause=self._pause,
                              pacer=_StreamPacer.for_pipe(ch.wfd, reading=False))
        total = 0
        while not self.stopped:
            readable, _ = self.wait(read_fd=src)
            if not readable:
                continue
            want = min(_proto_fionread(src) or 0, STREAM_CHUNK) if counted else STREAM_CHUNK
            if want == 0:
                break  # readable with nothing in it: EOF
            want = copier.grant(want)
            if not want:
                continue
            if counted:
                ch.send_data_frame(want, copier.move, on_blocked=self.serve_while_blocked)
                total += want
                continue
            try:  # a source the kernel can't measure: read first, then frame what came
                data = os.read(src, want)
            except BlockingIOError:
                data = None
            except OSError as e:
                return total, f"reading the stream source failed: {e.strerror}"
            copier.give_back(want - len(data or b""))
            if data == b"":
                break
            if data:
                ch.send_frame(FRAME_DATA, data, on_blocked=self.serve_while_blocked)
                self._count(len(data), False)
                total += len(data)
        return total, None

    def _count(self, n: int, spliced: bool) -> None:
        self.channel.record_sent(n, spliced=spliced)
        if self.progress is not None:
            self.progress(n)

    def _pause(self, delay: float) -> None:
        self.wait(timeout=delay)

    def _splice_failed(self, err: OSError) -> None:
        if isinstance(err, (BrokenPipeError, ConnectionResetError)):
            raise self.channel.lost("connection closed by the peer while sending a stream")
        raise self.channel.lost(f"sending the stream failed: {err.strerror}")

    def wait(self, *, read_fd: int | None = None, write_fd: int | None = None,
             timeout: float | None = None) -> tuple[set[int], set[int]]:
        """Wait for read_fd / write_fd (or `timeout` seconds) while serving the peer's control
        frames (after an early answer there is nothing more to serve).

        Returns:
        the ready ones of {read_fd} and {write_fd}; empty after a control frame or the timeout

        Raises:
        PeerTimeout if nothing came from the peer for the channel's timeout
        ProtocolError for an unexpected frame or the peer's fatal ERROR
        ConnectionLost, Cancelled as FrameChannel.read_frame
        """
        ch = self.channel
        listen = self.early is None
        if listen:
            alive_left = ch.time_left()
            if alive_left <= 0:
                raise ch.timeout_error()
            timeout = alive_left if timeout is None else min(timeout, alive_left)
        reads = ([ch.rfd] if listen else []) + ([read_fd] if read_fd is not None else [])
        readable, writable = ch.wait(reads, [write_fd] if write_fd is not None else [], timeout)
        if listen and ch.rfd in readable:
            self._control(ch.read_frame(skip_heartbeats=False))
        return ({read_fd} & readable if read_fd is not None else set(),
                {write_fd} & writable if write_fd is not None else set())

    def serve_while_blocked(self) -> bool:
        """write_all's on_blocked: wait for the channel to take bytes while serving the peer.
        False after an early answer: write_all then waits by itself (the peer owes us reading).

        Raises: as wait()
        """
        if self.early is not None:
            return False
        self.wait(write_fd=self.channel.wfd)
        return True

    def _control(self, frame: WireFrame) -> None:
        ch = self.channel
        if frame.type == FRAME_HEARTBEAT:
            return
        body = frame.body or {}
        if frame.type == FRAME_ABORT:
            if body.get("id") == self.rid:
                self.stopped = True
            return
        if frame.type == FRAME_ERROR and body.get("fatal"):
            err = ProtocolError(f"the peer reported a protocol error: {body.get('error')}",
                                kind=ch.kind, peer=ch.name)
            ch.mark_broken(err)
            raise err
        if self.answer_may_come and frame.type in (FRAME_RESPONSE, FRAME_ERROR):
            self.early, self.stopped = frame, True
            return
        raise ch.fail(f"unexpected {frame.name} frame while sending a stream")

    def _call_serving(self, fn: Callable[[], str | None]) -> tuple[bool, str | None]:
        """Run fn (waiting for the producer) in a helper thread while still serving control frames
        and cancel(). Returns (finished, result); finished is False if the peer stopped us first."""
        r, w = _proto_pipe()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except ZreplError as e:
                box["result"] = str(e)
            except Exception as e:  # a producer callback bug must still end the stream cleanly
                box["result"] = f"{type(e).__name__}: {e}"
            finally:
                try:
                    os.write(w, b"x")
                except OSError:
                    pass
                os.close(w)

        threading.Thread(target=run, daemon=True, name=f"stream finish {self.channel.name}").start()
        try:
            while not self.stopped:
                readable, _ = self.wait(read_fd=r)
                if readable:
                    return True, box.get("result")
            return False, None
        finally:
            os.close(r)


# ---- incoming streams ---------------------------------------------------------------------------

class _ChannelSource:
    """The channel as the source of a stream we receive (a DATA frame's payload)."""

    def __init__(self, channel: FrameChannel):
        self.fd, self._channel = channel.rfd, channel

    def read(self, n: int) -> bytes | None:
        return self._channel.read_some(min(n, STREAM_CHUNK))

    def wait(self) -> None:
        self._channel.wait_readable()

    def ended(self) -> ZreplError:
        return self._channel.lost("connection closed by the peer in the middle of a stream")


class _ConsumerSink:
    """The consumer of a stream we receive (`zfs recv` stdin, a file). Its pace is not the peer's
    fault: waiting for it credits the peer; abandon() (`wake`) ends such a wait."""

    def __init__(self, stream: IncomingStream, fd: int, channel: FrameChannel, wake: int | None):
        self.fd, self._stream, self._channel, self._wake = fd, stream, channel, wake

    @property
    def open(self) -> bool:
        return self._stream.consuming

    def wait(self) -> None:
        self._channel.wait([], [self.fd], None, wake=self._wake)
        self._channel.credit_peer()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.open:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                self.wait()
            except BrokenPipeError:
                self._stream.consumer_gone = True
            except OSError as e:
                self._stream.consumer_error = f"writing the stream failed: {e.strerror}"

    def splice_failed(self, err: OSError) -> None:
        if isinstance(err, BrokenPipeError):
            self._stream.consumer_gone = True
        elif isinstance(err, ConnectionResetError):
            raise self._channel.lost("connection reset by peer in the middle of a stream")
        else:
            self._stream.consumer_error = f"writing the stream failed: {err.strerror}"


class IncomingStream:
    """A stream arriving over a channel (the request's for a server handler, the response's in a
    client's stream_out callback).

    Use exactly one of: `open_fd()` -> an fd to give a subprocess as stdin (then close your copy);
    over AF_UNIX this is the passed pipe itself, otherwise a pipe fed by a pump thread;
    `copy_to(fd)` -> copy it into fd in the calling thread; `discard()`. Then `finish()` waits for
    the END and raises StreamError if the producer failed or the consumer stopped early. abandon()
    may come from another thread.
    """

    def __init__(self, channel: FrameChannel, mode: str, *, kind: str | None, rid: int,
                 progress: Callable[[int], None] | None = None, limit: TokenBucket | None = None):
        """Raises: ProtocolError if an announced passed fd does not come (and as read_frame)."""
        self.channel, self.mode, self.kind, self.rid = channel, mode, kind, rid
        self.nbytes = 0  # bytes copied (stays 0 when the fd was passed: Python never sees them)
        self.discarded = 0  # bytes dropped after abandon(): they arrived, so END's count includes them
        self.sender_status: str | None = None
        self.sender_error: str | None = None
        self.consumer_gone = False  # the consumer closed its end
        self.consumer_error: str | None = None  # writing to the consumer failed
        self._progress, self._limit = progress, limit
        self._fd: int | None = None
        self._opened = False
        self._done = False
        self._finished = False
        self._abandoned = False
        self._abort_sent = False
        self._thread: threading.Thread | None = None
        self._pump_error: BaseException | None = None
        if mode == "fd":
            frame = channel.read_frame()
            if frame.type != FRAME_FDPASS:
                raise channel.fail(f"expected FDPASS after announcing a passed stream, got {frame.name}")
            self._fd = frame.fd
        self._wake_r: int | None
        self._wake_w: int | None
        self._wake_r, self._wake_w = _proto_pipe()  # abandon() wakes a pump waiting for its consumer
        os.set_blocking(self._wake_w, False)

    @property
    def done(self) -> bool:
        """END has been received."""
        return self._done

    @property
    def finished(self) -> bool:
        """finish() (or discard()) has run."""
        return self._finished

    @property
    def consuming(self) -> bool:
        """Bytes still go to the consumer: not abandoned, the consumer neither gone nor failing."""
        return not (self._abandoned or self.consumer_gone or self.consumer_error)

    def open_fd(self) -> int:
        """An fd for a consumer's stdin. The caller owns it (close it after handing it over).

        Raises: ZreplError if the stream was already opened or discarded
        """
        self._claim()
        if self.mode == "fd":
            fd, self._fd = self._fd, None
            assert fd is not None
            return fd
        r, w = _proto_pipe()
        _proto_grow_pipe(w)
        os.set_blocking(w, False)
        self._thread = threading.Thread(target=self._pump_thread, args=(w,), daemon=True,
                                        name=f"stream pump {self.channel.name}")
        self._thread.start()
        return r

    def copy_to(self, fd: int) -> int:
        """Copy the whole stream into fd (a file or pipe; not closed) in this thread, then finish().

        Returns: the byte count
        Raises: ZreplError if already opened or discarded; as finish()
        """
        self._claim()
        if self.mode == "fd":
            src, self._fd = self._fd, None
            assert src is not None
            try:
                with os.fdopen(src, "rb", buffering=0, closefd=False) as f:
                    while chunk := f.read(STREAM_CHUNK):
                        os.write(fd, chunk)  # test/diagnostic path; real consumers get open_fd()
                        self.nbytes += len(chunk)
            finally:
                os.close(src)
        else:
            self._pump(fd, close_dst=False)
        self.finish()
        return self.nbytes

    def _claim(self) -> None:
        if self._opened or self._abandoned:
            raise ZreplError("the stream was already opened or discarded")
        self._opened = True

    def abandon(self) -> None:
        """Stop consuming: the sender is told (ABORT) and the rest is discarded by finish().

        Raises: ConnectionLost, PeerTimeout, Cancelled when telling the sender fails (fd mode)
        """
        self._abandoned = True
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.mode == "fd" and not self._done:
            self._send_abort()

    def discard(self) -> None:
        """Abandon and drain to END.

        Raises: only connection errors (ProtocolError, ConnectionLost, PeerTimeout, Cancelled)
        """
        self.abandon()
        try:
            self.finish()
        except StreamError:
            pass

    def finish(self) -> int:
        """Wait for END.

        Returns:
        the bytes copied (0 when the fd itself was passed)

        Raises:
        StreamError if the sending side failed or aborted, or the consumer stopped early or failed
        ProtocolError, ConnectionLost, PeerTimeout if the connection broke
        Cancelled if cancel() was called
        """
        if not self._finished:
            self._finished = True
            try:
                if self.mode == "fd":
                    self._await_end_after_fd()
                elif self._thread is not None:
                    self._thread.join()
                elif not self._done:
                    self._abandoned = True  # never opened: nobody consumes it
                    self._pump(None, close_dst=False)
            finally:
                for fd in (self._wake_r, self._wake_w):
                    if fd is not None:
                        os.close(fd)
                self._wake_r = self._wake_w = None
        if self._pump_error is not None:
            raise self._pump_error
        # the sender's own failure: its zfs send may well succeed on a retry (resuming)
        if self.sender_status == "error":
            raise StreamError(f"the sending side failed: {self.sender_error}", kind=self.kind, temporary=True)
        # our consumer's: whoever runs it has its error (e.g. zfs recv's) and decides
        if self.consumer_error is not None:
            raise StreamError(self.consumer_error, kind=self.kind, temporary=False)
        if self.consumer_gone:
            raise StreamError(f"the stream's consumer stopped reading after {self.nbytes} bytes",
                              kind=self.kind, temporary=False)
        if self.sender_status == "aborted" and not self._abandoned:
            raise StreamError(f"the sending side aborted the stream: {self.sender_error}", kind=self.kind,
                              temporary=False)
        return self.nbytes

    def _await_end_after_fd(self) -> None:
        if self._fd is not None and not self._opened:
            self.abandon()
        self.channel.credit_peer()
        while not self._done:
            frame = self.channel.read_frame()
            if frame.type == FRAME_ABORT:
                continue
            if frame.type != FRAME_END:
                raise self.channel.fail(f"unexpected {frame.name} frame after a passed stream")
            self._record_end(frame.body or {})

    def _send_abort(self) -> None:
        if not self._abort_sent and not self._done:
            self._abort_sent = True
            self.channel.send_frame(FRAME_ABORT, {"id": self.rid,
                                                  "reason": "the receiving side stopped consuming the stream"})

    def _record_end(self, body: dict[str, Any]) -> None:
        status, count = body.get("status"), body.get("bytes")
        if status not in ("ok", "error", "aborted") or not (count is None or isinstance(count, int)):
            raise self.channel.fail(f"malformed END frame {body!r:.200}")
        if self.mode == "data" and status == "ok" and count != self.nbytes + self.discarded:
            raise self.channel.fail(f"stream length mismatch: the peer sent {count} bytes, "
                                    f"{self.nbytes + self.discarded} arrived")
        error = body.get("error")
        self.sender_status, self.sender_error = status, None if error is None else _proto_cut(str(error), 2000)
        self._done = True

    def _pump_thread(self, dst: int) -> None:
        try:
            self._pump(dst, close_dst=True)
        except BaseException as e:  # re-raised by finish() in the owner's thread
            self._pump_error = e

    def _pump(self, dst: int | None, *, close_dst: bool) -> None:
        """Read frames until END, moving DATA payloads into dst; once the consumer is no longer
        consuming (or dst is None) the rest is discarded and the sender told to stop."""
        ch = self.channel
        copier = None
        if dst is not None:
            sink = _ConsumerSink(self, dst, ch, self._wake_r)
            copier = StreamCopier(_ChannelSource(ch), sink, count=self._count, on_splice_error=sink.splice_failed,
                                  limit=self._limit, pause=self._pause,
                                  pacer=_StreamPacer.for_pipe(ch.rfd, reading=True))
        try:
            while not self._done:
                left = self._next_payload()
                if left and copier is not None and self.consuming:
                    left = copier.move(left, limited=True)
                if copier is not None and not self.consuming:
                    if close_dst:
                        os.close(copier.sink.fd)
                    copier = None
                if left:
                    self._send_abort()
                    ch.skip(left)
                    self.discarded += left
        finally:
            if close_dst and copier is not None:
                os.close(copier.sink.fd)

    def _next_payload(self) -> int:
        """The length of the next DATA frame's payload; 0 after END (recorded) or a late ABORT."""
        ch = self.channel
        frame = ch.read_frame()
        body = frame.body or {}
        if frame.type == FRAME_ABORT:
            return 0
        if frame.type == FRAME_END:
            self._record_end(body)
            return 0
        if frame.type == FRAME_ERROR and body.get("fatal"):
            err = ProtocolError(f"the peer reported a protocol error: {body.get('error')}",
                                kind=self.kind, peer=ch.name)
            ch.mark_broken(err)
            raise err
        if frame.type != FRAME_DATA:
            raise ch.fail(f"unexpected {frame.name} frame inside a stream")
        return frame.length

    def _count(self, n: int, spliced: bool) -> None:
        self.nbytes += n
        self.channel.record_received(n, spliced=spliced)
        if self._progress is not None:
            self._progress(n)

    def _pause(self, delay: float) -> None:
        self.channel.wait([], [], delay, wake=self._wake_r)
        self.channel.credit_peer()


# ---- lanes: several sessions on one connection ---------------------------------------------------

# ssh+stdinserver runs parallel replication steps as lanes of ONE connection (why: JobRunner.
# _lanes_possible). Negotiated in the HELLOs: the client asks `"lanes": N`, a server that can
# answers `"lanes": M` (M <= N); a peer without the key (an older zrepl.py) gets one lane, the
# plain protocol. With M >= 2 every frame after the HELLOs is LANE (lane id + a slice of that
# lane's bytes), LANE_CTL (open, credit, close), HEARTBEAT or a fatal ERROR. Each lane is a whole
# Connection of its own over a pair of local pipes, with its own request ids, streams, heartbeats
# and errors: the mux only carries bytes, so a lane speaks exactly the protocol above.
#
# Flow control is per lane: a side sends at most LANE_WINDOW bytes of a lane that its peer has not
# credited back, and credits only what it handed to the lane's pipe. So the mux thread never blocks
# (it always reads the connection, a lane's backlog is bounded by its window), and a lane whose
# consumer stalls stops only its own sender. It reads a lane's pipe only while less than one
# LANE_CHUNK waits to be written, round robin: a stream on one lane delays another lane's request
# by about one frame.
MUX_MAX_LANES = 16  # lanes a server serves on one connection at most
LANE_WINDOW = 2 << 20  # un-credited bytes of one lane in flight (memory per lane and direction)
LANE_CHUNK = 256 << 10  # payload of one LANE frame at most
_LANE_ID = struct.Struct(">H")


class _MuxLane:
    """The mux's side of one lane: the two pipe ends it moves bytes through, and the credits."""

    def __init__(self, lane: int, conn: Connection, out_r: int, in_w: int):
        self.id, self.conn, self.out_r, self.in_w = lane, conn, out_r, in_w
        self.send_credit = LANE_WINDOW  # bytes we may still send before the peer credits more
        self.inbuf = bytearray()  # arrived from the peer, not yet in the lane's pipe
        self.owed = 0  # handed to the lane's pipe, not yet credited to the peer
        self.out_open = True  # the lane still writes (else we sent close)
        self.in_open = True  # the peer still sends (else it sent close)
        self.in_broken = False  # the lane stopped reading: what arrives is dropped (and credited)

    @property
    def finished(self) -> bool:
        """Both directions closed and delivered: the lane's id may go (it is never reused)."""
        return not self.out_open and not self.in_open and self.in_w < 0


class LaneMux:
    """The lanes of one connection (see above): one thread moves the bytes between the channel and
    each lane's pipes. The client opens lanes (open_lane); the server is told (`on_open`, from the
    mux thread) and serves each. Lane 0 exists from the start on both sides.

    A broken connection (lost, garbage, a hostile lane id or window, the peer's fatal ERROR, a lane's
    own ProtocolError via break_all) ends every lane: their pipes close and their errors name the
    cause (FrameChannel.carrier); cancel() cancels every lane. `error` keeps the cause; None after
    the peer closed the connection between frames.
    """

    def __init__(self, owner: Connection, count: int,
                 on_open: Callable[[int, Connection], None] | None = None):
        self.owner, self.channel, self.count = owner, owner.channel, count
        self._on_open = on_open
        self.error: ProtocolError | None = None
        self._lock = threading.Lock()
        self._lanes: dict[int, _MuxLane] = {}  # the mux thread's; others add under _lock via _new
        self._new: list[_MuxLane] = []
        self._conns: list[Connection] = []  # every lane made, for cancel()
        self._used: set[int] = set()
        self._next_id = 1
        self._break: ProtocolError | None = None  # a lane's ProtocolError, for the mux thread
        self._cancel_reason: str | None = None
        self._closing = False
        self._ended = False  # the mux thread has finished: new lanes can't be served
        self._write_error: ConnectionLost | None = None  # server: the client stopped reading
        self._out = bytearray()
        self._rbuf = bytearray()
        self._turn = 0
        self._wake_r, self._wake_w = _proto_pipe()
        os.set_blocking(self._wake_w, False)
        self.lane0 = self._make_lane(0)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,), daemon=True,
                                        name=f"lanes {self.channel.name}")

    def start(self) -> None:
        if self._on_open is not None:
            self._on_open(0, self.lane0)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    # ---- lanes --------------------------------------------------------------------------------

    def _make_lane(self, lane: int) -> Connection:
        """A lane's Connection over two fresh pipes, set up as if it had shaken hands (the owner's
        HELLOs, identity, limits and progress); queued for the mux thread."""
        owner = self.owner
        in_r, in_w = _proto_pipe()
        out_r, out_w = _proto_pipe()
        for fd in (in_w, out_r):
            os.set_blocking(fd, False)
        ch = owner.channel
        conn = Connection(rfd=in_r, wfd=out_w, name=f"{ch.name} lane {lane}", timeout=ch.timeout,
                          heartbeat_interval=ch.heartbeat_interval)
        conn.fd_passing = False
        conn.peer_hello = {k: v for k, v in owner.peer_hello.items() if k != "lanes"}
        conn.peer_hello["accept_fds"] = False
        conn.identity, conn._is_client = owner.identity, owner._is_client
        conn.send_limit, conn.recv_limit, conn.progress = owner.send_limit, owner.recv_limit, owner.progress
        conn._mux_parent = self
        conn.channel.carrier = lambda: self.error
        with self._lock:
            self._used.add(lane)
            self._conns.append(conn)
            cancelled, ended = self._cancel_reason, self._ended
            if not ended:
                self._new.append(_MuxLane(lane, conn, out_r, in_w))
        if ended:  # the mux thread is gone: the lane reads EOF at once, and says why
            if self.error is not None:
                conn.channel.mark_broken(self.error)
            _proto_close(out_r)
            _proto_close(in_w)
        if cancelled is not None:
            conn.cancel(cancelled)
        conn.channel.start_heartbeat()
        return conn

    def open_lane(self) -> Connection:
        """Client: a new lane (its Connection; close it when done).

        Raises:
        ProtocolError if the connection broke or all negotiated lanes are in use (lane ids are not
          reused on one connection)
        Cancelled if cancel() was called
        """
        if self._cancel_reason is not None:
            raise self.channel.cancelled_error()
        if self.error is not None:
            cls = type(self.error) if isinstance(self.error, ConnectionLost) else ProtocolError
            raise cls(f"connection unusable after an earlier error: {self.error.message}",
                      peer=self.channel.name, temporary=self.error.temporary)
        with self._lock:
            lane = self._next_id
            if lane >= self.count:
                raise ProtocolError(f"all {self.count} lanes of this connection are taken",
                                    peer=self.channel.name, temporary=False)
            self._next_id += 1
        conn = self._make_lane(lane)
        self._wake()
        return conn

    def break_all(self, err: ZreplError) -> None:
        """A lane's session broke (ProtocolError, Cancelled): end all lanes, from any thread."""
        if isinstance(err, Cancelled):
            self.cancel(str(err))
            return
        if isinstance(err, ProtocolError) and self._break is None:
            self._break = err
            self._wake()

    def cancel(self, reason: str) -> None:
        """Cancel the connection and every lane, from any thread."""
        with self._lock:
            if self._cancel_reason is None:
                self._cancel_reason = reason
            conns = list(self._conns)
        for conn in conns:
            conn.channel.cancel(reason)
        self.channel.cancel(reason)

    def close(self) -> None:
        """Cancel and wait for the mux thread (lanes are closed by their owners; lane 0 here). After
        the connection broke, lanes are not cancelled: each fails with why it broke, and may redial."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._closing = True  # the frames queued go out whole first: the peer sees a clean end
            self._wake()
            self._thread.join(timeout=10)
        if self._thread.is_alive() or not self._thread.ident:
            self.cancel("connection closed")
        else:
            self.channel.cancel("connection closed")
        self.lane0.close()
        if self._wake_r >= 0:
            for fd in (self._wake_r, self._wake_w):
                _proto_close(fd)
            self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    # ---- the mux thread -----------------------------------------------------------------------

    def _run(self) -> None:
        ch = self.channel
        try:
            with ch.send_lock:  # nobody else writes: our frames are whole, heartbeats come from here
                self._loop()
        except Cancelled:
            pass
        except ProtocolError as e:
            self.error = e
        except ZreplError as e:  # FrameTooLarge can't happen (our frames are small): be safe anyway
            self.error = ProtocolError(str(e), peer=ch.name)
        finally:
            if self.error is not None:
                ch.mark_broken(self.error)
            with self._lock:
                lanes = list(self._lanes.values()) + self._new
                self._new = []
                self._ended = True
            for lane in lanes:
                if self.error is not None:
                    lane.conn.channel.mark_broken(self.error)
                for fd in (lane.in_w, lane.out_r):
                    if fd >= 0:
                        _proto_close(fd)
                lane.in_w = lane.out_r = -1
                lane.out_open = False

    def _loop(self) -> None:
        ch = self.channel
        while True:
            self._adopt()
            if self._closing:
                self._drain(time.monotonic() + 2)
                return
            if self._break is not None:
                err = self._break
                raise self._fatal(f"lane session broke: {err.message if isinstance(err, ProtocolError) else err}")
            if not self._out and ch.heartbeat_interval > 0 and ch.idle_for() >= ch.heartbeat_interval:
                self._queue(FRAME_HEARTBEAT, b"")
            lanes = list(self._lanes.values())
            reads = [ch.rfd, self._wake_r]
            if len(self._out) < LANE_CHUNK:
                reads += [ln.out_r for ln in lanes if ln.out_open and ln.send_credit > 0]
            writes = [ln.in_w for ln in lanes if ln.inbuf and ln.in_w >= 0]
            if self._out:
                writes.append(ch.wfd)
            alive = ch.time_left()
            if alive <= 0:
                raise ch.timeout_error()
            wait = alive if ch.heartbeat_interval <= 0 else min(alive, ch.heartbeat_interval)
            readable, writable = ch.wait(reads, writes, wait)
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            if ch.rfd in readable and not self._read_peer():
                return  # the peer closed the connection between frames
            for ln in lanes:
                if ln.in_w in writable:
                    self._deliver(ln)
            if len(self._out) < LANE_CHUNK:
                self._read_lanes([ln for ln in lanes if ln.out_r in readable])
            if ch.wfd in writable or self._out:
                self._flush()
            for ln in lanes:
                if ln.finished and ln.out_r < 0:
                    del self._lanes[ln.id]

    def _adopt(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for ln in new:
            self._lanes[ln.id] = ln
            if ln.id and self._on_open is None:  # we opened it: tell the server
                self._queue_ctl({"op": "open", "lane": ln.id})

    def _queue(self, ftype: int, payload: bytes, more: bytes = b"") -> None:
        """Queue a frame of payload + more (a lane's bytes: one copy less than joining them)."""
        if self._write_error is not None:
            return
        self._out += FRAME_HEADER.pack(FRAME_MAGIC, ftype, len(payload) + len(more))
        self._out += payload
        self._out += more
        self.channel.stats.count(self.channel.stats.frames_sent, FRAME_NAMES[ftype])

    def _queue_ctl(self, body: dict[str, Any]) -> None:
        self._queue(FRAME_LANE_CTL, encode_control(FRAME_LANE_CTL, body))

    def _flush(self) -> None:
        if not self._out:
            return
        try:
            with memoryview(self._out) as view:  # released before _out may change size
                n = self.channel.write_some(view)
        except ConnectionLost as e:
            if self._on_open is None:
                raise
            # The client hung up while we wrote (a credit, a lane's end, a heartbeat): as with one
            # lane, its EOF decides; a clean one between frames ends serving normally.
            self._write_error = e
            self._out.clear()
            return
        del self._out[:n]

    def _drain(self, deadline: float) -> None:
        """Write what is queued (whole frames), until `deadline` at most."""
        while self._out and time.monotonic() < deadline:
            self._flush()
            if self._out:
                self.channel.wait([], [self.channel.wfd], max(0.0, deadline - time.monotonic()))

    def _fatal(self, message: str) -> ProtocolError:
        """The peer broke the lane protocol (or a lane's session broke): a fatal ERROR frame after
        whatever frames are queued (best effort, for a second), and the error to raise."""
        message = _proto_cut(message)
        err = ProtocolError(message, peer=self.channel.name)
        with contextlib.suppress(ZreplError):
            self._queue(FRAME_ERROR, encode_control(FRAME_ERROR, {
                "error": message, "type": "ProtocolError", "fatal": True, "temporary": False}))
            self._drain(time.monotonic() + 1)
        return err

    def _lane_for(self, lane: object, what: str) -> _MuxLane:
        if not isinstance(lane, int) or isinstance(lane, bool) or not 0 <= lane < self.count:
            raise self._fatal(f"{what} for lane {lane!r:.50}, outside the {self.count} negotiated lanes")
        ln = self._lanes.get(lane)
        if ln is None or not ln.in_open:
            raise self._fatal(f"{what} for lane {lane}, which is not open")
        return ln

    # peer -> lanes

    def _read_peer(self) -> bool:
        """Read what the peer sent and handle the whole frames. False at EOF between frames."""
        ch = self.channel
        data = ch.read_some(STREAM_CHUNK)
        if data is None:
            return True
        if not data:
            if self._rbuf:
                raise ch.lost("connection closed by the peer in the middle of a frame (truncated frame)")
            if self._on_open is None:  # the client never expects the server to go away
                raise ch.lost("connection closed by the peer")
            return False
        if self._write_error is not None:  # it talks on but no longer reads: gone after all
            raise self._write_error
        self._rbuf += data
        buf, pos = self._rbuf, 0
        try:
            while len(buf) - pos >= FRAME_HEADER.size:
                magic, ftype, length = FRAME_HEADER.unpack_from(buf, pos)
                if magic != FRAME_MAGIC:
                    raise self._fatal(f"bad frame magic {bytes(buf[pos:pos + 4])!r} on a connection with lanes")
                limit = {FRAME_LANE: _LANE_ID.size + LANE_CHUNK, FRAME_LANE_CTL: MAX_HEADER_SIZE,
                         FRAME_ERROR: MAX_HEADER_SIZE, FRAME_HEARTBEAT: 0}.get(ftype)
                if limit is None:
                    raise self._fatal(f"unexpected {FRAME_NAMES.get(ftype, str(ftype))} frame on a connection "
                                      "with lanes")
                if length > limit or (ftype == FRAME_LANE and length <= _LANE_ID.size):
                    raise self._fatal(f"{FRAME_NAMES[ftype]} frame of {length} bytes (allowed at most {limit})")
                if len(buf) - pos - FRAME_HEADER.size < length:
                    break
                start = pos + FRAME_HEADER.size
                ch.stats.count(ch.stats.frames_received, FRAME_NAMES[ftype])
                if ftype == FRAME_LANE:
                    self._lane_data(buf, start, length)
                else:
                    self._frame(ftype, buf[start:start + length])  # a copy: no view pins the buffer
                pos = start + length
        finally:
            del buf[:pos]
        return True

    def _lane_data(self, buf: bytearray, start: int, length: int) -> None:
        """A LANE frame's payload, buf[start:start + length]: into its lane's buffer."""
        (lane,) = _LANE_ID.unpack_from(buf, start)
        ln = self._lane_for(lane, "LANE frame")
        n = length - _LANE_ID.size
        if len(ln.inbuf) + ln.owed + n > LANE_WINDOW:
            raise self._fatal(f"lane {lane}: the peer sent more than the {LANE_WINDOW} bytes it was credited")
        if ln.in_broken:
            ln.owed += n
            self._credit(ln)
            return
        # one copy, straight from the read buffer (the view lives for this statement only)
        ln.inbuf += memoryview(buf)[start + _LANE_ID.size:start + length]
        self._deliver(ln)

    def _frame(self, ftype: int, payload: bytearray) -> None:
        if ftype == FRAME_HEARTBEAT:
            return
        try:
            body = decode_control(bytes(payload))
        except ValueError as e:
            raise self._fatal(f"{FRAME_NAMES[ftype]} frame: {e}") from None
        if ftype == FRAME_ERROR:
            raise ProtocolError(f"the peer reported a protocol error: {_proto_cut(str(body.get('error')))}",
                                peer=self.channel.name)
        op, lane = body.get("op"), body.get("lane")
        if op == "open":
            if self._on_open is None:
                raise self._fatal("LANE_CTL open from the server (only the client opens lanes)")
            if not isinstance(lane, int) or isinstance(lane, bool) or not 0 < lane < self.count:
                raise self._fatal(f"LANE_CTL open for lane {lane!r:.50}, outside the {self.count} negotiated lanes")
            if lane in self._used:
                raise self._fatal(f"LANE_CTL open for lane {lane}, which was opened before")
            self._on_open(lane, self._make_lane(lane))
            self._adopt()
        elif op == "credit":
            count = body.get("bytes")
            if not isinstance(lane, int) or isinstance(lane, bool) or lane not in self._used:
                raise self._fatal(f"LANE_CTL credit for lane {lane!r:.50}, which was never opened")
            if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
                raise self._fatal(f"LANE_CTL credit of {count!r:.50} bytes")
            credited = self._lanes.get(lane)
            if credited is not None:  # else: a late credit for a lane both sides closed
                if credited.send_credit + count > LANE_WINDOW:
                    raise self._fatal(f"lane {lane}: the peer credited more than the {LANE_WINDOW} byte window")
                credited.send_credit += count
        elif op == "close":
            ln = self._lane_for(lane, "LANE_CTL close")
            ln.in_open = False
            self._deliver(ln)
        else:
            raise self._fatal(f"LANE_CTL frame with unknown op {op!r:.50}")

    def _deliver(self, ln: _MuxLane) -> None:
        """Move what arrived for a lane into its pipe (as much as fits now) and credit it."""
        while ln.inbuf and ln.in_w >= 0:
            try:
                n = os.write(ln.in_w, ln.inbuf)
            except BlockingIOError:
                break
            except OSError:  # the lane closed its end: drop the rest, keep the peer unblocked
                n = len(ln.inbuf)
                ln.in_broken = True
                _proto_close(ln.in_w)
                ln.in_w = -1
            del ln.inbuf[:n]
            ln.owed += n
        if not ln.inbuf and not ln.in_open and ln.in_w >= 0:
            _proto_close(ln.in_w)  # the lane reads EOF
            ln.in_w = -1
        if not ln.in_open and ln.in_w < 0:
            ln.inbuf.clear()
        self._credit(ln)

    def _credit(self, ln: _MuxLane) -> None:
        if ln.owed and ln.in_open and (ln.owed >= LANE_CHUNK or not ln.inbuf):
            self._queue_ctl({"op": "credit", "lane": ln.id, "bytes": ln.owed})
            ln.owed = 0

    # lanes -> peer

    def _read_lanes(self, ready: list[_MuxLane]) -> None:
        """One chunk from each ready lane, round robin, while less than a chunk waits to be written."""
        if not ready:
            return
        self._turn = (self._turn + 1) % len(ready)
        for ln in ready[self._turn:] + ready[:self._turn]:
            if len(self._out) >= LANE_CHUNK:
                break
            try:
                data = os.read(ln.out_r, min(ln.send_credit, LANE_CHUNK))
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # the lane's session ended: the peer's end of it reads EOF
                ln.out_open = False
                _proto_close(ln.out_r)
                ln.out_r = -1
                self._queue_ctl({"op": "close", "lane": ln.id})
                continue
            ln.send_credit -= len(data)
            self._queue(FRAME_LANE, _LANE_ID.pack(ln.id), data)


# ---- the session --------------------------------------------------------------------------------

class Connection:
    """One protocol session over a FrameChannel: the handshake, then requests (client) or serving
    them (server). Create with local_pair(), Connection.from_stdio() or ssh_connect(); the keyword
    arguments are FrameChannel's.

    Client side: handshake_client(), then request(). Server side: serve() / serve_connection() (or
    handshake_server() and the loop yourself). Attributes you may set before the handshake:
    `send_limit` / `recv_limit` (TokenBucket, bandwidth limits for streams), `progress` (called
    with the byte count of every stream chunk moved, from whichever thread moves it), `fd_passing`
    (False forces DATA frames even over AF_UNIX), `lanes_wanted` (client: ask for that many lanes,
    see LaneMux). `channel` is the layer below (its `timeout` and `heartbeat_interval` may change
    any time); `name` and `stats` are the channel's. After a handshake `lanes` is the number agreed
    (1: the plain protocol); with more, request() runs on lane 0 and open_lane() gives the others.
    """

    def __init__(self, *, sock: socket.socket | None = None, rfd: int | None = None,
                 wfd: int | None = None, name: str = "peer", timeout: float = DEFAULT_PEER_TIMEOUT,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 process: TransportProcess | None = None, restore_blocking: bool = False):
        self.channel = FrameChannel(sock=sock, rfd=rfd, wfd=wfd, name=name, timeout=timeout,
                                    heartbeat_interval=heartbeat_interval, process=process,
                                    restore_blocking=restore_blocking)
        self.send_limit: TokenBucket | None = None
        self.recv_limit: TokenBucket | None = None
        self.progress: Callable[[int], None] | None = None
        self.fd_passing = self.channel.is_socket
        self.peer_hello: dict[str, Any] = {}
        self.identity: str | None = None
        self.lanes_wanted = 1
        self.lanes = 1
        self._mux: LaneMux | None = None  # our lanes, once more than one was agreed
        self._mux_parent: LaneMux | None = None  # a lane's: the mux it rides on
        self._request_lock = threading.Lock()
        self._next_id = 1
        self._is_client = False

    @classmethod
    def from_stdio(cls, *, name: str = "stdio client", timeout: float = DEFAULT_PEER_TIMEOUT,
                   heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL) -> Connection:
        """Server side of `stdinserver`: take over stdin/stdout. Stray prints can't corrupt the
        protocol afterwards: fd 0 becomes /dev/null and fd 1 a copy of stderr."""
        rfd, wfd = os.dup(0), os.dup(1)
        for fd in (rfd, wfd):
            os.set_inheritable(fd, False)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)
        return cls(rfd=rfd, wfd=wfd, name=name, timeout=timeout,
                   heartbeat_interval=heartbeat_interval, restore_blocking=True)

    @property
    def name(self) -> str:
        return self.channel.name

    @name.setter
    def name(self, value: str) -> None:
        self.channel.name = value

    @property
    def stats(self) -> ConnectionStats:
        return self.channel.stats

    @property
    def is_socket(self) -> bool:
        """True when fds can travel (a connected AF_UNIX socket)."""
        return self.channel.is_socket

    # tests/test_stdinserver.py reads these three; new code uses conn.channel
    @property
    def _child(self) -> subprocess.Popen | None:
        return self.channel.process.proc if self.channel.process is not None else None

    @property
    def _child_stderr(self) -> RingBuffer | None:
        return self.channel.process.stderr if self.channel.process is not None else None

    @property
    def _sock(self) -> socket.socket | None:
        return self.channel.sock

    def _accepts_fds(self) -> bool:
        return self.is_socket and self.fd_passing and self.recv_limit is None

    def _may_pass_fd(self, peer_accepts: bool) -> bool:
        return peer_accepts and self.is_socket and self.fd_passing and self.send_limit is None

    @property
    def usable(self) -> bool:
        """Neither cancelled, closed nor broken (nor the connection under its lanes)."""
        return self.channel.usable and (self._mux is None or self._mux.error is None)

    def cancel(self, reason: str = "cancelled") -> None:
        """Abort whatever this connection (and each of its lanes) is doing, from any thread: every
        blocked call raises Cancelled promptly. The connection is unusable after."""
        if self._mux is not None:
            self._mux.cancel(reason)
        self.channel.cancel(reason)

    def close(self) -> None:
        """Cancel, close the fds and stop the transport process (ssh) if there is one. Call it from
        the owning thread once nothing uses the connection; other threads use cancel()."""
        if self._mux is not None:
            self._mux.close()
        self.channel.close()

    def open_lane(self) -> Connection:
        """Client: one more lane on this connection (request() as here; close it when done).

        Raises:
        ProtocolError if no more lanes were agreed, or the connection broke
        Cancelled if cancel() was called
        """
        if self._mux is None:
            raise ProtocolError("the peer agreed to no lanes on this connection", peer=self.name,
                                temporary=False)
        return self._mux.open_lane()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- handshake ----------------------------------------------------------------------------

    def _hello(self, identity: str | None) -> dict[str, Any]:
        hello: dict[str, Any] = {"protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION,
                                 "software": __version__, "accept_fds": self._accepts_fds()}
        if identity is not None:
            hello["identity"] = identity
        return hello

    def _hello_with_lanes(self, identity: str | None, lanes: int | None) -> dict[str, Any]:
        hello = self._hello(identity)
        if lanes is not None:  # only when asked: an older peer sees the HELLO it always saw
            hello["lanes"] = lanes
        return hello

    def _hello_lanes(self, body: dict[str, Any], most: int) -> int | None:
        """The peer HELLO's `lanes` (None without one), validated: an int from 1 to `most`."""
        lanes = body.get("lanes")
        if lanes is None:
            return None
        if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= most:
            raise self.channel.fail(f"HELLO with invalid lanes {lanes!r:.50} (allowed 1..{most})")
        return lanes

    def _check_hello(self, body: dict[str, Any]) -> None:
        if body.get("protocol") != PROTOCOL_NAME:
            raise self.channel.fail(f"peer is not a zrepl.py endpoint (protocol {body.get('protocol')!r:.200})")
        version = body.get("version")
        if version != PROTOCOL_VERSION:
            peer, me = ("server", "client") if self._is_client else ("client", "server")
            raise self.channel.fail(
                f"protocol version mismatch: the {peer} (zrepl.py {body.get('software', '?')!s:.100}) speaks "
                f"version {version!r:.100}, the {me} (zrepl.py {__version__}) speaks version {PROTOCOL_VERSION}; "
                "install the same zrepl.py on both hosts")

    def handshake_client(self, identity: str) -> dict[str, Any]:
        """Active side: introduce ourselves as `identity`.

        Returns:
        the server's HELLO body

        Raises:
        ProtocolError with the server's message when it refuses (temporary as the server says, e.g.
          while it still serves this identity's previous connection) or answers garbage
        ConnectionLost ("handshake failed: ..."), PeerTimeout, Cancelled
        """
        ch = self.channel
        ch.check_usable()
        self._is_client = True
        wanted = self.lanes_wanted if self.lanes_wanted > 1 else None
        try:
            ch.send_frame(FRAME_HELLO, self._hello_with_lanes(identity, wanted))
            frame = ch.read_frame(deadline=time.monotonic() + ch.timeout)
            if frame.type == FRAME_ERROR:
                body = frame.body or {}
                err = ProtocolError(f"handshake refused: {body.get('error', 'no reason given')!s:.2000}",
                                    peer=ch.name, temporary=body.get("temporary") is True)
                ch.mark_broken(err)
                raise err
            if frame.type != FRAME_HELLO:
                raise ch.fail(f"expected HELLO from the server, got {frame.name}")
            assert frame.body is not None
            self._check_hello(frame.body)
            agreed = self._hello_lanes(frame.body, wanted) if wanted else None
        except ConnectionLost as e:
            e.message = f"handshake failed: {e.message}"
            raise
        self.peer_hello, self.identity = frame.body, identity
        self.lanes = agreed or 1
        if self.lanes > 1:
            self._mux = LaneMux(self, self.lanes)  # it sends the heartbeats
            self._mux.start()
        else:
            ch.start_heartbeat()
        return frame.body

    def handshake_server(self, identity: str | None = None, *, lanes: int = 1) -> str:
        """Passive side: read the client's HELLO, check the version, answer with ours. `lanes`: how
        many lanes we can serve (serve() can, MUX_MAX_LANES); a client asking for some gets
        min(asked, lanes) in our HELLO, and `self.lanes` says what was agreed.

        Returns:
        the client identity: `identity` if given (stdinserver: it comes from the forced command
        and the client's claim is ignored), else the one the client sent (local transport)

        Raises:
        ProtocolError for a wrong first frame, version or identity (the client gets an ERROR frame)
        ConnectionLost, PeerTimeout, Cancelled
        """
        ch = self.channel
        ch.check_usable()
        frame = ch.read_frame_or_eof(deadline=time.monotonic() + ch.timeout, skip_heartbeats=False)
        if frame is None:
            raise ch.lost("peer closed the connection before the handshake")
        if frame.type != FRAME_HELLO:
            raise ch.fail(f"expected HELLO as the first frame, got {frame.name}")
        assert frame.body is not None
        self._check_hello(frame.body)
        if identity is None:
            claimed = frame.body.get("identity")
            if (not isinstance(claimed, str) or not 0 < len(claimed) <= 255
                    or any(ord(c) < 32 or c in "/@#" for c in claimed)):
                raise ch.fail(f"invalid client identity {claimed!r:.300}")
            identity = claimed
        asked = self._hello_lanes(frame.body, 1 << 16)
        agreed = None if asked is None else min(asked, max(1, lanes))
        ch.send_frame(FRAME_HELLO, self._hello_with_lanes(None, agreed))
        self.peer_hello, self.identity = frame.body, identity
        self.lanes = agreed or 1
        if self.lanes == 1:
            ch.start_heartbeat()  # else serve()'s LaneMux sends them
        return identity

    # ---- client requests ----------------------------------------------------------------------

    def request(self, kind: str, body: dict[str, Any] | None = None, *,
                stream_in: OutgoingStream | int | None = None,
                stream_out: Callable[[dict[str, Any], IncomingStream], Any] | None = None,
                timeout: float | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Send one request and return the response body.

        `stream_in`: a stream to send with the request (push: `zfs send` stdout; fd ownership passes
        to us). `stream_out(body, stream)`: called when the response carries a stream (pull); hand
        `stream.open_fd()` to `zfs recv`. When it returns we wait for the stream's END and raise
        StreamError if the producer failed; if it raises, the rest of the stream is dropped and the
        error propagates. `timeout`: how long to wait for the answer after our part was sent (None:
        as long as the peer shows life). `progress`: overrides the connection's progress callback.

        Raises:
        RemoteError if the handler failed (the connection stays usable)
        StreamError if the response's stream did not arrive whole (usable too)
        FrameTooLarge if the request is over MAX_HEADER_SIZE (nothing was sent; usable too)
        ProtocolError, ConnectionLost, PeerTimeout if the connection broke (unusable afterwards)
        Cancelled if cancel() was called
        """
        if self._mux is not None:  # the connection's own requests go on lane 0
            return self._mux.lane0.request(kind, body, stream_in=stream_in, stream_out=stream_out,
                                           timeout=timeout, progress=progress)
        out = OutgoingStream(stream_in) if isinstance(stream_in, int) else stream_in
        with self._request_lock:
            try:
                self.channel.check_usable()
                if not self.peer_hello:
                    raise ProtocolError("request before handshake", kind=kind, peer=self.name)
            except ZreplError:
                if out is not None:  # ownership passed to us: don't leak it
                    os.close(out.fd)
                raise
            self.channel.kind = kind
            try:
                return self._request(kind, body or {}, out, stream_out, timeout, progress or self.progress)
            except (ProtocolError, Cancelled) as e:
                self.channel.mark_broken(e)
                if self._mux_parent is not None:  # one lane's session broke: the connection did
                    self._mux_parent.break_all(e)
                raise
            finally:
                self.channel.kind = None

    def _request(self, kind: str, body: dict[str, Any], out: OutgoingStream | None,
                 stream_out: Callable[[dict[str, Any], IncomingStream], Any] | None,
                 timeout: float | None, progress: Callable[[int], None] | None) -> dict[str, Any]:
        ch = self.channel
        mode = None
        if out is not None:
            mode = "fd" if self._may_pass_fd(self.peer_hello.get("accept_fds") is True) else "data"
        accept_fd = stream_out is not None and self._accepts_fds()
        rid, self._next_id = self._next_id, self._next_id + 1
        ch.credit_peer()
        try:
            ch.send_frame(FRAME_REQUEST, {"id": rid, "kind": kind, "body": body, "stream": mode,
                                          "accept_fd": accept_fd})
        except BaseException:
            if out is not None:
                os.close(out.fd)
            raise
        early = None
        if out is not None and mode is not None:
            early = self._send_stream(out, mode, rid, progress)
        reply = early or self._read_reply(rid, None if timeout is None else time.monotonic() + timeout)
        assert reply.body is not None
        if reply.type == FRAME_ERROR:
            raise self._remote_error(reply.body, kind)
        resp_body = reply.body.get("body", {})
        smode = reply.body.get("stream")
        if reply.body.get("id") != rid or not isinstance(resp_body, dict) or smode not in (None, "fd", "data"):
            raise ch.fail(f"malformed RESPONSE header {reply.body!r:.200}")
        if smode == "fd" and not accept_fd:
            raise ch.fail("peer passed a file descriptor we did not accept")
        if smode is None:
            return resp_body
        stream = IncomingStream(ch, smode, kind=kind, rid=rid, progress=progress, limit=self.recv_limit)
        if stream_out is None:
            stream.discard()
            raise ch.fail("peer answered with a stream to a request that expects none")
        try:
            stream_out(resp_body, stream)
        except BaseException:
            stream.discard()
            raise
        stream.finish()
        return resp_body

    def _read_reply(self, rid: int, deadline: float | None) -> WireFrame:
        while True:
            frame = self.channel.read_frame(deadline=deadline)
            if frame.type == FRAME_ABORT:
                continue  # a late ABORT refers to a stream that has ended already
            if frame.type in (FRAME_RESPONSE, FRAME_ERROR):
                return frame
            raise self.channel.fail(f"unexpected {frame.name} frame while waiting for the answer")

    def _remote_error(self, body: dict[str, Any], kind: str) -> ZreplError:
        msg = _proto_cut(str(body.get("error", "no reason given")))
        if body.get("fatal"):
            err = ProtocolError(f"the peer rejected the request: {msg}", kind=kind, peer=self.name)
            self.channel.mark_broken(err)
            return err
        return RemoteError(msg, kind=kind, peer=self.name, remote_type=str(body.get("type", ""))[:100],
                           temporary=body.get("temporary") is True)

    def _send_stream(self, out: OutgoingStream, mode: str, rid: int,
                     progress: Callable[[int], None] | None) -> WireFrame | None:
        sender = StreamSender(self.channel, rid, answer_may_come=self._is_client, limit=self.send_limit,
                              progress=progress)
        return sender.send(out, mode)

    # ---- serving ------------------------------------------------------------------------------

    def serve(self, handlers: dict[str, Handler], *, identity: str | None = None,
              lane_handlers: Callable[[], dict[str, Handler]] | None = None) -> None:
        """Serve this connection until the client disconnects (then return normally).

        A client may ask for lanes (LaneMux): then each lane is served in a thread of its own, its
        requests in order, with `handlers` (lanes 1 and up: `lane_handlers()` if given), and this
        returns once the connection ended AND every lane's handler has returned, so a caller's lock
        covers every `zfs recv` any lane ran.

        Handshakes first if not done (`identity` as in handshake_server). Each REQUEST goes to
        handlers[kind](body, ctx); a ZreplError from a handler becomes an ERROR answer (the
        connection goes on), any other exception too, logged as an internal error, and so does an
        answer too large for one frame (FrameTooLarge). Garbage from the peer (bad magic, unknown
        frame type, oversized frame, truncated frame, invalid or too deeply nested JSON, header
        not an object, unknown request kind) gets an ERROR frame and ends serving.

        Raises:
        ProtocolError for the peer's garbage (permanent)
        ConnectionLost, PeerTimeout if the peer went away
        Cancelled if cancel() was called
        """
        if not self.peer_hello:
            self.handshake_server(identity, lanes=MUX_MAX_LANES)
        if self.lanes > 1:
            self._serve_lanes(handlers, lane_handlers)
            return
        ch = self.channel
        while True:
            ch.credit_peer()
            frame = ch.read_frame_or_eof()
            if frame is None:
                return
            if frame.type == FRAME_ABORT:
                continue
            if frame.type != FRAME_REQUEST:
                raise ch.fail(f"expected a REQUEST frame, got {frame.name}")
            try:
                self._serve_request(frame.body or {}, handlers)
            finally:
                ch.kind = None

    def _serve_lanes(self, handlers: dict[str, Handler],
                     lane_handlers: Callable[[], dict[str, Handler]] | None) -> None:
        threads: list[threading.Thread] = []
        errors: list[BaseException] = []

        def serve_lane(lane: int, conn: Connection) -> None:
            try:
                conn.serve(lane_handlers() if lane and lane_handlers is not None else handlers)
            except ZreplError as e:
                errors.append(e)
                mux.break_all(e)
            except Exception as e:  # a bug: the others must still end, the caller's lock held till then
                log.error("lane %d of %s ended by an internal error: %s: %s", lane, self.name, type(e).__name__, e,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                errors.append(e)
                mux.break_all(ProtocolError(f"internal error serving lane {lane}", peer=self.name))
            finally:
                conn.close()

        def on_open(lane: int, conn: Connection) -> None:
            t = threading.Thread(target=contextvars.copy_context().run, args=(serve_lane, lane, conn),
                                 daemon=True, name=f"serve {conn.name}")
            threads.append(t)  # only the mux thread appends, and only before join() returns
            t.start()

        mux = LaneMux(self, self.lanes, on_open)
        self._mux = mux
        mux.start()
        mux.join()
        for t in threads:
            t.join()
        if mux.error is not None:
            raise mux.error
        if self.channel._cancel_reason is not None:
            raise self.channel.cancelled_error()
        first = next((e for e in errors if isinstance(e, ZreplError)), None)
        if first is not None:
            raise first

    def _serve_request(self, header: dict[str, Any], handlers: dict[str, Handler]) -> None:
        ch = self.channel
        rid, kind, body = header.get("id"), header.get("kind"), header.get("body", {})
        smode, accept_fd = header.get("stream"), header.get("accept_fd", False)
        if (not isinstance(rid, int) or isinstance(rid, bool) or not isinstance(kind, str)
                or not isinstance(body, dict) or smode not in (None, "data", "fd")
                or (smode == "fd" and not self._accepts_fds()) or not isinstance(accept_fd, bool)):
            raise ch.fail(f"malformed REQUEST header {header!r:.200}")
        ch.kind = kind
        handler = handlers.get(kind)
        if handler is None:
            raise ch.fail(f"unknown request type {kind!r:.200}")
        incoming = None
        if smode is not None:
            incoming = IncomingStream(ch, smode, kind=kind, rid=rid, progress=self.progress, limit=self.recv_limit)
        ctx = RequestContext(kind=kind, identity=self.identity or "", conn=self, stream=incoming,
                             accept_fd=accept_fd)
        mode = "fd" if self._may_pass_fd(accept_fd) else "data"
        ftype, payload, out = self._answer(handler, body, ctx, rid, mode)
        ch.credit_peer()
        try:
            ch.send_frame(ftype, payload)
        except BaseException:
            if out is not None:
                os.close(out.fd)
            raise
        if out is not None:
            self._send_stream(out, mode, rid, self.progress)
        if incoming is not None and not incoming.finished:
            incoming.discard()  # the handler did not consume all of it; the client stops on our answer

    def _answer(self, handler: Handler, body: dict[str, Any], ctx: RequestContext, rid: int,
                mode: str) -> tuple[int, bytes, OutgoingStream | None]:
        """Run the handler. Returns the answer, encoded (RESPONSE, or ERROR when the handler failed
        or its answer can't be sent), and the stream to send after a RESPONSE."""
        reply: Reply | None = None
        try:
            result = handler(body, ctx)
            reply = result if isinstance(result, Reply) else Reply({} if result is None else result)
            if not isinstance(reply.body, dict):
                raise TypeError(f"handler returned {type(reply.body).__name__}, not a dict")
            # encoded here: an unencodable or oversized answer is the handler's error, not a broken connection
            header = {"id": rid, "body": reply.body, "stream": None if reply.stream is None else mode}
            return FRAME_RESPONSE, encode_control(FRAME_RESPONSE, header, kind=ctx.kind), reply.stream
        except (ProtocolError, Cancelled) as e:
            if not self.channel.usable:
                raise  # our own connection broke: nothing more can be said on it
            error = {"error": str(e), "type": type(e).__name__, "temporary": e.temporary}
        except ZreplError as e:
            error = {"error": str(e), "type": type(e).__name__, "temporary": e.temporary}
        except Exception as e:  # a bug in a handler must not kill the server nor print a traceback
            log.error("internal error while handling %r: %s: %s", ctx.kind, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            error = {"error": f"internal error on the serving side: {type(e).__name__}: {e}",
                     "type": "InternalError", "temporary": False}
        if reply is not None and reply.stream is not None:
            os.close(reply.stream.fd)
        error["error"] = _proto_cut(str(error["error"]))
        return FRAME_ERROR, encode_control(FRAME_ERROR, {"id": rid, "kind": ctx.kind[:200], "fatal": False,
                                                         **error}), None


def session_handlers(make: Callable[[], dict[str, Handler]]) -> dict[str, Handler]:
    """Handlers that give each session (a connection, or each lane of one: ctx.conn) a set of
    make()'s own, made at its first request. What a handler keeps between requests (the pages of
    a paged answer, the targets prepare() found missing) then belongs to one session, whose
    requests come one at a time, as on a connection of its own; lanes served at once never share
    it. What make() hands every session on purpose (the run's listing: RunListing) is shared."""
    first = make()
    sets: weakref.WeakKeyDictionary[Connection, dict[str, Handler]] = weakref.WeakKeyDictionary()
    lock = threading.Lock()
    handed_out = False

    def session_set(ctx: RequestContext) -> dict[str, Handler]:
        nonlocal handed_out
        with lock:
            handlers = sets.get(ctx.conn)
            if handlers is None:
                handlers = make() if handed_out else first
                handed_out = True
                sets[ctx.conn] = handlers
            return handlers

    def dispatcher(kind: str) -> Handler:
        def handle(body: dict, ctx: RequestContext) -> dict | Reply | None:
            return session_set(ctx)[kind](body, ctx)
        return handle

    return {kind: dispatcher(kind) for kind in first}


def serve_connection(conn: Connection, handlers: dict[str, Handler], *, identity: str | None = None,
                     lane_handlers: Callable[[], dict[str, Handler]] | None = None) -> None:
    """conn.serve(handlers, identity=identity, lane_handlers=lane_handlers): see Connection.serve."""
    conn.serve(handlers, identity=identity, lane_handlers=lane_handlers)


class ProtocolServer:
    """Serves any number of connections, one thread each; a broken or hostile client only ends
    its own thread. `failures` keeps (connection name, error) for connections that ended badly."""

    def __init__(self, handlers: dict[str, Handler]):
        self.handlers = handlers
        self.failures: list[tuple[str, BaseException]] = []
        self._conns: dict[Connection, threading.Thread] = {}
        self._lock = threading.Lock()

    def serve(self, conn: Connection, identity: str | None = None) -> threading.Thread:
        """Start serving conn in a new thread; the connection is closed when serving ends."""
        t = threading.Thread(target=self._run, args=(conn, identity), daemon=True,
                             name=f"serve {conn.name}")
        with self._lock:
            self._conns[conn] = t
        t.start()
        return t

    def _run(self, conn: Connection, identity: str | None) -> None:
        try:
            conn.serve(self.handlers, identity=identity)
        except ZreplError as e:
            log.warning("connection %s ended: %s", conn.name, e)
            self.failures.append((conn.name, e))
        except Exception as e:  # never let one connection take the server down
            log.error("connection %s ended by an internal error: %s: %s", conn.name, type(e).__name__, e)
            self.failures.append((conn.name, e))
        finally:
            conn.close()
            with self._lock:
                self._conns.pop(conn, None)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._conns)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every connection and wait for the threads."""
        with self._lock:
            items = list(self._conns.items())
        for conn, _ in items:
            conn.cancel("server stopping")
        for _, t in items:
            t.join(timeout)


# ---- transports ---------------------------------------------------------------------------------

def local_pair(*, timeout: float = DEFAULT_PEER_TIMEOUT,
               heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL) -> tuple[Connection, Connection]:
    """The `local` transport: (client, server) joined by an AF_UNIX socketpair, so streams pass
    as file descriptors."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (Connection(sock=a, name="local server", timeout=timeout, heartbeat_interval=heartbeat_interval),
            Connection(sock=b, name="local client", timeout=timeout, heartbeat_interval=heartbeat_interval))


def ssh_connect(argv: Sequence[str], *, name: str | None = None, timeout: float = DEFAULT_PEER_TIMEOUT,
                heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                env: dict[str, str] | None = None) -> Connection:
    """The `ssh+stdinserver` transport: run argv (e.g. `ssh -T -o BatchMode=yes ... user@host`)
    and talk over its stdin/stdout. Its stderr is kept in a RingBuffer and quoted in errors;
    closing the connection stops the process.

    Raises: ProtocolError (permanent) if argv can't be started
    """
    argv = list(argv)
    if not argv:
        raise ValueError("ssh_connect needs a command")
    label = name or f"{os.path.basename(argv[0])} {argv[-1]}"
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env=env)
    except OSError as e:
        raise ProtocolError(f"cannot start {argv[0]}: {e.strerror}", peer=label, temporary=False) from None
    ring = RingBuffer(64 << 10)

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            ring.write(line)
            log.debug("%s: %s", label, line.decode("utf-8", "replace").rstrip())
        proc.stderr.close()

    thread = threading.Thread(target=drain_stderr, daemon=True, name=f"stderr {label}")
    thread.start()
    assert proc.stdin is not None and proc.stdout is not None
    return Connection(rfd=proc.stdout.fileno(), wfd=proc.stdin.fileno(), name=label, timeout=timeout,
                      heartbeat_interval=heartbeat_interval, process=TransportProcess(proc, ring, thread))


# =================================================================================================
# 8. Endpoints
# =================================================================================================

# Endpoints serve one side of a replication: a SenderEndpoint (push's own side, or a source job
# serving a pull client) and a ReceiverEndpoint (a sink serving a push client, or pull's own side).
# They only ever act on their job's datasets: a sender on what its filesystems filter accepts, a
# receiver below root_fs[/client identity]. Every name from the other side is validated and
# confined here, before it reaches the ZFS layer: the peer may be hostile.
#
# The replication runner (section 10) and the pruner (section 12) know only the two roles, `Sender`
# and `Receiver` (typing.Protocol; the model is zrepl's logic.Sender / logic.Receiver). The local
# endpoints implement them on top of the ZFS layer, RemoteSender / RemoteReceiver through a
# connection. A stream travels as a `StreamSource` from `Sender.send` to `Receiver.receive`.


class EndpointErrorKind(enum.StrEnum):
    ERROR = "error"
    FORBIDDEN = "forbidden"  # names something outside the endpoint's confinement, or is malformed
    ENCRYPTION = "encryption"  # the send would break the job's encryption policy
    RECEIVER_HAS_DATA = "receiver-has-data"  # a full receive would overwrite a dataset with data
    RECEIVER_MODIFIED = "receiver-modified"  # written to after its newest snapshot
    SEND_FAILED = "send-failed"  # the sending side's failure caused the step's failure


class EndpointError(ZreplError):
    """A request an endpoint refuses or cannot do. `temporary` tells the runner whether to retry."""

    def __init__(self, message: str, *, temporary: bool = False, kind: str = EndpointErrorKind.ERROR):
        self.temporary, self.kind = temporary, EndpointErrorKind(kind)
        super().__init__(message)


class ProcessRegistry:
    """The zfs processes one job run has started, so the watchdog can kill them all on cancel."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.cancelled: str | None = None

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if self.cancelled:
                proc.kill()
            self._procs.add(proc)

    def discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self, reason: str) -> None:
        with self._lock:
            self.cancelled = reason
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                log.warning("killing `%s` (pid %d): %s", _describe_argv(proc.args), proc.pid, reason)
                proc.kill()


class Progress:
    """Bytes moved and steps finished, for status and for the no-progress watchdog. A lane's
    progress (parallel steps) has the run's as its `parent`, which sees everything it sees."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, parent: Progress | None = None) -> None:
        self.clock, self.parent = clock, parent
        self.bytes = 0
        self.steps = 0
        self.last_change = clock.monotonic()
        # the running send's own size estimate (`zfs send -v -P` prints it before the stream)
        self.stream_size: int | None = None
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        if n > 0:
            with self._lock:
                self.bytes += n
                self.last_change = self.clock.monotonic()
            if self.parent is not None:
                self.parent.add_bytes(n)

    def step_done(self) -> None:
        with self._lock:
            self.steps += 1
            self.last_change = self.clock.monotonic()
        if self.parent is not None:
            self.parent.step_done()

    def touch(self) -> None:
        with self._lock:
            self.last_change = self.clock.monotonic()
        if self.parent is not None:
            self.parent.touch()


# ---- wire forms of the listing records (validated on the way in: the peer may lie) --------------

def version_to_wire(v: Version) -> dict[str, Any]:
    return {"name": v.name, "kind": v.kind, "guid": v.guid, "createtxg": v.createtxg, "creation": v.creation,
            "userrefs": v.userrefs}


def dataset_to_wire(ds: DatasetInfo, with_versions: bool = True) -> dict[str, Any]:
    return {"name": ds.name, "type": ds.type, "guid": ds.guid, "createtxg": ds.createtxg, "props": dict(ds.props),
            "versions": [version_to_wire(v) for v in ds.versions] if with_versions else []}


def _wire_int(d: dict[str, Any], key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EndpointError(f"peer sent an invalid {key!r}: {value!r}")
    return value


def dataset_from_wire(d: Any) -> DatasetInfo:
    """Rebuild a DatasetInfo from the peer's JSON, validating every name and number."""
    try:
        if not isinstance(d, dict):
            raise ValueError("dataset entry is not an object")
        name = validate_dataset_name(d.get("name", ""))
        props = d.get("props", {})
        if not isinstance(props, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
            raise ValueError("props must map strings to strings")
        dtype = d.get("type")
        ds = DatasetInfo(name=name, type=dtype if isinstance(dtype, str) and dtype in ("filesystem", "volume")
                         else "filesystem",
                         guid=_wire_int(d, "guid"), createtxg=_wire_int(d, "createtxg"), props=dict(props))
        versions = d.get("versions", [])
        if not isinstance(versions, list):
            raise ValueError("versions must be a list")
        ds.versions = [version_from_wire(name, v) for v in versions]
        sort_versions(ds)
        return ds
    except ValueError as exc:
        raise EndpointError(f"peer sent an invalid dataset listing: {exc}") from None


def version_from_wire(dataset: str, v: Any, shared: ListingValues | None = None) -> Version:
    """One snapshot or bookmark of `dataset` from the peer's JSON. Raises ValueError. `shared`:
    the listing's repeated values, one object each (ListingValues)."""
    if not isinstance(v, dict) or v.get("kind") not in ("snapshot", "bookmark"):
        raise ValueError("version entry must be an object with kind snapshot or bookmark")
    shared = shared if shared is not None else ListingValues()
    return Version(dataset=dataset, name=shared.name(validate_snapshot_short_name(v.get("name", ""))),
                   kind=VersionKind(v["kind"]), guid=_wire_int(v, "guid"),
                   createtxg=shared.number(_wire_int(v, "createtxg")), creation=shared.number(_wire_int(v, "creation")),
                   userrefs=_wire_int(v, "userrefs"))


# Listings of any size travel in pages: a flat sequence of items (a dataset header, then its
# versions), each page at most LISTING_PAGE_BYTES of JSON, far below a control frame's limit.
# The serving side lists once per listing (page 0) and answers the later pages from that copy.
LISTING_PAGE_BYTES = 256 << 10


# A listing's items between its pages: a dataset's wire head (made at once: its props may change
# later in the run), then its Version objects themselves (frozen), turned into wire form only as
# their page is served. A wire copy of every version would be held for the whole run: ~400 bytes
# each, 40 MB per side at 100,000 snapshots, on top of the listing itself.
ListingItem = dict[str, Any] | Version


def listing_items(datasets: Iterable[tuple[str, DatasetInfo]]) -> list[ListingItem]:
    """(key, dataset) pairs -> page items: {"key", "dataset" without versions}, then its versions."""
    items: list[ListingItem] = []
    for key, ds in datasets:
        items.append({"key": key, "dataset": dataset_to_wire(ds, with_versions=False)})
        items += ds.versions
    return items


def listing_item_to_wire(item: ListingItem) -> dict[str, Any]:
    return {"version": version_to_wire(item)} if isinstance(item, Version) else item


def listing_page(items: list[ListingItem], offset: Any) -> dict[str, Any]:
    """One page of items from `offset`: {"items": [...], "next": offset of the next page or None}."""
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= len(items):
        raise EndpointError(f"invalid listing offset {offset!r}", kind=EndpointErrorKind.FORBIDDEN)
    page: list[dict[str, Any]] = []
    size, end = 0, offset
    while end < len(items):
        wire = listing_item_to_wire(items[end])
        cost = len(json.dumps(wire)) + 2
        if page and size + cost > LISTING_PAGE_BYTES:
            break
        page.append(wire)
        size, end = size + cost, end + 1
    return {"items": page, "next": end if end < len(items) else None}


def served_listing_page(items: list[ListingItem], offset: Any) -> dict[str, Any]:
    """listing_page for a serving side, which lets go of the items once their last page is out:
    the client holds its own copy from then on, and a sink's listing was otherwise kept twice in
    the process for the whole run (the local transport serves it in a thread). Asking again starts
    at offset 0, which lists anew."""
    page = listing_page(items, offset)
    if page["next"] is None:
        items.clear()
    return page


def fetch_listing(conn: RequestChannel, kind: str) -> list[tuple[str, DatasetInfo]]:
    """Every page of a paged listing, rebuilt into (key, dataset) pairs; each item validated."""
    out: list[tuple[str, DatasetInfo]] = []
    shared = ListingValues()
    offset: int | None = 0
    while offset is not None:
        body = conn.request(kind, {"offset": offset})
        items, following = body.get("items"), body.get("next")
        if not isinstance(items, list) or not (following is None or (isinstance(following, int)
                                                                       and not isinstance(following, bool)
                                                                       and following > offset)):
            raise EndpointError(f"peer sent an invalid {kind} page")
        for item in items:
            if not isinstance(item, dict):
                raise EndpointError(f"peer sent an invalid {kind} item")
            if "dataset" in item:
                key = item.get("key")
                if not isinstance(key, str):
                    raise EndpointError(f"peer sent an invalid {kind} item")
                out.append((key, dataset_from_wire(item["dataset"])))
            elif out:
                try:
                    out[-1][1].versions.append(version_from_wire(out[-1][1].name, item.get("version"), shared))
                except ValueError as exc:
                    raise EndpointError(f"peer sent an invalid {kind} item: {exc}") from None
            else:
                raise EndpointError(f"peer sent a {kind} version before any dataset")
        offset = following
    for _, ds in out:
        sort_versions(ds)
    return out


@dataclass
class StepRequest:
    """What one transfer moves, as both sides see it (wire form: to_wire / from_wire)."""

    fs: str  # the sender's filesystem name
    to: str  # short snapshot name
    to_guid: int
    from_: str | None = None  # "@snap" or "#bookmark" short form, None for full sends
    from_guid: int | None = None
    multi: bool = False
    resume_token: str | None = None
    received: list[tuple[str, int]] = field(default_factory=list)  # (short name, guid) oldest first
    replace_placeholder: bool = False
    dataset_type: str = "filesystem"  # the sender's dataset type: receive defaults differ for volumes
    # the client checks what arrived and places the run's last-received holds in one batch
    # (Receiver.hold_received_all); only sent to a receiver whose PeerInfo says batched_holds
    defer_hold: bool = False

    @classmethod
    def from_step(cls, fs: str, step: Step, replace_placeholder: bool = False,
                  dataset_type: str = "filesystem") -> StepRequest:
        src = step.from_version
        return cls(fs=fs, to=step.to_version.name, to_guid=step.to_version.guid,
                   from_=None if src is None else ("@" if src.is_snapshot else "#") + src.name,
                   from_guid=None if src is None else src.guid, multi=step.multi,
                   resume_token=step.resume_token,
                   received=[(v.name, v.guid) for v in step.received_versions()],
                   replace_placeholder=replace_placeholder, dataset_type=dataset_type)

    def to_wire(self) -> dict[str, Any]:
        return {"fs": self.fs, "to": self.to, "to_guid": self.to_guid, "from": self.from_,
                "from_guid": self.from_guid, "multi": self.multi, "resume_token": self.resume_token,
                "received": [list(r) for r in self.received], "replace_placeholder": self.replace_placeholder,
                "type": self.dataset_type, "defer_hold": self.defer_hold}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StepRequest:
        try:
            fs = validate_dataset_name(str(d.get("fs", "")))
            to = validate_snapshot_short_name(str(d.get("to", "")))
            src = d.get("from")
            if src is not None:
                if not isinstance(src, str) or src[:1] not in ("@", "#"):
                    raise ValueError(f"bad incremental source {src!r}")
                validate_snapshot_short_name(src[1:])
            token = d.get("resume_token")
            if token is not None and (not isinstance(token, str) or not re.fullmatch(r"[0-9a-zA-Z-]+", token)):
                raise ValueError("bad resume token")
            received = []
            for item in d.get("received", []):
                if not isinstance(item, list) or len(item) != 2:
                    raise ValueError("bad received list")
                received.append((validate_snapshot_short_name(str(item[0])), int(item[1])))
            from_guid = d.get("from_guid")
            dtype = d.get("type", "filesystem")
            if dtype not in ("filesystem", "volume"):
                raise ValueError(f"bad dataset type {dtype!r}")
            return cls(fs=fs, to=to, to_guid=int(d.get("to_guid", 0)), from_=src,
                       from_guid=None if from_guid is None else int(from_guid), multi=bool(d.get("multi")),
                       resume_token=token, received=received, replace_placeholder=bool(d.get("replace_placeholder")),
                       defer_hold=d.get("defer_hold") is True,
                       dataset_type=dtype)
        except (ValueError, TypeError) as exc:
            raise EndpointError(f"invalid step request: {exc}") from None


# ---- the roles ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerInfo:
    """Facts about an endpoint, from its config (local) or its typed `endpoint.info` reply (remote).

    `job` is the job that serves this side; `abstraction_job` the job name its holds and bookmarks
    carry (a sender's replication cursor and step holds, a receiver's last-received holds); `root`
    is where a receiver keeps the replicas ("" on a sender)."""

    job: str
    type: str
    abstraction_job: str
    root: str = ""
    # a receiver that takes StepRequest.defer_hold and receiver.hold_received (older ones do not
    # say so and get one check and hold per receive, as before)
    batched_holds: bool = False
    # an endpoint that answers sender.holds_all / receiver.holds_all (hold tags of many datasets
    # in one request); older ones are asked per dataset
    holds_all: bool = False

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> PeerInfo:
        try:
            job, jtype, abstraction_job, root = (body.get(k) for k in ("job", "type", "abstraction_job", "root"))
            if not isinstance(job, str) or not isinstance(jtype, str) or not isinstance(root, str):
                raise ValueError("job, type and root must be strings")
            if jtype not in ("sink", "source", "push", "pull"):
                raise ValueError(f"unknown job type {jtype!r}")
            if not isinstance(abstraction_job, str):
                raise ValueError("abstraction_job must be a string")
            _check_job_for_names(abstraction_job)
            if root:
                validate_dataset_name(root)
        except ValueError as exc:
            raise EndpointError(f"peer sent an invalid endpoint.info reply: {exc}", kind="forbidden") from None
        return cls(job=job, type=jtype, abstraction_job=abstraction_job, root=root,
                   batched_holds=body.get("batched_holds") is True, holds_all=body.get("holds_all") is True)


@dataclass
class ReceiverFilesystem:
    """One dataset below a receiver's root, with its decoded resume token (None: no partial receive;
    a token that could not be decoded has toguid 0)."""

    dataset: DatasetInfo
    token: DecodedToken | None = None


ReceiverListing = dict[str, ReceiverFilesystem]  # keyed by the SENDER's filesystem name


@dataclass
class DestroyResult:
    """What a batch destroy did: snapshots gone (short names), per-snapshot errors, and snapshots
    the endpoint kept although asked to destroy them (another job or client still needs them)."""

    destroyed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


@dataclass
class ReceiveResult:
    """The snapshot a step delivered, verified on the receiver (name and guid)."""

    received: str
    guid: int


@dataclass(frozen=True)
class ProtectRequest:
    """What one filesystem's steps of a run need protected before the first starts (all of them
    at once: a multi-step plan is protected once, and its holds stay until complete_all)."""

    fs: str
    level: str
    snapshots: tuple[tuple[str, int], ...]  # (short name, guid) from the run's listing
    source: str | None = None  # the first step's incremental source ("@snap" or "#bookmark")

    def hold_names(self) -> list[str]:
        """The snapshots a step hold covers (guarantee_resumability): the steps' and the source."""
        source = [self.source[1:]] if self.source and self.source.startswith("@") else []
        return list(dict.fromkeys([n for n, _ in self.snapshots] + source))


@dataclass(frozen=True)
class Completion:
    """One filesystem's replication went up to `to`: move its cursor there, release the step
    holds of `held` (those protect_all placed) and anything of this job older than the cursor.
    `to` None: no step of it ran (blocked, cancelled): only release what protect_all placed."""

    fs: str
    to: str | None
    to_guid: int
    level: str
    held: tuple[str, ...] = ()  # short names protect_all held with the step tag


class StreamSource(Protocol):
    """A replication stream on its way from `zfs send` to `zfs recv`, as the receiving side sees it:
    `zfs send`'s own pipe (push) or a stream arriving over a connection (pull, a sink)."""

    def open_fd(self) -> int:
        """The readable end for `zfs recv`'s stdin; the caller owns and closes it. Once only."""
        ...

    def finish(self) -> str | None:
        """After the consumer is done: wait for the producer. None if it succeeded, else its error."""
        ...

    def abandon(self) -> None:
        """The consumer failed: stop the producer; the rest of the stream is discarded."""
        ...


Deliver = Callable[[StreamSource], ReceiveResult]


class Sender(Protocol):
    """The sending side of a replication (zrepl's logic.Sender): a SenderEndpoint or RemoteSender."""

    info: PeerInfo
    # True when send() puts the stream's size in the lane's Progress.stream_size (`zfs send -v`
    # prints its estimate first), so a step needs no separate `zfs send -n` estimate
    sizes_in_stream: bool
    # True when estimate() may be called from several threads at once (each its own `zfs send -n`);
    # a remote sender's requests go one at a time on its connection
    concurrent_estimates: bool

    def list_filesystems(self) -> list[DatasetInfo]: ...

    def estimate(self, req: StepRequest) -> int | None: ...

    def send(self, req: StepRequest, deliver: Deliver) -> ReceiveResult:
        """Start `zfs send` for req and hand its stream to deliver (the receiver's receive); a failed
        step names the sender's failure when that is the cause (with_sender_error)."""
        ...

    def protect(self, fs: str, level: str, snapshots: Sequence[tuple[str, int]], source: str | None) -> None: ...

    def complete(self, fs: str, to: str, to_guid: int, level: str) -> None: ...

    def protect_all(self, requests: Sequence[ProtectRequest]) -> dict[str, ZreplError]:
        """protect() for many filesystems at once (one `zfs hold` where it can); the failures by
        filesystem (those filesystems are not protected and must not run)."""
        ...

    def complete_all(self, completions: Sequence[Completion]) -> dict[str, ZreplError]:
        """complete() for many filesystems at once (the step holds released in one `zfs release`);
        the failures by filesystem."""
        ...

    def release_stale(self, fs: str) -> None:
        """Drop this side's stale holds and bookmarks of its job on fs (stale_abstractions)."""
        ...

    def hold_tags(self, fs: str, names: Sequence[str]) -> dict[str, list[str]]: ...

    def hold_tags_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        """hold_tags of several filesystems at once (fs -> short names -> tags): one `zfs holds`."""
        ...

    def destroy_snapshots(self, fs: str, names: Sequence[str]) -> DestroyResult: ...


class Receiver(Protocol):
    """The receiving side (zrepl's logic.Receiver): a ReceiverEndpoint or RemoteReceiver. Requests
    name the SENDER's filesystems; the receiver maps them below its root itself."""

    info: PeerInfo

    def list_filesystems(self) -> ReceiverListing: ...

    def prepare(self, req: StepRequest) -> None: ...

    def receive(self, req: StepRequest, source: StreamSource) -> ReceiveResult: ...

    def clear_resume_token(self, fs: str) -> None: ...

    def hold_last_received(self, fs: str, snapshot: str, guid: int) -> None: ...

    def hold_received_all(self, received: Sequence[tuple[str, str, int]]) -> dict[str, ZreplError]:
        """After the run's steps (those sent with defer_hold): check that each (fs, snapshot, guid)
        arrived, hold it, release the older last-received holds; the failures by filesystem."""
        ...

    def placeholders(self, filesystems: Sequence[str]) -> set[str]:
        """Of these sender filesystems, those whose replica is an empty placeholder (replaceable)."""
        ...

    def release_stale(self, fs: str) -> None:
        """Release this job's last-received holds on all but the replica's newest snapshot."""
        ...

    def hold_tags(self, fs: str, names: Sequence[str]) -> dict[str, list[str]]: ...

    def hold_tags_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]: ...

    def destroy_snapshots(self, fs: str, names: Sequence[str]) -> DestroyResult: ...


def _hold_tags_all(zfs: Zfs, targets: dict[str, str], names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """One `zfs holds` for snapshots of many datasets; `targets` maps each requested fs to its
    dataset here (validated by the caller). Keyed back by fs and short name."""
    wanted = {f"{targets[fs]}@{validate_snapshot_short_name(n)}": (fs, n) for fs, ns in names.items() for n in ns}
    out: dict[str, dict[str, list[str]]] = {}
    for full, tags in (zfs.holds(list(wanted)) if wanted else {}).items():
        if full in wanted:
            fs, short = wanted[full]
            out.setdefault(fs, {})[short] = tags
    return out


def with_sender_error(exc: BaseException, send_error: str | None) -> BaseException:
    """A failed step's error, naming the sender's failure when it is the cause.

    When `zfs send` fails (cut connection, vanished source), `zfs recv` fails too, with a message
    that only says the stream ended ("failed to read from stream"); the receiver's error is what
    arrives first, so without this the cause never reaches the status. When the receiver fails
    first, the sender only reports a broken pipe: then the receiver's error is the whole story."""
    if not send_error or send_error in str(exc) or isinstance(exc, Cancelled):
        return exc
    if "broken pipe" in send_error.lower() or "status -13" in send_error:
        return exc
    return EndpointError(f"the sending side failed: {send_error} (then the receiving side: {exc})",
                         temporary=is_temporary(exc), kind=EndpointErrorKind.SEND_FAILED)


_Item = TypeVar("_Item")


def as_zrepl_error(exc: ZreplError | OSError) -> ZreplError:
    """An OSError of ours (a pipe, a fork) as a temporary ZreplError, for per-filesystem results."""
    return exc if isinstance(exc, ZreplError) else EndpointError(str(exc), temporary=True)


def each_filesystem(items: Iterable[_Item], fs_of: Callable[[_Item], str],
                    action: Callable[[_Item], None]) -> dict[str, ZreplError]:
    """Run action on every item; the failures by filesystem (one never stops the others)."""
    failed: dict[str, ZreplError] = {}
    for item in items:
        try:
            action(item)
        except (ZreplError, OSError) as exc:
            failed[fs_of(item)] = as_zrepl_error(exc)
    return failed


def batch_failures(command: Callable[[], dict[str, str]], what: str, snapshots: dict[str, str],
                   failed: dict[str, ZreplError]) -> None:
    """Run one hold_many/release_many over snapshots (-> their filesystem); what it could not do
    fails those filesystems (all of them when zfs named none), added to `failed`."""
    try:
        refused = command() if snapshots else {}
    except ZfsError as exc:
        refused = {name: str(exc) for name in snapshots}
    for name, reason in refused.items():
        if name in snapshots:
            failed.setdefault(snapshots[name], EndpointError(f"cannot {what} {name}: {reason}", temporary=True))


def is_temporary(exc: BaseException) -> bool:
    """Whether retrying the step may help: the error says so itself (ZreplError.temporary, set
    where it is made); an OSError of ours (a pipe, a fork) is worth another attempt."""
    if isinstance(exc, ZreplError):
        return bool(exc.temporary)
    return isinstance(exc, OSError)


# ---- streams ----------------------------------------------------------------------------------------

def _progress_reader(stream: Any, buffer: RingBuffer, progress: Progress | None) -> None:
    """Read `zfs send -v -P` stderr: turn per-second lines (`HH:MM:SS<TAB>bytes<TAB>snapshot`)
    into progress and keep the rest for error messages (without the size header lines, which
    would push the actual error out of the message's tail)."""
    last = 0
    for raw in iter(stream.readline, b""):
        cols = raw.decode("utf-8", "replace").rstrip("\n").split("\t")
        if len(cols) == 3 and re.fullmatch(r"\d\d:\d\d:\d\d", cols[0]) and cols[1].isdigit():
            if progress is not None:
                value = int(cols[1])
                # the counter restarts for each snapshot of a -I package
                progress.add_bytes(value - last if value >= last else value)
                last = value
        elif cols[0] == "size" and len(cols) == 2 and cols[1].isdigit():
            if progress is not None:
                progress.stream_size = int(cols[1])
        elif cols[0] not in ("full", "incremental", "size"):
            buffer.write(raw)
    stream.close()


class SendProcess:
    """One `zfs send` of a step, as a StreamSource. result() waits for it exactly once, whichever
    way the step ended: by the consumer after a passed or copied stream, or after a failed receive
    (which may leave the send blocked on a pipe nobody reads: then it is killed)."""

    def __init__(self, proc: subprocess.Popen, argv: Sequence[str], buffer: RingBuffer, reader: threading.Thread,
                 processes: ProcessRegistry):
        self.proc, self.argv, self.buffer, self.reader, self.processes = proc, list(argv), buffer, reader, processes
        assert proc.stdout is not None
        self._fd: int | None = os.dup(proc.stdout.fileno())  # handed to the consumer by open_fd()
        proc.stdout.close()
        self._lock = threading.Lock()
        self._done = False
        self._error: str | None = None

    def open_fd(self) -> int:
        fd, self._fd = self._fd, None
        if fd is None:
            raise ZreplError(f"the stream of `{shlex.join(self.argv)}` was already handed over")
        return fd

    def finish(self) -> str | None:
        return self.result()

    def abandon(self) -> None:
        self.result(timeout=30.0)

    def result(self, timeout: float | None = None) -> str | None:
        """None when the send succeeded, else its exit status and stderr tail. With a timeout, a
        send still running after it is killed (its receiver is gone)."""
        with self._lock:
            if not self._done:
                if self._fd is not None:  # never handed over: nobody will read it
                    os.close(self._fd)
                    self._fd = None
                try:
                    rc = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("killing `%s`: its receiver is gone", shlex.join(self.argv))
                    self.proc.kill()
                    rc = self.proc.wait()
                self.reader.join(timeout=10)
                self.processes.discard(self.proc)
                if rc != 0:
                    tail = self.buffer.text().strip()[-2000:]
                    self._error = f"`{shlex.join(self.argv)}` exited with status {rc}" + (f": {tail}" if tail else "")
                self._done = True
            return self._error


class IncomingSource:
    """A stream arriving over a connection (IncomingStream) as a StreamSource."""

    def __init__(self, stream: IncomingStream):
        self.stream = stream

    def open_fd(self) -> int:
        return self.stream.open_fd()

    def finish(self) -> str | None:
        try:
            self.stream.finish()
        except StreamError as exc:
            return str(exc)
        return None

    def abandon(self) -> None:
        self.stream.abandon()

    @property
    def sender_error(self) -> str | None:
        """The producer's error as its END frame reported it (after the stream ended)."""
        return self.stream.sender_error if self.stream.sender_status == "error" else None


# ---- the local endpoints --------------------------------------------------------------------------

@dataclass
class RunListing:
    """An endpoint's listing of this run (its list_filesystems), shared by the endpoints of the
    run's lanes (replication.concurrency.steps): one listing per side and run, not one per lane
    (at 1,000 filesystems each is a whole-tree `zfs list`). What a step adds (a received dataset, a
    placeholder) is seen by every lane: a child on another lane does not take its parent for
    missing. Lanes touch different filesystems, and single dict operations are atomic."""

    datasets: dict[str, DatasetInfo] = field(default_factory=dict)
    listed: bool = False  # whether `datasets` is this run's listing (with what it made since); else empty
    placing: threading.Lock = field(default_factory=threading.Lock, repr=False)  # placeholders: a lane at a time


class SenderEndpoint:
    """The sending side of a job (implements Sender): lists its filesystems, sends streams, protects
    and moves cursors.

    `job` names the sending job (hold tags and cursor bookmarks carry it). Everything a request names
    must be a filesystem the filter accepts and a version of that filesystem.
    """

    sizes_in_stream = True  # open_send's progress reader takes the size from `zfs send -v -P`
    concurrent_estimates = True  # each estimate is a `zfs send -n` of its own

    def __init__(self, zfs: Zfs, job: str, filesystems: DatasetFilter, send: SendConfig,
                 processes: ProcessRegistry | None = None, progress: Progress | None = None,
                 job_type: str = "push", abstraction_job: str | None = None, guards: Sequence[str] = (),
                 read_only: bool = False, listing_cache: ListingCache | None = None,
                 run_listing: RunListing | None = None):
        """`abstraction_job` names this side's holds and bookmarks (default: the job; a source with
        several clients gives each its own). `guards` are the other replicating jobs whose
        unreplicated snapshots a destroy keeps. `read_only` refuses every destroy. `run_listing`:
        shared with the endpoints of the run's other lanes."""
        self.zfs, self.filter, self.send_cfg = zfs, filesystems, send
        self.listing_cache = listing_cache
        self.job = abstraction_job or job
        self.info = PeerInfo(job=job, type=job_type, abstraction_job=self.job, holds_all=True)
        self.guards, self.read_only = [g for g in guards if g != self.job], read_only
        self.processes = processes or ProcessRegistry()
        self.progress = progress
        self._run = run_listing if run_listing is not None else RunListing()
        # tentative cursors protect_all made this run, by filesystem (complete_all drops them)
        self._tentative: dict[str, list[Abstraction]] = {}

    # -- confinement -----------------------------------------------------------------------------
    def _allowed(self, fs: str) -> str:
        try:
            validate_dataset_name(fs)
        except ValueError as exc:
            raise EndpointError(f"invalid filesystem name: {exc}", kind=EndpointErrorKind.FORBIDDEN) from None
        if not self.filter.accepts(fs):
            raise EndpointError(f"filesystem {fs!r} is not served by job {self.job!r}",
                                kind=EndpointErrorKind.FORBIDDEN)
        return fs

    # -- listing ---------------------------------------------------------------------------------
    def list_filesystems(self) -> list[DatasetInfo]:
        listing = self.zfs.list_datasets(list_roots_for_filter(self.filter), cache=self.listing_cache)
        mine = {n: ds for n, ds in listing.items() if self.filter.accepts(n)}
        self._run.datasets, self._run.listed = mine, True
        return [mine[n] for n in sorted(mine)]

    def _info(self, fs: str) -> DatasetInfo | None:
        return self._run.datasets.get(fs)

    # -- sending ---------------------------------------------------------------------------------
    def _flags(self) -> SendFlags:
        c = self.send_cfg
        return SendFlags(raw=c.encrypted or c.raw, send_properties=c.send_properties,
                         backup_properties=c.backup_properties, large_blocks=c.large_blocks,
                         compressed=c.compressed, embedded_data=c.embedded_data, saved=c.saved)

    def _own(self, fs: str) -> DatasetInfo:
        """The filesystem as OUR listing shows it (the run's listing, else a fresh one)."""
        info = self._info(fs) or self.zfs.list_one(fs)
        if info is None:
            raise EndpointError(f"{fs} does not exist on the sender", kind=EndpointErrorKind.FORBIDDEN)
        return info

    def _check_encryption(self, info: DatasetInfo) -> None:
        problem = check_send_encryption(self.send_cfg.encrypted, self.send_cfg.raw, dataset_is_encrypted(info))
        if problem:
            raise EndpointError(f"{info.name}: {problem}", kind=EndpointErrorKind.ENCRYPTION)

    def _check_token(self, fs: str, req: StepRequest) -> None:
        """A resume token comes from the receiver: `zfs send -t` would send whatever snapshot of the
        pool its guid names, with the token's flags (raw or not). Accept it only if it continues
        exactly the step requested, of a snapshot of this filesystem in our own listing, with the
        raw flag our encryption policy demands."""
        def refuse(why: str, kind: str = EndpointErrorKind.FORBIDDEN) -> EndpointError:
            return EndpointError(f"{fs}: refusing the resume token: {why}", kind=kind)
        try:
            token = decode_resume_token(req.resume_token or "")
        except ValueError as exc:
            raise refuse(str(exc)) from None
        if token.toname.partition("@")[0] != fs:
            raise refuse(f"it continues {token.toname!r}, not a snapshot of {fs}")
        info = self._own(fs)
        to = next((v for v in info.snapshots() if v.guid == token.toguid), None)
        if to is None or token.toguid != req.to_guid or to.name != req.to:
            raise refuse(f"its snapshot (guid {token.toguid:#x}) is not {fs}@{req.to} here")
        if (token.fromguid is None) != (req.from_ is None):
            raise refuse("a full send and an incremental one were mixed up")
        if token.fromguid is not None and (req.from_guid != token.fromguid
                                           or not any(v.guid == token.fromguid for v in info.versions)):
            raise refuse(f"its incremental source (guid {token.fromguid:#x}) is not {fs}{req.from_} here")
        self._check_encryption(info)
        if token.raw != self._flags().raw:
            raise refuse(f"it asks for a {'raw' if token.raw else 'non-raw'} send, but this job sends "
                         f"{'raw' if self._flags().raw else 'non-raw'} (send.encrypted / send.raw)",
                         EndpointErrorKind.ENCRYPTION)

    def _send_argv(self, req: StepRequest, estimate: bool) -> list[str]:
        fs = self._allowed(req.fs)
        if req.resume_token:
            self._check_token(fs, req)
            argv = send_argv("", resume_token=req.resume_token, estimate=estimate)
        else:
            self._check_encryption(self._own(fs))
            src = f"{fs}{req.from_}" if req.from_ else None
            argv = send_argv(f"{fs}@{req.to}", src, multi=req.multi, flags=self._flags(), estimate=estimate)
        if not estimate:
            argv[2:2] = ["-v", "-P"]  # per-second progress on stderr (watchdog, status)
        return argv

    def estimate(self, req: StepRequest) -> int | None:
        try:
            proc = self.zfs.run(self._send_argv(req, estimate=True))
        except ZfsError as exc:
            log.debug("size estimate failed: %s", exc)
            return None
        return parse_send_estimate(proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace"))

    def open_send(self, req: StepRequest) -> SendProcess:
        """Start `zfs send`; the returned stream's finish() reports its exit status with stderr."""
        argv = self._send_argv(req, estimate=False)
        proc = self.zfs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.processes.add(proc)
        buffer = RingBuffer(64 * 1024)
        reader = threading.Thread(target=_progress_reader, args=(proc.stderr, buffer, self.progress), daemon=True)
        reader.start()
        return SendProcess(proc, argv, buffer, reader, self.processes)

    def send(self, req: StepRequest, deliver: Deliver) -> ReceiveResult:
        stream = self.open_send(req)
        try:
            return deliver(stream)
        except (ZreplError, OSError) as exc:
            # After a failed receive the send may be blocked on a pipe nobody reads: killed after 30 s.
            raise with_sender_error(exc, stream.result(timeout=30.0)) from exc

    # -- protection ------------------------------------------------------------------------------
    def _snapshots_of(self, fs: str, names: Sequence[str]) -> list[str]:
        return [f"{fs}@{validate_snapshot_short_name(n)}" for n in names]

    def _check_guids(self, fs: str, snapshots: Sequence[tuple[str, int]]) -> None:
        """Bookmark names carry guids: take them from our own listing, never from the request."""
        own = {v.name: v.guid for v in self._own(fs).snapshots()}
        for name, snap_guid in snapshots:
            if own.get(name) != snap_guid:
                raise EndpointError(f"{fs}@{name} with guid {snap_guid:#x} does not exist on the sender",
                                    kind=EndpointErrorKind.FORBIDDEN)

    def protect(self, fs: str, level: str, snapshots: Sequence[tuple[str, int]], source: str | None) -> None:
        """Before a step: step holds (resumability) or tentative cursors (incremental) on what it needs."""
        self._allowed(fs)
        self._check_guids(fs, snapshots)
        if level == "guarantee_resumability":
            names = [n for n, _ in snapshots] + ([source[1:]] if source and source.startswith("@") else [])
            self.zfs.hold_idempotent(step_hold_tag(self.job), self._snapshots_of(fs, names))
        elif level == "guarantee_incremental":
            for name, guid in snapshots:
                self._bookmark_once(fs, name, tentative_cursor_bookmark_name(guid, self.job))

    def _bookmark_once(self, fs: str, snapshot: str, bookmark: str) -> None:
        try:
            self.zfs.bookmark(f"{fs}@{snapshot}", f"{fs}#{bookmark}")
        except ZfsError as exc:
            if exc.kind != ZfsErrorKind.EXISTS:
                raise

    def protect_all(self, requests: Sequence[ProtectRequest]) -> dict[str, ZreplError]:
        """The step holds of every filesystem in one `zfs hold` (it holds what it can and names
        what it could not: only those filesystems fail); tentative cursors one bookmark each."""
        failed: dict[str, ZreplError] = {}
        held: dict[str, str] = {}  # snapshot -> its filesystem
        for r in requests:
            try:
                self._allowed(r.fs)
                self._check_guids(r.fs, r.snapshots)
                if r.level == "guarantee_resumability":
                    held.update(dict.fromkeys(self._snapshots_of(r.fs, r.hold_names()), r.fs))
                elif r.level == "guarantee_incremental":
                    self._tentative[r.fs] = [self._tentative_cursor(r.fs, name, guid) for name, guid in r.snapshots]
            except (ZreplError, OSError) as exc:
                failed[r.fs] = as_zrepl_error(exc)
        self._batch(self.zfs.hold_many, "hold", held, failed)
        return failed

    def _batch(self, command: Callable[[str, Sequence[str]], dict[str, str]], what: str, snapshots: dict[str, str],
               failed: dict[str, ZreplError]) -> None:
        tag = step_hold_tag(self.job)
        batch_failures(lambda: command(tag, list(snapshots)), what, snapshots, failed)

    def _tentative_cursor(self, fs: str, snapshot: str, snap_guid: int) -> Abstraction:
        name = tentative_cursor_bookmark_name(snap_guid, self.job)
        self._bookmark_once(fs, snapshot, name)
        version = next(v for v in self._own(fs).snapshots() if v.name == snapshot)
        return Abstraction(ABSTRACTION_TENTATIVE_CURSOR, self.job, fs, name, snap_guid, version.createtxg)

    def complete_all(self, completions: Sequence[Completion]) -> dict[str, ZreplError]:
        """Each filesystem's cursor bookmark, then ONE `zfs release` of the step holds of all of
        them, then the stale bookmarks. What is stale comes from the run's listing and what this
        run placed (the job lock keeps other runs of this job out), not from a new listing."""
        failed: dict[str, ZreplError] = {}
        releases: dict[str, str] = {}  # snapshot -> its filesystem
        bookmarks: list[Abstraction] = []
        for c in completions:
            try:
                stale = self._completed(c)
            except (ZreplError, OSError) as exc:
                failed[c.fs] = as_zrepl_error(exc)
                continue
            releases.update((a.full_name, c.fs) for a in stale if a.is_hold)
            bookmarks += [a for a in stale if not a.is_hold]
        self._batch(self.zfs.release_many, "release", releases, failed)
        for a in bookmarks:
            try:
                destroy_abstractions(self.zfs, [a])
            except ZfsError as exc:
                failed.setdefault(a.dataset, exc)
        return failed

    def _completed(self, c: Completion) -> list[Abstraction]:
        """Move one filesystem's cursor to c.to; return what is stale then (see stale_abstractions).
        Step-hold candidates: what protect_all held and any held snapshot in the listing (an older
        run's leftover): a release without our tag on it is a no-op, so no `zfs holds` is needed."""
        self._allowed(c.fs)
        tag = step_hold_tag(self.job)
        if c.to is None:
            return self._tentative.pop(c.fs, []) + [Abstraction(ABSTRACTION_STEP_HOLD, self.job, c.fs, n, tag=tag)
                                                    for n in c.held]
        self._check_guids(c.fs, [(c.to, c.to_guid)])
        info = self._own(c.fs)
        abstractions = bookmark_abstractions(info) + self._tentative.pop(c.fs, [])
        cursor = None
        if c.level != "guarantee_nothing":
            cursor = cursor_bookmark_name(c.to_guid, self.job)
            self._bookmark_once(c.fs, c.to, cursor)
            to = next(v for v in info.snapshots() if v.name == c.to)
            abstractions.append(Abstraction(ABSTRACTION_CURSOR, self.job, c.fs, cursor, c.to_guid, to.createtxg))
        held = set(c.held)
        abstractions += [Abstraction(ABSTRACTION_STEP_HOLD, self.job, c.fs, v.name, v.guid, v.createtxg, tag)
                         for v in info.snapshots() if v.name in held or v.userrefs > 0]
        return [a for a in stale_abstractions(abstractions, self.job)
                if not (a.type == ABSTRACTION_CURSOR and a.name == cursor)]

    def complete(self, fs: str, to: str, to_guid: int, level: str) -> None:
        """After a step: move the replication cursor to `to`, then drop this job's older
        cursors, tentative cursors and step holds on this filesystem (never another job's)."""
        self._allowed(fs)
        self._check_guids(fs, [(to, to_guid)])
        if level != "guarantee_nothing":
            self._bookmark_once(fs, to, cursor_bookmark_name(to_guid, self.job))
        self.drop_stale(fs, keep_cursor_guid=to_guid if level != "guarantee_nothing" else None)

    def release_stale(self, fs: str) -> None:
        self.drop_stale(fs)

    def drop_stale(self, fs: str, keep_cursor_guid: int | None = None, dry_run: bool = False) -> list[Abstraction]:
        """Release this job's stale abstractions on one filesystem (see stale_abstractions)."""
        self._allowed(fs)
        info = self.zfs.list_one(fs) if not dry_run or fs not in self._run.datasets else self._run.datasets.get(fs)
        if info is None:
            return []
        abstractions = bookmark_abstractions(info)
        held = [v for v in info.snapshots() if v.userrefs > 0]
        tags = self.zfs.holds([v.full_name for v in held]) if held else {}
        for v in held:
            abstractions += hold_abstractions(v, tags.get(v.full_name, []))
        stale = [a for a in stale_abstractions(abstractions, self.job) if a.type != ABSTRACTION_LAST_RECEIVED_HOLD]
        if keep_cursor_guid is not None:
            stale = [a for a in stale if not (a.type == ABSTRACTION_CURSOR and a.guid == keep_cursor_guid)]
        if not dry_run:
            destroy_abstractions(self.zfs, stale)
        return stale

    # -- pruning ---------------------------------------------------------------------------------
    def hold_tags(self, fs: str, names: Sequence[str]) -> dict[str, list[str]]:
        self._allowed(fs)
        return _hold_tags(self.zfs, fs, names)

    def hold_tags_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        return _hold_tags_all(self.zfs, {fs: self._allowed(fs) for fs in names}, names)

    def destroy_snapshots(self, fs: str, names: Sequence[str]) -> DestroyResult:
        """Destroy snapshots of one filesystem, but never one another job or client still has to
        replicate (checked against our own listing, whoever asks)."""
        self._allowed(fs)
        for n in names:
            validate_snapshot_short_name(n)
        if self.read_only:
            raise EndpointError(f"job {self.info.job!r} is a read-only source: it destroys nothing for its clients",
                                kind=EndpointErrorKind.FORBIDDEN)
        needed = unreplicated_by(self._own(fs), self.guards) if self.guards else {}
        kept = {n: needed[f"{fs}@{n}"] for n in names if f"{fs}@{n}" in needed}
        result = DestroyResult(*destroy_with_bisect(self.zfs, fs, [n for n in names if n not in kept]))
        result.kept = kept
        return result


def _hold_tags(zfs: Zfs, dataset: str, names: Sequence[str]) -> dict[str, list[str]]:
    """Hold tags of some snapshots of one dataset, keyed by short name."""
    if not names:
        return {}
    tags = zfs.holds([f"{dataset}@{validate_snapshot_short_name(n)}" for n in names])
    return {full.partition("@")[2]: t for full, t in tags.items()}


def destroy_abstractions(zfs: Zfs, stale: Sequence[Abstraction]) -> None:
    """Release holds (one `zfs release` per tag for all its snapshots) and destroy bookmarks;
    each is named in the log before it goes. Already gone counts as done."""
    by_tag: dict[str, list[str]] = {}
    for a in stale:
        if a.is_hold:
            by_tag.setdefault(a.tag or "", []).append(a.full_name)
    for tag, names in by_tag.items():
        log.debug("releasing hold %s on %s", tag, ", ".join(names))
        try:
            zfs.release(tag, names)
        except ZfsError as exc:
            if not says_only_not_exist(exc.stderr):
                raise
    for a in stale:
        if not a.is_hold:
            log.debug("destroying bookmark %s (%s)", a.full_name, a.type)
            try:
                zfs.destroy_bookmark(a.full_name)
            except ZfsError as exc:
                if exc.kind != ZfsErrorKind.NOT_EXIST:
                    raise


# Properties in a received stream come from the peer. A compromised sender could ship
# mountpoint=/etc with canmount=on, or sharenfs=on, and `zfs recv -u` only delays the mount until
# the next boot. With recv.properties.safe (the default) the stream's mountpoint and shares are
# ignored on every receive (-x: the replica inherits from its parent, a placeholder with
# mountpoint=none), and a new replica is created not mounted at boot, read-only and, for volumes,
# without a device node (-o; set locally, so later streams cannot change them). An explicit
# recv.properties inherit/override entry wins over these.
SAFE_RECEIVE_EXCLUDE = ("mountpoint", "sharenfs", "sharesmb")
SAFE_RECEIVE_CREATE = {"filesystem": {"canmount": "noauto", "readonly": "on"},
                       "volume": {"volmode": "none", "readonly": "on"}}


def receive_property_args(recv: RecvConfig, creates: bool, dataset_type: str) -> tuple[list[str], dict[str, str]]:
    """(`-x` properties, `-o` properties) for one receive; `creates`: a full, not resumed, receive."""
    inherit, override = list(recv.inherit), dict(recv.override)
    if recv.safe_properties:
        inherit += [p for p in SAFE_RECEIVE_EXCLUDE if p not in override and p not in inherit]
        if creates:
            for prop, value in SAFE_RECEIVE_CREATE.get(dataset_type, {}).items():
                if prop not in inherit:
                    override.setdefault(prop, value)
    # The placeholder mark is ours: a stream's value must never decide it, on any receive (an
    # incremental stream carries the sender's user properties too, TABs and NEWLINEs included).
    if creates:
        override.setdefault(PLACEHOLDER_PROPERTY, "off")
    elif PLACEHOLDER_PROPERTY not in override and PLACEHOLDER_PROPERTY not in inherit:
        inherit.append(PLACEHOLDER_PROPERTY)
    return inherit, override


def _datasets_only(listing: dict[str, DatasetInfo]) -> dict[str, DatasetInfo]:
    """The listing without its versions, for a receiver that keeps it for the session only to
    know which datasets exist and their properties (the same props dicts: what the run marks on
    them is seen here as before); the versions go with the caller's copy, not kept twice."""
    return {name: dataclasses.replace(ds, versions=[]) for name, ds in listing.items()}


class ReceiverEndpoint:
    """The receiving side (implements Receiver): receives below `root` (= root_fs, or
    root_fs/<client identity> on a sink).

    Requests name the SENDER's filesystem; the receiver maps it below its root itself, so a client
    can never name a dataset outside its subtree. `job` is the receiving job (last-received holds).
    """

    def __init__(self, zfs: Zfs, job: str, root_fs: str, client_identity: str | None, recv: RecvConfig,
                 processes: ProcessRegistry | None = None, progress: Progress | None = None,
                 job_type: str = "sink", listing_cache: ListingCache | None = None,
                 run_listing: RunListing | None = None):
        self.zfs, self.job, self.root_fs, self.identity, self.recv_cfg = zfs, job, root_fs, client_identity, recv
        self.listing_cache = listing_cache
        self.root = f"{root_fs}/{client_identity}" if client_identity else root_fs
        self.info = PeerInfo(job=job, type=job_type, abstraction_job=job, root=self.root, batched_holds=True,
                             holds_all=True)
        self.processes = processes or ProcessRegistry()
        self.progress = progress
        self._run = run_listing if run_listing is not None else RunListing()  # of root; shared by lanes
        self._prepared_absent: set[str] = set()  # targets prepare() found missing (parents made)

    def target(self, sender_fs: str) -> str:
        try:
            validate_dataset_name(sender_fs)
            target = validate_dataset_name(receiver_path(self.root_fs, sender_fs, self.identity))
        except ValueError as exc:
            raise EndpointError(f"invalid filesystem name: {exc}", kind=EndpointErrorKind.FORBIDDEN) from None
        if not is_descendant(target, self.root):
            raise EndpointError(f"{target!r} is outside {self.root!r}", kind=EndpointErrorKind.FORBIDDEN)
        return target

    def _sender_name(self, target: str) -> str:
        return target[len(self.root) + 1:]

    # -- listing ---------------------------------------------------------------------------------
    def list_filesystems(self) -> ReceiverListing:
        """Datasets below root keyed by the sender's name, with decoded resume tokens."""
        # Only this side's subtree: a sink client's listing must not cost (or show) the other clients'.
        listing = self.zfs.list_datasets([self.root], cache=self.listing_cache)
        if self.root not in listing and not self.zfs.list_datasets([self.root_fs], depth=0):
            raise EndpointError(f"root_fs {self.root_fs!r} does not exist on the receiver; create it once "
                                f"with `{_q('zfs', 'create', '-p', '-o', 'mountpoint=none', self.root_fs)}`")
        self._run.datasets, self._run.listed = _datasets_only(listing), True
        mine = {name: ds for name, ds in listing.items() if is_descendant(name, self.root, include_self=True)}
        out: ReceiverListing = {}
        for name, ds in mine.items():
            if name != self.root:
                out[self._sender_name(name)] = ReceiverFilesystem(ds, _decoded_token(ds))
        return out

    # -- placeholders ----------------------------------------------------------------------------
    def _ensure_parents(self, target: str) -> None:
        with self._run.placing:  # lanes: one creates a parent they share, the others then see it made
            self._make_parents(target)

    def _make_parents(self, target: str) -> None:
        if not self._run.listed:
            self._run.datasets, self._run.listed = _datasets_only(self.zfs.list_datasets([self.root])), True
        known = self._run.datasets
        for ph in placeholders_needed(target, self.root_fs, set(known)):
            is_identity = self.identity is not None and ph == self.root
            enc = self.recv_cfg.placeholder_encryption
            parent = known.get(ph.rsplit("/", 1)[0])
            parent_encrypted = parent is not None and parent.props.get("encryption", "off") not in ("off", "")
            # zrepl refuses every placeholder while this is unspecified. The choice only matters
            # below an encrypted parent (inherit = encrypted, off = plain), so only there we ask.
            if enc == "unspecified" and parent_encrypted and not is_identity:
                raise EndpointError(
                    f"{target}: parent {ph} must be created as a placeholder below the encrypted "
                    f"{parent.name if parent else self.root_fs}, and recv.placeholder.encryption is unspecified: "
                    "set it to \"inherit\" (placeholders and what is received below them are encrypted "
                    "with the parent's key) or \"off\"")
            log.info("creating placeholder %s", ph)
            try:
                self.zfs.run(create_placeholder_argv(ph, encryption_off=(enc == "off")))
            except ZfsError as exc:
                # as non-root (zfs allow), `zfs create` exits 1 after creating because only root may
                # mount; a placeholder is never mounted (mountpoint=none), so that is success
                mounted_by_root_only = "successfully created, but it may only be mounted by root" in exc.stderr
                if exc.kind != ZfsErrorKind.EXISTS and not mounted_by_root_only:
                    raise
            known.setdefault(ph, DatasetInfo(name=ph, type="filesystem", props={PLACEHOLDER_PROPERTY: "on"}))

    # -- receiving -------------------------------------------------------------------------------
    def prepare(self, req: StepRequest) -> None:
        """Before a full send starts: look for the target and create its placeholder parents.

        Done while no `zfs send` runs yet: otherwise the sender sits on a full pipe while we run
        zfs commands, and that wait counts against the stream (local replication must keep up
        with a raw `zfs send | zfs recv`)."""
        if req.from_ is not None or req.resume_token:
            return
        target = self.target(req.fs)
        # The run's listing knows (a full step is planned only for a target it did not show); one
        # made since is refused by `zfs recv` without -F, so nothing is overwritten.
        if (target not in self._run.datasets) if self._run.listed else (self.zfs.list_one(target) is None):
            self._ensure_parents(target)
            self._prepared_absent.add(target)

    def receive(self, req: StepRequest, source: StreamSource) -> ReceiveResult:
        """Run `zfs recv` on the stream, verify what arrived, then the producer's outcome."""
        try:
            result = self._receive(req, source.open_fd())
        except BaseException:
            source.abandon()
            raise
        error = source.finish()
        if error:
            raise StreamError(error, temporary=True)
        return result

    def _receive(self, req: StepRequest, stream_fd: int) -> ReceiveResult:
        """Run `zfs recv` with stdin = stream_fd (closed here), then verify what arrived."""
        try:
            target = self.target(req.fs)
            if req.from_ is None and not req.resume_token and target in self._prepared_absent:
                # prepare() just found no target: no listing while the stream waits. Should one
                # appear meanwhile, `zfs recv` without -F refuses it: nothing is overwritten.
                self._prepared_absent.discard(target)
                current = None
            else:
                current = self.zfs.list_one(target) if req.from_ is None else None
            force = False
            if req.from_ is None and not req.resume_token and current is not None:
                # A full stream onto an existing dataset: only into a placeholder without snapshots,
                # checked here on the receiving side right before `-F`, never on the client's word
                # nor on an earlier listing: the property must be set locally (an inherited `on` is
                # a dataset somebody created below a placeholder).
                if current.snapshots() or target not in self.zfs.local_placeholders([target]):
                    raise EndpointError(f"refusing to overwrite {target}: it exists and is not an empty placeholder "
                                        f"(zrepl:placeholder=on set on the dataset itself)",
                                        kind=EndpointErrorKind.RECEIVER_HAS_DATA)
                force = True
            if current is None and req.from_ is None:
                self._ensure_parents(target)
            creates = req.from_ is None and not req.resume_token
            inherit, override = receive_property_args(self.recv_cfg, creates, req.dataset_type)
            argv = recv_argv(target, resumable=True, force=force, inherit=inherit, override=override)
            proc = self.zfs.spawn(argv, stdin=stream_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            os.close(stream_fd)
        self.processes.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            self.processes.discard(proc)
        if proc.returncode != 0:
            failure = ZfsError(argv, proc.returncode, err.decode("utf-8", "replace"))
            raise self._explained(failure, target) from failure
        if req.defer_hold:  # checked and held by hold_received_all, for all filesystems at once
            if self._run.listed:  # a child's step must not take this new dataset for a missing parent
                self._run.datasets.setdefault(target, DatasetInfo(name=target, type=req.dataset_type))
            return ReceiveResult(received=req.to, guid=req.to_guid)
        return self._verify(target, req)

    def _explained(self, failure: ZfsError, target: str) -> ZreplError:
        """A refused receive that a human has to resolve: say why and how (permanent, not retried)."""
        aside = _q("zfs", "rename", target, f"{target}-zrepl-aside")
        if failure.kind == ZfsErrorKind.MODIFIED:
            info = self.zfs.list_one(target)
            newest = info.snapshots()[-1].full_name if info and info.snapshots() else f"{target}@<newest>"
            return EndpointError(
                f"{target} was written to on the receiver after its newest snapshot (mounted read-write?), so zfs "
                f"refuses the incremental receive. Discard the change: `{_q('zfs', 'rollback', newest)}`; or keep it "
                f"and start over with a full replication: `{aside}`. readonly=on on replicas prevents this "
                f"(recv.properties.safe sets it on new ones). ({failure.stderr})",
                kind=EndpointErrorKind.RECEIVER_MODIFIED)
        if failure.kind == ZfsErrorKind.ENCRYPTED_OVERWRITE:
            return EndpointError(
                f"{target}: OpenZFS cannot replace this placeholder with the stream (zfs receive -F does not put an "
                f"encrypted stream over an unencrypted placeholder, nor a plain one over an encrypted). If {target} "
                f"has no children, remove it (`{_q('zfs', 'destroy', target)}`) and the next run receives it as a "
                f"new dataset; otherwise move the placeholder aside (`{aside}`) or set "
                f"recv.placeholder.encryption to match the stream. ({failure.stderr})",
                kind=EndpointErrorKind.ENCRYPTION)
        return failure

    def _verify(self, target: str, req: StepRequest) -> ReceiveResult:
        info = self.zfs.list_one(target)
        if info is None:
            raise EndpointError(f"{target} does not exist after the receive")
        got = {v.name: v.guid for v in info.snapshots()}
        if got.get(req.to) != req.to_guid:
            raise EndpointError(f"{target}@{req.to} has guid {got.get(req.to)} after the receive, "
                                f"expected {req.to_guid}")
        if self._run.listed:  # a child's step must not take this new dataset for a missing parent
            self._run.datasets[target] = info
        self._hold_last_received(target, info, req.to)
        return ReceiveResult(received=req.to, guid=req.to_guid)

    def _hold_last_received(self, target: str, info: DatasetInfo, newest: str) -> None:
        """Hold the newest received snapshot (the next incremental base) and release older holds."""
        tag = last_received_hold_tag(self.job)
        self.zfs.hold_idempotent(tag, [f"{target}@{newest}"])
        # Our tag on any other held snapshot goes (usually one: the previous base). A snapshot held
        # only by others stays held (release_many: "no such tag"), so no `zfs holds` is needed.
        held = [v.full_name for v in info.snapshots() if v.userrefs > 0 and v.name != newest]
        if held:
            log.debug("releasing hold %s on %s", tag, ", ".join(held))
            refused = self.zfs.release_many(tag, held)
            if refused:
                raise EndpointError(f"{target}: cannot release older last-received holds: " +
                                    "; ".join(f"{n}: {r}" for n, r in refused.items()), temporary=True)

    def hold_last_received(self, fs: str, snapshot: str, guid: int) -> None:
        """Put the last-received hold on a snapshot that already arrived (its receive's own hold was
        lost). Only a snapshot that exists here with the GUID the client names is held."""
        target = self.target(fs)
        validate_snapshot_short_name(snapshot)
        info = self.zfs.list_one(target)
        found = {v.name: v.guid for v in info.snapshots()} if info else {}
        if info is None or found.get(snapshot) != guid:
            raise EndpointError(f"{target}@{snapshot} with guid {guid} does not exist on the receiver")
        log.info("%s@%s: restoring the last-received hold", target, snapshot)
        self._hold_last_received(target, info, snapshot)

    def hold_received_all(self, received: Sequence[tuple[str, str, int]]) -> dict[str, ZreplError]:
        """One listing of the received replicas (`zfs list -d 1` of all of them), then one `zfs
        hold` of what arrived with the expected guid, then one `zfs release` of our tag on their
        other held snapshots (a snapshot held only by others stays held: "no such tag")."""
        failed: dict[str, ZreplError] = {}
        targets: dict[str, tuple[str, str, int]] = {}
        for fs, snapshot, snap_guid in received:
            try:
                targets[self.target(fs)] = (fs, validate_snapshot_short_name(snapshot), snap_guid)
            except (EndpointError, ValueError) as exc:
                failed[fs] = EndpointError(str(exc), kind=EndpointErrorKind.FORBIDDEN)
        listing = self.zfs.list_datasets(list(targets), depth=1) if targets else {}
        hold: dict[str, str] = {}
        older: dict[str, str] = {}
        for target, (fs, snapshot, snap_guid) in targets.items():
            info = listing.get(target)
            got = {v.name: v.guid for v in info.snapshots()} if info else {}
            if info is None or got.get(snapshot) != snap_guid:
                failed[fs] = EndpointError(f"{target}@{snapshot} has guid {got.get(snapshot)} after the receive, "
                                           f"expected {snap_guid}")
                continue
            hold[f"{target}@{snapshot}"] = fs
            older.update((v.full_name, fs) for v in info.snapshots() if v.userrefs > 0 and v.name != snapshot)
        tag = last_received_hold_tag(self.job)
        batch_failures(lambda: self.zfs.hold_many(tag, list(hold)), "hold", hold, failed)
        older = {name: fs for name, fs in older.items() if fs not in failed}  # a replica not held keeps its base's
        batch_failures(lambda: self.zfs.release_many(tag, list(older)), "release", older, failed)
        return failed

    def placeholders(self, filesystems: Sequence[str]) -> set[str]:
        """Which of these (sender names) have a replica that is a placeholder a full receive may
        replace: zrepl:placeholder=on set LOCALLY (the listing holds no user property)."""
        targets = {self.target(fs): fs for fs in filesystems}
        return {targets[t] for t in self.zfs.local_placeholders(list(targets))}

    def release_stale(self, fs: str) -> None:
        target = self.target(fs)
        info = self.zfs.list_one(target)
        if info is None:
            return
        snaps = _by_txg(info.snapshots())
        held = [v.full_name for v in snaps[:-1] if v.userrefs > 0]
        tag = last_received_hold_tag(self.job)
        older = [name for name, tags in (self.zfs.holds(held) if held else {}).items() if tag in tags]
        if older:
            log.debug("%s: releasing stale last-received holds on %s", target, ", ".join(older))
            destroy_abstractions(self.zfs, [Abstraction(ABSTRACTION_LAST_RECEIVED_HOLD, self.job, target,
                                                        name.partition("@")[2], tag=tag) for name in older])

    def clear_resume_token(self, fs: str) -> None:
        target = self.target(fs)
        log.warning("%s: discarding the partial receive state (zfs recv -A): its source is gone", target)
        try:
            self.zfs.run(recv_abort_argv(target))
        except ZfsError as exc:
            if exc.kind != ZfsErrorKind.NOT_EXIST and "does not have any resumable receive state" not in exc.stderr:
                raise

    # -- pruning ---------------------------------------------------------------------------------
    def hold_tags(self, fs: str, names: Sequence[str]) -> dict[str, list[str]]:
        return _hold_tags(self.zfs, self.target(fs), names)

    def hold_tags_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        return _hold_tags_all(self.zfs, {fs: self.target(fs) for fs in names}, names)

    def destroy_snapshots(self, fs: str, names: Sequence[str]) -> DestroyResult:
        target = self.target(fs)
        for n in names:
            validate_snapshot_short_name(n)
        return DestroyResult(*destroy_with_bisect(self.zfs, target, list(names)))


# ---- serving endpoints over the protocol, and the client-side proxies ---------------------------

def _wire_str_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise EndpointError(f"{key!r} must be a list of strings", kind=EndpointErrorKind.FORBIDDEN)
    return value


def _wire_names_by_fs(body: dict[str, Any]) -> dict[str, list[str]]:
    value = body.get("names", {})
    if not isinstance(value, dict) or not all(isinstance(fs, str) and isinstance(ns, list)
                                              and all(isinstance(n, str) for n in ns) for fs, ns in value.items()):
        raise EndpointError("'names' must map filesystems to lists of strings", kind=EndpointErrorKind.FORBIDDEN)
    return value


def _refuse_malformed(handlers: dict[str, Handler]) -> dict[str, Handler]:
    """A body of the wrong shape (a number where a list belongs, a missing pair) is the client's
    error: answer it as a refused request, not as an internal error of ours."""
    def guard(kind: str, handler: Handler) -> Handler:
        def call(body: dict, ctx: RequestContext) -> Any:
            for key in ("fs", "to"):  # names are strings: None must not become a dataset "None"
                if key in body and not isinstance(body[key], str):
                    raise EndpointError(f"malformed {kind} request: {key!r} must be a string",
                                        kind=EndpointErrorKind.FORBIDDEN)
            try:
                return handler(body, ctx)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
                raise EndpointError(f"malformed {kind} request: {type(exc).__name__}: {exc}",
                                    kind=EndpointErrorKind.FORBIDDEN) from None
        return call
    return {kind: guard(kind, handler) for kind, handler in handlers.items()}


def _destroy_reply(result: DestroyResult) -> dict[str, Any]:
    return {"destroyed": result.destroyed, "errors": result.errors, "kept": result.kept}


def sender_handlers(ep: SenderEndpoint) -> dict[str, Handler]:
    """Protocol handlers of a source job's sender (a pull client talks to these)."""

    def info(body: dict, ctx: RequestContext) -> dict:
        return ep.info.to_wire()

    pages: list[ListingItem] = []

    def list_(body: dict, ctx: RequestContext) -> dict:
        if body.get("offset", 0) == 0:
            pages[:] = listing_items((d.name, d) for d in ep.list_filesystems())
        return served_listing_page(pages, body.get("offset", 0))

    def estimate(body: dict, ctx: RequestContext) -> dict:
        return {"bytes": ep.estimate(StepRequest.from_wire(body))}

    def send(body: dict, ctx: RequestContext) -> Reply:
        stream = ep.open_send(StepRequest.from_wire(body))
        return Reply({"ok": True}, stream=OutgoingStream(stream.open_fd(), stream.finish))

    def protect(body: dict, ctx: RequestContext) -> dict:
        snaps = [(validate_snapshot_short_name(str(n)), int(g)) for n, g in body.get("snapshots", [])]
        source = body.get("source")
        ep.protect(str(body.get("fs", "")), _level(body), snaps, source if isinstance(source, str) else None)
        return {}

    def complete(body: dict, ctx: RequestContext) -> dict:
        ep.complete(str(body.get("fs", "")), validate_snapshot_short_name(str(body.get("to", ""))),
                    int(body.get("to_guid", 0)), _level(body))
        return {}

    def holds(body: dict, ctx: RequestContext) -> dict:
        return {"holds": ep.hold_tags(str(body.get("fs", "")), _wire_str_list(body, "names"))}

    def holds_all(body: dict, ctx: RequestContext) -> dict:
        return {"holds": ep.hold_tags_all(_wire_names_by_fs(body))}

    def release_stale(body: dict, ctx: RequestContext) -> dict:
        ep.release_stale(str(body.get("fs", "")))
        return {}

    def destroy(body: dict, ctx: RequestContext) -> dict:
        return _destroy_reply(ep.destroy_snapshots(str(body.get("fs", "")), _wire_str_list(body, "names")))

    return _refuse_malformed({"endpoint.info": info, "sender.list": list_, "sender.estimate": estimate,
                              "sender.send": send, "sender.protect": protect, "sender.complete": complete,
                              "sender.release_stale": release_stale, "sender.holds": holds,
                              "sender.holds_all": holds_all, "sender.destroy": destroy})


def _level(body: dict[str, Any]) -> str:
    level = body.get("level")
    if level not in PROTECTION_CHOICES:
        raise EndpointError(f"invalid protection level {level!r}", kind=EndpointErrorKind.FORBIDDEN)
    return level


def receiver_handlers(ep: ReceiverEndpoint) -> dict[str, Handler]:
    """Protocol handlers of a sink's receiver (a push client talks to these)."""

    def info(body: dict, ctx: RequestContext) -> dict:
        return ep.info.to_wire()

    pages: list[ListingItem] = []

    def list_(body: dict, ctx: RequestContext) -> dict:
        # keyed by the sender's filesystem name; the client decodes any resume token itself
        if body.get("offset", 0) == 0:
            pages[:] = listing_items((name, e.dataset) for name, e in ep.list_filesystems().items())
        return served_listing_page(pages, body.get("offset", 0))

    def receive(body: dict, ctx: RequestContext) -> dict:
        if ctx.stream is None:
            raise EndpointError("receive request without a stream", kind=EndpointErrorKind.FORBIDDEN)
        result = ep.receive(StepRequest.from_wire(body), IncomingSource(ctx.stream))
        return dataclasses.asdict(result)

    def prepare(body: dict, ctx: RequestContext) -> dict:
        ep.prepare(StepRequest.from_wire(body))
        return {}

    def clear_token(body: dict, ctx: RequestContext) -> dict:
        ep.clear_resume_token(str(body.get("fs", "")))
        return {}

    def hold_last_received(body: dict, ctx: RequestContext) -> dict:
        try:
            snap_guid = int(body.get("guid", 0))
        except (TypeError, ValueError):
            raise EndpointError("invalid guid", kind=EndpointErrorKind.FORBIDDEN) from None
        ep.hold_last_received(str(body.get("fs", "")), str(body.get("snapshot", "")), snap_guid)
        return {}

    def holds(body: dict, ctx: RequestContext) -> dict:
        return {"holds": ep.hold_tags(str(body.get("fs", "")), _wire_str_list(body, "names"))}

    def holds_all(body: dict, ctx: RequestContext) -> dict:
        return {"holds": ep.hold_tags_all(_wire_names_by_fs(body))}

    def hold_received(body: dict, ctx: RequestContext) -> dict:
        items = body.get("received")
        if not isinstance(items, list) or not all(
                isinstance(i, list) and len(i) == 3 and isinstance(i[0], str) and isinstance(i[1], str)
                and isinstance(i[2], int) and not isinstance(i[2], bool) for i in items):
            raise EndpointError("invalid received list", kind=EndpointErrorKind.FORBIDDEN)
        failed = ep.hold_received_all([(fs, snap, g) for fs, snap, g in items])
        return {"failed": {fs: str(exc) for fs, exc in failed.items()}}

    def release_stale(body: dict, ctx: RequestContext) -> dict:
        ep.release_stale(str(body.get("fs", "")))
        return {}

    def placeholders(body: dict, ctx: RequestContext) -> dict:
        return {"placeholders": sorted(ep.placeholders(_wire_str_list(body, "filesystems")))}

    def destroy(body: dict, ctx: RequestContext) -> dict:
        return _destroy_reply(ep.destroy_snapshots(str(body.get("fs", "")), _wire_str_list(body, "names")))

    return _refuse_malformed({"endpoint.info": info, "receiver.list": list_, "receiver.placeholders": placeholders,
                              "receiver.prepare": prepare,
                              "receiver.receive": receive, "receiver.clear_token": clear_token,
                              "receiver.hold_last_received": hold_last_received,
                              "receiver.hold_received": hold_received,
                              "receiver.release_stale": release_stale, "receiver.holds": holds,
                              "receiver.holds_all": holds_all, "receiver.destroy": destroy})


class RequestChannel(Protocol):
    """What the Remote* proxies need of a connection (a Connection or a RedialingConnection)."""

    def request(self, kind: str, body: dict[str, Any] | None = None, *,
                stream_in: OutgoingStream | int | None = None,
                stream_out: Callable[[dict[str, Any], IncomingStream], Any] | None = None) -> dict[str, Any]: ...


def _peer_info(conn: RequestChannel, expected: str) -> PeerInfo:
    info = PeerInfo.from_wire(conn.request("endpoint.info", {}))
    if info.type != expected:
        raise EndpointError(f"the peer is a {info.type} job ({info.job!r}), expected a {expected}",
                            kind=EndpointErrorKind.FORBIDDEN)
    return info


def _destroy_result(body: dict[str, Any]) -> DestroyResult:
    destroyed, errors, kept = body.get("destroyed", []), body.get("errors", {}), body.get("kept", {})
    if not isinstance(destroyed, list) or not all(isinstance(n, str) for n in destroyed) \
            or not all(isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in (errors, kept)):
        raise EndpointError("peer sent an invalid destroy reply")
    return DestroyResult(list(destroyed), {str(k): v for k, v in errors.items()}, {str(k): v for k, v in kept.items()})


def _holds_reply(body: dict[str, Any]) -> dict[str, list[str]]:
    holds = body.get("holds", {})
    if not isinstance(holds, dict) or not all(isinstance(t, list) and all(isinstance(x, str) for x in t)
                                              for t in holds.values()):
        raise EndpointError("peer sent an invalid holds reply")
    return {str(k): list(v) for k, v in holds.items()}


def _remote_hold_tags_all(conn: RequestChannel, side: str, info: PeerInfo, names: dict[str, list[str]],
                          per_fs: Callable[[str, Sequence[str]], dict[str, list[str]]]
                          ) -> dict[str, dict[str, list[str]]]:
    """One `SIDE.holds_all` request, or one `SIDE.holds` per filesystem to a peer without it. Only
    what was asked for is taken from the reply."""
    names = {fs: ns for fs, ns in names.items() if ns}
    if not names:
        return {}
    if not info.holds_all:
        return {fs: per_fs(fs, ns) for fs, ns in names.items()}
    reply = conn.request(f"{side}.holds_all", {"names": names}).get("holds", {})
    if not isinstance(reply, dict):
        raise EndpointError("peer sent an invalid holds reply")
    return {fs: {n: t for n, t in _holds_reply({"holds": reply.get(fs, {})}).items() if n in ns}
            for fs, ns in names.items()}


class RemoteSender:
    """A pull job's view of a source's SenderEndpoint, through a connection (implements Sender)."""

    sizes_in_stream = False  # the source's `zfs send` stderr stays on the source: ask for estimates
    concurrent_estimates = False  # one request at a time on the connection

    def __init__(self, conn: RequestChannel):
        self.conn = conn
        self.info = _peer_info(conn, "source")
        self._pending_protect: dict[str, ProtectRequest] = {}

    def list_filesystems(self) -> list[DatasetInfo]:
        return [ds for _, ds in fetch_listing(self.conn, "sender.list")]

    def estimate(self, req: StepRequest) -> int | None:
        value = self.conn.request("sender.estimate", req.to_wire()).get("bytes")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def send(self, req: StepRequest, deliver: Deliver) -> ReceiveResult:
        self._protect_pending(req.fs)
        results: list[ReceiveResult] = []
        sources: list[IncomingSource] = []

        def on_stream(body: dict[str, Any], stream: IncomingStream) -> None:
            source = IncomingSource(stream)
            sources.append(source)
            results.append(deliver(source))
        try:
            self.conn.request("sender.send", req.to_wire(), stream_out=on_stream)
        except (ZreplError, OSError) as exc:
            # the stream was drained to its END: it says whether the sender failed
            failed = [s.sender_error for s in sources if s.sender_error]
            raise with_sender_error(exc, failed[0] if failed else None) from exc
        if not results:
            raise EndpointError("the source answered sender.send without a stream")
        return results[0]

    def protect(self, fs: str, level: str, snapshots: Sequence[tuple[str, int]], source: str | None) -> None:
        self.conn.request("sender.protect", {"fs": fs, "level": level, "snapshots": [list(s) for s in snapshots],
                                             "source": source})

    def complete(self, fs: str, to: str, to_guid: int, level: str) -> None:
        self.conn.request("sender.complete", {"fs": fs, "to": to, "to_guid": to_guid, "level": level})

    # One request per filesystem, as before. Protection waits for the filesystem's first send
    # (a failure there fails that step), so one that never runs gets no holds on the source.
    def protect_all(self, requests: Sequence[ProtectRequest]) -> dict[str, ZreplError]:
        self._pending_protect.update((r.fs, r) for r in requests)
        return {}

    def _protect_pending(self, fs: str) -> None:
        r = self._pending_protect.pop(fs, None)
        if r is not None:
            self.protect(r.fs, r.level, r.snapshots, r.source)

    def complete_all(self, completions: Sequence[Completion]) -> dict[str, ZreplError]:
        def complete(c: Completion) -> None:
            if self._pending_protect.pop(c.fs, None) is None and c.to is not None:
                self.complete(c.fs, c.to, c.to_guid, c.level)
        return each_filesystem(completions, lambda c: c.fs, complete)

    def release_stale(self, fs: str) -> None:
        self.conn.request("sender.release_stale", {"fs": fs})

    def hold_tags(self, fs: str, names: Sequence[str]) -> dict[str, list[str]]:
        return _holds_reply(self.conn.request("sender.holds", {"fs": fs, "names": list(names)})) if names else {}

    def hold_tags_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        return _remote_hold_tags_all(self.conn, "sender", self.info, names, self.hold_tags)

    def destroy_snapshots(self, fs: str, names: Sequence[str]) -> DestroyResult:
        return _destroy_result(self.conn.request("sender.destroy", {"fs": fs, "names": list(names)}))


class RemoteReceiver:
    """A push job's view of a sink's ReceiverEndpoint, through a connection (implements Receiver)."""

    def __init__(self, conn: RequestChannel):
        self.conn = conn
        self.info = _peer_info(conn, "sink")

    def list_filesystems(self) -> ReceiverListing:
        out: ReceiverListing = {}
        for name, dataset in fetch_listing(self.conn, "receiver.list"):
            try:
                validate_dataset_name(name)
            except ValueError as exc:
                raise EndpointError(f"peer sent an invalid listing: {exc}") from None
            out[name] = ReceiverFilesystem(dataset, _decoded_token(dataset))
        return out

    def prepare(self, req: StepRequest) -> None:
        self.conn.request("receiver.prepare", req.to_wire())

    def receive(self, req: StepRequest, source: StreamSource) -> ReceiveResult:
        body = self.conn.request("receiver.receive", req.to_wire(),
                                 stream_in=OutgoingStream(source.open_fd(), source.finish))
        received, guid = body.get("received"), body.get("guid")
        if not isinstance(received, str) or not isinstance(guid, int) or isinstance(guid, bool):
            raise EndpointError(f"peer sent an invalid receive reply {body!r:.200}")
        return ReceiveResult(received=received, guid=guid)

    def clear_resume_token(self, fs: str) -> None:
        self.conn.request("receiver.clear_token", {"fs": fs})

    def hold_last_received(self, fs: str, snapshot: str, guid: int) -> None:
        self.conn.request("receiver.hold_last_received", {"fs": fs, "snapshot": snapshot, "guid": guid})

    def hold_received_all(self, received: Sequence[tuple[str, str, int]]) -> dict[str, ZreplError]:
        body = self.conn.request("receiver.hold_received", {"received": [list(r) for r in received]})
        failed = body.get("failed")
        if not isinstance(failed, dict) or not all(isinstance(v, str) for v in failed.values()):
            raise EndpointError(f"peer sent an invalid hold_received reply {body!r:.200}")
        asked = {fs for fs, _, _ in received}
        return {fs: EndpointError(msg, temporary=True) for fs, msg in failed.items() if fs in asked}

    def release_stale(self, fs: str) -> None:
        self.conn.request("receiver.release_stale", {"fs": fs})

    def placeholders(self, filesystems: Sequence[str]) -> set[str]:
        names = _wire_str_list(self.conn.request("receiver.placeholders", {"filesystems": list(filesystems)}),
                               "placeholders")
        return set(names) & set(filesystems)

    def hold_tags(self, fs: str, names: Sequence[str]) -> dict[str, list[str]]:
        return _holds_reply(self.conn.request("receiver.holds", {"fs": fs, "names": list(names)})) if names else {}

    def hold_tags_all(self, names: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        return _remote_hold_tags_all(self.conn, "receiver", self.info, names, self.hold_tags)

    def destroy_snapshots(self, fs: str, names: Sequence[str]) -> DestroyResult:
        return _destroy_result(self.conn.request("receiver.destroy", {"fs": fs, "names": list(names)}))


def _decoded_token(ds: DatasetInfo) -> DecodedToken | None:
    """A dataset's receive_resume_token decoded HERE (the peer's own decoding is never used): None
    without a token; one that does not decode has toguid 0, so planning clears it."""
    raw = ds.props.get("receive_resume_token")
    if not raw:
        return None
    try:
        return decode_resume_token(raw)
    except ValueError as exc:
        log.warning("%s: undecodable resume token (%s); it will be cleared", ds.name, exc)
        return DecodedToken(toguid=0, toname="", fromguid=None, bytes=None)


# =================================================================================================
# 9. Transports
# =================================================================================================

# How an active job reaches its passive side (zrepl's `connect`), and what the passive side offers
# one client (`serve`). `local`: a socketpair to the sink/source of the same config, served in a
# thread of this process (streams pass as file descriptors). `ssh+stdinserver`: ssh with no remote
# command; the passive host's authorized_keys forces `zrepl.py stdinserver IDENTITY`.

@dataclass
class Peer:
    """A connected peer for one active run: the connection and how to tear it down.
    `open_lane(progress)` gives another lane for a parallel step (a Peer of its own: over
    ssh+stdinserver a lane of the same connection, locally another socketpair), sharing the run's
    bandwidth limits; `lanes()` says how many lanes the passive side agreed to (LaneMux)."""

    conn: RequestChannel
    close: Callable[[], None]
    cancel: Callable[[str], None]
    open_lane: Callable[[Progress], Peer] | None = None
    lanes: Callable[[], int] = lambda: 1


@dataclass(frozen=True)
class LocalLimits:
    """The bandwidth limits of one local run, as TokenBuckets shared by all its connections: the
    lanes of parallel steps draw from the same buckets, so `steps = 4` does not mean four times the
    configured rate (over ssh the lanes share their connection's buckets likewise)."""

    client_send: TokenBucket | None = None
    client_recv: TokenBucket | None = None
    server_send: TokenBucket | None = None
    server_recv: TokenBucket | None = None

    @classmethod
    def of(cls, job: JobConfig, passive: JobConfig) -> LocalLimits:
        if passive.type == "sink":
            return cls(client_send=_bucket(job.send.bandwidth_limit), server_recv=_bucket(passive.recv.bandwidth_limit))
        return cls(server_send=_bucket(passive.send.bandwidth_limit), client_recv=_bucket(job.recv.bandwidth_limit))


def connect_local(config: Config, job: JobConfig, zfs: Zfs, processes: ProcessRegistry,
                  progress: Progress, limits: LocalLimits | None = None,
                  run_listing: RunListing | None = None) -> Peer:
    """Join an active job to the sink/source serving its local listener: a socketpair, the passive
    endpoint served in a thread of this process. Streams pass as file descriptors (zero copies)
    unless a bandwidth limit forces copying. `open_lane` gives another such pair for a parallel
    step, drawing from the same bandwidth buckets (`limits`, made here when not given) and sharing
    the passive endpoint's listing of the run (`run_listing`, likewise), as an ssh connection's
    lanes do."""
    assert job.connect is not None
    passive = local_listener_job(config, job.connect.listener_name)
    if limits is None:
        limits = LocalLimits.of(job, passive)
    if run_listing is None:
        run_listing = RunListing()
    client, server = local_pair()
    client.name, server.name = f"local listener {job.connect.listener_name}", f"local client {job.name}"
    identity = job.connect.client_identity
    handlers = passive_handlers(passive, identity, zfs, processes, progress, replication_guards(config),
                                client_listing_cache(config, passive, identity), run_listing)
    client.send_limit, client.recv_limit = limits.client_send, limits.client_recv
    server.send_limit, server.recv_limit = limits.server_send, limits.server_recv
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            serve_connection(server, handlers)
        except (ZreplError, OSError) as exc:
            failure.append(exc)
            log.debug("local server for %s ended: %s", passive.name, exc)
        finally:
            server.close()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(serve,), name=f"serve {passive.name}",
                              daemon=True)
    thread.start()
    client.handshake_client(identity)

    def close() -> None:
        client.close()
        thread.join(timeout=30)

    def open_lane(lane_progress: Progress) -> Peer:
        return connect_local(config, job, zfs, processes, lane_progress, limits, run_listing)

    return Peer(client, close, client.cancel, open_lane, lambda: job.replication.concurrency_steps)


def client_listing_cache(config: Config, passive: JobConfig, identity: str) -> ListingCache:
    """The listing cache of what a sink or source serves one client (ssh or local alike)."""
    return ListingCache.for_owner(config.global_.runtime_dir, f"{passive.name} client {identity}")


def local_listener_job(config: Config, listener: str) -> JobConfig:
    """The sink or source job serving a local listener (configcheck guarantees exactly one)."""
    for j in config.jobs:
        if j.serve is not None and j.serve.type == "local" and j.serve.listener_name == listener:
            return j
    raise ConfigError(f"no sink or source job serves local listener {listener!r}", file=config.file)


def _bucket(limit: BandwidthLimit | None) -> TokenBucket | None:
    return TokenBucket(limit.max, limit.bucket_capacity) if limit else None


def connect_peer(config: Config, job: JobConfig, zfs: Zfs, processes: ProcessRegistry, progress: Progress,
                 clock: Clock = SYSTEM_CLOCK) -> Peer:
    """Connect an active job to its passive side over the configured transport."""
    assert job.connect is not None
    if job.connect.type == "local":
        return connect_local(config, job, zfs, processes, progress)
    return connect_ssh(job, progress, clock)


DIAL_RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds between dials refused as temporary


def connect_ssh(job: JobConfig, progress: Progress, clock: Clock = SYSTEM_CLOCK) -> Peer:
    """ssh+stdinserver: ssh with no remote command; the passive host's authorized_keys forces
    `zrepl.py stdinserver IDENTITY`, which serves the protocol on its stdin/stdout.

    The connection redials after it broke (RedialingConnection), so the runner's retry attempts
    after a lost connection (ssh killed, network gone) get a fresh one and resume from the
    receiver's resume token."""
    assert job.connect is not None
    connect = job.connect

    def dial_once() -> Connection:
        conn = ssh_connect(ssh_argv(connect), name=f"{connect.user}@{connect.host}",
                           timeout=max(connect.dial_timeout, DEFAULT_PEER_TIMEOUT))
        conn.lanes_wanted = job.replication.concurrency_steps  # parallel steps ride on lanes
        if job.type == "push":
            conn.send_limit = _bucket(job.send.bandwidth_limit)
        else:
            conn.recv_limit = _bucket(job.recv.bandwidth_limit)
            # push counts bytes from the local `zfs send -v -P`; pull has only the stream to count
            conn.progress = progress.add_bytes
        try:
            conn.handshake_client(job.name)
        except BaseException:
            conn.close()
            raise
        return conn

    def dial() -> Connection:
        # A temporary refusal (the server still holds this identity's lock, e.g. its previous
        # stdinserver is winding down) is worth a few short waits; anything else fails at once.
        for delay in DIAL_RETRY_DELAYS:
            try:
                return dial_once()
            except ProtocolError as exc:
                if not exc.temporary:
                    raise
                log.warning("job %s: %s; dialing again in %gs", job.name, exc, delay)
                clock.sleep(delay)
        return dial_once()

    redialing = RedialingConnection(dial)

    def open_lane(lane_progress: Progress) -> Peer:
        def dial_lane() -> Connection:
            lane = redialing.open_lane()
            if job.type == "pull":
                lane.progress = lane_progress.add_bytes
            return lane
        lane = RedialingConnection(dial_lane)
        return Peer(lane, lane.close, lane.cancel)

    return Peer(redialing, redialing.close, redialing.cancel, open_lane, lambda: redialing.conn.lanes)


def ssh_argv(c: ConnectConfig) -> list[str]:
    """`ssh -T -o BatchMode=yes [-o opt]... -o ConnectTimeout=<dial_timeout> -i identity_file -p port
    user@host`, no remote command: the forced command in authorized_keys decides what runs.

    ConnectTimeout comes after the configured options because ssh keeps the FIRST value of an
    option: an explicit `options = ["ConnectTimeout=30"]` wins over dial_timeout."""
    argv = [c.ssh_command, "-T", "-o", "BatchMode=yes"]
    for opt in c.options:
        argv += ["-o", opt]
    argv += ["-o", f"ConnectTimeout={max(1, int(c.dial_timeout))}"]
    return argv + ["-i", c.identity_file, "-p", str(c.port), f"{c.user}@{c.host}"]


class RedialingConnection:
    """An active side's connection that dials again after the previous one broke (a RequestChannel).

    A request that fails with ProtocolError (lost, timed out, garbage) marks the connection stale;
    the next request dials anew; so does one on a connection that broke under another user (a
    lane of it: lanes and the connection's own requests run in several threads, hence the lock).
    Cancelled connections never redial: cancel means stop.
    """

    def __init__(self, dial: Callable[[], Connection]):
        self._dial = dial
        self.conn: Connection = dial()
        self.dials = 1
        self._stale = False
        self._cancelled: str | None = None
        self._lock = threading.Lock()

    def request(self, kind: str, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        try:
            self._redial_if_broken()
        except BaseException:
            stream_in = kwargs.get("stream_in")
            if stream_in is not None:  # ownership passed to us: don't leak the producer's pipe
                os.close(stream_in if isinstance(stream_in, int) else stream_in.fd)
            raise
        try:
            return self.conn.request(kind, body, **kwargs)
        except ProtocolError:
            self._stale = True
            raise

    def open_lane(self) -> Connection:
        """Another lane of the (working, redialed if need be) connection: see Connection.open_lane."""
        self._redial_if_broken()
        return self.conn.open_lane()

    def _redial_if_broken(self) -> None:
        with self._lock:
            if (self._stale or not self.conn.usable) and self._cancelled is None:
                self._redial()

    def _redial(self) -> None:
        log.warning("%s: connecting again after the lost connection", self.conn.name)
        self.conn.close()
        self.conn = self._dial()
        self.dials += 1
        self._stale = False

    @property
    def name(self) -> str:
        return self.conn.name

    def cancel(self, reason: str = "cancelled") -> None:
        self._cancelled = reason
        self.conn.cancel(reason)

    def close(self) -> None:
        self.conn.close()


# ---- the passive side: what a sink or source offers one client ------------------------------------

def stdinserver_job(config: Config, identity: str) -> JobConfig:
    """The sink or source job whose `serve = {type = "stdinserver"}` lists `identity`."""
    matches = [j for j in config.jobs
               if j.serve is not None and j.serve.type == "stdinserver" and identity in j.serve.client_identities]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ZreplError(f"client identity {identity!r} is listed by several jobs "
                         f"({', '.join(j.name for j in matches)}); it must select exactly one sink or source job")
    known = sorted({i for j in config.jobs if j.serve is not None and j.serve.type == "stdinserver"
                    for i in j.serve.client_identities})
    raise ZreplError(f"unknown client identity {identity!r}: no sink or source job in {config.file} lists it "
                     f"in serve.client_identities (known: {', '.join(known) or 'none'})")


def passive_handlers(job: JobConfig, identity: str, zfs: Zfs, processes: ProcessRegistry,
                     progress: Progress, guards: Sequence[str] = (),
                     listing_cache: ListingCache | None = None,
                     run_listing: RunListing | None = None) -> dict[str, Handler]:
    """The protocol handlers a sink (receiver below root_fs/<identity>) or a source (sender of its
    filesystems filter) offers one client. A source gives each client its own abstraction names
    and keeps what its other clients and this host's other jobs (`guards`) still need. Each lane
    of an ssh connection gets an endpoint of its own (session_handlers), as each connection of the
    local transport does; they share one listing of the run (`run_listing`, made here unless a
    local run's other lanes pass theirs), which the client's first lane asks for."""
    shared = run_listing if run_listing is not None else RunListing()

    def make() -> dict[str, Handler]:
        if job.type == "sink":
            return receiver_handlers(ReceiverEndpoint(zfs, job.name, job.root_fs, identity, job.recv, processes,
                                                      progress, job_type="sink", listing_cache=listing_cache,
                                                      run_listing=shared))
        assert job.filesystems is not None and job.serve is not None
        return sender_handlers(SenderEndpoint(zfs, job.name, job.filesystems, job.send, processes, progress,
                                              job_type="source", abstraction_job=source_abstraction_job(job, identity),
                                              guards=guards, read_only=job.serve.read_only,
                                              listing_cache=listing_cache, run_listing=shared))
    return session_handlers(make)


# =================================================================================================
# 10. Replication runner
# =================================================================================================

# The runner plans from both listings and drives the steps. It knows only the roles (Sender,
# Receiver): push = SenderEndpoint + RemoteReceiver, pull = RemoteSender + ReceiverEndpoint.
# Failures stay per filesystem; temporary ones (ZreplError.temporary) are retried within the run.

RETRY_ATTEMPTS = 3


class FilesystemState(enum.StrEnum):
    """A filesystem's replication state in the status document (zrepl's names)."""

    PLANNING = "planning"
    PLANNING_ERROR = "planning-error"
    STEPPING = "stepping"
    STEP_ERROR = "step-error"
    BLOCKED = "blocked"
    DONE = "done"


_FAILED_STATES = (FilesystemState.PLANNING_ERROR, FilesystemState.STEP_ERROR, FilesystemState.BLOCKED)


@dataclass
class FilesystemReport:
    """Replication status of one filesystem (the `filesystems` entries of a job's status)."""

    sender_fs: str
    receiver_fs: str = ""
    state: FilesystemState = FilesystemState.PLANNING
    step: str = ""
    steps_total: int = 0
    steps_done: int = 0
    bytes_expected: int | None = None
    bytes_replicated: int = 0
    last_replicated: str | None = None
    last_success: str | None = None
    error: str | None = None
    error_details: dict[str, Any] = field(default_factory=dict)
    error_count: int = 0
    blocked_by: str | None = None
    plan: str = ""
    step_started: str | None = None
    # For monitoring (status freshness checks, metrics): creation times of the newest snapshot the
    # receiver has from the sender and of the sender's newest snapshot (their difference is the lag),
    # and the bytes of every step completed, across runs (a counter: zrepl_replication_bytes_replicated).
    last_replicated_time: str | None = None
    sender_newest: str | None = None
    sender_newest_time: str | None = None
    bytes_total: int = 0

    def to_json(self) -> dict[str, Any]:
        # What dataclasses.asdict gave, without its recursion into every value: a status publish
        # makes one of these per filesystem, so at 1,000 filesystems it was most of a run's CPU.
        doc = dict(self.__dict__)
        if self.error_details:
            doc["error_details"] = copy_json(self.error_details)
        return doc


def _nonnegative_int(value: Any) -> int:
    """A count carried over from an earlier run's status entry (0 unless well-formed)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass
class ReplicationSettings:
    """What the runner needs from the active job's config."""

    job: str
    plan: PlanSettings
    timeout: float = 600.0
    attempts: int = RETRY_ATTEMPTS
    retry_delay: float = 2.0
    dry_run: bool = False
    concurrency: int = 1  # replication.concurrency.steps: filesystems replicated at once
    size_estimates: int = 1  # replication.concurrency.size_estimates: a dry run's estimates at once


@dataclass
class Lane:
    """The endpoints one filesystem's steps run on: the run's own pair, or those of an extra
    connection (replication.concurrency.steps > 1), with a progress of its own that feeds the run's."""

    sender: Sender
    receiver: Receiver
    progress: Progress


LaneFactory = Callable[[], Lane]


Listings = tuple[list[DatasetInfo], ReceiverListing]  # (sender's, receiver's) as planning saw them


class Replication:
    """One replication pass between a sender and a receiver.

    `on_update(reports)` is called whenever a filesystem's status changes (status file).
    `error_counts` carries each filesystem's consecutive failures from earlier runs; failing ones
    go behind healthy ones in the queue.
    """

    def __init__(self, sender: Sender, receiver: Receiver, settings: ReplicationSettings, progress: Progress,
                 on_update: Callable[[dict[str, FilesystemReport]], None] = lambda r: None,
                 error_counts: dict[str, int] | None = None,
                 previous: dict[str, dict[str, Any]] | None = None, clock: Clock = SYSTEM_CLOCK,
                 lane_factory: LaneFactory | None = None):
        self.sender, self.receiver, self.settings = sender, receiver, settings
        self.progress, self.on_update, self.clock = progress, on_update, clock
        self.error_counts = dict(error_counts or {})
        self.reports: dict[str, FilesystemReport] = {}
        self.previous = previous or {}
        self.cancel_reason: str | None = None
        self.plans: list[FilesystemPlan] = []
        self.estimates: dict[str, int | None] = {}
        # the steps in flight: filesystem -> (report, its lane's progress, bytes at the step's start)
        self.current: dict[str, tuple[FilesystemReport, Progress, int]] = {}
        self.lock = threading.RLock()  # reports are shared by the lanes and the status ticker
        self.lane_factory = lane_factory
        self.started: set[str] = set()  # filesystems whose step ran (or failed) in this run
        # The last planning's listings and whether we changed either side since: pruning reuses
        # unchanged listings instead of listing both sides again (half the spawns of a no-op run).
        self.listings: Listings | None = None
        self.changed = False
        # filesystem -> "sender" | "receiver": restoring a lost cursor or hold failed there, so that
        # side of it must not be pruned (its incremental base is not protected)
        self.unprotected: dict[str, str] = {}

    def refresh(self) -> None:
        """Update the in-flight steps' byte counts (called by the status ticker)."""
        with self.lock:
            for rep, progress, base in self.current.values():
                rep.bytes_replicated = progress.bytes - base
                if rep.bytes_expected is None:
                    rep.bytes_expected = progress.stream_size

    def _report(self, fs: str) -> FilesystemReport:
        if fs not in self.reports:
            prev = self.previous.get(fs, {})
            self.reports[fs] = FilesystemReport(sender_fs=fs, last_replicated=prev.get("last_replicated"),
                                                last_success=prev.get("last_success"),
                                                last_replicated_time=prev.get("last_replicated_time"),
                                                bytes_total=_nonnegative_int(prev.get("bytes_total")),
                                                error_count=self.error_counts.get(fs, 0))
        return self.reports[fs]

    def _publish(self) -> None:
        with self.lock:
            self.on_update(self.reports)

    def _now_iso(self) -> str | None:
        return iso_time(self.clock.time())

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> list[FilesystemPlan]:
        # Each finished command is a sign of life for the watchdog, which is there to catch a
        # command that hangs, not a slow host working through many short ones.
        sender_list = self.sender.list_filesystems()
        self.progress.touch()
        receiver_list = self.receiver.list_filesystems()
        self.progress.touch()
        self.listings = (sender_list, receiver_list)
        self._mark_placeholders(sender_list, receiver_list)
        root = self.receiver.info.root
        inputs = []
        for ds in sender_list:
            r = receiver_list.get(ds.name)
            token = None
            if r is not None and r.token is not None:
                t = r.token
                token = ResumeToken(fromguid=t.fromguid, toguid=t.toguid, toname=t.toname,
                                    raw=r.dataset.props.get("receive_resume_token", ""))
            receiver_fs = f"{root}/{ds.name}" if root else ds.name
            inputs.append(FilesystemInput(sender=ds, receiver=r.dataset if r else None, receiver_fs=receiver_fs,
                                          resume_token=token))
        plans = plan_filesystems(inputs, self.settings.plan, self.error_counts)
        replanned = []
        for p in plans:
            if p.clear_resume_token and not self.settings.dry_run:
                self.changed = True
                self.receiver.clear_resume_token(p.sender_fs)
                inp = next(i for i in inputs if i.sender.name == p.sender_fs)
                inp.resume_token = None
                if inp.receiver is not None:
                    inp.receiver.props.pop("receive_resume_token", None)
                replanned.append(p.sender_fs)
        if replanned:
            plans = plan_filesystems(inputs, self.settings.plan, self.error_counts)
        listed = {i.sender.name: i.sender for i in inputs}
        for fs in [fs for fs in self.reports if fs not in listed]:
            # Destroyed on the sender since an earlier attempt of this run: nothing left to do.
            log.info("%s: %s no longer exists on the sender", self.settings.job, fs)
            del self.reports[fs]
        if not self.settings.dry_run:
            receivers = {i.sender.name: i.receiver for i in inputs}
            for p in plans:
                if p.common is not None and p.error is None:
                    self._restore_bookkeeping(p, listed[p.sender_fs])
            self._release_stale({p.sender_fs: (listed[p.sender_fs], receivers.get(p.sender_fs))
                                 for p in plans if p.up_to_date and p.error is None})
        for p in plans:
            self._record_plan(p, listed[p.sender_fs])
        self.plans = plans
        self.progress.touch()
        self._publish()
        return plans

    def _mark_placeholders(self, sender_list: list[DatasetInfo], receiver_list: ReceiverListing) -> None:
        """Only a replica without snapshots can be a placeholder a full receive replaces: for those
        (and only those: usually none, so a no-op run asks nothing) the receiver checks ZFS."""
        empty = [ds.name for ds in sender_list if (r := receiver_list.get(ds.name)) and not r.dataset.snapshots()]
        for entry in receiver_list.values():
            entry.dataset.props.pop(PLACEHOLDER_PROPERTY, None)  # never from a listing, see LIST_PROPERTIES
        if empty:
            for fs in self.receiver.placeholders(empty):
                receiver_list[fs].dataset.props[PLACEHOLDER_PROPERTY] = "on"
            self.progress.touch()

    def _record_plan(self, p: FilesystemPlan, sender: DatasetInfo) -> None:
        rep = self._report(p.sender_fs)
        rep.receiver_fs, rep.plan = p.receiver_fs, p.describe()
        newest = max(sender.snapshots(), key=lambda v: v.createtxg, default=None)
        if newest is not None:
            rep.sender_newest, rep.sender_newest_time = newest.full_name, iso_time(newest.creation)
        if p.common is not None:  # a bookmark carries its snapshot's creation time
            rep.last_replicated_time = iso_time(p.common.creation)
        rep.blocked_by = p.blocked_by
        rep.steps_total, rep.steps_done = len(p.steps), 0
        if p.error:
            if rep.error != p.error.message:  # once per run, not once per retry attempt
                log.error("%s: %s: cannot replicate: %s%s", self.settings.job, p.sender_fs, p.error.message,
                          " (recovery steps: zrepl.py status -v)" if p.error.details else "")
            rep.state, rep.error, rep.error_details = FilesystemState.PLANNING_ERROR, p.error.message, p.error.details
        elif p.blocked_by:
            blocked = f"blocked by {p.blocked_by}: {p.note}".rstrip(": ")
            if rep.error != blocked:
                log.warning("%s: %s: %s", self.settings.job, p.sender_fs, blocked)
            rep.state, rep.error = FilesystemState.BLOCKED, blocked
        elif not p.steps:
            rep.state, rep.error = FilesystemState.DONE, None
        else:
            rep.state, rep.error = FilesystemState.STEPPING, None

    def _restore_bookkeeping(self, plan: FilesystemPlan, sender_info: DatasetInfo) -> None:
        """zrepl's "hint most recent common ancestor". The newest snapshot both sides have should
        carry this job's replication cursor (sender) and a hold (receiver). If not, the completion
        of an earlier step was lost after the data arrived (a failed `zfs bookmark` or `zfs hold`,
        a crash, a cut connection): put them back now, before pruning can take the incremental
        base. Costs no spawn when both are in place. Failures are logged, never fatal: the
        replication itself does not depend on them."""
        fs, level = plan.sender_fs, self.settings.plan.protection_incremental
        common, rcommon = plan.common, plan.receiver_common
        side = "sender"
        try:
            if level != "guarantee_nothing" and common is not None and common.is_snapshot:
                current = replication_cursor(sender_info, self.sender.info.abstraction_job)
                if current is None or current.guid != common.guid:
                    log.info("%s: %s: moving the replication cursor to %s (its completion was lost)",
                             self.settings.job, fs, common.full_name)
                    self.changed = True
                    self.sender.complete(fs, common.name, common.guid, level)
            side = "receiver"
            if rcommon is not None and rcommon.userrefs == 0:
                self.changed = True
                log.info("%s: %s: restoring the last-received hold on %s", self.settings.job, fs, rcommon.full_name)
                self.receiver.hold_last_received(fs, rcommon.name, rcommon.guid)
            self.unprotected.pop(fs, None)
        except (ZreplError, OSError) as exc:
            self.unprotected[fs] = side
            log.error("%s: %s: could not restore the %s on the %s; not pruning that side of it: %s",
                      self.settings.job, fs, "replication cursor" if side == "sender" else "last-received hold",
                      side, exc)

    def _release_stale(self, up_to_date: dict[str, tuple[DatasetInfo, DatasetInfo | None]]) -> None:
        """A no-op run heals what a crash during a step's completion left (an extra cursor, step
        holds, an older last-received hold): otherwise they block pruning until the next step.
        Whose holds the listing shows is asked once per side for all filesystems (another tool's
        holds on old snapshots are common and need nothing); only a filesystem where something
        of ours is stale costs a release_stale."""
        sjob, rjob = self.sender.info.abstraction_job, self.receiver.info.abstraction_job
        sender_check = {fs: s for fs, (s, _) in up_to_date.items() if sender_needs_cleanup(s, sjob)}
        receiver_check = {fs: r for fs, (_, r) in up_to_date.items() if r is not None and receiver_needs_cleanup(r)}
        sender_ask = {fs: names for fs, s in sender_check.items() if (names := sender_cleanup_holds(s, sjob))}
        receiver_ask = {fs: names for fs, r in receiver_check.items() if (names := receiver_cleanup_holds(r))}
        try:
            stags = self.sender.hold_tags_all(sender_ask) if sender_ask else {}
            rtags = self.receiver.hold_tags_all(receiver_ask) if receiver_ask else {}
        except (ZreplError, OSError) as exc:
            log.warning("%s: could not ask for hold tags to release stale holds: %s", self.settings.job, exc)
            return
        ours = last_received_hold_tag(rjob)
        for fs in sorted(set(sender_check) | set(receiver_check)):
            try:
                if fs in sender_check and sender_has_stale(sender_check[fs], sjob, stags.get(fs, {})):
                    self.changed = True
                    self.sender.release_stale(fs)
                if fs in receiver_check and any(ours in t for t in rtags.get(fs, {}).values()):
                    self.changed = True
                    self.receiver.release_stale(fs)
            except (ZreplError, OSError) as exc:
                log.warning("%s: %s: could not release stale holds or bookmarks: %s", self.settings.job, fs, exc)

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> dict[str, FilesystemReport]:
        """Plan and run all steps; retry temporary failures with back-off; return the reports."""
        failed_now: set[str] = set()
        for attempt in range(1, self.settings.attempts + 1):
            if self.cancel_reason:
                break
            try:
                plans = self.plan()
            except (ZreplError, OSError) as exc:
                if attempt < self.settings.attempts and is_temporary(exc) and not self.cancel_reason:
                    log.warning("%s: planning failed (attempt %d): %s", self.settings.job, attempt, exc)
                    self.clock.sleep(self.settings.retry_delay * attempt)
                    continue
                raise
            if self.settings.dry_run:
                wanted = [(p, step) for p in plans if p.runnable for step in p.steps]
                for (p, step), size in zip(wanted, self._estimate_all(wanted), strict=True):
                    self.estimates[f"{p.sender_fs}: {step.describe()}"] = size
                return self.reports
            retry = self._run_steps(plans, failed_now)
            # A cursor or hold that could not be put back is worth another attempt too: the next
            # plan() tries again (a completion lost twice must not leave a side unprunable).
            retry |= set(self.unprotected)
            if not retry or self.cancel_reason:
                break
            log.warning("%s: retrying %d filesystem(s) after temporary errors", self.settings.job, len(retry))
            self.clock.sleep(self.settings.retry_delay * attempt)
        for fs, rep in self.reports.items():
            if rep.state in _FAILED_STATES:
                rep.error_count = self.error_counts.get(fs, 0) + 1
            elif rep.state == FilesystemState.DONE:
                rep.error_count = 0
        self._publish()
        return self.reports

    def _estimate_all(self, wanted: list[tuple[FilesystemPlan, Step]]) -> list[int | None]:
        """The estimates of a dry run, in order: replication.concurrency.size_estimates at a time
        where the sender takes them at once (a local sender: one `zfs send -n` each), else one after
        another (a remote sender: one request at a time on its connection)."""
        workers = min(self.settings.size_estimates, len(wanted)) if self.sender.concurrent_estimates else 1
        if workers <= 1:
            return [self._estimate(p, step) for p, step in wanted]
        context = contextvars.copy_context()  # the job's name stays on the workers' log lines
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="estimate") as pool:
            return list(pool.map(lambda ps: context.copy().run(self._estimate, *ps), wanted))

    def _estimate(self, plan: FilesystemPlan, step: Step, sender: Sender | None = None) -> int | None:
        try:
            return (sender or self.sender).estimate(StepRequest.from_step(plan.sender_fs, step))
        except (ZreplError, OSError):
            return None

    def _run_steps(self, plans: list[FilesystemPlan], failed_now: set[str]) -> set[str]:
        """Run the steps (one filesystem after another, or up to `concurrency` filesystems at once
        on lanes of their own); returns the filesystems worth another attempt."""
        if self.settings.concurrency > 1 and self.lane_factory is not None and sum(p.runnable for p in plans) > 1:
            return self._run_parallel(plans, failed_now)
        retry: set[str] = set()
        stopped: set[str] = set()
        lane = self.primary_lane()
        # All filesystems protected before the first step and completed after the last: one
        # `zfs hold` and one `zfs release` per run on a local sender, not one each per step. Safe
        # in between: a received filesystem's new snapshot stays step-held on the sender until its
        # cursor exists, and its replica's old base keeps its last-received hold until the new one
        # is placed; a crash there leaves what _restore_bookkeeping puts right in the next run.
        runnable = [p for p in plans if p.runnable]
        protection = self._protect(lane, runnable)
        done: dict[str, Step] = {}
        for plan, step in order_steps(plans, self.error_counts):
            fs = plan.sender_fs
            rep = self._report(fs)
            if fs in stopped or (plan.depends_on and plan.depends_on in stopped):
                if fs not in stopped and plan.depends_on in stopped:
                    self._block(rep, plan.depends_on)
                    stopped.add(fs)
                continue
            if self._attempt(plan, step, rep, lane, retry, failed_now, protection.get(fs)):
                done[fs] = step
            else:
                stopped.add(fs)
        self._complete(lane, runnable, done, retry, failed_now)
        return retry

    def _protection_requests(self, plan: FilesystemPlan) -> list[ProtectRequest]:
        """What a filesystem's steps need protected, all at once, per protection level (a step
        resuming a token is covered by the holds of its interrupted run)."""
        by_level: dict[str, list[Step]] = {}
        for step in plan.steps:
            level = self.settings.plan.protection_for(step)
            if level != "guarantee_nothing" and not step.resume_token:
                by_level.setdefault(level, []).append(step)
        out = []
        for level, steps in by_level.items():
            snaps = dict.fromkeys((v.name, v.guid) for st in steps for v in st.received_versions() if v.is_snapshot)
            out.append(ProtectRequest(plan.sender_fs, level, tuple(snaps),
                                      StepRequest.from_step(plan.sender_fs, steps[0]).from_))
        return out

    def _protect(self, lane: Lane, plans: list[FilesystemPlan]) -> dict[str, ZreplError]:
        requests = [r for p in plans for r in self._protection_requests(p)]
        if not requests:
            return {}
        failed = lane.sender.protect_all(requests)
        lane.progress.touch()
        return failed

    def _hold_received(self, lane: Lane, plans: list[FilesystemPlan], done: dict[str, Step]) -> dict[str, ZreplError]:
        """The receiver's check of what arrived and its last-received holds, for all at once,
        before any cursor moves (a receiver that cannot batch did both in each receive)."""
        received = [(p.sender_fs, done[p.sender_fs].to_version.name, done[p.sender_fs].to_version.guid)
                    for p in plans if p.sender_fs in done]
        if not received or not lane.receiver.info.batched_holds:
            return {}
        try:
            failed = lane.receiver.hold_received_all(received)
        except (ZreplError, OSError) as exc:
            failed = {fs: as_zrepl_error(exc) for fs, _, _ in received}
        lane.progress.touch()
        return failed

    def _completion(self, plan: FilesystemPlan, last_done: Step | None) -> Completion:
        held = {name for r in self._protection_requests(plan) if r.level == "guarantee_resumability"
                for name in r.hold_names()}
        level = self.settings.plan.protection_for(last_done) if last_done else "guarantee_nothing"
        return Completion(plan.sender_fs, last_done.to_version.name if last_done else None,
                          last_done.to_version.guid if last_done else 0, level, tuple(sorted(held)))

    def _complete(self, lane: Lane, plans: list[FilesystemPlan], done: dict[str, Step], retry: set[str],
                  failed_now: set[str]) -> set[str]:
        """After the steps: each filesystem's cursor to its last step done (also when a later one
        failed), the step holds up to it released; those that did not start only lose the holds
        (a failed first step keeps them: resumability). A failure
        here fails the filesystem (temporary: the next attempt's planning restores the cursor)."""
        failed = self._hold_received(lane, plans, done)
        done = {fs: step for fs, step in done.items() if fs not in failed}  # not arrived: keep the holds
        # A filesystem whose step failed keeps the holds of what is not done (resumability).
        completions = [self._completion(p, done.get(p.sender_fs)) for p in plans
                       if p.sender_fs in done or p.sender_fs not in self.started]
        if any(c.to is not None or c.held for c in completions):
            failed.update(lane.sender.complete_all(completions))
            lane.progress.touch()
        for fs, exc in failed.items():
            rep = self._report(fs)
            with self.lock:
                rep.state, rep.error = FilesystemState.STEP_ERROR, f"completing the replication: {exc}"
                if is_temporary(exc) and not self.cancel_reason:
                    retry.add(fs)
                failed_now.add(fs)
            log.error("%s: %s: %s", self.settings.job, fs, rep.error, extra={"job": self.settings.job, "fs": fs})
        if failed:
            self._publish()
        return set(failed)

    def _block(self, rep: FilesystemReport, parent: str) -> None:
        with self.lock:
            rep.state, rep.blocked_by = FilesystemState.BLOCKED, parent
            rep.error = f"blocked: parent {parent} failed"

    def _attempt(self, plan: FilesystemPlan, step: Step, rep: FilesystemReport, lane: Lane, retry: set[str],
                 failed_now: set[str], unprotected: ZreplError | None = None) -> bool:
        """One step with its failure recorded (one filesystem's failure never stops the others);
        `unprotected`: why protecting the filesystem failed (then the step must not run)."""
        fs = plan.sender_fs
        if self.cancel_reason:
            with self.lock:
                rep.state, rep.error = FilesystemState.STEP_ERROR, f"cancelled: {self.cancel_reason}"
            return False
        try:
            self.changed = True
            if unprotected is not None:
                raise unprotected
            with self.lock:
                self.started.add(fs)
            self._run_step(plan, step, rep, lane)
        except Exception as exc:
            if not isinstance(exc, (ZreplError, OSError)):
                log.error("internal error replicating %s: %s: %s", fs, type(exc).__name__, exc)
            reason = f"cancelled by the watchdog: {self.cancel_reason}" if self.cancel_reason else str(exc)
            with self.lock:
                rep.state, rep.error = FilesystemState.STEP_ERROR, f"{step.describe()}: {reason}"
                if is_temporary(exc) and not self.cancel_reason:
                    retry.add(fs)
                failed_now.add(fs)
            log.error("%s: %s: %s", self.settings.job, fs, rep.error, extra={"job": self.settings.job, "fs": fs})
            self._publish()
            return False
        with self.lock:
            rep.steps_done += 1
            if rep.steps_done >= rep.steps_total:
                rep.state, rep.error = FilesystemState.DONE, None
                rep.last_success = self._now_iso()
        self._publish()
        return True

    def _run_parallel(self, plans: list[FilesystemPlan], failed_now: set[str]) -> set[str]:
        """Up to `concurrency` filesystems at once, each on a lane (its own connection): a worker
        takes the most urgent ready filesystem (order_steps' order) and runs all its steps. A child
        that the parent's initial replication must create waits for that first step; if the parent
        fails before it, the child is blocked. Protection before the lanes start and completion
        after they end are batched on the primary lane as in the serial run (per filesystem they
        would double the run's `zfs` spawns and eat the lanes' gain; the states in between are the
        serial run's, which the next run's _restore_bookkeeping puts right after a crash)."""
        runnable = {p.sender_fs: p for p in plans if p.runnable}
        order = list(dict.fromkeys(p.sender_fs for p, _ in order_steps(plans, self.error_counts)))
        retry: set[str] = set()
        taken: set[str] = set()
        created: set[str] = set()  # parents whose first step is done: their children may start
        failed: set[str] = set()
        done: dict[str, Step] = {}  # each filesystem's last step done, for the one completion
        cond = threading.Condition()
        protection = self._protect(self.primary_lane(), list(runnable.values()))

        def next_ready() -> FilesystemPlan | None:
            for fs in order:
                plan = runnable[fs]
                parent = plan.depends_on
                if fs in taken or (parent in runnable and parent not in created and parent not in failed):
                    continue
                taken.add(fs)
                if parent in failed and parent not in created:
                    self._block(self._report(fs), parent)
                    failed.add(fs)
                    cond.notify_all()
                    continue
                return plan
            return None

        def work(lane: Lane) -> None:
            while True:
                with cond:
                    plan = next_ready()
                    while plan is None and len(taken) < len(runnable) and not self.cancel_reason:
                        cond.wait(1.0)
                        plan = next_ready()
                if plan is None:
                    return
                fs, ok = plan.sender_fs, True
                for i, step in enumerate(plan.steps):
                    ok = self._attempt(plan, step, self._report(fs), lane, retry, failed_now, protection.get(fs))
                    with cond:
                        if ok:
                            done[fs] = step
                            if i == 0:
                                created.add(fs)
                        cond.notify_all()
                    if not ok:
                        break
                with cond:
                    if not ok:
                        failed.add(fs)
                    cond.notify_all()

        lanes = [self.primary_lane()]
        assert self.lane_factory is not None
        for _ in range(min(self.settings.concurrency, len(runnable)) - 1):
            try:
                lanes.append(self.lane_factory())
            except (ZreplError, OSError) as exc:
                log.warning("%s: replicating with %d lane(s) only: another connection failed: %s",
                            self.settings.job, len(lanes), exc)
                break
        workers = [threading.Thread(target=contextvars.copy_context().run, args=(work, lane), name=f"lane {i}",
                                    daemon=True)
                   for i, lane in enumerate(lanes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self._complete(self.primary_lane(), list(runnable.values()), done, retry, failed_now)
        return retry

    def primary_lane(self) -> Lane:
        return Lane(self.sender, self.receiver, self.progress)

    def _run_step(self, plan: FilesystemPlan, step: Step, rep: FilesystemReport, lane: Lane) -> None:
        fs, sender, receiver, progress = plan.sender_fs, lane.sender, lane.receiver, lane.progress
        req = StepRequest.from_step(fs, step, replace_placeholder=plan.replace_placeholder and step.is_full,
                                    dataset_type=plan.sender_type)
        req.defer_hold = receiver.info.batched_holds  # checked and held with the others in _complete
        # A local `zfs send -v -P` states its size first (Progress.stream_size): no `zfs send -n`.
        expected = None if sender.sizes_in_stream else self._estimate(plan, step, sender)
        progress.stream_size = None
        with self.lock:
            rep.state, rep.step = FilesystemState.STEPPING, step.describe()
            rep.bytes_expected, rep.bytes_replicated = expected, 0
            rep.step_started = self._now_iso()
            self.current[fs] = (rep, progress, progress.bytes)
        progress.touch()  # signs of life between commands: see plan()
        self._publish()
        log.info("%s: %s", self.settings.job, step.describe(),
                 extra={"job": self.settings.job, "fs": fs, "step": step.describe(), "bytes": expected})
        # Receiver set-up (placeholders) before `zfs send` starts, not while it waits on the pipe.
        receiver.prepare(req)
        progress.touch()
        try:
            sender.send(req, lambda source: receiver.receive(req, source))
        finally:
            self.refresh()
            with self.lock:
                self.current.pop(fs, None)
        progress.step_done()
        with self.lock:
            rep.last_replicated = f"{fs}@{step.to_version.name}"
            rep.last_replicated_time = iso_time(step.to_version.creation)
            if rep.bytes_expected is None:
                rep.bytes_expected = progress.stream_size
            # The stream is complete: it moved at least ZFS's estimate of it (`zfs send -P` reports
            # once a second, so a short send counted less, or nothing).
            rep.bytes_replicated = max(rep.bytes_replicated, rep.bytes_expected or 0)
            rep.bytes_total += rep.bytes_replicated


class Watchdog(PeriodicThread):
    """Cancels a replication that makes no progress (bytes moved or steps finished) for `timeout`.

    Cancelling kills the run's zfs processes and cancels the connection, so every blocked call
    returns; the reason is kept for the status file. `check()` is the decision, callable by tests
    with a fake clock; the thread only calls it every `interval` seconds.
    """

    def __init__(self, progress: Progress, timeout: float, cancel: Callable[[str], None], interval: float = 1.0):
        super().__init__(interval, "watchdog")
        self.progress, self.timeout, self.cancel = progress, timeout, cancel
        self.fired: str | None = None

    def tick(self) -> bool:
        return self.check()

    def check(self) -> bool:
        idle = self.progress.clock.monotonic() - self.progress.last_change
        if idle <= self.timeout:
            return False
        self.fired = (f"no progress for {format_duration(idle)} (replication.timeout = "
                      f"{format_duration(self.timeout)}; {format_size(self.progress.bytes)} moved, "
                      f"{self.progress.steps} step(s) done)")
        log.error("watchdog: %s: cancelling", self.fired)
        self.cancel(self.fired)
        return True


# =================================================================================================
# 11. Snapshotter and hooks
# =================================================================================================

HOOK_OUTPUT_LIMIT = 1 << 20


@dataclass
class HookResult:
    """The outcome of one hook edge (pre or post) for one or more filesystems."""

    hook: str
    edge: str  # "pre" or "post"
    filesystems: list[str]
    ok: bool
    error: str | None = None
    duration: float = 0.0
    output: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def newest_prefixed_snapshot(ds: DatasetInfo, prefix: str) -> Version | None:
    """The newest (createtxg) snapshot whose name starts with prefix."""
    matching = [v for v in ds.snapshots() if v.name.startswith(prefix)]
    return max(matching, key=lambda v: v.createtxg) if matching else None


def snapshot_due(ds: DatasetInfo, snap: SnapshottingConfig, now: float) -> tuple[bool, float | None]:
    """(due now?, when it will next be due). Sync-up: due-ness comes from the newest prefixed snapshot.

    After downtime this catches up ONCE: one overdue snapshot, then the interval starts again.
    """
    newest = newest_prefixed_snapshot(ds, snap.prefix)
    if snap.type == "periodic":
        if newest is None:
            return True, now
        due_at = newest.creation + snap.interval
        return due_at <= now, due_at
    if snap.type == "cron" and snap.cron is not None:
        last_fire = snap.cron.last_at_or_before(now, snap.timestamp_location)
        if newest is None or (last_fire is not None and last_fire > newest.creation):
            return True, now
        return False, snap.cron.next_after(now, snap.timestamp_location)
    return False, None


def pool_of(dataset: str) -> str:
    return dataset.split("/", 1)[0]


class _Hook:
    """One configured hook. Subclasses implement the pre and post edges for a set of filesystems."""

    def __init__(self, cfg: HookConfig):
        self.cfg = cfg

    @property
    def label(self) -> str:
        return self.cfg.type + (f" {self.cfg.path}" if self.cfg.path else "")

    def pre(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        raise NotImplementedError

    def post(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        return []

    def close(self) -> None:
        """Release anything the pre edge kept open (called even when post is skipped)."""


def _run_captured(argv: list[str], env: dict[str, str] | None, timeout: float,
                  buffer: RingBuffer, stdin_data: bytes | None = None) -> tuple[int | None, str]:
    """Run a hook process, streaming its output into a ring buffer (stdout info, stderr warn).

    Returns (exit code or None on timeout, error text). On timeout the whole process group is killed.
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        return 127, f"cannot execute {argv[0]}: {exc.strerror}"

    def pump(stream: Any, level: int) -> None:
        for line in iter(stream.readline, b""):
            buffer.write(line)
            log.log(level, "hook %s: %s", os.path.basename(argv[0]), line.decode("utf-8", "replace").rstrip())
        stream.close()

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(pump, proc.stdout, logging.INFO),
                                daemon=True),
               threading.Thread(target=contextvars.copy_context().run, args=(pump, proc.stderr, logging.WARNING),
                                daemon=True)]
    for t in threads:
        t.start()
    if stdin_data is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin_data)
            proc.stdin.close()
        except OSError:
            pass
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        code = None
    for t in threads:
        t.join(timeout=5)
    if code is None:
        return None, f"timed out after {format_duration(timeout)} and was killed"
    if code != 0:
        return code, f"exited with status {code}"
    return 0, ""


class CommandHook(_Hook):
    """`command` hook: runs an executable per filesystem with ZREPL_* environment variables."""

    def _edge(self, edge: str, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        results = []
        for fs in filesystems:
            env = dict(os.environ)
            env.update(ZREPL_HOOKTYPE=f"{edge}_snapshot", ZREPL_FS=fs, ZREPL_SNAPNAME=snapname,
                       ZREPL_DRYRUN="true" if dry_run else "", ZREPL_TIMEOUT=str(int(self.cfg.timeout)))
            buffer = RingBuffer(HOOK_OUTPUT_LIMIT)
            started = time.monotonic()
            code, error = _run_captured([self.cfg.path], env, self.cfg.timeout, buffer)
            results.append(HookResult(self.label, edge, [fs], code == 0, error or None,
                                      round(time.monotonic() - started, 3), buffer.text()))
        return results

    def pre(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        return self._edge("pre", filesystems, snapname, dry_run)

    def post(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        return self._edge("post", filesystems, snapname, dry_run)


class PostgresCheckpointHook(_Hook):
    """`postgres-checkpoint`: one CHECKPOINT through psql before the snapshot of all its filesystems."""

    def pre(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        buffer = RingBuffer(HOOK_OUTPUT_LIMIT)
        started = time.monotonic()
        code: int | None
        if dry_run:
            code, error = 0, ""
            buffer.write(b"dry run: would run CHECKPOINT\n")
        else:
            argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.cfg.dsn, "-c", "CHECKPOINT"]
            code, error = _run_captured(argv, None, self.cfg.timeout, buffer)
        return [HookResult(self.label, "pre", list(filesystems), code == 0, error or None,
                           round(time.monotonic() - started, 3), buffer.text())]


def mysql_client_argv(dsn: str) -> tuple[list[str], dict[str, str]]:
    """Translate a zrepl (go-sql-driver) DSN `user:pass@unix(/sock)/db` or `@tcp(host:port)` into
    `mysql` client arguments; the password travels in MYSQL_PWD, never on the command line."""
    m = re.match(r"^(?:(?P<user>[^:@]*)(?::(?P<pw>[^@]*))?@)?(?:(?P<net>unix|tcp)\((?P<addr>[^)]*)\))?/(?P<db>[^?]*)",
                 dsn)
    if not m:
        raise ValueError(f"cannot parse MySQL DSN {dsn!r} (expected user:password@unix(/path/to.sock)/ "
                         "or user:password@tcp(host:port)/)")
    argv = ["mysql", "--batch", "--skip-column-names", "--unbuffered"]
    env: dict[str, str] = {}
    if m.group("user"):
        argv.append(f"--user={m.group('user')}")
    if m.group("pw"):
        env["MYSQL_PWD"] = m.group("pw")
    if m.group("net") == "unix":
        argv += ["--protocol=socket", f"--socket={m.group('addr')}"]
    elif m.group("net") == "tcp":
        host, _, port = m.group("addr").rpartition(":") if ":" in m.group("addr") else (m.group("addr"), "", "")
        argv += ["--protocol=tcp", f"--host={host or '127.0.0.1'}"] + ([f"--port={port}"] if port else [])
    if m.group("db"):
        argv.append(m.group("db"))
    return argv, env


class MysqlLockTablesHook(_Hook):
    """`mysql-lock-tables`: FLUSH TABLES WITH READ LOCK on one client session held across the snapshot.

    The lock lives as long as the session, so the `mysql` client stays running between the pre and
    post edges; post sends UNLOCK TABLES on the same session. close() ends the session in any case.
    """

    _MARK = b"zrepl-lock-held"

    def __init__(self, cfg: HookConfig):
        super().__init__(cfg)
        self.proc: subprocess.Popen | None = None
        self.buffer = RingBuffer(HOOK_OUTPUT_LIMIT)

    def pre(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        started = time.monotonic()
        if dry_run:
            return [HookResult(self.label, "pre", list(filesystems), True, None, 0.0,
                               "dry run: would run FLUSH TABLES WITH READ LOCK")]
        error = None
        try:
            argv, extra_env = mysql_client_argv(self.cfg.dsn)
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env={**os.environ, **extra_env},
                                         start_new_session=True)
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"FLUSH TABLES WITH READ LOCK;\nSELECT '" + self._MARK + b"';\n")
            self.proc.stdin.flush()
            error = self._await_mark(self.cfg.timeout)
        except (OSError, ValueError) as exc:
            error = str(exc)
        if error:
            self.close()
        return [HookResult(self.label, "pre", list(filesystems), error is None, error,
                           round(time.monotonic() - started, 3), self.buffer.text())]

    def _await_mark(self, timeout: float) -> str | None:
        """Read the client's output until our marker proves the lock is held."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        seen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"FLUSH TABLES WITH READ LOCK did not complete within {format_duration(timeout)}"
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    return f"mysql client exited with status {code} before the lock was held"
                self.buffer.write(chunk)
                seen += chunk
                if self._MARK in seen:
                    return None

    def post(self, filesystems: list[str], snapname: str, dry_run: bool) -> list[HookResult]:
        started = time.monotonic()
        if dry_run or self.proc is None:
            return [HookResult(self.label, "post", list(filesystems), True, None, 0.0,
                               "dry run: would run UNLOCK TABLES" if dry_run else "")]
        error = None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b"UNLOCK TABLES;\n")
            self.proc.stdin.close()
            rest = self.proc.stdout.read()
            self.buffer.write(rest)
            code = self.proc.wait(timeout=30)
            if code != 0:
                error = f"mysql client exited with status {code}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = f"UNLOCK TABLES failed: {exc}"
        self.close()
        return [HookResult(self.label, "post", list(filesystems), error is None, error,
                           round(time.monotonic() - started, 3), self.buffer.text())]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None


def make_hook(cfg: HookConfig) -> _Hook:
    return {"command": CommandHook, "postgres-checkpoint": PostgresCheckpointHook,
            "mysql-lock-tables": MysqlLockTablesHook}[cfg.type](cfg)


@dataclass
class SnapshotBatchResult:
    """One snapshot name taken across the due filesystems of one pool, with its hooks."""

    pool: str
    name: str
    snapshotted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # filesystem -> why no snapshot
    hooks: list[HookResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # filesystem -> snapshot error

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hooks"] = [h.to_json() for h in self.hooks]
        return d


def snapshot_batch(zfs: Zfs, pool: str, filesystems: list[str], name: str, hooks_cfg: list[HookConfig],
                   dry_run: bool = False) -> SnapshotBatchResult:
    """Hooks' pre edges, ONE `zfs snapshot` for all of the pool's filesystems, post edges in reverse.

    Stack model per filesystem (zrepl's): pre edges in config order; a failing err_is_fatal pre drops
    that filesystem from the snapshot and skips its later pres; post edges run in reverse for every
    hook whose pre succeeded. Database hooks run once for all their filesystems, so one lock covers
    the whole atomic snapshot.
    """
    result = SnapshotBatchResult(pool=pool, name=name)
    active = list(filesystems)
    done: list[tuple[_Hook, list[str]]] = []
    try:
        for cfg in hooks_cfg:
            targets = [fs for fs in active if cfg.filesystems.accepts(fs)]
            if not targets:
                continue
            hook = make_hook(cfg)
            edge_results = hook.pre(targets, name, dry_run)
            result.hooks.extend(edge_results)
            ok = [fs for r in edge_results if r.ok for fs in r.filesystems]
            failed = [fs for r in edge_results if not r.ok for fs in r.filesystems]
            done.append((hook, ok))
            for r in edge_results:
                if not r.ok:
                    log.warning("pre-snapshot hook %s failed for %s: %s", hook.label, ", ".join(r.filesystems), r.error)
            if cfg.err_is_fatal:
                for fs in failed:
                    active.remove(fs)
                    result.skipped[fs] = f"pre-snapshot hook {hook.label} failed (err_is_fatal)"
        if active:
            full = [f"{fs}@{name}" for fs in active]
            if dry_run:
                log.debug("dry run: would snapshot %s", ", ".join(full))
                result.snapshotted = list(active)
            else:
                try:
                    zfs.snapshot(full)
                    result.snapshotted = list(active)
                    log.info("snapshotted %d filesystem(s) of pool %s as @%s", len(active), pool, name,
                             extra={"snapshot": name})
                except ZfsError as exc:
                    # One bad filesystem must not cost the others their snapshot: retry one by one.
                    log.warning("atomic snapshot of pool %s failed, retrying per filesystem: %s", pool, exc)
                    for fs in active:
                        try:
                            zfs.snapshot([f"{fs}@{name}"])
                            result.snapshotted.append(fs)
                        except ZfsError as one:
                            result.errors[fs] = str(one)
    finally:
        for hook, ok in reversed(done):
            try:
                if ok:
                    post = hook.post(ok, name, dry_run)
                    result.hooks.extend(post)
                    for r in post:
                        if not r.ok:
                            log.warning("post-snapshot hook %s failed: %s", hook.label, r.error)
            finally:
                hook.close()
    return result


def take_due_snapshots(zfs: Zfs, snap: SnapshottingConfig, datasets: list[DatasetInfo], now: float,
                       dry_run: bool = False) -> tuple[list[SnapshotBatchResult], float | None]:
    """Snapshot every due filesystem, one command per pool, one name per run.

    Returns the batches and the earliest time something will next be due.
    """
    if snap.type == "manual":
        return [], None
    due_by_pool: dict[str, list[str]] = {}
    next_due: float | None = None
    for ds in datasets:
        due, when = snapshot_due(ds, snap, now)
        if due:
            due_by_pool.setdefault(pool_of(ds.name), []).append(ds.name)
        elif when is not None:
            next_due = when if next_due is None else min(next_due, when)
    if not due_by_pool:
        return [], next_due
    name = snapshot_name(snap.prefix, snap.timestamp_format, now, snap.timestamp_location)
    batches = [snapshot_batch(zfs, pool, fss, name, snap.hooks, dry_run) for pool, fss in sorted(due_by_pool.items())]
    soonest: float | None
    if snap.type == "periodic":
        soonest = now + snap.interval
    else:
        soonest = snap.cron.next_after(now, snap.timestamp_location) if snap.cron else None
    if soonest is not None:
        next_due = soonest if next_due is None else min(next_due, soonest)
    return batches, next_due


# =================================================================================================
# 12. Pruner
# =================================================================================================

# Pruning applies the pure keep-rule decisions (section 3) to one side through the same roles the
# replication uses (zrepl's pruner over its sender and receiver endpoints): a Sender or Receiver
# lists, looks up hold tags and destroys in batches, locally or through the connection. Only
# snapshots are ever destroyed; bookmarks and datasets never reach a destroyer.

@dataclass
class PruneResult:
    """What pruning did (or would do) to one dataset."""

    dataset: str
    destroyed: list[str] = field(default_factory=list)
    # full snapshot name -> rules that keep it; from the pruner a KeptSnapshots (compact, its
    # reasons lists shared: read, never change them)
    kept: Mapping[str, list[str]] = field(default_factory=dict)
    held: dict[str, list[str]] = field(default_factory=dict)  # snapshot -> hold tags (not destroyed)
    errors: dict[str, str] = field(default_factory=dict)  # snapshot -> error
    notes: list[str] = field(default_factory=list)
    # snapshots this job did not make (no snapshotting prefix of its own): destroyed (or, in a dry
    # run, to be destroyed), and kept only by last_n, so a few more snapshots will take them too
    foreign_destroyed: list[str] = field(default_factory=list)
    foreign_at_risk: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "destroyed": self.destroyed, "kept": len(self.kept),
                "held": self.held, "errors": self.errors, "notes": self.notes,
                "foreign_destroyed": self.foreign_destroyed, "foreign_at_risk": self.foreign_at_risk}


Destroyer = Callable[[str, list[str]], DestroyResult]  # (dataset, short names) -> what happened
HoldLookup = Callable[[str, list[str]], dict[str, list[str]]]  # (dataset, short names) -> tags by name


def prune_datasets(datasets: list[DatasetInfo], rules: Sequence[KeepRule], destroy: Destroyer,
                   holds: HoldLookup | None = None, contexts: dict[str, PruneContext] | None = None,
                   dry_run: bool = False, guards: Sequence[str] = (),
                   protected: dict[str, dict[str, str]] | None = None,
                   tick: Callable[[], None] | None = None, own_prefix: str | None = None,
                   now: float | None = None) -> list[PruneResult]:
    """Apply keep rules to each dataset's snapshots; destroy the rest in one batch per dataset.

    `destroy(dataset, short_names)` does the batch (locally: destroy_with_bisect; on a peer: a
    request), `holds(dataset, short_names)` looks up hold tags (None: tags unknown). Held snapshots
    are reported with their tags and left alone. Only snapshots are ever destroyed: bookmarks and
    datasets never reach `destroy`. Whatever the rules say, a snapshot stays when another
    replicating job (`guards`, by their cursors in the listing) still needs it, or when
    `protected[dataset]` names it (e.g. a receiver's incremental base), with that reason.
    With `own_prefix` (the job's snapshotting prefix), destroying a snapshot without it is logged
    as a warning and recorded (foreign_destroyed), and so is one kept only by last_n. `now` (the
    caller's clock) lets the grid refuse to anchor on a snapshot dated in the future.
    """
    results: list[PruneResult] = []
    for ds in datasets:
        ctx = (contexts or {}).get(ds.name) or PruneContext()
        if ctx.now is None:
            ctx.now = now
        decision = decide_prune(ds.snapshots(), rules, ctx)
        must_stay = {**unreplicated_by(ds, guards), **(protected or {}).get(ds.name, {})}
        kept = decision.keep
        for v in [v for v in decision.destroy if v.full_name in must_stay]:
            decision.destroy.remove(v)
            kept.add(v.dataset, v.name, [must_stay[v.full_name]])
        result = PruneResult(dataset=ds.name, kept=kept, notes=list(decision.notes))
        if own_prefix:
            result.foreign_at_risk = [name for name, why in kept.by_short_name()
                                      if not name.startswith(own_prefix) and all(w.startswith("last_n(") for w in why)]
        held_names = [v.name for v in decision.destroy if v.userrefs > 0]
        tags = holds(ds.name, held_names) if (held_names and holds) else {}
        victims = []
        for v in decision.destroy:
            if v.userrefs > 0:
                result.held[v.name] = tags.get(v.name, [f"{v.userrefs} hold(s)"])
            else:
                victims.append(v.name)
        for snap, snap_tags in result.held.items():
            level = logging.INFO if all(t.startswith("zrepl_") for t in snap_tags) else logging.WARNING
            log.log(level, "not destroying %s@%s: held by %s", ds.name, snap, ", ".join(snap_tags),
                    extra={"fs": ds.name, "snapshot": snap})
        foreign = [n for n in victims if own_prefix and not n.startswith(own_prefix)]
        if foreign:  # a dry run prints them itself
            log.log(logging.INFO if dry_run else logging.WARNING,
                    "%s %d snapshot(s) of %s that this job did not make (no prefix %r): %s",
                    "would destroy" if dry_run else "destroying", len(foreign), ds.name, own_prefix,
                    ", ".join(foreign), extra={"fs": ds.name})
        if victims:
            if dry_run:
                log.debug("dry run: would destroy %s@%s", ds.name, ",".join(victims), extra={"fs": ds.name})
                result.destroyed, result.foreign_destroyed = victims, foreign
            else:
                log.info("destroying %d snapshot(s) of %s: %s", len(victims), ds.name, ", ".join(victims),
                         extra={"fs": ds.name})
                done = destroy(ds.name, victims)
                result.destroyed, result.errors = done.destroyed, dict(done.errors)
                for name, why in done.kept.items():  # the endpoint knows another job still needs it
                    kept.add(ds.name, name, [why])
                _report_raced_holds(ds.name, result, holds)
            result.foreign_destroyed = [n for n in foreign if n in result.destroyed]
        results.append(result)
        if tick is not None:
            tick()
    return results


def _report_raced_holds(dataset: str, result: PruneResult, holds: HoldLookup | None) -> None:
    """A hold placed after our listing shows up as "dataset is busy": report its tags instead."""
    raced = holds(dataset, list(result.errors)) if (result.errors and holds) else {}
    for snap, tags in raced.items():
        if tags and snap in result.errors:
            del result.errors[snap]
            result.held[snap] = tags
    for snap, err in result.errors.items():
        log.error("could not destroy %s@%s: %s", dataset, snap, err)


def local_destroyer(zfs: Zfs) -> Destroyer:
    return lambda dataset, names: DestroyResult(*destroy_with_bisect(zfs, dataset, names))


def local_hold_lookup(zfs: Zfs) -> HoldLookup:
    return lambda dataset, names: _hold_tags(zfs, dataset, names)


def cursor_contexts(listing: Iterable[DatasetInfo], abstraction_job: str) -> dict[str, PruneContext]:
    """not_replicated's facts per sender dataset: the replication cursor of the job that sends."""
    contexts = {}
    for ds in listing:
        cursor = replication_cursor(ds, abstraction_job)
        contexts[ds.name] = PruneContext(cursor_guid=cursor.guid if cursor else None,
                                         cursor_createtxg=cursor.createtxg if cursor else None)
    return contexts


def prune_sender(sender: Sender, listing: list[DatasetInfo], rules: Sequence[KeepRule],
                 dry_run: bool = False, guards: Sequence[str] = (),
                 tick: Callable[[], None] | None = None, own_prefix: str | None = None,
                 now: float | None = None) -> list[PruneResult]:
    """keep_sender on the sending side; not_replicated compares against the cursor of the job whose
    abstractions the sender writes (sender.info: the push job, or the source serving this client).
    `guards`: other jobs of this host whose unreplicated snapshots stay (the endpoint checks too)."""
    own = sender.info.abstraction_job
    return prune_datasets(listing, rules, sender.destroy_snapshots, sender.hold_tags,
                          cursor_contexts(listing, own), dry_run, guards=[g for g in guards if g != own], tick=tick,
                          own_prefix=own_prefix, now=now)


def prune_receiver(receiver: Receiver, listing: ReceiverListing, sender_list: Iterable[DatasetInfo],
                   rules: Sequence[KeepRule], dry_run: bool = False, refused: Iterable[str] = (),
                   tick: Callable[[], None] | None = None, own_prefix: str | None = None,
                   now: float | None = None) -> list[PruneResult]:
    """keep_receiver on the receiving side, only for datasets established as replicas of this
    sender's filesystems (replica_protection: a common snapshot, not diverged) and not refused by
    this run's planning; their incremental base always stays."""
    senders, skip = {ds.name: ds for ds in sender_list}, set(refused)
    names, datasets, protected = {}, [], {}
    for fs, entry in sorted(listing.items()):
        if fs not in senders or fs in skip:
            continue
        protect = replica_protection(senders[fs], entry.dataset)
        if protect is None:
            log.info("%s: not pruned: not an established replica of %s on the sender (no common snapshot, "
                     "or diverged)", entry.dataset.name, fs)
            continue
        names[entry.dataset.name] = fs
        datasets.append(entry.dataset)
        protected[entry.dataset.name] = protect
    return prune_datasets(datasets, rules,
                          lambda dataset, snaps: receiver.destroy_snapshots(names[dataset], snaps),
                          lambda dataset, snaps: receiver.hold_tags(names[dataset], snaps),
                          None, dry_run, protected=protected, tick=tick, own_prefix=own_prefix, now=now)


@dataclass
class BothSidesPruned:
    """The outcome of pruning both sides of an active job; `failures` are keyed like a pass's."""

    sender: list[PruneResult] = field(default_factory=list)
    receiver: list[PruneResult] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def prune_both_sides(sender: Sender, receiver: Receiver, keep_sender: Sequence[KeepRule],
                     keep_receiver: Sequence[KeepRule], listings: Listings | None = None,
                     dry_run: bool = False, on_side: Callable[[str], None] = lambda side: None,
                     job: str = "", guards: Sequence[str] = (), refused: Iterable[str] = (),
                     skip_sender: Iterable[str] = (), tick: Callable[[], None] | None = None,
                     own_prefix: str | None = None, now: float | None = None) -> BothSidesPruned:
    """Prune the sender, then the receiver (zrepl's order). `listings` are the replication's own
    when it changed nothing since; otherwise both sides are listed again. A failure on one side is
    recorded and the other side still runs. `refused`: filesystems whose replication was refused
    in this run (their receiver is left alone); `skip_sender`: filesystems whose sender side must
    stay as it is (its cursor could not be restored); `guards`: see prune_sender; `tick` is called
    after each dataset (a sign of life for a watchdog)."""
    out = BothSidesPruned()
    on_side("sender")
    try:
        sender_list = listings[0] if listings is not None else sender.list_filesystems()
    except (ZreplError, OSError) as exc:
        log.error("job %s: listing the sender for pruning failed: %s", job, exc)
        out.failures["(pruning)"] = str(exc)
        return out
    try:
        skip = set(skip_sender)
        out.sender = prune_sender(sender, [ds for ds in sender_list if ds.name not in skip], keep_sender, dry_run,
                                  guards, tick, own_prefix, now)
        for r in out.sender:
            if r.errors:
                out.failures[r.dataset] = f"pruning sender: {len(r.errors)} snapshot(s) could not be destroyed"
    except (ZreplError, OSError) as exc:
        log.error("job %s: pruning the sender failed: %s", job, exc)
        out.failures["(pruning sender)"] = str(exc)
    on_side("receiver")
    try:
        receiver_list = listings[1] if listings is not None else receiver.list_filesystems()
        out.receiver = prune_receiver(receiver, receiver_list, sender_list, keep_receiver, dry_run, refused, tick,
                                      own_prefix, now)
        for r in out.receiver:
            if r.errors:
                out.failures[r.dataset] = f"pruning receiver: {len(r.errors)} snapshot(s) could not be destroyed"
    except (ZreplError, OSError) as exc:
        log.error("job %s: pruning the receiver failed: %s", job, exc)
        out.failures["(pruning receiver)"] = str(exc)
    return out


def prune_summary(pruned: list[PruneResult]) -> dict[str, Any]:
    """The `pruning` part of a job's status document."""
    return {"destroyed": [f"{r.dataset}@{s}" for r in pruned for s in r.destroyed],
            "kept": sum(len(r.kept) for r in pruned),
            "held": {f"{r.dataset}@{s}": t for r in pruned for s, t in r.held.items()},
            "errors": {f"{r.dataset}@{s}": e for r in pruned for s, e in r.errors.items()},
            "notes": [n for r in pruned for n in r.notes],
            "foreign_destroyed": [f"{r.dataset}@{s}" for r in pruned for s in r.foreign_destroyed],
            "foreign_at_risk": [f"{r.dataset}@{s}" for r in pruned for s in r.foreign_at_risk]}


# =================================================================================================
# 13. Jobs
# =================================================================================================

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def ensure_private_dir(path: str) -> None:
    """Create (if needed) and check a private directory for locks and requests: a real directory
    (not a symlink), owned by the running user (root when run as root), writable by nobody else.
    Raises SetupError naming the path and the fix."""
    try:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
    except OSError as exc:
        raise SetupError(f"cannot create the runtime directory {path}: {exc.strerror or exc} "
                         f"(global.runtime_dir; it must be a writable local directory)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SetupError(f"{path} is not a directory (global.runtime_dir must name a directory, not a file "
                         f"or a symlink)")
    if st.st_uid != os.geteuid():
        raise SetupError(f"{path} belongs to uid {st.st_uid}, not to the running user (uid {os.geteuid()}): "
                         f"its locks would be shared with another user; `chown {os.geteuid()} {path}` or set "
                         f"global.runtime_dir to a directory of your own")
    if st.st_mode & 0o022:
        raise SetupError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                         f"`chmod 700 {path}`")


def _open_private_file(path: str, flags: int) -> int:
    """Open a lock or request file without following a symlink planted in its place."""
    try:
        return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        what = "is a directory" if exc.errno == errno.EISDIR else (
            "is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc))
        raise SetupError(f"cannot open {path}: {what} (remove it; zrepl.py creates it)") from None


# Name spaces in the runtime dir: job names and client identities cannot contain '/', so these
# never collide with each other nor with the status writer's `status.lock`.
_JOBS_DIR, _CLIENTS_DIR = "jobs", "clients"


class JobLock:
    """A per-job flock in the runtime dir, so overlapping cron/timer runs never work on one job twice.

    The lock dies with the process, so a crashed run never leaves a stale lock behind.
    """

    def __init__(self, runtime_dir: str, job: str, directory: str = _JOBS_DIR):
        self.dir = os.path.join(runtime_dir, directory)
        self.path = os.path.join(self.dir, f"{job}.lock")
        self.runtime_dir = runtime_dir
        self.fd: int | None = None

    @classmethod
    def for_client(cls, runtime_dir: str, job: str, identity: str) -> JobLock:
        """The lock of one client identity of a passive job (one connection at a time)."""
        return cls(runtime_dir, identity, os.path.join(_CLIENTS_DIR, job))

    def try_acquire(self) -> bool:
        ensure_private_dir(self.runtime_dir)
        ensure_private_dir(os.path.dirname(self.path))
        fd = _open_private_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder_pid(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                return int(f.read(32).strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class WakeupRequest:
    """A file that asks whichever run holds the job to do one more pass before it exits.

    Protocol (no wakeup is ever lost): the waker writes the request THEN tries the lock; a run
    removes the request before each pass, checks it again before releasing the lock, and once more
    after releasing it (then re-takes the lock if it can).
    """

    def __init__(self, runtime_dir: str, job: str, clock: Clock = SYSTEM_CLOCK):
        self.path = os.path.join(runtime_dir, _JOBS_DIR, f"{job}.wakeup")
        self.runtime_dir, self.clock = runtime_dir, clock

    def post(self) -> None:
        ensure_private_dir(self.runtime_dir)
        ensure_private_dir(os.path.dirname(self.path))
        fd = _open_private_file(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, f"{self.clock.time()}\n".encode())
        os.close(fd)

    def pending(self) -> bool:
        return os.path.lexists(self.path)

    def consume(self) -> bool:
        try:
            os.unlink(self.path)
            return True
        except FileNotFoundError:
            return False


Publish = Callable[[str, dict[str, Any]], None]


def _no_publish(job: str, doc: dict[str, Any]) -> None:
    pass


@dataclass
class PassResult:
    """The outcome of one pass of a job."""

    exit_code: int = EXIT_OK
    error: str | None = None
    failures: dict[str, str] = field(default_factory=dict)  # filesystem -> what failed


class ActiveMode(Protocol):
    """How an active job's run is wired (zrepl's activeMode: modePush, modePull): which side is
    local, which one is reached through the connection, and whether the job takes snapshots."""

    listing_cache: ListingCache | None  # for the local side's listings (set by the job run)

    def takes_snapshots(self) -> bool: ...

    def sides(self, conn: RequestChannel, progress: Progress | None = None) -> tuple[Sender, Receiver]:
        """The sender and receiver for one connection (built again after a reconnect, and for each
        extra lane of parallel steps, with that lane's progress); the local side's endpoints of one
        run share its listing (RunListing)."""
        ...


class PushMode:
    """push: this host's filesystems are the sender; the sink is the receiver, through the connection.
    The replication cursor lives here (this job's name), the last-received holds on the sink.
    `guards`: this host's replicating jobs whose unreplicated snapshots our pruning keeps."""

    def __init__(self, job: JobConfig, zfs: Zfs, processes: ProcessRegistry, progress: Progress,
                 guards: Sequence[str] = ()):
        self.job, self.zfs, self.processes, self.progress = job, zfs, processes, progress
        self.guards = list(guards)
        self.listing_cache: ListingCache | None = None
        self.run_listing = RunListing()  # the sender's, shared by the run's lanes

    def takes_snapshots(self) -> bool:
        return self.job.snapshotting.type != "manual"

    def sides(self, conn: RequestChannel, progress: Progress | None = None) -> tuple[Sender, Receiver]:
        assert self.job.filesystems is not None
        sender = SenderEndpoint(self.zfs, self.job.name, self.job.filesystems, self.job.send, self.processes,
                                progress or self.progress, job_type="push", guards=self.guards,
                                listing_cache=self.listing_cache, run_listing=self.run_listing)
        return sender, RemoteReceiver(conn)


class PullMode:
    """pull: the source is the sender, through the connection; this host's root_fs is the receiver.
    The replication cursor lives on the source (named by the source: endpoint.info), the
    last-received holds here (this job's name). The source guards its own other clients."""

    def __init__(self, job: JobConfig, zfs: Zfs, processes: ProcessRegistry, progress: Progress,
                 guards: Sequence[str] = ()):
        self.job, self.zfs, self.processes, self.progress = job, zfs, processes, progress
        self.listing_cache: ListingCache | None = None
        self.run_listing = RunListing()  # the receiver's, shared by the run's lanes

    def takes_snapshots(self) -> bool:
        return False

    def sides(self, conn: RequestChannel, progress: Progress | None = None) -> tuple[Sender, Receiver]:
        receiver = ReceiverEndpoint(self.zfs, self.job.name, self.job.root_fs, None, self.job.recv,
                                    self.processes, progress or self.progress, job_type="pull",
                                    listing_cache=self.listing_cache, run_listing=self.run_listing)
        return RemoteSender(conn), receiver


ACTIVE_MODES: dict[str, Callable[[JobConfig, Zfs, ProcessRegistry, Progress, Sequence[str]], ActiveMode]] = {
    "push": PushMode, "pull": PullMode}


def failing_replications(filesystems: dict[str, Any], now: float, limit: float,
                         since: float | None = None) -> dict[str, float]:
    """The filesystems of a replication record (status JSON or FilesystemReport) that fail now and
    have not replicated successfully for longer than `limit`: filesystem -> seconds since their last
    success (or since `since`, when the job was configured, for one that never succeeded)."""
    out = {}
    for fs, raw in filesystems.items():
        rep = raw if isinstance(raw, FilesystemReport) else \
            document_from_json(FilesystemReport, {"sender_fs": fs, **raw} if isinstance(raw, dict) else {})[0]
        if rep is None or rep.state not in _FAILED_STATES:
            continue
        last_ok = parse_iso(rep.last_success)
        began = last_ok if last_ok is not None else since
        if began is not None and now - began > limit:
            out[fs] = now - began
    return out


class JobRunner:
    """Runs passes of one job under its lock and publishes the job's status document.

    `publish(job_name, doc)` is injected (the status section stores it), so this section does not
    depend on how status is kept.
    """

    def __init__(self, config: Config, job: JobConfig, zfs: Zfs, publish: Publish = _no_publish,
                 dry_run: bool = False, clock: Clock = SYSTEM_CLOCK):
        self.config, self.job, self.zfs = config, job, zfs
        self.publish = publish if not dry_run else _no_publish
        self.dry_run, self.clock = dry_run, clock
        self.doc: dict[str, Any] = {"type": job.type, "state": "idle"}
        self.last_batches: list[SnapshotBatchResult] = []  # for dry-run reports
        self.last_prune: list[PruneResult] = []
        self.last_prune_receiver: list[PruneResult] = []
        self.last_replication: Replication | None = None
        # Set by cancel() (the daemon: SIGTERM, `signal reset`), cleared when a pass starts.
        self.stop_reason: str | None = None
        self._cancel_replication: Callable[[str], None] | None = None
        self._peer_lanes = 1  # lanes the passive side agreed to on this pass's connection (ssh)

    def cancel(self, reason: str) -> None:
        """Stop the current pass at a resumable point: a running replication is cancelled the way the
        watchdog cancels it (`zfs recv -s` keeps the resume token) and the pass skips its pruning.
        Snapshotting and a started batch of destroys finish: they are short and not resumable."""
        self.stop_reason = reason
        cancel = self._cancel_replication
        if cancel is not None:
            cancel(reason)

    # -- status helpers ------------------------------------------------------------------------
    def _set_activity(self, step: str, progress: str = "") -> None:
        self.doc["state"] = "running"
        self.doc["pid"] = os.getpid()
        self.doc["activity"] = {"step": step, "progress": progress, "since": iso_time(self.clock.time())}
        self.publish(self.job.name, self.doc)

    # how often pruning republishes its count (a write per filesystem would cost more than pruning)
    PRUNE_PUBLISH_INTERVAL = 2.0

    def _prune_tick(self, total: int | None = None) -> Callable[[], None]:
        """A tick for the pruner: counts pruned filesystems into activity.progress (`12/40
        filesystems`; per side for push and pull) and republishes now and then."""
        state: dict[str, Any] = {"done": 0, "step": None, "shown": self.clock.monotonic()}

        def tick() -> None:
            activity = self.doc.get("activity") or {}
            if activity.get("step") != state["step"]:  # the next side: count anew
                state["step"], state["done"] = activity.get("step"), 0
            state["done"] += 1
            activity["progress"] = (f"{state['done']}/{total} filesystems" if total
                                    else f"{state['done']} filesystem(s) done")
            if self.clock.monotonic() - state["shown"] >= self.PRUNE_PUBLISH_INTERVAL:
                state["shown"] = self.clock.monotonic()
                self.publish(self.job.name, self.doc)
        return tick

    def _fs(self, name: str) -> dict[str, Any]:
        return self.doc.setdefault("filesystems", {}).setdefault(name, {})

    # -- runs ------------------------------------------------------------------------------------
    def run(self, previous: dict[str, Any] | None = None) -> int | None:
        """Run passes while wakeups are pending. Returns the worst exit code, or None if busy.
        A dry run changes nothing, so it takes no lock and runs once."""
        rt = self.config.global_.runtime_dir
        lock, wakeup = JobLock(rt, self.job.name), WakeupRequest(rt, self.job.name, self.clock)
        self.carry_over(previous)
        if self.dry_run:
            return self.run_pass().exit_code
        worst: int | None = None
        while True:
            if not lock.try_acquire():
                return worst
            try:
                while True:
                    wakeup.consume()
                    code = self.run_pass().exit_code
                    worst = code if worst is None else max(worst, code)
                    if not wakeup.pending() or self.stop_reason is not None:
                        break  # a cancelled pass (SIGTERM, reset) leaves the request to a later run
                    log.info("job %s: wakeup requested during the run, running once more", self.job.name)
            finally:
                lock.release()
            if not wakeup.pending() or self.stop_reason is not None:
                return worst

    def carry_over(self, previous: dict[str, Any] | None) -> None:
        """Keep what earlier runs recorded (the status entry of the job's last run, or the daemon's
        runner of an older config) in this runner's document."""
        for key in ("last_success", "filesystems", "last_run", "replication", "filter_unmatched_total"):
            if previous and key in previous:
                self.doc[key] = previous[key]

    def run_pass(self) -> PassResult:
        """One pass: whatever the job type does (snapshot if due, replicate, prune)."""
        started = self.clock.time()
        self.stop_reason = None
        self.doc["last_run"] = {"start": iso_time(started), "end": None, "result": "running",
                                "dry_run": self.dry_run}
        self._set_activity("starting")
        try:
            result = self._dispatch()
        except SetupError:
            raise  # the environment, not this job: the command says so and exits 2
        except ZreplError as exc:
            log.error("job %s: %s", self.job.name, exc)
            result = PassResult(EXIT_FAILED, error=str(exc))
        except Exception as exc:  # a bug must end this pass with a recorded error, never other jobs
            log.error("job %s: internal error: %s: %s", self.job.name, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            result = PassResult(EXIT_FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
        ended = self.clock.time()
        outcome = "ok" if result.exit_code == EXIT_OK else ("error" if result.error else "failed")
        self.doc["last_run"] = {"start": iso_time(started), "end": iso_time(ended), "result": outcome,
                                "error": result.error, "failures": result.failures, "dry_run": self.dry_run}
        if outcome == "ok":
            self.doc["last_success"] = iso_time(ended)
        self.doc["state"] = "idle"
        self.doc.pop("activity", None)
        self.doc.pop("pid", None)
        self.publish(self.job.name, self.doc)
        return result

    def _dispatch(self) -> PassResult:
        if self.job.type in ("snap", "source"):
            return self._snap_pass(prune=self.job.type == "snap")
        if self.job.type in ACTIVE_MODES:
            return self._active_pass()
        log.info("job %s: sink jobs are passive; they serve when a client connects", self.job.name)
        return PassResult()

    def _listing_cache(self, side: str) -> ListingCache:
        """This job's cache of one side's listings; a dry run reads it but changes nothing."""
        return ListingCache.for_owner(self.config.global_.runtime_dir, f"{self.job.name} {side}",
                                      writable=not self.dry_run)

    def _select(self) -> list[DatasetInfo]:
        assert self.job.filesystems is not None
        listing = self.zfs.list_datasets(list_roots_for_filter(self.job.filesystems),
                                         cache=self._listing_cache("snapshots"))
        return [ds for name, ds in sorted(listing.items()) if self.job.filesystems.accepts(name)]

    def _note_unmatched_patterns(self, selected: Iterable[str]) -> None:
        """Record the filter's accepting patterns that selected nothing this pass: named in the log
        and the status, and counted up in the status for zrepl's metric of the same meaning."""
        assert self.job.filesystems is not None
        unmatched = self.job.filesystems.unmatched(selected)
        self.doc["filter_unmatched"] = unmatched
        total = self.doc.get("filter_unmatched_total")
        self.doc["filter_unmatched_total"] = (total if isinstance(total, int) and total >= 0 else 0) + len(unmatched)
        if unmatched:
            log.warning("job %s: the filesystems filter's %s selected no dataset (renamed or destroyed? check "
                        "with `zrepl.py test filesystems --job %s`)", self.job.name,
                        ", ".join(repr(p) for p in unmatched), self.job.name)

    def _take_snapshots(self, datasets: list[DatasetInfo], result: PassResult) -> list[SnapshotBatchResult]:
        """Snapshot the due filesystems (one command per pool) and record it in the status."""
        if not datasets:
            why = ("the filesystems filter selects no dataset (a typo, or a pool that is not imported?); "
                   "check with `zrepl.py test filesystems --job " + self.job.name + "`")
            log.error("job %s: %s", self.job.name, why)
            result.failures["(filesystems)"] = why
        now = self.clock.time()
        snap = self.job.snapshotting
        if snap.type != "manual":
            self._set_activity("snapshotting", f"{len(datasets)} filesystems")
        batches, next_due = take_due_snapshots(self.zfs, snap, datasets, now, self.dry_run)
        self.doc["next_snapshot_due"] = iso_time(next_due)
        self.doc["snapshots"] = [b.to_json() for b in batches]
        self.doc["hooks"] = [h.to_json() for b in batches for h in b.hooks]
        for batch in batches:
            for fs in batch.snapshotted:
                self._fs(fs).update(last_snapshot=f"{fs}@{batch.name}", last_snapshot_time=iso_time(now),
                                    snapshot_error=None)
            for fs, why in {**batch.skipped, **batch.errors}.items():
                self._fs(fs)["snapshot_error"] = why
                result.failures[fs] = why
            for hook in batch.hooks:  # even with err_is_fatal = false: the snapshot may be inconsistent
                if not hook.ok:
                    for fs in hook.filesystems:
                        result.failures.setdefault(fs, f"{hook.edge}-snapshot hook {hook.hook} failed: {hook.error}")
        self.last_batches = batches
        return batches

    def _snap_pass(self, prune: bool) -> PassResult:
        result = PassResult()
        self._set_activity("listing")
        datasets = self._select()
        self._note_unmatched_patterns(ds.name for ds in datasets)
        batches = self._take_snapshots(datasets, result)
        if prune:
            if any(b.snapshotted for b in batches):
                if self.dry_run:
                    datasets = _with_planned_snapshots(datasets, batches, self.clock.time())
                else:
                    datasets = self._select()  # pruning must see the new snapshots' real txg and guid
            self._set_activity("pruning", f"{len(datasets)} filesystems")
            began = self.clock.monotonic()
            pruned = prune_datasets(datasets, self.job.keep, local_destroyer(self.zfs), local_hold_lookup(self.zfs),
                                    dry_run=self.dry_run, guards=replication_guards(self.config),
                                    own_prefix=self.job.snapshotting.prefix or None, now=self.clock.time(),
                                    tick=self._prune_tick(len(datasets)))
            self.doc["pruning"] = {**prune_summary(pruned), "seconds": round(self.clock.monotonic() - began, 3)}
            self.last_prune = pruned
            for r in pruned:
                self._fs(r.dataset)["pruning"] = r.to_json()
                if r.errors:
                    result.failures[r.dataset] = f"pruning: {len(r.errors)} snapshot(s) could not be destroyed"
        if result.failures:
            result.exit_code = EXIT_FAILED
        return result

    # -- push and pull -----------------------------------------------------------------------------
    def _replication_settings(self, sender: Sender, receiver: Receiver) -> ReplicationSettings:
        job = self.job
        plan = PlanSettings(initial=job.initial_replication, protection_initial=job.replication.protection_initial,
                            protection_incremental=job.replication.protection_incremental,
                            encrypted=job.send.encrypted, raw=job.send.raw,
                            receiving_job=receiver.info.abstraction_job, sending_job=sender.info.abstraction_job)
        return ReplicationSettings(job=job.name, plan=plan, timeout=job.replication.timeout, dry_run=self.dry_run,
                                   retry_delay=float(os.environ.get("ZREPL_RETRY_DELAY", "2")),
                                   concurrency=self._lanes_possible(),
                                   size_estimates=self.job.replication.concurrency_size_estimates)

    def _lanes_possible(self) -> int:
        """How many filesystems may replicate at once: replication.concurrency.steps, each on a
        lane: locally a connection of its own; over ssh+stdinserver a lane of the one connection
        (LaneMux), as many as the passive side agreed to (an older zrepl.py there: one)."""
        # Parallel steps over ssh: several streams on the ONE connection, not several connections.
        # The passive side's safety rests on one server process per (job, identity): its lock
        # covers every `zfs recv` it runs and is released only once they have exited (and saved
        # their resume state), so no two receives into one filesystem and no two savers of its
        # resume state exist. Lanes multiplexed into that process keep the rule as it is (serve()
        # returns only after every lane's handler did). Extra connections would need a second
        # authority: lanes proving they belong to the primary, confined to the filesystems it
        # hands out, per-filesystem locks outliving a primary that dies mid-receive, status
        # records merged from several processes; plus an ssh login and an sshd per lane. The
        # price: one ssh channel's cipher caps the combined byte rate, but many small filesystems
        # are bound by per-step latency (zfs spawns on both sides), which lanes overlap.
        steps = self.job.replication.concurrency_steps
        if steps > 1 and self.job.connect is not None and self.job.connect.type != "local":
            agreed = self._peer_lanes  # set by _active_pass once connected
            if agreed < steps:
                why = ("its zrepl.py serves no lanes (an older version?); update it for parallel steps"
                       if agreed <= 1 else f"it serves at most {agreed} lanes on one connection")
                log.warning("job %s: replication.concurrency.steps = %d: %d step(s) at a time over ssh+stdinserver: "
                            "%s", self.job.name, steps, max(1, agreed), why)
            return max(1, min(steps, agreed))
        return steps

    def _active_pass(self) -> PassResult:
        """push: snapshot if due, replicate, prune sender, prune receiver. pull: replicate, prune."""
        job, result = self.job, PassResult()
        processes, progress = ProcessRegistry(), Progress(self.clock)
        guards = replication_guards(self.config)
        mode = ACTIVE_MODES[job.type](job, self.zfs, processes, progress, guards)
        mode.listing_cache = self._listing_cache("sender" if job.type == "push" else "receiver")
        if mode.takes_snapshots():  # manual snapshotting: no listing needed
            self._set_activity("listing")
            datasets = self._select()
            paused = self._paused_snapshotting()
            if not datasets or any(ds.name not in paused for ds in datasets):
                self._take_snapshots([ds for ds in datasets if ds.name not in paused], result)
        self._set_activity("connecting")
        peer = connect_peer(self.config, job, self.zfs, processes, progress, self.clock)
        self._peer_lanes = peer.lanes()
        try:
            sender, receiver = mode.sides(peer.conn)
            replicated_peer = self._replicate(mode, sender, receiver, peer, processes, progress, result)
            if replicated_peer is not peer:  # reconnected after a cancelled replication
                peer = replicated_peer
                sender, receiver = mode.sides(peer.conn)
            repl = self.last_replication
            unchanged = (repl.listings if repl is not None and not repl.changed and not repl.cancel_reason
                         else None)
            if self.stop_reason is None:
                self._prune_both(sender, receiver, peer, result, unchanged)
        finally:
            peer.close()
        if result.failures and result.exit_code == EXIT_OK:
            result.exit_code = EXIT_FAILED
        return result

    def _paused_snapshotting(self) -> set[str]:
        """replication.pause_snapshotting_after: the filesystems whose replication has failed for
        that long take no new snapshots (recorded as their snapshot_error) until it succeeds again."""
        limit = self.job.replication.pause_snapshotting_after
        previous = (self.doc.get("replication") or {}).get("filesystems") or {}
        if not limit or not isinstance(previous, dict):
            return set()
        failing = failing_replications(previous, self.clock.time(), limit)
        for fs, seconds in sorted(failing.items()):
            why = (f"snapshotting paused: replication has failed for {format_duration(seconds)} "
                   f"(replication.pause_snapshotting_after = {format_duration(limit)})")
            log.warning("job %s: %s: %s", self.job.name, fs, why)
            self._fs(fs)["snapshot_error"] = why
        return set(failing)

    def _replicate(self, mode: ActiveMode, sender: Sender, receiver: Receiver, peer: Peer,
                   processes: ProcessRegistry, progress: Progress, result: PassResult) -> Peer:
        """Run the replication under the watchdog; returns a usable peer (reconnected if cancelled)."""
        previous = (self.doc.get("replication") or {}).get("filesystems") or {}
        counts = {fs: int(v.get("error_count") or 0) for fs, v in previous.items() if isinstance(v, dict)}
        settings = self._replication_settings(sender, receiver)
        lanes: list[Peer] = []

        def new_lane() -> Lane:
            lane_progress = Progress(self.clock, parent=progress)
            if peer.open_lane is not None:  # ssh: a lane of the run's connection; local: a pair of its own
                lane_peer = peer.open_lane(lane_progress)
            else:
                lane_peer = connect_peer(self.config, self.job, self.zfs, processes, lane_progress, self.clock)
            lanes.append(lane_peer)
            lane_sender, lane_receiver = mode.sides(lane_peer.conn, lane_progress)
            # No listing of its own: the lane's endpoints on both sides share the run's (RunListing:
            # the mode's here, the passive side's per connection), made by the planning.
            return Lane(lane_sender, lane_receiver, lane_progress)
        repl = Replication(sender, receiver, settings, progress, error_counts=counts, previous=previous,
                           clock=self.clock, lane_factory=new_lane if settings.concurrency > 1 else None)
        self.last_replication = repl
        state: dict[str, Any] = {"started": iso_time(self.clock.time()), "cancelled": None}

        def publish(reports: dict[str, FilesystemReport]) -> None:
            with repl.lock:  # lanes change reports while the ticker publishes
                self.doc["replication"] = {**state, "filesystems": {fs: r.to_json() for fs, r in reports.items()}}
                self.publish(self.job.name, self.doc)

        # Every step's start and end asks for a publish, and each one writes every filesystem's
        # report: at 1,000 filesystems, publishing each was most of the run's CPU (quadratic in
        # the filesystems). So they are throttled; the status ticker below publishes every 2 s
        # through the same throttle, so the file is never more than a few seconds behind, and the
        # last publish after the run is forced.
        throttle = Throttle(min_gap=1.0, share=0.1)

        def publish_soon(reports: dict[str, FilesystemReport]) -> None:
            throttle.call(lambda: publish(reports))
        repl.on_update = publish_soon

        def cancel(reason: str) -> None:
            repl.cancel_reason = reason
            state["cancelled"] = reason
            processes.kill_all(reason)
            for p in [peer, *lanes]:
                p.cancel(reason)

        self._set_activity("replicating")
        self._cancel_replication = cancel
        if self.stop_reason is not None:  # cancel() came between the job's steps: do not start
            cancel(self.stop_reason)
        try:
            def tick() -> None:
                repl.refresh()
                throttle.call(lambda: publish(repl.reports))
            with Watchdog(progress, settings.timeout, cancel), StatusTicker(tick):
                repl.run()
        except (ZreplError, OSError) as exc:
            reason = f"cancelled by the watchdog: {repl.cancel_reason}" if repl.cancel_reason else str(exc)
            log.error("job %s: replication failed: %s", self.job.name, reason)
            result.error = reason
            result.exit_code = EXIT_FAILED
        finally:
            self._cancel_replication = None
        if self.stop_reason is not None:
            # Not the watchdog: the daemon stopped it (SIGTERM, reset); the receiver keeps its token.
            result.error = f"replication cancelled ({self.stop_reason}); the next pass resumes it"
            result.exit_code = EXIT_FAILED
        elif repl.cancel_reason and result.error is None:
            # The whole replication was stopped, not one filesystem: say why at the run's level too.
            result.error = f"replication cancelled by the watchdog: {repl.cancel_reason}"
        for lane_peer in lanes:
            lane_peer.close()
        publish(repl.reports)
        for fs, rep in repl.reports.items():
            if rep.error:
                result.failures[fs] = rep.error
        for fs, side in repl.unprotected.items():
            what = "replication cursor" if side == "sender" else "last-received hold"
            result.failures.setdefault(fs, f"the lost {what} could not be restored on the {side}; not pruned there")
        if repl.listings is not None and self.job.filesystems is not None:
            self._note_unmatched_patterns(ds.name for ds in repl.listings[0])
        if repl.listings is not None and not repl.listings[0]:
            chooser = "source" if self.job.type == "pull" else "filesystems filter"
            why = f"the {chooser} selects no dataset to replicate (a typo, or a pool that is not imported?)"
            log.error("job %s: %s", self.job.name, why)
            result.failures["(filesystems)"] = why
        if repl.cancel_reason and not self.dry_run and self.stop_reason is None:
            peer.close()
            log.info("job %s: reconnecting for pruning after the cancelled replication", self.job.name)
            return connect_peer(self.config, self.job, self.zfs, ProcessRegistry(), Progress(self.clock), self.clock)
        return peer

    def _prune_both(self, sender: Sender, receiver: Receiver, peer: Peer, result: PassResult,
                    listings: Listings | None) -> None:
        """Prune the sender, then the receiver (section 12), under a watchdog of its own (a stalled
        peer must not hold the job lock for ever), and record it in the status."""
        job = self.job
        if not job.keep_sender and not job.keep_receiver:
            # Empty keep lists keep everything: skip both listings (two spawns per run).
            self.doc["pruning_sender"] = self.doc["pruning_receiver"] = prune_summary([])
            return
        repl = self.last_replication
        reports = repl.reports if repl else {}
        refused = [fs for fs, r in reports.items() if r.state == FilesystemState.PLANNING_ERROR]
        unprotected = repl.unprotected if repl else {}
        guards = replication_guards(self.config) if job.type == "push" else []
        progress, cancelled = Progress(self.clock), []

        def cancel(reason: str) -> None:
            cancelled.append(reason)
            peer.cancel(reason)

        began: dict[str, float] = {}  # side -> when it started (zrepl_pruning_time)

        def on_side(side: str) -> None:
            began[side] = self.clock.monotonic()
            progress.touch()
            self._set_activity(f"pruning {side}")
        counted = self._prune_tick()

        def tick() -> None:
            progress.touch()
            counted()
        with Watchdog(progress, job.replication.timeout, cancel):
            pruned = prune_both_sides(sender, receiver, job.keep_sender, job.keep_receiver, listings, self.dry_run,
                                      on_side=on_side, job=job.name, guards=guards,
                                      refused=refused + [fs for fs, side in unprotected.items() if side == "receiver"],
                                      skip_sender=[fs for fs, side in unprotected.items() if side == "sender"],
                                      tick=tick, own_prefix=job.snapshotting.prefix or None,
                                      now=self.clock.time())
        if cancelled:
            result.failures["(pruning)"] = f"pruning cancelled by the watchdog: {cancelled[0]}"
        ended = self.clock.monotonic()
        seconds = {"sender": began.get("receiver", ended) - began.get("sender", ended),
                   "receiver": ended - began.get("receiver", ended)}
        self.doc["pruning_sender"] = {**prune_summary(pruned.sender), "seconds": round(seconds["sender"], 3)}
        self.doc["pruning_receiver"] = {**prune_summary(pruned.receiver), "seconds": round(seconds["receiver"], 3)}
        self.last_prune, self.last_prune_receiver = pruned.sender, pruned.receiver
        result.failures.update(pruned.failures)


def _with_planned_snapshots(datasets: list[DatasetInfo], batches: list[SnapshotBatchResult],
                            now: float) -> list[DatasetInfo]:
    """Dry run: pretend the planned snapshots exist so pruning shows what it would keep."""
    planned = {fs: b.name for b in batches for fs in b.snapshotted}
    out = []
    for ds in datasets:
        if ds.name in planned:
            top = max((v.createtxg for v in ds.versions), default=ds.createtxg)
            extra = Version(ds.name, planned[ds.name], "snapshot", 0, top + 1, int(now))
            ds = dataclasses.replace(ds, versions=[*ds.versions, extra])
        out.append(ds)
    return out


class StatusTicker(PeriodicThread):
    """Republishes a running job's status every few seconds (bytes moved, ETA) while it works."""

    def __init__(self, publish: Callable[[], None], interval: float = 2.0):
        super().__init__(interval, "status")
        self.publish = publish

    def tick(self) -> None:
        try:
            self.publish()
        except Exception as exc:  # status is best effort; never kill the run over it
            log.debug("status tick failed: %s", exc)


# ---- the passive side of ssh+stdinserver: one process per client connection ----------------------

STDINSERVER_LOCK_WAIT = 30.0  # seconds a new connection waits for the same identity's previous one
CLIENT_TRANSFERS_KEPT = 20
CLIENT_ERRORS_KEPT = 10

StatusMerge = Callable[[str, Callable[[dict[str, Any]], None]], None]


class ClientBusy(ZreplError):
    """The same client identity is still being served by another stdinserver process."""

    temporary = True


def acquire_client_lock(runtime_dir: str, job: str, identity: str, wait: float = STDINSERVER_LOCK_WAIT,
                        clock: Clock = SYSTEM_CLOCK) -> JobLock | None:
    """One connection per (job, identity) at a time: a client that reconnects after a lost connection
    waits here until the previous server process has let its `zfs recv` save the resume state.
    Returns the held lock, or None when the runtime dir is unusable (then we serve unlocked)."""
    lock = JobLock.for_client(runtime_dir, job, identity)
    deadline = clock.monotonic() + wait
    try:
        while not lock.try_acquire():
            if clock.monotonic() >= deadline:
                raise ClientBusy(f"another connection of client {identity!r} to job {job!r} is still being "
                                 f"served (pid {lock.holder_pid() or '?'}); try again later")
            clock.sleep(0.2)
    except OSError as exc:
        log.warning("cannot lock %s (%s); serving without the per-client lock", lock.path, exc.strerror or exc)
        return None
    return lock


class ClientRecorder:
    """The passive side's record of one client connection, kept in its job's status document under
    `clients[<identity>]`: the last connection (start, end, result, error), what was received or sent
    (`transfers`, newest last), destroyed snapshots and recent errors.

    It writes through `merge(job, mutate)`, which changes only this client's entry, so connections of
    other clients and the job's own runs keep theirs.
    """

    def __init__(self, job: JobConfig, identity: str, merge: StatusMerge, clock: Callable[[], float] = utcnow):
        self.job, self.identity, self.merge, self.clock = job, identity, merge, clock
        self.connection: dict[str, Any] = {"start": iso_time(clock()), "end": None, "result": "running",
                                           "error": None, "pid": os.getpid(), "requests": 0, "transfers": 0,
                                           "bytes": 0, "destroyed": 0, "failed_requests": 0}
        self._new_transfers: list[dict[str, Any]] = []
        self._new_errors: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def publish(self) -> None:
        with self._lock:
            connection = dict(self.connection)
            transfers, self._new_transfers = self._new_transfers, []
            errors, self._new_errors = self._new_errors, []
        jtype, identity = self.job.type, self.identity

        def mutate(doc: dict[str, Any]) -> None:
            doc.setdefault("type", jtype)
            client = doc.setdefault("clients", {}).setdefault(identity, {})
            client["last_connection"] = connection
            if connection["result"] == "ok":
                client["last_success"] = connection["end"]
            if transfers:
                client["transfers"] = (list(client.get("transfers") or []) + transfers)[-CLIENT_TRANSFERS_KEPT:]
                client["last_transfer"] = transfers[-1]
                if jtype == "sink":  # per filesystem, for the freshness check on the receiving host
                    received = client.setdefault("received", {})
                    for t in transfers:
                        fs, _, _ = str(t.get("received") or "").partition("@")
                        received[fs] = {"snapshot": t.get("received"), "time": t.get("time")}
            if errors:
                client["errors"] = (list(client.get("errors") or []) + errors)[-CLIENT_ERRORS_KEPT:]

        self.merge(self.job.name, mutate)

    def _error(self, kind: str, message: str) -> None:
        with self._lock:
            self.connection["failed_requests"] += 1
            self.connection["error"] = self.connection["error"] or f"{kind}: {message}"
            self._new_errors.append({"time": iso_time(self.clock()), "request": kind, "error": message[:2000]})

    def _transfer(self, body: dict[str, Any], nbytes: int, started: float) -> None:
        what = "received" if self.job.type == "sink" else "sent"
        src = body.get("from")
        entry = {"time": iso_time(self.clock()), what: f"{body.get('fs')}@{body.get('to')}",
                 "from": src if isinstance(src, str) else None, "resumed": bool(body.get("resume_token")),
                 "bytes": nbytes, "seconds": round(time.monotonic() - started, 3)}
        with self._lock:
            self.connection["transfers"] += 1
            self.connection["bytes"] += nbytes
            self._new_transfers.append(entry)
        self.publish()

    def wrap(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        """The same handlers, recording requests, transfers and failures."""
        return {kind: self._wrap_one(kind, handler) for kind, handler in handlers.items()}

    def _wrap_one(self, kind: str, handler: Handler) -> Handler:
        def recorded(body: dict, ctx: RequestContext) -> Any:
            with self._lock:
                self.connection["requests"] += 1
            started = time.monotonic()
            try:
                result = handler(body, ctx)
            except Exception as exc:
                self._error(kind, str(exc))
                raise
            if kind == "receiver.receive":
                self._transfer(body, ctx.stream.nbytes if ctx.stream is not None else 0, started)
            elif kind == "sender.send" and isinstance(result, Reply) and result.stream is not None:
                self._track_send(body, ctx, result.stream, started)
            elif kind.endswith(".destroy") and isinstance(result, dict):
                with self._lock:
                    self.connection["destroyed"] += len(result.get("destroyed") or [])
                for name, why in (result.get("errors") or {}).items():
                    self._error(kind, f"{body.get('fs')}@{name}: {why}")
            return result
        return recorded

    def _track_send(self, body: dict[str, Any], ctx: RequestContext, stream: OutgoingStream, started: float) -> None:
        """The stream goes out after the handler returns: record it when the producer finishes."""
        stats, inner = ctx.conn.stats, stream.finish
        base = stats.stream_bytes_sent

        def finish() -> str | None:
            error = inner() if inner is not None else None
            if error:
                self._error("sender.send", error)
            else:
                self._transfer(body, stats.stream_bytes_sent - base, started)
            return error

        stream.finish = finish

    def finished(self, error: str | None) -> None:
        """The connection ended: `error` is why it broke (None: the client hung up cleanly)."""
        with self._lock:
            self.connection["end"] = iso_time(self.clock())
            if error:
                self.connection["error"] = error
            failed = error is not None or self.connection["failed_requests"] > 0
            self.connection["result"] = "error" if failed else "ok"
        self.publish()


# =================================================================================================
# 14. Status
# =================================================================================================

NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL, NAGIOS_UNKNOWN = 0, 1, 2, 3
NAGIOS_NAMES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
# Which level wins when several are combined: UNKNOWN ("cannot tell") must not hide a CRITICAL job.
_SEVERITY = {NAGIOS_OK: 0, NAGIOS_UNKNOWN: 1, NAGIOS_WARNING: 2, NAGIOS_CRITICAL: 3}
STATUS_VERSION = 1


def worst_level(levels: Iterable[int]) -> int:
    """The most severe of Nagios levels (CRITICAL > WARNING > UNKNOWN > OK); OK for none."""
    return max(levels, key=_SEVERITY.__getitem__, default=NAGIOS_OK)


# ---- the status document: dataclasses read back defensively ----------------------------------------
#
# Writers (JobRunner, ClientRecorder) produce the JSON forms of these; readers (`status`, a run's
# previous state, the store's merges) go through `from_json`, which keeps every well-formed value
# and drops the rest with its path noted: a corrupted or hand-edited file never breaks a run, and
# `status` says it could not read what it dropped instead of guessing.

_JSON_INT_LIMIT = 2 ** 63  # no counter, pid or size of ours comes near; 10**30 is garbage


def _json_name(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


class _JsonReader:
    """Validates parsed JSON against the document's dataclasses, collecting problems."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def note(self, path: str, what: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(f"{path}: {what}")

    def read(self, hint: Any, raw: Any, path: str) -> tuple[bool, Any]:
        """(ok, value) for raw as the type `hint`; not ok means: drop it (noted)."""
        origin, args = getattr(hint, "__origin__", None), tuple(getattr(hint, "__args__", ()))
        if hint is Any:
            return True, raw
        if origin is None and args:  # X | None
            if raw is None and type(None) in args:
                return True, None
            inner = [a for a in args if a is not type(None)]
            return self.read(inner[0], raw, path) if len(inner) == 1 else (False, None)
        if origin is list:
            if not isinstance(raw, list):
                return self._bad(path, "expected an array", raw)
            out = []
            for i, item in enumerate(raw):
                ok, value = self.read(args[-1], item, f"{path}[{i}]")
                if ok:
                    out.append(value)
            return True, out
        if origin is dict:
            if not isinstance(raw, dict):
                return self._bad(path, "expected an object", raw)
            result = {}
            for key, item in raw.items():
                ok, value = self.read(args[-1], item, f"{path}.{key}")
                if ok:
                    result[key] = value
            return True, result
        if dataclasses.is_dataclass(hint):
            return self.object(hint, raw, path)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            try:
                return True, hint(raw)
            except (ValueError, TypeError):
                return self._bad(path, f"not one of {', '.join(str(m.value) for m in hint)}", raw)
        if hint is bool:
            return (True, raw) if isinstance(raw, bool) else self._bad(path, "expected true or false", raw)
        if hint is int:
            if isinstance(raw, int) and not isinstance(raw, bool) and -_JSON_INT_LIMIT < raw < _JSON_INT_LIMIT:
                return True, raw
            return self._bad(path, "expected an integer", raw)
        if hint is float:
            if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw) \
                    and abs(raw) < _JSON_INT_LIMIT:
                return True, float(raw)
            return self._bad(path, "expected a finite number", raw)
        if hint is str:
            return (True, raw) if isinstance(raw, str) else self._bad(path, "expected a string", raw)
        return self._bad(path, f"unexpected type {hint!r}", raw)

    def _bad(self, path: str, what: str, raw: Any) -> tuple[bool, Any]:
        self.note(path, f"{what}, got {shorten(raw, 40)}")
        return False, None

    def object(self, cls: Any, raw: Any, path: str) -> tuple[bool, Any]:
        if not isinstance(raw, dict):
            return self._bad(path, "expected an object", raw)
        hints = _type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _json_name(f)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if key in raw:
                ok, value = self.read(hints[f.name], raw[key], f"{path}.{key}" if path else key)
                if ok:
                    values[f.name] = value
                    continue
            if required:
                if key not in raw:
                    self.note(path, f"{key} is missing")
                return False, None
        return True, cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def document_from_json(cls: type, raw: Any) -> tuple[Any, list[str]]:
    """An instance of the dataclass `cls` from parsed JSON and the problems found (each with its
    path). Malformed parts are left out; a malformed whole (or a missing required field) is None."""
    reader = _JsonReader()
    ok, value = reader.object(cls, raw, "")
    return (value if ok else None), reader.problems


def document_to_json(obj: Any) -> Any:
    """The JSON form of a status dataclass (enums as their values; None fields left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None:
                out[_json_name(f)] = document_to_json(value)
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: document_to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [document_to_json(v) for v in obj]
    return obj


@dataclass
class Activity:
    """What a running job is doing now."""

    step: str = ""
    progress: str = ""
    since: str | None = None


@dataclass
class RunRecord:
    """One pass of a job: `result` is running, ok, failed (some filesystem) or error (the pass)."""

    start: str | None = None
    end: str | None = None
    result: str = ""
    error: str | None = None
    failures: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False


@dataclass
class PruneSummary:
    """What pruning did: a job's `pruning*` totals, or one dataset's (`dataset` set)."""

    dataset: str | None = None
    destroyed: list[str] = field(default_factory=list)
    kept: int = 0
    held: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    foreign_destroyed: list[str] = field(default_factory=list)
    foreign_at_risk: list[str] = field(default_factory=list)
    seconds: float | None = None  # how long it took (zrepl_pruning_time)


@dataclass
class SnapshotRecord:
    """A filesystem's snapshotting and pruning record (snap, push and source jobs)."""

    last_snapshot: str | None = None
    last_snapshot_time: str | None = None
    snapshot_error: str | None = None
    pruning: PruneSummary | None = None


@dataclass
class ReplicationRecord:
    """The last (or running) replication of an active job; filesystems as FilesystemReport."""

    started: str | None = None
    cancelled: str | None = None
    filesystems: dict[str, FilesystemReport] = field(default_factory=dict)


@dataclass
class ClientConnection:
    start: str | None = None
    end: str | None = None
    result: str = ""
    error: str | None = None
    pid: int | None = None
    requests: int = 0
    transfers: int = 0
    bytes: int = 0
    destroyed: int = 0
    failed_requests: int = 0


@dataclass
class ClientTransfer:
    time: str | None = None
    received: str | None = None
    sent: str | None = None
    from_: str | None = field(default=None, metadata={"json": "from"})
    resumed: bool = False
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class ClientError:
    time: str | None = None
    request: str = ""
    error: str = ""


@dataclass
class ClientReceived:
    snapshot: str | None = None
    time: str | None = None  # when it arrived (the sink does not learn its creation time)


@dataclass
class ClientRecord:
    """What a passive job's stdinserver processes recorded about one client identity."""

    last_connection: ClientConnection | None = None
    last_success: str | None = None
    transfers: list[ClientTransfer] = field(default_factory=list)
    last_transfer: ClientTransfer | None = None
    errors: list[ClientError] = field(default_factory=list)
    received: dict[str, ClientReceived] = field(default_factory=dict)  # a sink's: filesystem -> newest


class DaemonState(enum.StrEnum):
    """Where `zrepl.py daemon` has a job (a normal wait and a wait after an error are distinct)."""

    RUNNING = "running"
    WAITING = "waiting"  # until next_run: the last pass went well
    WAITING_AFTER_ERROR = "waiting after error"  # until next_run, `error` says what failed
    WAITING_FOR_WAKEUP = "waiting for wakeup"  # manual snapshotting, pull interval "manual"
    BUSY = "busy"  # another process (a cron `run`) holds the job's lock; tried again at next_run
    STOPPED = "stopped"  # the daemon exited (`error`: why, e.g. "stopped by SIGTERM")


@dataclass
class DaemonRecord:
    """The daemon's schedule for one job, in the job's status entry while a daemon runs it."""

    state: DaemonState = DaemonState.WAITING
    pid: int | None = None
    next_run: str | None = None
    error: str | None = None
    wakeup_queued: bool = False  # a wakeup came while the job was running: one more pass follows
    reset: str | None = None  # the last `signal reset`: when and what it cancelled


@dataclass
class JobStatus:
    """One job's entry in the status document (README: Status file)."""

    type: str = ""
    state: str = ""  # running or idle (the writers always say which)
    pid: int | None = None
    boot_id: str | None = None  # the boot its pid belongs to: after a reboot the pid is someone else's
    activity: Activity | None = None
    last_run: RunRecord | None = None
    last_success: str | None = None
    next_snapshot_due: str | None = None
    snapshots: list[SnapshotBatchResult] = field(default_factory=list)
    hooks: list[HookResult] = field(default_factory=list)
    filesystems: dict[str, SnapshotRecord] = field(default_factory=dict)
    pruning: PruneSummary | None = None
    pruning_sender: PruneSummary | None = None
    pruning_receiver: PruneSummary | None = None
    replication: ReplicationRecord | None = None
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    daemon: DaemonRecord | None = None
    filter_unmatched: list[str] = field(default_factory=list)  # accepting patterns that selected nothing
    filter_unmatched_total: int | None = None  # their count summed over the job's passes (zrepl's metric)

    @classmethod
    def from_json(cls, raw: Any) -> tuple[JobStatus, list[str]]:
        doc, problems = document_from_json(cls, raw)
        return doc or cls(), problems

    def to_json(self) -> dict[str, Any]:
        return document_to_json(self)


@dataclass
class ConfiguredJob:
    """A job of the config that last wrote the document, so `status --status-file` (which reads
    no config) knows every job, also those that never ran, and how to judge it."""

    type: str = ""
    passive: bool = False  # judged by its clients alone (a sink; a source with manual snapshotting)
    since: str | None = None  # when the document first saw this job configured
    snapshot_interval: float | None = None  # how late a due snapshot may be before it is overdue
    local_clients: dict[str, str] = field(default_factory=dict)  # a sink's local pushes: identity -> job


@dataclass
class ConfiguredJobs:
    jobs: dict[str, ConfiguredJob] = field(default_factory=dict)
    warn_no_success_after: float = StatusThresholds.warn_no_success_after
    crit_no_success_after: float = StatusThresholds.crit_no_success_after
    warn_snapshot_older_than: float = 0.0
    crit_snapshot_older_than: float = 0.0
    warn_received_older_than: float = 0.0
    crit_received_older_than: float = 0.0
    crit_replication_failing_after: float = 0.0

    def thresholds(self) -> StatusThresholds:
        return StatusThresholds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StatusThresholds)})


@dataclass
class StatusDocument:
    """The whole status file: `{"version": 1, "updated": ..., "jobs": {...}, "configured": {...}}`."""

    version: int = STATUS_VERSION
    updated: str | None = None
    jobs: dict[str, Any] = field(default_factory=dict)  # raw entries: read each with JobStatus.from_json
    configured: ConfiguredJobs | None = None

    def job(self, name: str) -> tuple[JobStatus | None, list[str]]:
        if name not in self.jobs:
            return None, []
        doc, problems = JobStatus.from_json(self.jobs[name])
        return doc, [f"jobs.{name}.{p}" for p in problems]


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read(64).strip() or None
    except OSError:
        return None


BOOT_ID = _boot_id()


class StatusStore:
    """The JSON status file: read-merge-write under a lock, replaced atomically (temp file + rename).

    Several processes (one per job run) and the threads of one run share the file; each write
    replaces only its own job's entry. The file is world-readable (0644) and its directory is
    created 0755, so a monitoring user can run `status` without the root-only config or runtime
    dir (restrict the directory yourself if the document must stay private). `configured` (the
    config's jobs, see ConfiguredJobs) is written into the document with every update.
    """

    def __init__(self, path: str, runtime_dir: str, configured: ConfiguredJobs | None = None):
        self.path, self.runtime_dir, self.configured = path, runtime_dir, configured
        self._lock = threading.Lock()
        self.closed: str | None = None  # set by close(): later writes are dropped

    def read(self) -> dict[str, Any]:
        """The current document; raises ZreplError if it exists but is unreadable."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(64 * 1024 * 1024)
            doc = json.loads(data, parse_constant=_refuse_json_constant)
        except FileNotFoundError:
            return {"version": STATUS_VERSION, "jobs": {}}
        except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else getattr(exc, "strerror", None) or exc
            raise ZreplError(f"cannot read status file {self.path}: {what}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), dict):
            raise ZreplError(f"status file {self.path} is not a zrepl.py status document")
        return doc

    def document(self) -> StatusDocument:
        """The current document as a StatusDocument (raises ZreplError if unreadable)."""
        return status_document(self.read())

    def job(self, name: str) -> dict[str, Any] | None:
        """A job's previous entry, well-formed parts only (a broken document never breaks a run)."""
        try:
            raw = self.read()["jobs"].get(name)
        except ZreplError:
            return None
        if raw is None:
            return None
        doc, problems = JobStatus.from_json(raw)
        if problems:
            log.warning("status file %s: ignoring malformed parts of job %s's entry: %s", self.path, name,
                        "; ".join(problems[:3]))
        return doc.to_json()

    def publish(self, job: str, job_doc: dict[str, Any]) -> None:
        """Replace one job's entry, keeping its `clients` (written by stdinserver processes). Status
        problems are logged, never fatal to the job."""
        doc = dict(job_doc)
        if doc.get("state") == "running" and isinstance(doc.get("activity"), dict) \
            and doc["activity"].get("step") == "replicating":
            doc["activity"] = {**doc["activity"], "progress": doc["activity"].get("progress")
                               or _replication_progress(doc.get("replication"))}

        def replace(entry: dict[str, Any]) -> None:
            clients = entry.get("clients")
            entry.clear()
            entry.update(doc)
            if clients is not None and "clients" not in doc:
                # the only part kept of the old entry, so the only part checked (a broken one is
                # rewritten from its well-formed parts, as _update does for a whole entry)
                parsed, problems = JobStatus.from_json({"clients": clients})
                entry["clients"] = parsed.to_json().get("clients", {}) if problems else clients
        self.update(job, replace, check_entry=False)

    def update(self, job: str, mutate: Callable[[dict[str, Any]], None], *, check_entry: bool = True) -> None:
        """Change one job's entry in place under the lock (mutate gets the entry, {} if none).
        `check_entry=False`: mutate replaces the entry and checks what it keeps of it itself (a
        running job publishes often: typed-reading its whole old entry each time cost more than
        the work it reported)."""
        try:
            with self._lock:
                if self.closed:
                    return
                self._update(job, mutate, check_entry)
        except (OSError, ZreplError) as exc:
            log.warning("cannot write status file %s: %s", self.path, exc)

    def close(self, reason: str, final: Callable[[], None] = lambda: None) -> None:
        """Run `final` (the last writes, through _final_update) and drop every later write: a run
        stopped by a signal records why, and no thread of it overwrites that afterwards."""
        with self._lock:
            self.closed = reason
            try:
                final()
            except (OSError, ZreplError) as exc:
                log.warning("cannot write status file %s: %s", self.path, exc)

    def final_update(self, job: str, mutate: Callable[[dict[str, Any]], None]) -> None:
        """update() for close()'s `final` (the lock is already held)."""
        self._update(job, mutate)

    def _update(self, job: str, mutate: Callable[[dict[str, Any]], None], check_entry: bool = True) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ZreplError(f"cannot create {directory}: {exc.strerror or exc} (global.status_file)") from None
        ensure_private_dir(self.runtime_dir)
        lock_fd = _open_private_file(os.path.join(self.runtime_dir, "status.lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                doc = self.read()
            except ZreplError as exc:
                log.warning("%s; starting a new status document", exc)
                doc = {"version": STATUS_VERSION, "jobs": {}}
            doc["version"] = STATUS_VERSION
            doc["updated"] = iso_time(utcnow())
            entry = doc["jobs"].get(job)
            if entry is not None and not check_entry:
                entry = dict(entry) if isinstance(entry, dict) else {}
            elif entry is not None:
                parsed, problems = JobStatus.from_json(entry)
                entry = parsed.to_json() if problems else dict(entry)  # only a broken entry is rewritten
            entry = entry or {}
            mutate(entry)
            if BOOT_ID:
                entry["boot_id"] = BOOT_ID
            doc["jobs"][job] = entry
            if self.configured is not None:
                doc["configured"] = self._configured(doc.get("configured"))
            fd, tmp = tempfile.mkstemp(prefix=".status.", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(status_text(doc))
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        finally:
            os.close(lock_fd)

    def _configured(self, previous: Any) -> dict[str, Any]:
        """This config's jobs, each keeping the time the document first saw it (same type)."""
        assert self.configured is not None
        old = document_from_json(ConfiguredJobs, previous if isinstance(previous, dict) else {})[0] or ConfiguredJobs()
        now = iso_time(utcnow())
        jobs = {}
        for name, cj in self.configured.jobs.items():
            seen = old.jobs.get(name)
            jobs[name] = dataclasses.replace(cj, since=seen.since if seen and seen.type == cj.type and seen.since
                                             else cj.since or now)
        return document_to_json(dataclasses.replace(self.configured, jobs=jobs))


def status_text(doc: dict[str, Any]) -> str:
    """The status file's text: one top-level key per line and one line per job (valid JSON, keys
    sorted). Not `json.dump(indent=...)`: with an indent CPython's encoder runs in Python, and a
    running job rewrites the file often (at 1,000 filesystems that encoding was most of a run's CPU)."""
    def compact(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)
    lines = []
    for key in sorted(doc):
        value = doc[key]
        if key == "jobs" and isinstance(value, dict) and value:
            jobs = ",\n".join(f"  {compact(str(name))}: {compact(entry)}" for name, entry in sorted(value.items()))
            lines.append(f' "jobs": {{\n{jobs}\n }}')
        else:
            lines.append(f" {compact(str(key))}: {compact(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def status_document(raw: dict[str, Any]) -> StatusDocument:
    """A read document (the file's, or the daemon's live one) as a StatusDocument."""
    doc = document_from_json(StatusDocument, {**raw, "jobs": {}})[0] or StatusDocument()
    doc.jobs = raw["jobs"]
    return doc


def _refuse_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _replication_progress(raw: Any) -> str:
    """activity.progress while replicating: filesystems done of all, bytes moved of expected.

    Read straight from the raw reports (each field checked where it is used), not through the typed
    reader: a running job publishes often, and typed-reading 1,000 reports each time cost more than
    the replication's own work."""
    filesystems = raw.get("filesystems") if isinstance(raw, dict) else None
    reports = [r for r in filesystems.values() if isinstance(r, dict)] if isinstance(filesystems, dict) else []
    if not reports:
        return ""

    def count(r: dict[str, Any], key: str) -> int:
        return _nonnegative_int(r.get(key))
    done = sum(1 for r in reports if r.get("state") == FilesystemState.DONE)
    moved = sum(count(r, "bytes_replicated") for r in reports)
    running = [r for r in reports if r.get("state") == FilesystemState.STEPPING]
    expected = sum(count(r, "bytes_expected") for r in running)
    text = f"{done}/{len(reports)} filesystems done, {format_size(moved)} moved"
    if running and expected:
        text += f" (current step: {format_size(count(running[0], 'bytes_replicated'))} of {format_size(expected)})"
    return text


def _pid_alive(pid: int | None, boot_id: str | None = None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2 ** 31:
        return False
    if boot_id and BOOT_ID and boot_id != BOOT_ID:
        return False  # recorded before a reboot: that process is gone, whoever has its pid now
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class JobHealth:
    """One job's health for `zrepl.py status`: a Nagios level and a one-line summary."""

    name: str
    level: int
    line: str
    details: list[str] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)  # passive jobs: one line per client, always shown
    success_age: float | None = None  # seconds since the last success (perfdata)
    table: list[list[str]] = field(default_factory=list)  # status -v: running filesystems
    findings: list[Finding] = field(default_factory=list)  # per-filesystem checks that are not OK


@dataclass
class Finding:
    """One filesystem that fails a per-filesystem check (freshness, failing replication)."""

    check: str  # snapshot_age, received_age, replication_failing
    filesystem: str
    level: int
    age: float | None  # seconds (None: no snapshot, or never replicated)


def _ago(ts: float | None, now: float) -> str:
    return "never" if ts is None else f"{format_duration(now - ts)} ago"


def _client_records(clients: dict[str, Any]) -> dict[str, ClientRecord]:
    out = {}
    for identity, raw in clients.items():
        if isinstance(raw, ClientRecord):
            out[identity] = raw
        elif isinstance(raw, dict):
            out[identity] = document_from_json(ClientRecord, raw)[0] or ClientRecord()
    return out


def evaluate_clients(jtype: str, clients: dict[str, Any], now: float,
                     monitoring: MonitoringConfig) -> tuple[int, list[str]]:
    """Health of a passive job's clients (recorded by stdinserver): the worst level and one line
    per client saying when it last connected, whether that worked and what it moved."""
    verb = "pushed" if jtype == "sink" else "pulled"
    levels, lines = [NAGIOS_OK], []
    for identity, c in sorted(_client_records(clients).items()):
        conn = c.last_connection or ClientConnection()
        success = parse_iso(c.last_success)
        when = _ago(parse_iso(conn.end or conn.start), now)
        result = conn.result
        if result == "running" and not _pid_alive(conn.pid):
            result = "died"
        if result == "ok":
            text = f"client {identity}: last connection {when} ok"
        elif result == "running":
            text = f"client {identity}: connected since {_ago(parse_iso(conn.start), now)}"
        else:
            levels.append(NAGIOS_WARNING)
            why = conn.error or ("the server process died" if result == "died" else "?")
            text = f"client {identity}: last connection {when} FAILED: {why}"
        last = c.last_transfer or ClientTransfer()
        moved = last.received or last.sent
        if moved:
            text += f"; last {verb} {moved} {_ago(parse_iso(last.time), now)}"
        level, note = _success_level(success, now, monitoring, "connection")
        levels.append(level)
        lines.append(text + note)
    return worst_level(levels), lines


def _success_level(success: float | None, now: float, monitoring: MonitoringConfig, what: str) -> tuple[int, str]:
    age = None if success is None else now - success
    if age is None:
        return NAGIOS_WARNING, f"; no successful {what} ever"
    if age > monitoring.crit_no_success_after:
        return NAGIOS_CRITICAL, f"; no successful {what} for {format_duration(age)}"
    if age > monitoring.warn_no_success_after:
        return NAGIOS_WARNING, f"; no successful {what} for {format_duration(age)}"
    return NAGIOS_OK, ""


def evaluate_local_clients(clients: dict[str, str], jobs: dict[str, Any], now: float,
                           monitoring: MonitoringConfig) -> tuple[int, list[str]]:
    """A sink's clients on the local transport: the push jobs of the same config serve themselves
    (no stdinserver records them), so their own entries say what the sink received."""
    levels, lines = [NAGIOS_OK], []
    for identity, push in sorted(clients.items()):
        entry, _ = JobStatus.from_json(jobs.get(push)) if isinstance(jobs.get(push), dict) else (None, [])
        last = entry.last_run if entry and entry.last_run else RunRecord()
        text = f"client {identity} (local push job {push}): "
        if not entry or not last.result:
            text += "has not pushed yet"
        elif last.result == "running":
            text += f"pushing since {_ago(parse_iso(last.start), now)}"
        else:
            text += f"last push {_ago(parse_iso(last.end), now)} {last.result}"
        success = parse_iso(entry.last_success) if entry else None
        if success is None and last.result == "running":  # the first push: judged by how long it runs
            success = parse_iso(last.start)
        level, note = _success_level(success, now, monitoring, "push")
        if entry and last.result:
            levels.append(level)
            text += note
        lines.append(text)
    return worst_level(levels), lines


def _never_ran(name: str, jtype: str, passive: bool, since: float | None, now: float,
               monitoring: MonitoringConfig) -> JobHealth:
    """A job with no record yet: OK for as long as a job may go without a success (a fresh
    config), then WARNING and CRITICAL like any job without success (is the timer enabled?)."""
    what = "no client has connected yet" if passive else "has not run yet"
    if since is None:  # nobody knows since when: a passive job waits, an active one should have run
        return JobHealth(name, NAGIOS_OK, f"passive {jtype}, {what}") if passive else \
            JobHealth(name, NAGIOS_WARNING, what)
    age = now - since
    if age <= monitoring.warn_no_success_after:
        return JobHealth(name, NAGIOS_OK, f"{what} (configured {format_duration(age)} ago)")
    level = NAGIOS_CRITICAL if age > monitoring.crit_no_success_after else NAGIOS_WARNING
    hint = "" if passive else ": is the timer or cron job enabled?"
    return JobHealth(name, level, f"{what}, configured {format_duration(age)} ago{hint}")


def evaluate_job(name: str, jtype: str, doc: JobStatus | dict[str, Any] | None, now: float,
                 monitoring: MonitoringConfig, runs: bool | None = None, *,
                 spec: ConfiguredJob | None = None, since: float | None = None,
                 others: dict[str, Any] | None = None) -> JobHealth:
    """Turn a job's status entry into a Nagios level and a summary line.

    `runs` says whether the job has runs of its own to judge (default: every type but sink). A
    sink, and a source with manual snapshotting, only serve clients: they are judged by those
    (a sink's local pushes by their own entries in `others`). `since`: when the job was
    configured, for a job without a record (see _never_ran). A malformed entry is UNKNOWN unless
    what could be read is worse."""
    problems: list[str] = []
    if doc is not None and not isinstance(doc, JobStatus):  # a dict, or garbage where an entry belongs
        doc, problems = JobStatus.from_json(doc)
    passive = not runs if runs is not None else jtype == "sink"
    local = spec.local_clients if spec else {}
    has_clients = bool(doc and doc.clients) or bool(local)
    if doc is None or (passive and not (doc.clients or any(p in (others or {}) for p in local.values()))):
        if not local:
            return _never_ran(name, jtype, passive, since, now, monitoring)
    health = (_evaluate_passive(name, jtype, doc or JobStatus(), now, monitoring, local, others or {}) if passive
              else _evaluate_active(name, jtype, doc or JobStatus(), now, monitoring))
    if doc is not None and has_clients and not passive:
        level, lines = evaluate_clients(jtype, doc.clients, now, monitoring)
        health.level, health.clients = worst_level([health.level, level]), lines
    if spec and spec.snapshot_interval and doc and not passive:
        _check_overdue(health, doc, spec.snapshot_interval, now)
    if doc is not None and not passive:
        check_filesystems(health, doc, jtype, monitoring, now, since)
    elif doc is not None and jtype == "sink":
        check_received_by_clients(health, doc, monitoring, now)
    if problems:
        health.level = worst_level([health.level, NAGIOS_UNKNOWN])
        health.line += f"; status entry partly unreadable ({len(problems)} problem(s); the next run rewrites it)"
        health.details += [f"unreadable: {p}" for p in problems]
    return health


def _evaluate_passive(name: str, jtype: str, doc: JobStatus, now: float, monitoring: MonitoringConfig,
                      local: dict[str, str], others: dict[str, Any]) -> JobHealth:
    level, lines = evaluate_clients(jtype, doc.clients, now, monitoring)
    local_level, local_lines = evaluate_local_clients(local, others, now, monitoring)
    lines += local_lines
    level = worst_level([level, local_level])
    failing = sum(1 for ln in lines if "FAILED" in ln or "no successful" in ln)
    summary = f"{len(lines)} client(s)" + (f", {failing} need attention" if failing else ", all ok")
    return JobHealth(name, level, summary, clients=lines)


def _evaluate_active(name: str, jtype: str, doc: JobStatus, now: float, monitoring: MonitoringConfig) -> JobHealth:
    levels = [NAGIOS_OK]
    parts: list[str] = []
    details: list[str] = []
    last = doc.last_run or RunRecord()
    success = parse_iso(doc.last_success)
    table: list[list[str]] = []
    running = doc.state == "running"
    if running:
        act = doc.activity or Activity()
        if _pid_alive(doc.pid, doc.boot_id):
            parts.append(f"running: {act.step or '?'} {act.progress}".rstrip())
            started = parse_iso(last.start)
            if started is not None and now - started > monitoring.crit_no_success_after:
                # a run that holds the job's lock this long keeps every later run out ("busy")
                levels.append(NAGIOS_CRITICAL)
                parts.append(f"the run started {format_duration(now - started)} ago still holds the job (stuck?)")
        else:
            running = False
            levels.append(NAGIOS_WARNING)
            parts.append(f"a run (pid {doc.pid}) died during {act.step or '?'}")
    if last.result in ("failed", "error"):
        levels.append(NAGIOS_WARNING)
        what = last.error or f"{len(last.failures)} filesystem(s) failed"
        parts.append(f"last run {_ago(parse_iso(last.end), now)} {last.result}: {what}")
        details += [f"{fs}: {why}" for fs, why in sorted(last.failures.items())]
    elif last.result == "ok":
        parts.append(f"last run {_ago(parse_iso(last.end), now)} ok")
    if doc.filter_unmatched:  # a renamed or mistyped dataset is no longer backed up: not OK
        levels.append(NAGIOS_WARNING)
        parts.append(f"the filesystems filter's {', '.join(repr(p) for p in doc.filter_unmatched[:5])}"
                     f"{' and more' if len(doc.filter_unmatched) > 5 else ''} selected no dataset")
    age = None if success is None else now - success
    first_run = age is None and running and last.result == "running"
    if first_run:  # judged like a job that has not run yet: by how long ago it started
        started = parse_iso(last.start)
        age = None if started is None else now - started
        if age is None or age > monitoring.warn_no_success_after:
            levels.append(NAGIOS_CRITICAL if age is None or age > monitoring.crit_no_success_after
                          else NAGIOS_WARNING)
            parts.append(f"first run, no success yet{'' if age is None else ' after ' + format_duration(age)}")
        age = None
    elif age is None or age > monitoring.crit_no_success_after:
        levels.append(NAGIOS_CRITICAL if success is not None or last.result else NAGIOS_WARNING)
        parts.append(f"no successful run {'ever' if age is None else 'for ' + format_duration(age)}")
    elif age > monitoring.warn_no_success_after:
        levels.append(NAGIOS_WARNING)
        parts.append(f"no successful run for {format_duration(age)}")
    details += _pruning_details(doc)
    if doc.next_snapshot_due:
        details.append(f"next snapshot due {doc.next_snapshot_due}")
    if doc.daemon is not None:
        details.append(_daemon_detail(doc.daemon))
    for fs, rec in sorted(doc.filesystems.items()):
        line = f"{fs}: last snapshot {rec.last_snapshot or '-'}"
        if rec.snapshot_error:
            line += f"; snapshot error: {rec.snapshot_error}"
        details.append(line)
    replication = doc.replication or ReplicationRecord()
    if replication.cancelled:
        details.append(f"replication cancelled: {replication.cancelled}")
    for fs, rep in sorted(replication.filesystems.items()):
        if running:
            table.append(replication_row(fs, rep, now))
        else:
            details.append(describe_replication(fs, rep, now))
        if rep.state == FilesystemState.STEPPING and running:
            parts.append(describe_replication(fs, rep, now))
        commands = rep.error_details.get("recovery_commands") if isinstance(rep.error_details, dict) else None
        for cmd in commands if isinstance(commands, list) else []:
            details.append(f"    recovery: {shorten(cmd, 300) if not isinstance(cmd, str) else cmd}")
    for hook in doc.hooks:
        state = "ok" if hook.ok else f"FAILED ({hook.error})"
        details.append(f"hook {hook.hook} {hook.edge} {', '.join(hook.filesystems)}: {state}")
        details += ["    " + ln for ln in hook.output.strip().splitlines()[-5:]]
    return JobHealth(name, worst_level(levels), "; ".join(parts) or "idle", details, success_age=age, table=table)


def _pruning_details(doc: JobStatus) -> list[str]:
    details = []
    pruning = doc.pruning or PruneSummary()
    if pruning.held:
        details.append(f"held snapshots not pruned: {len(pruning.held)}")
        details += [f"  {snap}: held by {', '.join(tags)}" for snap, tags in sorted(pruning.held.items())]
    if pruning.destroyed:
        details.append(f"pruned {len(pruning.destroyed)} snapshot(s), kept {pruning.kept}")
    sides = (("pruning", doc.pruning), ("pruning_sender", doc.pruning_sender),
             ("pruning_receiver", doc.pruning_receiver))
    for key, section in sides:
        if section and section.foreign_destroyed:
            details.append(f"destroyed snapshots this job did not make ({key}): {', '.join(section.foreign_destroyed)}")
        if section and section.foreign_at_risk:
            details.append(f"snapshots this job did not make, kept only by last_n ({key}): "
                           f"{', '.join(section.foreign_at_risk)}")
    for label, pr in (("sender", doc.pruning_sender), ("receiver", doc.pruning_receiver)):
        if pr and (pr.destroyed or pr.errors):
            details.append(f"pruning {label}: destroyed {len(pr.destroyed)}, kept {pr.kept}, errors {len(pr.errors)}")
    return details


def newest_snapshot_times(doc: JobStatus, jtype: str) -> dict[str, float | None]:
    """The newest snapshot of each filesystem the job snapshots: the ones it took, and for a push
    also the sender's newest seen by replication (snapshots of other tools count too)."""
    newest = {fs: parse_iso(rec.last_snapshot_time) for fs, rec in doc.filesystems.items()}
    if jtype == "push":
        for fs, raw in (doc.replication or ReplicationRecord()).filesystems.items():
            sender = parse_iso(_report(raw).sender_newest_time)
            if sender is not None:
                newest[fs] = max(sender, newest.get(fs) or sender)
    return newest


def freshness(times: dict[str, float | None], now: float, warn: float, crit: float,
              check: str) -> list[Finding]:
    """sanoid's --monitor-snapshots rule: a filesystem whose newest snapshot (None: none known) is
    older than `crit` is CRITICAL, older than `warn` WARNING (0 turns a level off)."""
    out = []
    for fs, ts in sorted(times.items()):
        age = None if ts is None else max(now - ts, 0.0)
        if crit and (age is None or age > crit):
            out.append(Finding(check, fs, NAGIOS_CRITICAL, age))
        elif warn and (age is None or age > warn):
            out.append(Finding(check, fs, NAGIOS_WARNING, age))
    return out


_FINDING_TEXT = {"snapshot_age": "newest snapshot too old", "received_age": "newest received snapshot too old",
                 "replication_failing": "replication failing too long"}


def check_filesystems(health: JobHealth, doc: JobStatus, jtype: str, t: StatusThresholds, now: float,
                      since: float | None = None) -> None:
    """The per-filesystem checks of an active job: snapshot and received freshness ([global.status]
    *_older_than) and the guard against a replication failing unnoticed (crit_replication_failing_after)."""
    reports = {fs: _report(raw) for fs, raw in (doc.replication or ReplicationRecord()).filesystems.items()}
    findings = freshness(newest_snapshot_times(doc, jtype), now, t.warn_snapshot_older_than,
                         t.crit_snapshot_older_than, "snapshot_age")
    if jtype in ACTIVE_MODES:
        # a filesystem without snapshots on the sender has nothing to receive
        received = {fs: parse_iso(rep.last_replicated_time) for fs, rep in reports.items()
                    if rep.last_replicated_time or rep.sender_newest_time}
        findings += freshness(received, now, t.warn_received_older_than, t.crit_received_older_than, "received_age")
        failing = failing_replications(reports, now, t.replication_failing_limit, since)
        findings += [Finding("replication_failing", fs, NAGIOS_CRITICAL, age) for fs, age in sorted(failing.items())]
    _add_findings(health, findings)


def _add_findings(health: JobHealth, findings: list[Finding]) -> None:
    """Each check with failing filesystems adds its level and one part naming them to the line."""
    health.findings += findings
    for check, text in _FINDING_TEXT.items():
        mine = [f for f in findings if f.check == check]
        if mine:
            health.level = worst_level([health.level, *(f.level for f in mine)])
            named = ", ".join(f"{f.filesystem} ({'never' if f.age is None else format_duration(f.age)})"
                              for f in sorted(mine, key=lambda f: (-_SEVERITY[f.level], f.filesystem)))
            health.line += f"; {text}: {named}"


def check_received_by_clients(health: JobHealth, doc: JobStatus, t: StatusThresholds, now: float) -> None:
    """A sink's received freshness: per client and filesystem, when its last snapshot arrived."""
    times = {f"{identity} {fs}": parse_iso(r.time) for identity, c in _client_records(doc.clients).items()
             for fs, r in c.received.items()}
    _add_findings(health, freshness(times, now, t.warn_received_older_than, t.crit_received_older_than,
                                    "received_age"))


def _check_overdue(health: JobHealth, doc: JobStatus, interval: float, now: float) -> None:
    """A snapshot due longer ago than its interval is overdue (the timer stopped, or a long run
    holds the job): WARNING, whatever the last run said."""
    due = parse_iso(doc.next_snapshot_due)
    if due is not None and now - due > interval:
        health.level = worst_level([health.level, NAGIOS_WARNING])
        health.line += f"; snapshot overdue by {format_duration(now - due)} (due {doc.next_snapshot_due})"


def _report(rep: FilesystemReport | dict[str, Any]) -> FilesystemReport:
    if isinstance(rep, FilesystemReport):
        return rep
    parsed, _ = document_from_json(FilesystemReport, {"sender_fs": "", **rep} if isinstance(rep, dict) else {})
    return parsed if isinstance(parsed, FilesystemReport) else FilesystemReport("")


def _rate_eta(rep: FilesystemReport, now: float) -> tuple[float | None, float | None]:
    started = parse_iso(rep.step_started)
    if not started or rep.bytes_replicated <= 0 or now <= started:
        return None, None
    rate = rep.bytes_replicated / (now - started)
    eta = max((rep.bytes_expected or 0) - rep.bytes_replicated, 0) / rate if rep.bytes_expected else None
    return rate, eta


def describe_replication(fs: str, rep: FilesystemReport | dict[str, Any], now: float) -> str:
    """One filesystem's replication line: state, progress with ETA, last replicated, error."""
    rep = _report(rep)
    state = str(rep.state)
    line = f"{fs}: {state}"
    if rep.state == FilesystemState.STEPPING:
        done, expected = rep.bytes_replicated, rep.bytes_expected
        line += f" {rep.step}: {format_size(done)}"
        if expected:
            line += f" of {format_size(expected)} ({min(100, 100 * done // max(expected, 1))}%)"
            _, eta = _rate_eta(rep, now)
            if eta is not None:
                line += f", ETA {format_duration(eta)}"
        line += f" (step {rep.steps_done + 1}/{rep.steps_total})"
    if rep.last_replicated:
        line += f"; last replicated {rep.last_replicated}"
    if rep.error:
        line += f"; error ({rep.error_count} in a row): {rep.error}"
    return line


def progress_bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


TABLE_HEADER = ["filesystem", "state", "step", "progress", "rate", "ETA"]


def replication_row(fs: str, rep: FilesystemReport | dict[str, Any], now: float) -> list[str]:
    """A row of `status -v`'s table of a running job's filesystems."""
    rep = _report(rep)
    if rep.state == FilesystemState.STEPPING:
        rate, eta = _rate_eta(rep, now)
        done, expected = rep.bytes_replicated, rep.bytes_expected
        progress = format_size(done)
        if expected:
            progress = f"{progress_bar(done / expected)} {min(100, 100 * done // expected):3d}% {progress}"
            progress += f" of {format_size(expected)}"
        step = f"{rep.steps_done + 1}/{rep.steps_total} {rep.step}"
        return [fs, "stepping", step, progress, f"{format_size(rate)}/s" if rate else "-",
                format_duration(eta) if eta is not None else "-"]
    if rep.state == FilesystemState.PLANNING:
        return [fs, "waiting", "", "", "", ""]
    if rep.state == FilesystemState.DONE:
        note = f"{rep.last_replicated}" if rep.last_replicated else "up to date"
        if rep.steps_total and rep.steps_done >= rep.steps_total:
            note = f"{rep.steps_done} step(s), {format_size(rep.bytes_replicated)}: {note}"
        return [fs, "done", "", note, "", ""]
    return [fs, str(rep.state), rep.step, shorten(rep.error, 120).strip("'\"") if rep.error else "", "", ""]


def format_table(rows: list[list[str]], indent: str = "    ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def evaluate_status(doc: dict[str, Any] | StatusDocument, jobs: Sequence[tuple[str, str]], now: float,
                    monitoring: MonitoringConfig, passive: Iterable[str] = (), *,
                    specs: dict[str, ConfiguredJob] | None = None,
                    since: dict[str, float] | None = None) -> list[JobHealth]:
    """Health of every configured job (name, type), worst first. Jobs named in `passive` have no
    runs of their own (see evaluate_job); `specs` add what the config says about a job (overdue
    snapshots, a sink's local clients), `since` when jobs without a record were configured."""
    passive = set(passive)
    entries = doc.jobs if isinstance(doc, StatusDocument) else (doc.get("jobs") or {})
    health = [evaluate_job(name, jtype, entries.get(name), now, monitoring,
                           runs=None if name not in passive else False,
                           spec=(specs or {}).get(name), since=(since or {}).get(name), others=entries)
              for name, jtype in jobs]
    return sorted(health, key=lambda h: (-_SEVERITY[h.level], h.name))


def _perf_label(name: str) -> str:
    return re.sub(r"['=\s]", "_", name)


def perfdata(health: list[JobHealth], monitoring: MonitoringConfig) -> str:
    """Nagios performance data: per job the seconds since its last success (warn;crit), and counts."""
    warn, crit = int(monitoring.warn_no_success_after), int(monitoring.crit_no_success_after)
    parts = [f"jobs={len(health)}", f"problems={sum(1 for h in health if h.level != NAGIOS_OK)}"]
    for h in sorted(health, key=lambda h: h.name):
        if h.success_age is not None:
            parts.append(f"'{_perf_label(h.name)} age'={int(max(h.success_age, 0))}s;{warn};{crit};0;")
    return " ".join(parts)


def _daemon_detail(record: DaemonRecord) -> str:
    """`daemon: waiting after error until 2026-12-01T10:00:00Z: <error>`"""
    line = f"daemon (pid {record.pid or '?'}): {record.state}"
    if record.next_run and record.state != DaemonState.STOPPED:
        line += f" until {record.next_run}"
    if record.error:
        line += f": {record.error}"
    if record.wakeup_queued:
        line += "; a wakeup is queued"
    if record.reset:
        line += f"; last reset {record.reset}"
    return line


def render_status(health: list[JobHealth], types: dict[str, str], verbose: bool,
                  monitoring: MonitoringConfig | None = None) -> tuple[str, int]:
    """Nagios-style text: a first summary line (with perfdata when `monitoring` is given), then a
    line per job (problems first); verbose adds details and a table of running filesystems."""
    worst = worst_level(h.level for h in health)
    if not health:
        worst = NAGIOS_UNKNOWN
    bad = sum(1 for h in health if h.level != NAGIOS_OK)
    head = f"{NAGIOS_NAMES[worst]}: {len(health)} job(s)" + (f", {bad} need attention" if bad else ", all ok")
    if not health:
        head = f"{NAGIOS_NAMES[worst]}: no jobs configured"
    if monitoring is not None:
        head += " | " + perfdata(health, monitoring)
    lines = [head]
    width = max((len(h.name) for h in health), default=0)
    for h in health:
        lines.append(f"{NAGIOS_NAMES[h.level]:<8} {h.name:<{width}} {types.get(h.name, ''):<6} {h.line}")
        lines += [f"    {c}" for c in h.clients]
        if verbose:
            if h.table:
                lines += format_table([TABLE_HEADER, *h.table])
            lines += [f"    {d}" for d in h.details]
    return "\n".join(lines), worst


def status_summary(health: list[JobHealth], types: dict[str, str], text: str, level: int) -> dict[str, Any]:
    """`status --json`'s verdict: the level, the summary line, and per job its level, line and the
    filesystems that fail a per-filesystem check."""
    return {"level": NAGIOS_NAMES[level], "exit_code": level, "summary": text.split("\n", 1)[0],
            "jobs": {h.name: {"type": types.get(h.name, ""), "level": NAGIOS_NAMES[h.level], "line": h.line,
                              "filesystems": [{"check": f.check, "filesystem": f.filesystem,
                                               "level": NAGIOS_NAMES[f.level],
                                               "age_seconds": None if f.age is None else int(f.age)}
                                              for f in h.findings]}
                     for h in health}}


def watch_lines(health: list[JobHealth], types: dict[str, str], width: int) -> list[str]:
    """`status --watch`: the summary, a line per job (problems first), and below a running job a
    line per filesystem that is not done yet (progress bar, bytes, rate, ETA), each cut to width."""
    text, _ = render_status(health, types, verbose=False)
    lines = text.splitlines()[:1]
    name_width = max((len(h.name) for h in health), default=0)
    for h in health:
        lines.append(f"{NAGIOS_NAMES[h.level]:<8} {h.name:<{name_width}} {types.get(h.name, ''):<6} {h.line}")
        active = [row for row in h.table if row[1] != "done"]
        if active:
            lines += format_table([TABLE_HEADER, *active])
    return [ln if len(ln) <= width else ln[:max(width - 1, 0)] + "~" for ln in lines]


# =================================================================================================
# 15. Metrics
# =================================================================================================

# Prometheus text exposition (format 0.0.4), built from the status document, so the same text comes
# out of a cron `run` (the node_exporter textfile) and the daemon (HTTP /metrics): what a job did is
# in the document, whichever process did it. Only what one process measures (zfs command runtimes,
# log entries, control requests) comes from ProcessMetrics. zrepl's metric names, types and labels
# are kept where zrepl has them (dashboards query them); the rest is zrepl.py's (README: Metrics).
# Timestamps, not ages: an age in a textfile written an hour ago would be an hour wrong, while
# `time() - zrepl_..._timestamp_seconds` is right whenever Prometheus evaluates it.

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PRUNING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # client_golang's defaults
CONTROL_BUCKETS = (1e-6, 10e-6, 100e-6, 500e-6, 1e-3, 10e-3, 100e-3, 200e-3, 400e-3, 800e-3, 1.0, 10.0, 20.0)
_PROCESS_START = time.time()
_LOG_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
                    logging.CRITICAL: "error"}


class _LogEntryCounter(logging.Handler):
    """Counts the log entries that pass the logger's level, by job and level (zrepl_daemon_log_entries)."""

    def __init__(self, owner: ProcessMetrics):
        super().__init__(logging.NOTSET)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        job = getattr(record, "job", None) or LOG_JOB.get() or "_nojobid"
        level = _LOG_LEVEL_NAMES.get(record.levelno, "error" if record.levelno > logging.ERROR else "debug")
        with self.owner.lock:
            key = (str(job), level)
            self.owner.log_entries[key] = self.owner.log_entries.get(key, 0) + 1


class ProcessMetrics:
    """What this process measured itself: its start, zfs command runtimes (the Zfs layers' counters
    it was given), log entries and control-socket requests (the daemon observes them)."""

    def __init__(self, start_time: float = _PROCESS_START, zfs: Iterable[ZfsCounters] = ()):
        self.start_time = start_time
        self.zfs = list(zfs)
        self.lock = threading.Lock()
        self.log_entries: dict[tuple[str, str], int] = {}
        self.control_requests: dict[str, Histogram] = {}
        self.control_begun: dict[str, int] = {}
        self.log_handler = _LogEntryCounter(self)

    def request_begun(self, endpoint: str) -> None:
        with self.lock:
            self.control_begun[endpoint] = self.control_begun.get(endpoint, 0) + 1

    def request_finished(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.control_requests.setdefault(endpoint, Histogram(CONTROL_BUCKETS)).observe(seconds)


PROCESS_METRICS = ProcessMetrics()  # this process's; setup_logging attaches its log counter


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 2 ** 53):
        return str(int(value))
    return "+Inf" if value == math.inf else "-Inf" if value == -math.inf else "NaN" if value != value else repr(value)


class Exposition:
    """Metric families in the text format: each family's HELP, TYPE and samples together, once."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.families.setdefault(name, (kind, help_text, []))

    def sample(self, family: str, labels: dict[str, str], value: float, suffix: str = "") -> None:
        text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
        self.families[family][2].append(f"{family}{suffix}{{{text}}} {_number(value)}" if text
                                        else f"{family}{suffix} {_number(value)}")

    def histogram(self, family: str, labels: dict[str, str], h: Histogram) -> None:
        for bound, count in zip(h.bounds, h.counts, strict=True):
            self.sample(family, {**labels, "le": _number(float(bound))}, count, "_bucket")
        self.sample(family, {**labels, "le": "+Inf"}, h.count, "_bucket")
        self.sample(family, labels, h.sum, "_sum")
        self.sample(family, labels, h.count, "_count")

    def text(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self.families.items():
            if samples:
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(out) + "\n" if out else ""


# name -> (type, help): every family render_metrics can write (README lists the same)
METRIC_FAMILIES: dict[str, tuple[str, str]] = {
    "zrepl_start_time": ("gauge", "Unix time this process started, with its version in labels (zrepl's name)."),
    "zrepl_replication_bytes_replicated": (
        "counter", "Bytes of the completed replication steps of a filesystem, across runs (zrepl's name)."),
    "zrepl_replication_filesystem_errors": (
        "gauge", "Filesystems that failed in the job's latest replication; -1 if the run failed before planning."),
    "zrepl_replication_last_successful": (
        "gauge", "Unix time of the job's last run in which every filesystem replicated (zrepl's name)."),
    "zrepl_pruning_time": ("histogram", "Seconds the job's latest pruning of one side took (zrepl's name)."),
    "zrepl_zfscmd_runtime": ("histogram", "Seconds each zfs command of this process ran, by verb (zrepl's name)."),
    "zrepl_daemon_log_entries": ("counter", "Log entries this process wrote, by job and level (zrepl's name)."),
    "zrepl_control_request_begin": ("counter", "Control socket requests begun, by endpoint (zrepl's name)."),
    "zrepl_control_request_finished": ("histogram", "Seconds control requests took, by endpoint (zrepl's name)."),
    "zrepl_job_last_run_timestamp_seconds": ("gauge", "Unix time the job's latest run ended (or started, if running)."),
    "zrepl_job_last_success_timestamp_seconds": ("gauge", "Unix time of the job's latest successful run."),
    "zrepl_job_running": ("gauge", "1 while a run of the job is in progress."),
    "zrepl_job_last_run_failed": ("gauge", "1 if the job's latest finished run failed."),
    "zrepl_snapshot_newest_timestamp_seconds": (
        "gauge", "Creation time of the newest snapshot of a selected filesystem (snap, push, source)."),
    "zrepl_replication_last_replicated_timestamp_seconds": (
        "gauge", "Creation time of the newest snapshot the receiver has of a filesystem."),
    "zrepl_replication_lag_seconds": (
        "gauge", "How much older the receiver's newest snapshot is than the sender's newest (0: up to date)."),
    "zrepl_replication_bytes_remaining": ("gauge", "Bytes left in the filesystem's current step (0 when idle)."),
    "zrepl_replication_filesystem_failed": ("gauge", "1 if the filesystem's replication failed in the latest run."),
    "zrepl_replication_last_success_timestamp_seconds": (
        "gauge", "Unix time the filesystem last replicated without error."),
    "zrepl_client_last_connection_timestamp_seconds": (
        "gauge", "Unix time a sink's or source's client last connected (its end, or its start while connected)."),
    "zrepl_client_last_success_timestamp_seconds": ("gauge", "Unix time a client's last successful connection ended."),
    "zrepl_client_last_transfer_timestamp_seconds": (
        "gauge", "Unix time of a client's last transfer (sink: received, source: sent)."),
    "zrepl_client_transfer_bytes": ("gauge", "Bytes of a client's last transfer."),
    "zrepl_client_last_received_timestamp_seconds": (
        "gauge", "Unix time a sink last received a snapshot of the client's filesystem."),
    "zrepl_pruning_destroyed": ("gauge", "Snapshots the job's latest pruning destroyed, by side."),
    "zrepl_pruning_kept": ("gauge", "Snapshots the job's latest pruning kept, by side."),
    "zrepl_pruning_errors": ("gauge", "Snapshots the job's latest pruning could not destroy, by side."),
    "zrepl_zfs_list_unmatched_user_specified_dataset_count": (
        "gauge", "Filter patterns that selected no dataset, summed over the job's passes: an increase means a "
        "rule without effect (zrepl's name and jobid label; zrepl also counts rejecting patterns)."),
}


def render_metrics(doc: StatusDocument, process: ProcessMetrics | None = None,
                   zfs: Iterable[ZfsCounters] = ()) -> str:
    """The Prometheus text for every job of the status document, plus the process's own counters
    (PROCESS_METRICS unless given) and the runtimes recorded by the `zfs` layers' counters."""
    out = Exposition()
    for name, (kind, help_text) in METRIC_FAMILIES.items():
        out.family(name, kind, help_text)
    process = process or PROCESS_METRICS
    out.sample("zrepl_start_time", {"raw": __version__, "version_info": f"zrepl.py version={__version__} python="
                                    f"{'.'.join(map(str, sys.version_info[:3]))}"}, process.start_time)
    configured = doc.configured.jobs if doc.configured else {}
    for job in sorted(doc.jobs):
        entry, _ = doc.job(job)
        if entry is not None:
            spec = configured.get(job)
            _job_metrics(out, job, entry, spec.type if spec else entry.type)
    _process_metrics(out, process, [*process.zfs, *zfs])
    return out.text()


def _timestamp(out: Exposition, family: str, labels: dict[str, str], iso: str | None) -> None:
    ts = parse_iso(iso)
    if ts is not None:
        out.sample(family, labels, ts)


def _job_metrics(out: Exposition, job: str, entry: JobStatus, jtype: str) -> None:
    labels = {"zrepl_job": job}
    last = entry.last_run or RunRecord()
    running = entry.state == "running" and _pid_alive(entry.pid, entry.boot_id)
    out.sample("zrepl_job_running", labels, 1 if running else 0)
    _timestamp(out, "zrepl_job_last_run_timestamp_seconds", labels, last.end or last.start)
    _timestamp(out, "zrepl_job_last_success_timestamp_seconds", labels, entry.last_success)
    if last.result in ("ok", "failed", "error"):
        out.sample("zrepl_job_last_run_failed", labels, 0 if last.result == "ok" else 1)
    if jtype in ACTIVE_MODES:
        _replication_metrics(out, labels, entry, last)
    if jtype in ("snap", "push", "source"):
        out.sample("zrepl_zfs_list_unmatched_user_specified_dataset_count", {"jobid": job},
                   entry.filter_unmatched_total or 0)
    for fs, ts in sorted(newest_snapshot_times(entry, jtype).items()):
        if ts is not None:
            out.sample("zrepl_snapshot_newest_timestamp_seconds", {**labels, "filesystem": fs}, ts)
    for side, summary in (("local", entry.pruning), ("sender", entry.pruning_sender),
                          ("receiver", entry.pruning_receiver)):
        if summary is not None:
            _pruning_metrics(out, {**labels, "prune_side": side}, summary)
    for identity, client in sorted(_client_records(entry.clients).items()):
        _client_metrics(out, {**labels, "client": identity}, client)


def _replication_metrics(out: Exposition, labels: dict[str, str], entry: JobStatus, last: RunRecord) -> None:
    reports = (entry.replication or ReplicationRecord()).filesystems
    failed = sum(1 for rep in reports.values() if _report(rep).state in _FAILED_STATES)
    errors = -1 if last.result == "error" and not reports else failed
    out.sample("zrepl_replication_filesystem_errors", labels, errors)
    _timestamp(out, "zrepl_replication_last_successful", labels, entry.last_success)  # kept through failures
    for fs, raw in sorted(reports.items()):
        rep, fs_labels = _report(raw), {**labels, "filesystem": fs}
        out.sample("zrepl_replication_bytes_replicated", fs_labels, rep.bytes_total)
        out.sample("zrepl_replication_filesystem_failed", fs_labels, 1 if rep.state in _FAILED_STATES else 0)
        stepping = rep.state == FilesystemState.STEPPING and rep.bytes_expected
        out.sample("zrepl_replication_bytes_remaining", fs_labels,
                   max((rep.bytes_expected or 0) - rep.bytes_replicated, 0) if stepping else 0)
        _timestamp(out, "zrepl_replication_last_success_timestamp_seconds", fs_labels, rep.last_success)
        replicated, sender = parse_iso(rep.last_replicated_time), parse_iso(rep.sender_newest_time)
        if replicated is not None:
            out.sample("zrepl_replication_last_replicated_timestamp_seconds", fs_labels, replicated)
            if sender is not None:
                out.sample("zrepl_replication_lag_seconds", fs_labels, max(sender - replicated, 0))


def _pruning_metrics(out: Exposition, labels: dict[str, str], summary: PruneSummary) -> None:
    out.sample("zrepl_pruning_destroyed", labels, len(summary.destroyed))
    out.sample("zrepl_pruning_kept", labels, summary.kept)
    out.sample("zrepl_pruning_errors", labels, len(summary.errors))
    if summary.seconds is not None:
        h = Histogram(PRUNING_BUCKETS)
        h.observe(summary.seconds)
        out.histogram("zrepl_pruning_time", labels, h)


def _client_metrics(out: Exposition, labels: dict[str, str], client: ClientRecord) -> None:
    conn = client.last_connection or ClientConnection()
    _timestamp(out, "zrepl_client_last_connection_timestamp_seconds", labels, conn.end or conn.start)
    _timestamp(out, "zrepl_client_last_success_timestamp_seconds", labels, client.last_success)
    if client.last_transfer is not None:
        _timestamp(out, "zrepl_client_last_transfer_timestamp_seconds", labels, client.last_transfer.time)
        out.sample("zrepl_client_transfer_bytes", labels, client.last_transfer.bytes)
    for fs, received in sorted(client.received.items()):
        _timestamp(out, "zrepl_client_last_received_timestamp_seconds", {**labels, "filesystem": fs}, received.time)


def _process_metrics(out: Exposition, process: ProcessMetrics, zfs: Iterable[ZfsCounters]) -> None:
    runtimes: dict[tuple[str, str, str], Histogram] = {}
    for counters in zfs:
        with counters.lock:
            for key, h in counters.runtimes.items():
                merged = runtimes.setdefault(key, Histogram(h.bounds))
                merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
                merged.sum, merged.count = merged.sum + h.sum, merged.count + h.count
    for (job, binary, verb), h in sorted(runtimes.items()):
        out.histogram("zrepl_zfscmd_runtime", {"jobid": job, "zfsbinary": binary, "zfsverb": verb}, h)
    with process.lock:
        for (job, level), n in sorted(process.log_entries.items()):
            out.sample("zrepl_daemon_log_entries", {"zrepl_job": job, "level": level}, n)
        for endpoint, n in sorted(process.control_begun.items()):
            out.sample("zrepl_control_request_begin", {"endpoint": endpoint}, n)
        for endpoint, h in sorted(process.control_requests.items()):
            out.histogram("zrepl_control_request_finished", {"endpoint": endpoint}, h)


# ---- outlets: the node_exporter textfile and the HTTP listener --------------------------------------

def write_textfile(path: str, text: str) -> None:
    """Replace `path` atomically (a temp file in its directory, then rename), as node_exporter's
    textfile collector needs: it must never read half a file. 0644: node_exporter rarely runs as root."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".zrepl-metrics.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_metrics_textfiles(outlets: Iterable[MonitoringOutlet], store: StatusStore,
                            process: ProcessMetrics | None = None, zfs: Iterable[ZfsCounters] = ()) -> None:
    """Every textfile outlet gets the metrics of the current status document. Failures are logged,
    never fatal: monitoring must not fail a job that did its work."""
    paths = [o.path for o in outlets if o.type == "textfile"]
    if not paths:
        return
    try:
        text = render_metrics(store.document(), process, zfs)
    except (OSError, ZreplError) as exc:
        log.warning("cannot render metrics for the textfile: %s", exc)
        return
    for path in paths:
        try:
            write_textfile(path, text)
        except OSError as exc:
            log.warning("cannot write metrics textfile %s: %s (global.monitoring)", path, exc.strerror or exc)


def split_listen(listen: str) -> tuple[str, int]:
    """zrepl's listen form (":9811", "127.0.0.1:9811", "[::1]:9811") -> (host, port); "" is every address."""
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


class MetricsServer:
    """HTTP `GET /metrics` on a `prometheus` outlet's `listen` address, served by threads of its own.

    start() binds (raising ZreplError naming the address) and returns at once; close() stops it.
    `render()` produces the text per scrape. Each connection gets `timeout` seconds to send its
    request and read the answer, so a slow or silent client holds one thread and nothing else;
    at most `max_clients` are served at once, later ones are closed unanswered."""

    def __init__(self, listen: str, render: Callable[[], str], *, freebind: bool = False, timeout: float = 5.0,
                 max_clients: int = 16):
        self.listen, self.render, self.freebind = listen, render, freebind
        self.timeout, self.max_clients = timeout, max_clients
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(max_clients)
        self._closed = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        addr = self._sock.getsockname()
        return addr[0], addr[1]

    def start(self) -> None:
        host, port = split_listen(self.listen)
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ZreplError(f"cannot listen on {self.listen} for metrics: {exc.strerror or exc} "
                             f"(global.monitoring prometheus listen)") from None
        # "" (every address): the IPv6 wildcard first, it takes IPv4 too; IPv4 alone where IPv6 is off
        error: OSError | None = None
        for family, _, _, _, sockaddr in sorted(infos, key=lambda i: bool(host) or i[0] != socket.AF_INET6):
            try:
                self._sock = self._bind(family, sockaddr, dual_stack=not host)
                break
            except OSError as exc:
                error = error or exc
        if self._sock is None:
            why = (error.strerror or error) if error else "no address"
            raise ZreplError(f"cannot listen on {self.listen} for metrics: {why} (global.monitoring prometheus listen)")
        self._thread = threading.Thread(target=self._accept_loop, name="metrics-http", daemon=True)
        self._thread.start()

    def _bind(self, family: int, sockaddr: Any, dual_stack: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and dual_stack:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if self.freebind:
                sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the address need not exist yet
            sock.bind(sockaddr)
            sock.listen(64)
            return sock
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="metrics-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self.timeout)
                request = self._read_request(conn, time.monotonic() + self.timeout)
                if request is not None:
                    conn.sendall(self._answer(request))
        except OSError:
            pass  # the client went away or was too slow: its problem, not ours
        finally:
            self._slots.release()

    @staticmethod
    def _read_request(conn: socket.socket, deadline: float) -> bytes | None:
        """The request line, once the headers are complete (None: too big, too slow, or gone)."""
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > 16384 or time.monotonic() > deadline:
                return None
            chunk = conn.recv(4096)
            if not chunk:
                return None
            data += chunk
        return data.split(b"\n", 1)[0].strip()

    def _answer(self, request_line: bytes) -> bytes:
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _http_response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return _http_response(404, "text/plain", b"not found: try /metrics\n")
        if method not in (b"GET", b"HEAD"):
            return _http_response(405, "text/plain", b"only GET\n", extra="Allow: GET, HEAD\r\n")
        try:
            body = self.render().encode()
        except Exception as exc:  # a broken status file must not kill the listener
            log.warning("metrics: cannot render: %s", exc)
            return _http_response(500, "text/plain", f"cannot render metrics: {exc}\n".encode())
        return _http_response(200, METRICS_CONTENT_TYPE, body, head=method == b"HEAD")


def start_metrics_servers(outlets: Iterable[MonitoringOutlet], render: Callable[[], str]) -> list[MetricsServer]:
    """A started MetricsServer per `prometheus` outlet (the daemon's; close() each when done). If one
    cannot listen, those already started are closed and its ZreplError is raised."""
    servers: list[MetricsServer] = []
    try:
        for outlet in outlets:
            if outlet.type == "prometheus":
                server = MetricsServer(outlet.listen, render, freebind=outlet.listen_freebind)
                server.start()
                servers.append(server)
    except ZreplError:
        for server in servers:
            server.close()
        raise
    return servers


def _http_response(code: int, content_type: str, body: bytes, *, extra: str = "", head: bool = False) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              500: "Internal Server Error"}[code]
    header = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              f"Connection: close\r\n{extra}\r\n")
    return header.encode() + (b"" if head else body)


# =================================================================================================
# 16. Daemon
# =================================================================================================
#
# `zrepl.py daemon` runs every job on its own schedule through the JobRunner `run` uses (section 13):
# its passes take the same job locks, so a cron `run` next to the daemon reports busy. The caller's
# thread decides (Daemon.tick), each pass runs in a thread of its own, the control socket answers
# each client in a thread of its own. Time is a parameter: tests drive tick() with a fake clock.

DAEMON_RETRY_AFTER_ERROR = 60.0  # a snapshot that failed (or never came) is tried again this soon
DAEMON_BUSY_RETRY = 30.0  # another process (a cron `run`) held the job: try again this soon
DAEMON_MAX_SLEEP = 60.0  # the loop looks at the wall clock at least this often (clock steps, suspend)
# node_exporter textfiles are rewritten at least this often, passes or not: a daemon whose jobs
# only wake on request (or only serve) still shows its process counters and the passive
# side's records, and a textfile collector's mtime check sees a live daemon.
DAEMON_TEXTFILE_INTERVAL = 60.0


class ScheduleKind(enum.StrEnum):
    """What starts a job's passes in the daemon."""

    SNAPSHOTS = "snapshots"  # periodic or cron snapshotting (snap, push, source): when a snapshot is due
    INTERVAL = "interval"  # pull: every `interval`
    WAKEUP = "wakeup"  # manual snapshotting, pull interval "manual": only `wakeup`
    PASSIVE = "passive"  # sink, source without snapshotting: served when a client connects


def schedule_kind(job: JobConfig) -> ScheduleKind:
    if job.type == "pull":
        return ScheduleKind.INTERVAL if job.interval else ScheduleKind.WAKEUP
    if job.type == "sink":
        return ScheduleKind.PASSIVE
    if job.snapshotting.type == "manual":
        return ScheduleKind.PASSIVE if job.type == "source" else ScheduleKind.WAKEUP
    return ScheduleKind.SNAPSHOTS


def next_pass_time(job: JobConfig, doc: dict[str, Any], ended: float, failed: bool) -> float | None:
    """When the daemon starts the job's next pass, judged by what the last one recorded in `doc`
    (its status entry). None: only a wakeup starts it."""
    kind = schedule_kind(job)
    if kind is ScheduleKind.INTERVAL:
        return ended + (job.interval or 0.0)
    if kind is not ScheduleKind.SNAPSHOTS:
        return None
    due = parse_iso(doc.get("next_snapshot_due"))
    retry = ended + DAEMON_RETRY_AFTER_ERROR
    filesystems = doc.get("filesystems") if isinstance(doc.get("filesystems"), dict) else {}
    assert isinstance(filesystems, dict)
    if failed and any(isinstance(fs, dict) and fs.get("snapshot_error") for fs in filesystems.values()):
        return min(retry, due) if due is not None and due > ended else retry  # a snapshot failed: soon again
    if due is not None and due > ended:
        return float(math.ceil(due))  # the status keeps whole seconds: never wake just before it is due
    snap = job.snapshotting
    regular: float | None = ended + snap.interval if snap.type == "periodic" else None
    if snap.type == "cron" and snap.cron is not None:
        with contextlib.suppress(ValueError, OverflowError):
            regular = snap.cron.next_after(ended, snap.timestamp_location)
    if regular is None:
        return retry
    # An overdue snapshot (it failed, or the filter selected nothing): soon, but not in a tight loop.
    return min(retry, regular) if failed or due is not None else regular


def _pass_problem(doc: dict[str, Any]) -> str:
    """What went wrong in the pass recorded in `doc` (its last_run), in one line."""
    last = doc.get("last_run") if isinstance(doc.get("last_run"), dict) else {}
    assert isinstance(last, dict)
    failures = last.get("failures") if isinstance(last.get("failures"), dict) else {}
    assert isinstance(failures, dict)
    return shorten(last.get("error") or "; ".join(f"{fs}: {why}" for fs, why in sorted(failures.items()))
                   or "the pass failed", 500).strip("'")


def mark_stopped(entry: dict[str, Any], reason: str, now: str | None) -> None:
    """A status entry of a job this process was running when it was stopped: the pass ended with
    `reason`, a filesystem that was being sent says so."""
    if entry.get("state") != "running" or entry.get("pid") != os.getpid():
        return
    last = entry.get("last_run") if isinstance(entry.get("last_run"), dict) else {}
    entry["last_run"] = {**(last or {}), "end": now, "result": "error", "error": reason}
    entry["state"] = "idle"
    entry.pop("activity", None)
    entry.pop("pid", None)
    replication = entry.get("replication")
    if isinstance(replication, dict) and isinstance(replication.get("filesystems"), dict):
        for rep in replication["filesystems"].values():
            if isinstance(rep, dict) and rep.get("state") == FilesystemState.STEPPING:
                rep.update(state=str(FilesystemState.STEP_ERROR), error=f"{rep.get('step', '')}: {reason}")


# ---- systemd notify --------------------------------------------------------------------------------

def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about the daemon's state: READY=1, RELOADING=1, STOPPING=1. A
    datagram to $NOTIFY_SOCKET (a path, or '@' for the abstract namespace); False when there is
    none or it cannot be reached (never fatal: the daemon runs on without systemd)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        path = "\0" + path[1:]
    elif not path.startswith("/"):
        return False  # unset, or a transport (vsock) this does not speak
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path.replace("\0", "@"), exc.strerror or exc)
        return False
    return True


def _reloading_notice(clock: Clock) -> str:
    # Type=notify-reload (systemd 253) wants the time of the reload with RELOADING=1.
    return f"RELOADING=1\nMONOTONIC_USEC={int(clock.monotonic() * 1_000_000)}"


# ---- the control socket: HTTP/1.1 on a unix socket -------------------------------------------------

CONTROL_READ_TIMEOUT = CONTROL_WRITE_TIMEOUT = 1.0  # seconds (zrepl's control server)
CONTROL_MAX_HEADER = 16 * 1024
CONTROL_MAX_BODY = 64 * 1024
CONTROL_MAX_CONNECTIONS = 512  # more at once are closed at once: the daemon's threads stay bounded
_HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
                 431: "Request Header Fields Too Large", 500: "Internal Server Error",
                 501: "Not Implemented", 503: "Service Unavailable"}

ControlHandler = Callable[[str, str, bytes], tuple[int, Any]]


class HttpError(ZreplError):
    """A control request that gets an error reply: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Outlet(Protocol):
    """Something the daemon serves while it runs (the control socket; metrics join later)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


def bind_private_unix_socket(path: str) -> socket.socket:
    """A listening unix socket only its owner (root) can connect to, in a private directory.
    A stale socket (nobody listens) is replaced; a live one means another daemon: SetupError."""
    ensure_private_dir(os.path.dirname(path) or ".")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SetupError(f"{path} exists and is not a socket (global.control.sockpath): remove it or choose "
                             f"another path")
        if _unix_socket_listens(path):
            raise SetupError(f"another daemon listens on {path} (global.control.sockpath): stop it first")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits in the backlog, not refused
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {path} (global.control.sockpath): {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def _unix_socket_listens(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


CONTROL_ENDPOINTS = ("/version", "/status", "/signal")


class ControlServer:
    """The control socket: one request per connection (Connection: close), JSON in and out. Each
    connection is served in a thread of its own with 1 s to send its request and 1 s to take the
    reply, so a client that sends nothing, too much, or reads nothing never holds up the daemon."""

    def __init__(self, path: str, handle: ControlHandler, read_timeout: float = CONTROL_READ_TIMEOUT,
                 write_timeout: float = CONTROL_WRITE_TIMEOUT, max_connections: int = CONTROL_MAX_CONNECTIONS):
        self.path, self.handle = path, handle
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self.refused = 0  # connections closed because max_connections were being served

    def start(self) -> None:
        self._sock = bind_private_unix_socket(self.path)
        self._sock.settimeout(0.5)  # the accept loop notices close() this soon
        threading.Thread(target=self._accept_loop, name="control socket", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed.is_set():
                    return
                log.warning("control socket: accept failed: %s", exc.strerror or exc)
                self._closed.wait(0.1)  # out of file descriptors: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                method, path, body = self._read_request(conn, time.monotonic() + self.read_timeout)
                endpoint = path if path in CONTROL_ENDPOINTS else "other"  # a bounded label set
                PROCESS_METRICS.request_begun(endpoint)
                started = time.monotonic()
                try:
                    status, reply = self.handle(method, path, body)
                finally:
                    PROCESS_METRICS.request_finished(endpoint, time.monotonic() - started)
            except HttpError as exc:
                status, reply = exc.status, {"error": str(exc)}
            except (TimeoutError, ConnectionError):
                return  # the client was too slow or went away: nobody to answer
            except Exception as exc:  # a bug answers 500, it never ends the daemon
                log.error("control socket: internal error: %s: %s", type(exc).__name__, exc)
                status, reply = 500, {"error": f"internal error: {type(exc).__name__}"}
            self._write(conn, status, reply)
        except OSError:
            pass
        finally:
            conn.close()
            self._slots.release()

    def _recv(self, conn: socket.socket, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionResetError
        return chunk

    def _read_request(self, conn: socket.socket, deadline: float) -> tuple[str, str, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > CONTROL_MAX_HEADER:
                raise HttpError(431, f"request header larger than {CONTROL_MAX_HEADER} bytes")
            data += self._recv(conn, deadline)
        head, _, body = data.partition(b"\r\n\r\n")
        if len(head) > CONTROL_MAX_HEADER:
            raise HttpError(431, f"request header larger than {CONTROL_MAX_HEADER} bytes")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "not an HTTP/1.x request line")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise HttpError(501, "chunked requests are not supported: send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or len(length_text) > 12:
            raise HttpError(400, "bad Content-Length")
        length = int(length_text)
        if length > CONTROL_MAX_BODY:
            raise HttpError(413, f"request body larger than {CONTROL_MAX_BODY} bytes")
        while len(body) < length:
            body += self._recv(conn, deadline)
        return parts[0], parts[1].split("?", 1)[0], body[:length]

    def _write(self, conn: socket.socket, status: int, reply: Any) -> None:
        payload = (json.dumps(reply, sort_keys=True, default=str) + "\n").encode()
        head = (f"HTTP/1.1 {status} {_HTTP_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        conn.settimeout(self.write_timeout)  # since 3.5: the whole sendall, not each send
        conn.sendall(head + payload)


class DaemonNotRunning(ZreplError):
    """Nobody listens on the control socket: no daemon runs (the caller falls back to the file)."""


def control_request(path: str, method: str, target: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One request to the daemon's control socket: (HTTP status, parsed JSON reply).
    Raises DaemonNotRunning when nobody listens, ZreplError for a broken reply."""
    payload = b"" if body is None else json.dumps(body).encode()
    request = (f"{method} {target} HTTP/1.1\r\nHost: zrepl\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        _connect_unix(sock, path, time.monotonic() + timeout)
        try:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
        except OSError as exc:
            raise ZreplError(f"the daemon did not answer on {path}: {exc.strerror or exc}") from None
    head, _, reply = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    try:
        return int(status_line[1]), json.loads(reply)
    except (IndexError, ValueError):
        raise ZreplError(f"the daemon on {path} sent a malformed reply") from None


def _connect_unix(sock: socket.socket, path: str, deadline: float) -> None:
    """connect(), waiting while the daemon's backlog is full (EAGAIN: it is busy, not gone)."""
    while True:
        try:
            sock.connect(path)
            return
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonNotRunning(f"no daemon listens on {path}") from None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ZreplError(f"the daemon's control socket {path} accepts no connection (too busy)") from None
            time.sleep(0.01)
        except OSError as exc:
            raise ZreplError(f"cannot reach the daemon's control socket {path}: {exc.strerror or exc} "
                             f"(it is root-only)") from None


# ---- the scheduler -------------------------------------------------------------------------------

@dataclass
class DaemonJob:
    """One job in the daemon: its runner (one per config generation), what starts it, when."""

    job: JobConfig
    runner: JobRunner
    kind: ScheduleKind
    generation: int
    next_run: float | None = None
    running: bool = False
    wakeup: bool = False  # a pass was asked for (queued while one runs)
    reset: str | None = None


StartThread = Callable[[str, Callable[[], None]], None]


def _start_thread(name: str, target: Callable[[], None]) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


class WakeupFlag:
    """threading.Event's set/clear/wait, safe to set from a signal handler. A handler runs in the
    main thread between two bytecodes, possibly while that thread holds the Event's lock (inside
    clear() or wait(), or a previous handler's set()): Event.set() there blocks on it forever, and
    the daemon hangs on SIGTERM. Here set() is one write to a pipe and nothing takes a lock."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for fd in (self._read, self._write):
            weakref.finalize(self, _proto_close, fd)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the flag is set already
            os.write(self._write, b"!")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def is_set(self) -> bool:
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (it stays set until clear()), False after `timeout` seconds."""
        readable, _, _ = select.select([self._read], [], [], timeout)
        return bool(readable)


class Daemon:
    """Runs the jobs of a config on their schedules until SIGTERM or SIGINT (see serve()).

    Injected: `store_for(config)` the status store, `load_config()` for SIGHUP, the clock,
    `start_thread` (tests run passes inline), `notify` (systemd), `stop_streams` (kills this
    process's zfs send/recv when a second signal stops it at once) and `exit_now`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, config: Config, zfs: Zfs, store_for: Callable[[Config], StatusStore],
                 load_config: Callable[[], Config], clock: Clock = SYSTEM_CLOCK,
                 start_thread: StartThread = _start_thread, notify: Callable[[str], Any] = sd_notify,
                 stop_streams: Callable[[], None] = lambda: None, exit_now: Callable[[int], Any] = os._exit):
        self.zfs, self.store_for, self.load_config, self.clock = zfs, store_for, load_config, clock
        self.start_thread, self.notify, self.stop_streams, self.exit_now = start_thread, notify, stop_streams, exit_now
        self.lock = threading.RLock()
        self.changed = WakeupFlag()  # set when tick() has something new to decide (also by on_signal)
        self.jobs: dict[str, DaemonJob] = {}
        self.generation = 0
        self.stopping: str | None = None
        self.started = clock.time()
        self.textfiles_due = self.started  # the first tick writes them
        self._signals: list[int] = []
        self.config, self.store = config, store_for(config)
        self._use_config(config)
        # What the daemon serves while it runs, started in this order and closed in reverse: the
        # control socket, then one Prometheus listener per `prometheus` outlet (global.monitoring;
        # a listen address change takes effect at restart, like the socket's path).
        self.outlets: list[Outlet] = [ControlServer(config.global_.control.sockpath, self.control)]
        self.outlets += [MetricsServer(o.listen, self.metrics_text, freebind=o.listen_freebind)
                         for o in config.global_.monitoring if o.type == "prometheus"]

    # -- config generations ----------------------------------------------------------------------
    def _use_config(self, config: Config) -> None:
        self.config, self.store = config, self.store_for(config)
        self.generation += 1
        self._apply_config(self.clock.time())

    def _apply_config(self, now: float) -> None:
        """Replace the jobs of older configs by the current one's, each at its idle point."""
        wanted = {j.name: j for j in self.config.jobs if schedule_kind(j) is not ScheduleKind.PASSIVE}
        for name, dj in list(self.jobs.items()):
            if dj.generation == self.generation or dj.running:
                continue
            if name in wanted:
                self.jobs[name] = self._new_job(wanted[name], now, dj)
            else:
                log.info("job %s: no longer in the config; the daemon stops scheduling it", name)
                del self.jobs[name]
        for name, job in wanted.items():
            if name not in self.jobs:
                self.jobs[name] = self._new_job(job, now, None)

    def _new_job(self, job: JobConfig, now: float, old: DaemonJob | None) -> DaemonJob:
        runner = JobRunner(self.config, job, self.zfs, self._publish, clock=self.clock)
        kind = schedule_kind(job)
        dj = DaemonJob(job, runner, kind, self.generation)
        if old is not None and old.kind == kind:
            dj.next_run, dj.wakeup, dj.reset = old.next_run, old.wakeup, old.reset
        else:  # a new job: the first pass at once (it snapshots only what is due)
            dj.next_run = now if kind in (ScheduleKind.SNAPSHOTS, ScheduleKind.INTERVAL) else None
        # GET /status shows the job's history from the start, not only after its first pass here
        runner.carry_over(old.runner.doc if old is not None else self.store.job(job.name))
        runner.doc["daemon"] = self._record(dj, DaemonState.WAITING if dj.next_run is not None
                                            else DaemonState.WAITING_FOR_WAKEUP)
        return dj

    def _publish(self, job: str, doc: dict[str, Any]) -> None:
        self.store.publish(job, doc)  # the store of the current config (a reload may change it)

    def _record(self, dj: DaemonJob, state: DaemonState, error: str | None = None) -> dict[str, Any]:
        record = DaemonRecord(state=state, pid=os.getpid(), next_run=iso_time(dj.next_run), error=error,
                              wakeup_queued=dj.wakeup and dj.running, reset=dj.reset)
        return document_to_json(record)

    def _set_record(self, dj: DaemonJob, state: DaemonState, error: str | None = None) -> None:
        # A new dict each time: a publish copying the doc in another thread never sees it change.
        dj.runner.doc["daemon"] = self._record(dj, state, error)

    # -- scheduling ------------------------------------------------------------------------------
    def tick(self) -> float | None:
        """One round of decisions: act on signals, apply a reloaded config where jobs are idle,
        start the passes that are due or woken up. Returns the seconds until the next scheduled
        pass (None: nothing is scheduled)."""
        self._handle_signals()
        now = self.clock.time()
        with self.lock:
            if self.stopping is None:
                self._apply_config(now)
            due = []
            for dj in self.jobs.values():
                if self.stopping is None and not dj.running and (
                        dj.wakeup or (dj.next_run is not None and dj.next_run <= now)):
                    dj.running, dj.wakeup = True, False
                    self._set_record(dj, DaemonState.RUNNING)
                    due.append(dj)
        for dj in due:
            self._publish(dj.job.name, dj.runner.doc)
            self.start_thread(f"job {dj.job.name}", self._pass_in_own_context(dj))
        textfiles = any(o.type == "textfile" for o in self.config.global_.monitoring)
        if textfiles and now >= self.textfiles_due:
            self.write_textfiles()
        with self.lock:  # a running job is timed when its pass ends (that wakes the loop)
            waits = [dj.next_run - now for dj in self.jobs.values() if not dj.running and dj.next_run is not None]
        if textfiles:
            waits.append(self.textfiles_due - now)
        return max(0.0, min(waits)) if waits else None

    def write_textfiles(self) -> None:
        """The node_exporter textfiles from the status document, now and again within
        DAEMON_TEXTFILE_INTERVAL (after every pass, and periodically while nothing runs)."""
        self.textfiles_due = self.clock.time() + DAEMON_TEXTFILE_INTERVAL
        write_metrics_textfiles(self.config.global_.monitoring, self.store, zfs=[self.zfs.counters])

    def running(self) -> list[DaemonJob]:
        with self.lock:
            return [dj for dj in self.jobs.values() if dj.running]

    def _pass_in_own_context(self, dj: DaemonJob) -> Callable[[], None]:
        context = contextvars.Context()  # the job's LOG_JOB stays in its pass (tests run passes inline)
        return lambda: context.run(self._pass, dj)

    def _pass(self, dj: DaemonJob) -> None:
        """One firing of a job (in its own thread): JobRunner.run under the job's lock (it runs
        once more for a wakeup file a `zrepl.py wakeup` without the socket left), then the wait."""
        LOG_JOB.set(dj.job.name)
        code: int | None = None
        error: str | None = None
        try:
            code = dj.runner.run()
        except SetupError as exc:
            log.error("%s", exc)
            error = str(exc)
        except Exception as exc:  # a bug outside the pass (the pass records its own): this job only
            log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            error = f"internal error: {type(exc).__name__}: {exc}"
        ended = self.clock.time()
        with self.lock:
            dj.running = False
            why: str | None
            if code is None and error is None:
                pid = JobLock(self.config.global_.runtime_dir, dj.job.name).holder_pid()
                dj.next_run = ended + DAEMON_BUSY_RETRY
                state, why = DaemonState.BUSY, f"another run (pid {pid or '?'}) holds the job"
                log.info("busy: %s; trying again at %s", why, iso_time(dj.next_run))
            else:
                failed = error is not None or code != EXIT_OK
                dj.next_run = next_pass_time(dj.job, dj.runner.doc, ended, failed)
                why = error or (_pass_problem(dj.runner.doc) if failed else None)
                state = (DaemonState.WAITING_AFTER_ERROR if failed else DaemonState.WAITING if dj.next_run
                         is not None else DaemonState.WAITING_FOR_WAKEUP)
            if self.stopping is not None:
                state, why = DaemonState.STOPPED, self.stopping
            self._set_record(dj, state, why)
        self._publish(dj.job.name, dj.runner.doc)
        self.write_textfiles()  # after every pass, as after every `run`
        self.changed.set()

    # -- signals ---------------------------------------------------------------------------------
    def on_signal(self, signum: int, frame: Any = None) -> None:
        """The signal handler: notes the signal for the loop; a second stopping signal acts at once."""
        if signum != signal.SIGHUP and self.stopping is not None:
            self._stop_at_once(signum)
            return
        if signum != signal.SIGHUP:
            self.stopping = f"stopped by {signal.Signals(signum).name}"
        self._signals.append(signum)
        self.changed.set()

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            else:
                self._begin_stop()

    def _begin_stop(self) -> None:
        """SIGTERM/SIGINT: no new passes; running replications are cancelled at a resumable point
        (the receiver keeps its resume token); the loop ends when the last pass has ended."""
        reason = self.stopping or "stopped"
        self.notify("STOPPING=1")
        running = self.running()
        log.warning("%s: %s", reason, f"cancelling {len(running)} running job(s) at a resumable point "
                    "(a second signal stops at once)" if running else "no job is running")
        for dj in running:
            dj.runner.cancel(reason)

    def _stop_at_once(self, signum: int) -> None:
        reason = f"stopped at once by a second signal ({signal.Signals(signum).name})"
        log.warning("%s", reason)
        now = iso_time(self.clock.time())

        def final() -> None:
            for dj in self.running():
                self.store.final_update(dj.job.name, lambda entry: mark_stopped(entry, reason, now))
        # In a thread, with a limit: this handler may have interrupted this thread inside a status
        # write that holds the store's lock; stopping at once must not wait on itself.
        closer = threading.Thread(target=self.store.close, args=(reason, final), name="final status", daemon=True)
        closer.start()
        closer.join(5.0)
        self.stop_streams()
        for handler in log.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        self.exit_now(128 + signum)

    def reload(self) -> None:
        """SIGHUP: a valid new config replaces the jobs at their next idle point; an invalid one is
        logged (with its key path) and the old one keeps running."""
        self.notify(_reloading_notice(self.clock))
        try:
            config = self.load_config()
        except ConfigError as exc:
            log.error("SIGHUP: the new config is not valid, the old one keeps running: %s", exc)
        else:
            if config.global_.control.sockpath != self.config.global_.control.sockpath:
                log.warning("SIGHUP: global.control.sockpath changed; the daemon keeps %s until it is restarted",
                            self.config.global_.control.sockpath)
            with self.lock:
                self._use_config(config)
            log.info("SIGHUP: config %s reloaded: %d job(s)", config.file, len(config.jobs))
        finally:
            self.notify("READY=1")

    # -- running -----------------------------------------------------------------------------------
    def serve(self, wait: Callable[[float], Any] | None = None) -> int:
        """The daemon's life (in the main thread: it installs the signal handlers). Returns 0
        after a stop by SIGTERM or SIGINT."""
        wait = wait or self.changed.wait
        saved = {signum: signal.signal(signum, self.on_signal) for signum in self.SIGNALS}
        started: list[Outlet] = []
        try:
            for outlet in self.outlets:
                outlet.start()
                started.append(outlet)
            self.notify("READY=1")
            log.info("daemon started (pid %d): %d scheduled job(s)", os.getpid(), len(self.jobs))
            while True:
                self.changed.clear()
                delay = self.tick()
                if self.stopping is not None and not self.running():
                    break
                wait(min(delay, DAEMON_MAX_SLEEP) if delay is not None else DAEMON_MAX_SLEEP)
        finally:
            for outlet in reversed(started):
                outlet.close()
            for signum, handler in saved.items():
                signal.signal(signum, handler)
        self._record_stop()
        return EXIT_OK

    def _record_stop(self) -> None:
        with self.lock:
            for dj in self.jobs.values():
                self._set_record(dj, DaemonState.STOPPED, self.stopping)
            jobs = list(self.jobs.values())
        for dj in jobs:
            self._publish(dj.job.name, dj.runner.doc)
        log.warning("%s: daemon exits", self.stopping or "stopped")

    # -- the control socket's requests ---------------------------------------------------------------
    def control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        routes: dict[str, tuple[str, Callable[[bytes], Any]]] = {
            "/version": ("GET", lambda _: self.version()), "/status": ("GET", lambda _: self.live_status()),
            "/signal": ("POST", self._signal_request)}
        if path not in routes:
            raise HttpError(404, f"no endpoint {path} (GET /version, GET /status, POST /signal)")
        want, handler = routes[path]
        if method != want:
            raise HttpError(405, f"{path} takes {want}")
        return 200, handler(body)

    def metrics_text(self) -> str:
        """The Prometheus text of the live status (what GET /status shows) and this process's counters."""
        return render_metrics(status_document(self.live_status()), PROCESS_METRICS, [self.zfs.counters])

    def version(self) -> dict[str, Any]:
        return {"version": __version__, "python": sys.version.split()[0], "pid": os.getpid(),
                "started": iso_time(self.started), "config": self.config.file}

    def live_status(self) -> dict[str, Any]:
        """The status document as the file has it, with the daemon's own jobs as they are now."""
        try:
            doc = self.store.read()
        except ZreplError:
            doc = {"version": STATUS_VERSION, "jobs": {}}
        with self.lock:
            live = {name: dj.runner.doc for name, dj in self.jobs.items()}
        for name, entry in live.items():
            try:
                fresh = json.loads(json.dumps(entry, default=str))  # a copy; a pass may change it meanwhile
            except (RuntimeError, ValueError):
                continue  # changed while copied: the file's entry (a second older) is good enough
            clients = _object_value(doc["jobs"].get(name), "clients")
            if clients is not None and "clients" not in fresh:
                fresh["clients"] = clients
            doc["jobs"][name] = fresh
        doc["updated"] = iso_time(self.clock.time())
        return doc

    def _signal_request(self, body: bytes) -> dict[str, Any]:
        try:
            request = json.loads(body or b"{}", parse_constant=_refuse_json_constant)
        except (ValueError, RecursionError):
            raise HttpError(400, "the body is not JSON: send {\"job\": NAME, \"op\": \"wakeup\"|\"reset\"}") from None
        if not isinstance(request, dict):
            raise HttpError(400, "the body must be an object: {\"job\": NAME, \"op\": \"wakeup\"|\"reset\"}")
        name, op = request.get("job", request.get("Name")), request.get("op", request.get("Op"))
        if not isinstance(name, str) or not isinstance(op, str):
            raise HttpError(400, "job and op must be strings")
        if op == "wakeup":
            return self.wakeup(name)
        if op == "reset":
            return self.reset(name)
        raise HttpError(400, f"operation {shorten(op, 40)} is invalid (wakeup or reset)")

    def _daemon_job(self, name: str) -> DaemonJob:
        dj = self.jobs.get(name)
        if dj is not None:
            return dj
        if any(j.name == name for j in self.config.jobs):
            raise HttpError(409, f"job {name!r} is passive: it serves when a client connects; signal the job that "
                                 f"connects to it")
        raise HttpError(404, f"no job named {shorten(name, 60)} in {self.config.file}")

    def wakeup(self, name: str) -> dict[str, Any]:
        """A pass now; while one runs, one more right after it (queued, never refused)."""
        with self.lock:
            if self.stopping is not None:
                raise HttpError(503, f"the daemon is stopping ({self.stopping})")
            dj = self._daemon_job(name)
            dj.wakeup = True
            queued = dj.running
            if queued:  # seen at once in GET /status; the file gets it with the pass's next publish
                self._set_record(dj, DaemonState.RUNNING)
        self.changed.set()
        return {"job": name, "op": "wakeup", "queued": queued}

    def reset(self, name: str) -> dict[str, Any]:
        """Cancel the job's current pass at a resumable point (and a queued wakeup)."""
        with self.lock:
            dj = self._daemon_job(name)
            running, dj.wakeup = dj.running, False
            when = iso_time(self.clock.time())
            dj.reset = f"{when}: " + ("cancelled the running pass (the receiver keeps its resume token)"
                                      if running else "nothing was running")
            record = dj.runner.doc.get("daemon")
            dj.runner.doc["daemon"] = {**(record if isinstance(record, dict) else {}), "reset": dj.reset,
                                       "wakeup_queued": False}
        if running:
            reason = f"reset by `zrepl.py signal reset` at {when}"
            log.warning("%s: cancelling the running pass", reason, extra={"job": name})
            dj.runner.cancel(reason)
        else:  # a running job's own thread publishes (it may be changing the entry right now)
            self._publish(name, dj.runner.doc)
        return {"job": name, "op": "reset", "cancelled": running}


def _object_value(entry: Any, key: str) -> Any:
    return entry.get(key) if isinstance(entry, dict) else None


# =================================================================================================
# 17. CLI
# =================================================================================================

# ---- logging --------------------------------------------------------------------------------------
#
# Every line names its job (LOG_JOB, set per job thread; extra={"job": ...} wins). The fields a log
# call passes with extra= (fs, snapshot, step, bytes) are columns in logfmt and json; the human
# format keeps them in the message.

LOG_FIELDS = ("job", "fs", "snapshot", "step", "bytes")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    job = getattr(record, "job", None) or LOG_JOB.get()
    fields = {"job": job} if job else {}
    for key in LOG_FIELDS[1:]:
        value = getattr(record, key, None)
        if value is not None:
            fields[key] = value
    return fields


def _message(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + formatter.formatException(record.exc_info)
    return text


class _HumanFormatter(logging.Formatter):
    """`2026-11-30T10:15:00+0100 WARNING job backup: ...`: local time with its zone, the job first."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created).astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")
        text = _message(self, record)
        job = _record_fields(record).get("job")
        if job and not (text.startswith((f"job {job}", f"{job}: ")) or f"job {job} " in text[:len(job) + 12]):
            text = f"job {job}: {text}"
        return f"{when} {record.levelname:<7} {text}"


def _logfmt_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' ="\\') or not text.isprintable()) else text


class _LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": iso_time(record.created), "level": record.levelname.lower(), **_record_fields(record),
                  "msg": _message(self, record)}
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": iso_time(record.created), "level": record.levelname.lower(),
                           **_record_fields(record), "msg": _message(self, record)})


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (zrepl.main called in-process
    by tests and tools replaces it), not to the stream it was created with. Clears a terminal's
    progress line first (TerminalProgress redraws it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        display = TerminalProgress.active
        if display is not None:
            display.clear()
        super().emit(record)


def _syslog_reachable(path: str = "/dev/log") -> str | None:
    """None when a syslog daemon listens on `path`, else why not. Python 3.11's SysLogHandler
    connects lazily and then prints a traceback for every record: we ask once, ourselves."""
    why = "no such socket"
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.connect(path)
            return None
        except OSError as exc:
            why = exc.strerror or str(exc)
        finally:
            sock.close()
    return f"{path}: {why}"


def _syslog_handler(facility: str) -> logging.Handler:
    import logging.handlers

    class SyslogOrStderr(logging.handlers.SysLogHandler):
        """Syslog that, once it fails (the daemon went away), says so once and writes to stderr."""

        fallback: logging.Handler | None = None

        def handleError(self, record: logging.LogRecord) -> None:
            if self.fallback is None:
                self.fallback = _StderrHandler()
                self.fallback.setFormatter(_HumanFormatter())
                self.fallback.setLevel(self.level)
                why = sys.exc_info()[1]
                print(f"zrepl.py: warning: cannot write to syslog ({why}); logging to stderr instead", file=sys.stderr)
            self.fallback.handle(record)

    handler = SyslogOrStderr(address="/dev/log", facility=facility)
    handler.setFormatter(logging.Formatter("zrepl.py[%(process)d]: %(levelname)s %(message)s"))
    return handler


class _JobFields(logging.Filter):
    """Puts the job (and missing fields) on every record, for formatters and syslog alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job", None) is None:
            record.job = LOG_JOB.get()
        return True


def setup_logging(outlets: Sequence[LoggingConfig], level_override: str | None = None) -> None:
    """Configure the `zrepl` logger from `[[global.logging]]` (stderr human|logfmt|json, or syslog).
    A syslog outlet without a syslog daemon gives one warning and logs to stderr instead."""
    log.handlers.clear()
    log.filters.clear()
    log.addFilter(_JobFields())
    log.propagate = False
    lowest = logging.ERROR
    for outlet in outlets:
        level = _LEVELS[level_override or outlet.level]
        lowest = min(lowest, level)
        handler: logging.Handler
        if outlet.type == "syslog" and (why := _syslog_reachable()) is None:
            handler = _syslog_handler(outlet.facility)
        else:
            if outlet.type == "syslog":
                print(f"zrepl.py: warning: no syslog daemon ({why}); logging to stderr instead", file=sys.stderr)
            handler = _StderrHandler()
            handler.setFormatter({"human": _HumanFormatter(), "logfmt": _LogfmtFormatter(),
                                  "json": _JsonFormatter()}[outlet.format])
        handler.setLevel(level)
        log.addHandler(handler)
    log.addHandler(PROCESS_METRICS.log_handler)  # zrepl_daemon_log_entries: what the outlets were given
    log.setLevel(lowest)


# ---- progress on a terminal -----------------------------------------------------------------------

class TerminalProgress:
    """An interactive `run` (stderr is a terminal) shows one line that updates while jobs work:
    per running job its step, or the filesystem being sent with bytes, rate and ETA. Fed by the
    jobs' status publishes; under cron or a timer (no terminal) there is none."""

    active: TerminalProgress | None = None  # the display log lines clear before they are written

    def __init__(self, stream: Any, clock: Callable[[], float] = time.monotonic, interval: float = 0.5):
        self.stream, self.clock, self.interval = stream, clock, interval
        self.lines: dict[str, str] = {}
        self._shown = False
        self._last = 0.0
        self._lock = threading.Lock()

    def wrap(self, publish: Publish) -> Publish:
        def publish_and_show(job: str, doc: dict[str, Any]) -> None:
            publish(job, doc)
            self.update(job, doc)
        return publish_and_show

    def update(self, job: str, doc: dict[str, Any]) -> None:
        line = progress_line(job, doc, utcnow())
        with self._lock:
            if line:
                self.lines[job] = line
            else:
                self.lines.pop(job, None)
            if self.clock() - self._last >= self.interval or not line:
                self._draw()

    def _draw(self) -> None:
        self._last = self.clock()
        text = " | ".join(self.lines.values())
        width = shutil.get_terminal_size((100, 24)).columns - 1
        try:
            self.stream.write("\r\x1b[K" + text[:width])
            self.stream.flush()
        except (OSError, ValueError):
            return
        self._shown = bool(text)

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("\r\x1b[K")
                    self.stream.flush()
                self._shown = False

    def __enter__(self) -> TerminalProgress:
        TerminalProgress.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
        TerminalProgress.active = None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def progress_line(job: str, doc: dict[str, Any], now: float) -> str:
    """A running job's progress in one line ('' when it is idle)."""
    if doc.get("state") != "running":
        return ""
    act = _object(doc.get("activity"))
    reports = _object(_object(doc.get("replication")).get("filesystems"))
    for fs, raw in sorted(reports.items()):
        rep = _report(raw)
        if rep.state == FilesystemState.STEPPING and act.get("step") == "replicating":
            rate, eta = _rate_eta(rep, now)
            text = f"{job}: {fs} {rep.step}: {format_size(rep.bytes_replicated)}"
            if rep.bytes_expected:
                text += f" of {format_size(rep.bytes_expected)} " \
                        f"({min(100, 100 * rep.bytes_replicated // max(rep.bytes_expected, 1))}%)"
            if rate:
                text += f", {format_size(rate)}/s"
            if eta is not None:
                text += f", ETA {format_duration(eta)}"
            return text
    return f"{job}: {act.get('step') or 'working'} {act.get('progress') or ''}".rstrip()


# ---- commands -------------------------------------------------------------------------------------

def _open_config(args: argparse.Namespace) -> Config:
    config = load_config(find_config_file(args.config))
    setup_logging(config.global_.logging, args.log_level)
    return config


def _snapshot_interval(job: JobConfig, now: float) -> float | None:
    """How long after its due time a job's snapshot counts as overdue: its interval (cron: the gap
    between its next two fire times)."""
    snap = job.snapshotting
    if job.type not in ("snap", "push", "source"):
        return None
    if snap.type == "periodic" and snap.interval > 0:
        return snap.interval
    if snap.type == "cron" and snap.cron is not None:
        try:
            first = snap.cron.next_after(now, snap.timestamp_location)
            return snap.cron.next_after(first, snap.timestamp_location) - first
        except (ValueError, OverflowError):
            return None
    return None


def _local_clients(config: Config, job: JobConfig) -> dict[str, str]:
    """A sink's or source's clients on the local transport: client identity -> the active job."""
    if job.serve is None or job.serve.type != "local":
        return {}
    return {j.connect.client_identity: j.name for j in config.jobs
            if j.connect is not None and j.connect.type == "local"
            and j.connect.listener_name == job.serve.listener_name}


def is_passive(job: JobConfig) -> bool:
    """Judged by its clients alone: a sink, and a source that takes no snapshots (it never runs)."""
    return job.type == "sink" or (job.type == "source" and job.snapshotting.type == "manual")


def configured_jobs(config: Config, now: float | None = None) -> ConfiguredJobs:
    now = utcnow() if now is None else now
    t = config.global_.status_thresholds
    return ConfiguredJobs(
        jobs={j.name: ConfiguredJob(type=j.type, passive=is_passive(j), snapshot_interval=_snapshot_interval(j, now),
                                    local_clients=_local_clients(config, j)) for j in config.jobs},
        **dataclasses.asdict(t))


def _status_store(config: Config) -> StatusStore:
    return StatusStore(config.global_.status_file, config.global_.runtime_dir, configured_jobs(config))


def _select_jobs(config: Config, names: Sequence[str]) -> list[JobConfig]:
    return [config.job(n) for n in names] if names else list(config.jobs)


def _need_zfs(args: argparse.Namespace) -> None:
    """A command that runs zfs fails early and clearly when there is none (cron's PATH is short)."""
    zfs = args.zfs
    if getattr(args, "real_zfs", False) and shutil.which(zfs.zfs_bin, path=os.environ.get("PATH")) is None:
        raise SetupError(f"{zfs.zfs_bin} not found in PATH; is OpenZFS installed? (PATH={os.environ.get('PATH', '')}; "
                         f"under cron set PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin in the "
                         f"crontab)")


def cmd_configcheck(args: argparse.Namespace) -> int:
    config = _open_config(args)
    if not args.quiet:
        kinds = ", ".join(f"{j.name} ({j.type})" for j in config.jobs)
        print(f"config OK: {config.file}: {len(config.jobs)} job(s){': ' + kinds if kinds else ''}")
    return EXIT_OK


# ---- running jobs: each in a thread of its own -----------------------------------------------------
#
# The jobs of one `run` proceed independently: each under its own lock, in its own thread, so an
# initial replication of terabytes never delays a snap job's due snapshot. The ZFS layer and the
# status store are safe for threads (the store serialises writes). A signal (SIGTERM, SIGINT,
# SIGHUP) records "stopped by SIGTERM" in the log and in every running job's status, stops the zfs
# streams the run started and exits 128 + the signal's number.

class _TrackedZfs(Zfs):
    """The real ZFS layer, remembering the streams (zfs send/recv) it started, so a stopped run
    does not leave them running on their own."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()
        self._streams_lock = threading.Lock()

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        proc = super().spawn(argv, **popen_kwargs)
        with self._streams_lock:
            self.streams.add(proc)
        return proc

    def stop_streams(self) -> None:
        with self._streams_lock:
            procs = list(self.streams)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()


@dataclass
class _JobThread:
    """One job of a run: its runner, its thread and what came of it (code None: it was busy)."""

    job: JobConfig
    runner: JobRunner
    thread: threading.Thread | None = None
    code: int | None = None
    error: BaseException | None = None
    started: float = 0.0
    ended: float | None = None


class _Stop:
    """The signals that stop a run, noted by the handler and acted on by the waiting main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._saved[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


class CancelOnSignals:
    """While entered (in the main thread), SIGTERM and SIGHUP cancel `cancel`'s target with "terminated
    by SIGTERM": the stdinserver records why its connection ended instead of vanishing.

    The handler only notes the signal and sets a WakeupFlag; a watcher thread makes the call. A
    handler runs in the main thread between two bytecodes, possibly while that thread holds a lock
    the cancel needs (the LaneMux's, a heartbeat Event's): calling it there blocks the process
    forever, holding its client lock, and every later connection of that client is refused."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, cancel: Callable[[str], None]):
        self._cancel = cancel
        self._signums: list[int] = []  # list.append takes no lock a handler could find held
        self._flag = WakeupFlag()
        self._saved: dict[int, Any] = {}
        self._watcher = threading.Thread(target=self._watch, name="stdinserver signals", daemon=True)

    def on_signal(self, signum: int, frame: Any = None) -> None:
        self._signums.append(signum)
        self._flag.set()

    def _watch(self) -> None:
        self._flag.wait()
        if self._signums:
            self._cancel(f"terminated by {signal.Signals(self._signums[0]).name}")

    def __enter__(self) -> CancelOnSignals:
        self._watcher.start()
        if threading.current_thread() is threading.main_thread():
            self._saved = {signum: signal.signal(signum, self.on_signal) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._flag.set()  # ends the watcher (no signal noted: it cancels nothing)
        self._watcher.join()


def _job_thread(item: _JobThread, previous: dict[str, Any] | None) -> None:
    LOG_JOB.set(item.job.name)
    item.started = time.monotonic()
    try:
        item.code = item.runner.run(previous=previous)
    except SetupError as exc:
        item.error = exc
    except Exception as exc:  # a bug outside a pass (the pass itself records its own): this job only
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        item.error, item.code = exc, EXIT_FAILED
    finally:
        item.ended = time.monotonic()


def run_jobs(config: Config, jobs: Sequence[JobConfig], zfs: Zfs, store: StatusStore, dry_run: bool = False,
             progress: TerminalProgress | None = None) -> list[_JobThread]:
    """Run the jobs at once, each in its own thread under its own lock; returns when all are done
    (or exits the process when a signal stops the run)."""
    publish: Publish = store.publish if progress is None else progress.wrap(store.publish)
    items = [_JobThread(job, JobRunner(config, job, zfs, publish, dry_run=dry_run)) for job in jobs]
    with _Stop() as stop:
        for item in items:
            previous = store.job(item.job.name)
            item.thread = threading.Thread(target=_job_thread, args=(item, previous), name=f"job {item.job.name}",
                                           daemon=True)
            item.thread.start()
        for item in items:
            assert item.thread is not None
            while item.thread.is_alive():
                item.thread.join(0.2)
                if stop.signum is not None:
                    _stopped_by_signal(stop.signum, items, zfs, store, dry_run)
    return items


def _stopped_by_signal(signum: int, items: list[_JobThread], zfs: Zfs, store: StatusStore, dry_run: bool) -> None:
    """Record the stop in the log and in each running job's status, stop the zfs streams, exit."""
    name = signal.Signals(signum).name
    reason = f"stopped by {name}"
    running = [item for item in items if item.thread is not None and item.thread.is_alive()]
    for item in running:
        log.warning("%s", reason, extra={"job": item.job.name})
    now = iso_time(utcnow())

    def mark(entry: dict[str, Any]) -> None:
        mark_stopped(entry, reason, now)

    if not dry_run:
        def final() -> None:
            for item in running:
                store.final_update(item.job.name, mark)
        store.close(reason, final)
    if isinstance(zfs, _TrackedZfs):
        zfs.stop_streams()
    if TerminalProgress.active is not None:
        TerminalProgress.active.clear()
    for handler in log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(128 + signum)


def _worst(items: list[_JobThread]) -> int:
    """The run's exit code: the worst of its jobs; a setup error of any job makes it 2 (raised)."""
    for item in items:
        if isinstance(item.error, SetupError):
            raise item.error
    return max((item.code for item in items if item.code is not None), default=EXIT_OK)


def cmd_run(args: argparse.Namespace) -> int:
    config = _open_config(args)
    jobs = _select_jobs(config, args.jobs)
    if args.jobs:
        for job in jobs:
            if job.type == "sink":
                raise UsageError(f"job {job.name!r} is a sink: it does not run, it serves when a client connects "
                                 f"(ssh: `zrepl.py stdinserver`; local: the push job's run); run the push job instead")
    else:
        jobs = [j for j in jobs if j.type != "sink"]  # passive: sinks run when a client connects
    _need_zfs(args)
    store = _status_store(config)
    interactive = not args.dry_run and _is_terminal(sys.stderr)
    with contextlib.ExitStack() as stack:
        display = stack.enter_context(TerminalProgress(sys.stderr)) if interactive else None
        items = run_jobs(config, jobs, args.zfs, store, args.dry_run, display)
    if not args.dry_run:
        write_metrics_textfiles(config.global_.monitoring, store, zfs=[args.zfs.counters])
    for item in items:
        if item.code is None:
            pid = JobLock(config.global_.runtime_dir, item.job.name).holder_pid()
            log.info("busy (another run, pid %s, holds the job); skipping", pid or "?", extra={"job": item.job.name})
        if args.dry_run and item.code is not None:
            print(render_dry_run(item.job, item.runner, verbose=args.verbose))
        elif interactive:
            print(_run_summary(item), file=sys.stderr)
    return _worst(items)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _run_summary(item: _JobThread) -> str:
    """One line per job after an interactive run."""
    if item.code is None:
        return f"{item.job.name}: busy (another run holds it)"
    took = format_duration((item.ended or item.started) - item.started)
    last = item.runner.doc.get("last_run") or {}
    if item.code == EXIT_OK:
        return f"{item.job.name}: ok ({took})"
    why = last.get("error") or "; ".join(f"{fs}: {e}" for fs, e in sorted((last.get("failures") or {}).items()))
    return f"{item.job.name}: FAILED ({took}): {shorten(why, 300).strip(chr(39))}"


def _rule_name(reason: str) -> str:
    return reason.split("(", 1)[0]


def _prune_summary_line(label: str, r: PruneResult) -> str:
    """`tank/data: keep 12 (grid 10, regex 2), destroy 3 (1 foreign), 1 foreign kept only by last_n`"""
    by_rule: dict[str, int] = {}
    for reasons in r.kept.values():
        key = _rule_name(reasons[0]) if reasons else "?"
        by_rule[key] = by_rule.get(key, 0) + 1
    rules = ", ".join(f"{k} {n}" for k, n in sorted(by_rule.items()))
    line = f"  {label}{r.dataset}: keep {len(r.kept)}" + (f" ({rules})" if rules else "")
    if r.destroyed:
        line += f", destroy {len(r.destroyed)}"
        if r.foreign_destroyed:
            line += f" ({len(r.foreign_destroyed)} foreign: not made by this job)"
    else:
        line += ", destroy none"
    if r.held:
        line += f", {len(r.held)} held"
    if r.foreign_at_risk:
        line += f", {len(r.foreign_at_risk)} foreign kept only by last_n"
    return line


def render_dry_run(job: JobConfig, runner: JobRunner, verbose: bool = False) -> str:
    """What a run would snapshot, send and destroy: a line per filesystem (keep N by rule, destroy
    M, foreign K), then, with `verbose`, each snapshot with the rule that keeps it."""
    lines = [f"job {job.name} ({job.type}), dry run:"]
    if not runner.last_batches and job.snapshotting.type != "manual":
        lines.append("  no snapshot due")
    for batch in runner.last_batches:
        if batch.snapshotted:
            lines.append(f"  would snapshot @{batch.name} in pool {batch.pool}: {', '.join(batch.snapshotted)}")
        for fs, why in batch.skipped.items():
            lines.append(f"  would NOT snapshot {fs}: {why}")
    repl = runner.last_replication
    if repl is not None:
        for plan in repl.plans:
            lines += ["  " + ln for ln in plan.describe().splitlines()]
        for what, size in repl.estimates.items():
            lines.append(f"  estimate {what}: {format_size(size) if size is not None else 'unknown'}")
    sides = [("", runner.last_prune), ("receiver ", runner.last_prune_receiver)]
    if runner.last_prune_receiver:
        sides[0] = ("sender ", runner.last_prune)
    for label, results in sides:
        if results:
            lines.append(f"  pruning{' the ' + label.strip() if label else ''}:")
        for r in results:
            lines.append("  " + _prune_summary_line("", r))
            if verbose:
                lines += ["      " + ln for ln in _prune_details(r)]
            elif r.destroyed:
                lines.append(f"      {_would_destroy(r)}")
    if (runner.last_prune or runner.last_prune_receiver) and not verbose:
        lines.append("  (-v: the rule that keeps each snapshot)")
    return "\n".join(lines)


DRY_RUN_NAMES_SHOWN = 10  # without -v: a filesystem with 300 victims gets one line, not 300


def _would_destroy(r: PruneResult) -> str:
    """One line for a filesystem's victims: `would destroy tank/data@a, @b, ... and 290 more (-v)`."""
    names = [f"@{snap}" + (" (foreign)" if snap in r.foreign_destroyed else "") for snap in r.destroyed]
    text = f"would destroy {r.dataset}" + ", ".join(names[:DRY_RUN_NAMES_SHOWN])
    if len(names) > DRY_RUN_NAMES_SHOWN:
        text += f" and {len(names) - DRY_RUN_NAMES_SHOWN} more (-v lists them)"
    return text


def _prune_details(r: PruneResult) -> list[str]:
    out = []
    for snap in r.destroyed:
        mark = " (foreign: not made by this job)" if snap in r.foreign_destroyed else ""
        out.append(f"would destroy {r.dataset}@{snap}{mark}")
    for snap, tags in r.held.items():
        out.append(f"keep {r.dataset}@{snap}: held by {', '.join(tags)}")
    at_risk = {f"{r.dataset}@{n}" for n in r.foreign_at_risk}
    for full, reasons in r.kept.items():
        mark = " (foreign: not made by this job, kept only by last_n)" if full in at_risk else ""
        out.append(f"keep {full}: {', '.join(reasons)}{mark}")
    out += [f"note: {note}" for note in r.notes]
    return out


def cmd_wakeup(args: argparse.Namespace) -> int:
    config = _open_config(args)
    job = config.job(args.job)
    if job.type == "sink":
        raise UsageError(f"job {job.name!r} is a sink: it serves when a client connects; wake up the push job")
    try:
        return _signal_daemon(config, job.name, "wakeup")
    except DaemonNotRunning:
        pass  # no daemon: this process runs the job (or asks the run that holds it for one more pass)
    _need_zfs(args)
    rt = config.global_.runtime_dir
    WakeupRequest(rt, job.name).post()  # first the request, then the lock: see WakeupRequest
    store = _status_store(config)
    items = run_jobs(config, [job], args.zfs, store)
    write_metrics_textfiles(config.global_.monitoring, store, zfs=[args.zfs.counters])
    if items[0].code is None and items[0].error is None:
        pid = JobLock(rt, job.name).holder_pid()
        print(f"job {job.name} is running (pid {pid or '?'}); it will run once more before it exits")
        return EXIT_OK
    return _worst(items)


# ---- the daemon -----------------------------------------------------------------------------------

def cmd_daemon(args: argparse.Namespace) -> int:
    config = _open_config(args)
    _need_zfs(args)
    zfs = args.zfs

    def load() -> Config:
        new = load_config(config.file)
        setup_logging(new.global_.logging, args.log_level)
        return new

    rt = config.global_.runtime_dir
    lock = JobLock(rt, "daemon", "")  # one daemon per runtime dir
    if not lock.try_acquire():
        raise SetupError(f"another daemon (pid {lock.holder_pid() or '?'}) runs with runtime dir {rt}")
    try:
        daemon = Daemon(config, zfs, _status_store, load,
                        stop_streams=zfs.stop_streams if isinstance(zfs, _TrackedZfs) else lambda: None)
        return daemon.serve()
    finally:
        lock.release()


def _signal_daemon(config: Config, job: str, op: str) -> int:
    """wakeup or reset through the control socket; raises DaemonNotRunning when no daemon runs."""
    code, reply = control_request(config.global_.control.sockpath, "POST", "/signal", {"job": job, "op": op})
    reply = _object(reply)
    if code != 200:
        raise ZreplError(f"the daemon refused {op} of job {job!r}: {reply.get('error') or f'HTTP {code}'}")
    if op == "reset":
        print(f"job {job}: " + ("its running pass is being cancelled (resumable state is kept)"
                                if reply.get("cancelled") else "nothing was running"))
    elif reply.get("queued"):
        print(f"job {job} is running in the daemon; it will run once more right after this pass")
    else:
        print(f"job {job}: the daemon runs it now")
    return EXIT_OK


def cmd_signal(args: argparse.Namespace) -> int:
    """zrepl's spelling: `signal wakeup JOB` is `wakeup JOB`; `signal reset JOB` needs the daemon."""
    if args.op == "wakeup":
        return cmd_wakeup(args)
    config = _open_config(args)
    config.job(args.job)
    try:
        return _signal_daemon(config, args.job, "reset")
    except DaemonNotRunning:
        raise ZreplError(f"no daemon runs (nobody listens on {config.global_.control.sockpath}): there is no "
                         f"work of job {args.job!r} to reset") from None


# ---- status ---------------------------------------------------------------------------------------

def _threshold(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _status_thresholds(args: argparse.Namespace, base: StatusThresholds) -> StatusThresholds:
    warn, crit = _threshold(args.warn, "--warn"), _threshold(args.crit, "--crit")
    result = dataclasses.replace(base, warn_no_success_after=warn if warn is not None else base.warn_no_success_after,
                                 crit_no_success_after=crit if crit is not None else base.crit_no_success_after)
    if result.crit_no_success_after < result.warn_no_success_after:
        given = " and ".join(o for o, v in (("--warn", warn), ("--crit", crit)) if v is not None)
        raise UsageError(f"contradictory thresholds ({given}): critical after "
                         f"{format_duration(result.crit_no_success_after)} comes before warning after "
                         f"{format_duration(result.warn_no_success_after)}; --crit must not be shorter than --warn")
    return result


def cmd_status(args: argparse.Namespace) -> int:
    """Nagios plugin conventions: one summary line with perfdata on stdout, the exit code its
    level; anything that keeps us from judging (usage, config, an unreadable document) is UNKNOWN.
    --watch redraws a terminal view; when stdout is no terminal it prints the plain summary once."""
    if args.watch is not None:
        if args.json:
            print("UNKNOWN: --watch and --json do not go together")
            return NAGIOS_UNKNOWN
        if _is_terminal(sys.stdout):
            return watch_status(args, sys.stdout)
    try:
        text, level = _status_report(args)
    except (ZreplError, OSError) as exc:
        print(f"UNKNOWN: {exc}")
        return NAGIOS_UNKNOWN
    print(text)
    return level


def _status_report(args: argparse.Namespace, watch_width: int = 0) -> tuple[str, int]:
    """The status text and level; watch_width > 0: status --watch's lines, cut to that width."""
    config: Config | None = None
    if args.status_file is not None:
        if not args.status_file:
            raise UsageError("--status-file: the file name is empty")
        path = args.status_file
        if args.config:
            config = _open_config(args)
    else:
        try:
            config = _open_config(args)
        except ConfigError as exc:
            if "Permission denied" in str(exc):
                raise ConfigError(f"{exc} (a user who may not read the config: `zrepl.py status --status-file "
                                  f"{GlobalConfig.status_file}`, or the config's global.status_file)") from None
            raise
        path = config.global_.status_file
    store = StatusStore(path, config.global_.runtime_dir if config else "")
    raw = _live_status(config) if config is not None and args.status_file is None else None
    raw = raw if raw is not None else store.read()
    doc = status_document(raw)
    health, types, thresholds = _status_health(args, config, doc)
    if watch_width:
        return "\n".join(watch_lines(health, types, watch_width)), worst_level(h.level for h in health)
    text, level = render_status(health, types, args.verbose, thresholds)
    if args.json:  # the document, with the check's verdict for scripts under "check"
        return json.dumps({**raw, "check": status_summary(health, types, text, level)}, indent=2,
                          sort_keys=True), level
    return text, level


def _live_status(config: Config) -> dict[str, Any] | None:
    """The running daemon's status document (GET /status), or None when no daemon answers."""
    try:
        code, reply = control_request(config.global_.control.sockpath, "GET", "/status", timeout=30.0)
    except DaemonNotRunning:
        return None
    except ZreplError as exc:
        log.warning("%s; reading the status file instead", exc)
        return None
    if code != 200 or not isinstance(reply, dict) or not isinstance(reply.get("jobs"), dict):
        log.warning("the daemon's status reply is not a status document (HTTP %s); reading the file instead", code)
        return None
    return reply


def _status_health(args: argparse.Namespace, config: Config | None,
                   doc: StatusDocument) -> tuple[list[JobHealth], dict[str, str], StatusThresholds]:
    now = utcnow()
    if config is not None:
        known = configured_jobs(config, now)
        mtime = os.stat(config.file).st_mtime if os.path.exists(config.file) else None
    else:
        known = doc.configured or ConfiguredJobs(
            jobs={n: ConfiguredJob(type=t if isinstance(t := _object(e).get("type"), str) else "?")
                  for n, e in doc.jobs.items()})
        mtime = None
    thresholds = _status_thresholds(args, known.thresholds())
    recorded = doc.configured.jobs if doc.configured else {}
    since: dict[str, float] = {}
    for name, spec in known.jobs.items():
        seen = recorded.get(name)
        when = parse_iso(seen.since) if seen and seen.type == spec.type else None
        if when is None and mtime is not None:
            when = mtime
        if when is not None:
            since[name] = when
    jobs = [(name, spec.type) for name, spec in known.jobs.items()]
    passive = [name for name, spec in known.jobs.items() if spec.passive]
    health = evaluate_status(doc, jobs, now, thresholds, passive, specs=known.jobs, since=since)
    return health, dict(jobs), thresholds


WATCH_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: plain ANSI, every terminal has it


def watch_status(args: argparse.Namespace, stream: Any, sleep: Callable[[float], None] = time.sleep,
                 rounds: int | None = None) -> int:
    """Redraw the status every args.watch seconds until Ctrl-C; returns the last level. The status
    file is read again each round, so a run in another process shows its progress."""
    level = NAGIOS_UNKNOWN
    shown = 0
    try:
        while rounds is None or shown < rounds:
            try:
                text, level = _status_report(args, shutil.get_terminal_size((100, 24)).columns)
            except (ZreplError, OSError) as exc:
                text, level = f"UNKNOWN: {exc}", NAGIOS_UNKNOWN
            stamp = dt.datetime.now().astimezone().strftime("%H:%M:%S")
            stream.write(f"{WATCH_CLEAR}{text}\n\n(every {format_duration(args.watch)}, {stamp}; Ctrl-C to quit)\n")
            stream.flush()
            shown += 1
            sleep(args.watch)
    except KeyboardInterrupt:
        stream.write("\n")
    return level


# ---- stdinserver ----------------------------------------------------------------------------------

def _refuse_stdio_client(message: str, temporary: bool = False, wait: float = 5.0) -> None:
    """Tell the ssh client on our stdin/stdout why it is not served: an ERROR frame, which it reports
    as "handshake refused: ...". Then wait briefly for it to hang up, so the frame is not lost when
    our exit closes the pipes before the client has read it."""
    if os.isatty(1):
        return
    payload = json.dumps({"error": message, "type": "ZreplError", "fatal": True, "temporary": temporary}).encode()
    view = memoryview(FRAME_HEADER.pack(FRAME_MAGIC, FRAME_ERROR, len(payload)) + payload)
    try:
        while view:
            view = view[os.write(1, view):]
    except OSError:
        return
    if os.isatty(0):
        return
    deadline = time.monotonic() + wait
    try:
        with selectors.PollSelector() as sel:  # poll, unlike epoll, takes any fd (even /dev/null)
            sel.register(0, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                if not os.read(0, 65536):
                    return
    except OSError:
        return


def cmd_stdinserver(args: argparse.Namespace) -> int:
    """The ssh forced command of a sink or source: serve one client on stdin/stdout, then exit.

    No daemon: sshd starts this per connection. The identity comes from authorized_keys (never from
    the client); it selects the job and, on a sink, the client's subtree root_fs/<identity>. stdout
    carries only the protocol; logs go to stderr (the client's ssh shows them) or syslog."""
    identity = args.identity
    try:
        config = _open_config(args)
        job = stdinserver_job(config, identity)
        LOG_JOB.set(job.name)
        _need_zfs(args)
        # ZREPL_STDINSERVER_LOCK_WAIT (seconds) shortens the wait for the previous connection (tests)
        wait = float(os.environ.get("ZREPL_STDINSERVER_LOCK_WAIT", STDINSERVER_LOCK_WAIT))
        lock = acquire_client_lock(config.global_.runtime_dir, job.name, identity, wait)
    except ZreplError as exc:
        _refuse_stdio_client(str(exc), temporary=isinstance(exc, ClientBusy))
        raise
    store = _status_store(config)
    error: str | None = None
    try:
        processes, progress = ProcessRegistry(), Progress()
        recorder = ClientRecorder(job, identity, store.update)
        handlers = recorder.wrap(passive_handlers(job, identity, args.zfs, processes, progress,
                                                  replication_guards(config),
                                                  client_listing_cache(config, job, identity)))
        conn = Connection.from_stdio(name=f"client {identity}")
        if job.type == "sink":
            conn.recv_limit = _bucket(job.recv.bandwidth_limit)
        else:
            conn.send_limit = _bucket(job.send.bandwidth_limit)
        log.info("job %s: serving client %s (pid %d)", job.name, identity, os.getpid())
        recorder.publish()
        try:
            with CancelOnSignals(conn.cancel):  # record the end instead of vanishing
                serve_connection(conn, handlers, identity=identity)
        except (ZreplError, OSError) as exc:
            error = str(exc).removeprefix(f"{conn.name}: ")
        except Exception as exc:  # a bug: record it, never a traceback on the client's terminal
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            processes.kill_all("the client connection ended")  # leftovers only: handlers wait for theirs
            conn.close()
            recorder.finished(error)
    finally:
        if lock is not None:
            lock.release()
    write_metrics_textfiles(config.global_.monitoring, store, zfs=[args.zfs.counters])
    c = recorder.connection
    if error:
        log.error("job %s: client %s: %s", job.name, identity, error)
        return EXIT_FAILED
    summary = f"{c['requests']} request(s), {c['transfers']} transfer(s), {format_size(c['bytes'])}"
    if c["result"] != "ok":
        log.warning("job %s: client %s done with %d failed request(s) (%s): %s", job.name, identity,
                    c["failed_requests"], summary, c["error"])
        return EXIT_FAILED
    log.info("job %s: client %s done: %s", job.name, identity, summary)
    return EXIT_OK


def cmd_test_filesystems(args: argparse.Namespace) -> int:
    config = _open_config(args)
    job = config.job(args.job)
    if job.filesystems is None:
        raise ConfigError(f"job {job.name!r} ({job.type}) has no filesystems filter")
    if args.input is not None:
        if not args.input:
            raise UsageError("--input: the dataset name is empty")
        try:
            names = [validate_dataset_name(args.input)]
        except ValueError as exc:
            raise UsageError(f"--input: {exc}") from None
    else:
        _need_zfs(args)
        listing = args.zfs.list_datasets(list_roots_for_filter(job.filesystems) if not args.all else [])
        names = sorted(listing)
    if not names:
        print("no datasets (the filter's roots do not exist; --all lists every pool)")
    for name in names:
        accepted, pattern = job.filesystems.explain(name)
        why = f"(pattern {pattern!r})" if pattern else "(no pattern matches)"
        print(f"{'ACCEPT' if accepted else 'REJECT'}\t{name}\t{why}")
    return EXIT_OK


def cmd_test_placeholder(args: argparse.Namespace) -> int:
    """The placeholders (zrepl:placeholder=on set on the dataset itself: an empty stand-in parent);
    with --all every dataset with its state, with --dataset that one."""
    _need_zfs(args)
    if args.dataset is not None:
        try:
            root = validate_dataset_name(args.dataset)
        except ValueError as exc:
            raise UsageError(f"--dataset: {exc}") from None
        listing = args.zfs.list_datasets([root], depth=0)
        names = [root] if root in listing else []
        if not names:
            raise ZreplError(f"dataset {root!r} does not exist")
    else:
        listing = args.zfs.list_datasets([])
        names = sorted(listing)
    placeholders = args.zfs.local_placeholders(names)
    shown = names if (args.all or args.dataset is not None) else [n for n in names if n in placeholders]
    if not shown:
        print("no placeholders (--all lists every dataset)")
    for name in shown:
        state = "placeholder" if name in placeholders else "not a placeholder"
        print(f"{name}\t{state}")
    return EXIT_OK


def cmd_test_decoderesumetoken(args: argparse.Namespace) -> int:
    """Decode a receive_resume_token (as zfs would, without running it) and print what it resumes."""
    if not re.fullmatch(r"[0-9a-zA-Z-]+", args.token):
        raise UsageError("--token: not a resume token (expected the receive_resume_token property's value)")
    try:
        decoded = args.zfs.decode_resume_token(args.token)
    except ZfsError as exc:  # decoded here, as zfs would: what it cannot decode is not a token
        raise UsageError(f"--token: not a resume token: {exc.stderr}") from None
    print(json.dumps({**dataclasses.asdict(decoded), "flags": sorted(decoded.flags)}, indent=2))
    return EXIT_OK


def list_abstractions(zfs: Zfs, roots: Sequence[str]) -> list[Abstraction]:
    """Every zrepl hold and bookmark below the roots (all pools when empty): one listing, then one
    `zfs holds` per 500 held snapshots."""
    listing = zfs.list_datasets(roots)
    found: list[Abstraction] = []
    held: list[Version] = []
    for ds in listing.values():
        found += bookmark_abstractions(ds)
        held += [v for v in ds.snapshots() if v.userrefs > 0]
    for i in range(0, len(held), 500):
        chunk = held[i:i + 500]
        tags = zfs.holds([v.full_name for v in chunk])
        for v in chunk:
            found += hold_abstractions(v, tags.get(v.full_name, []))
    return found


def cmd_zfs_abstractions(args: argparse.Namespace) -> int:
    """list | release-stale | release-all of zrepl's holds and bookmarks, for one job or all."""
    roots: list[str] = []
    if args.fs:
        try:
            roots = [validate_dataset_name(args.fs)]
        except ValueError as exc:
            raise UsageError(f"--fs: {exc}") from None
    _need_zfs(args)
    zfs = args.zfs
    found = list_abstractions(zfs, roots)
    if args.job:
        found = [a for a in found if a.job == args.job]
    if args.fs:
        found = [a for a in found if a.dataset == args.fs or is_descendant(a.dataset, args.fs)]
    if args.action == "list":
        chosen = found
    elif args.action == "release-stale":
        chosen = [a for job in sorted({a.job for a in found}) for a in stale_abstractions(found, job)]
    else:
        if not args.job and not args.fs:
            raise UsageError("release-all needs --job or --fs (it removes replication cursors: the next "
                             "replication may then need a full send)")
        chosen = found
    if args.json:
        print(json.dumps([dataclasses.asdict(a) for a in chosen], indent=2))
    elif not chosen:
        print("none" + (" to release" if args.action != "list" else ""))
    else:
        for a in chosen:
            what = f"hold {a.tag}" if a.is_hold else "bookmark"
            print(f"{a.type}\t{a.job}\t{a.full_name}\t{what}")
    if args.action != "list" and not args.dry_run:
        locks = _lock_abstraction_owners(args, {a.job for a in chosen})
        try:
            destroy_abstractions(zfs, chosen)
        finally:
            for lock in locks:
                lock.release()
    return EXIT_OK


def _lock_abstraction_owners(args: argparse.Namespace, jobs: set[str]) -> list[JobLock]:
    """Take the lock of every job of this host's config (a source's client: that client's lock)
    whose abstractions are about to go, so no run of it is between placing and using them."""
    try:
        config = load_config(find_config_file(args.config))
    except ConfigError as exc:
        log.warning("no usable config (%s): releasing without taking the jobs' locks", exc)
        return []
    owners: list[tuple[str, JobLock]] = []
    rt = config.global_.runtime_dir
    for job in config.jobs:
        if job.name in jobs:
            owners.append((job.name, JobLock(rt, job.name)))
        if job.type == "source" and job.serve is not None and job.serve.type == "stdinserver":
            for ident in job.serve.client_identities:
                if source_abstraction_job(job, ident) in jobs:
                    owners.append((f"{job.name} (client {ident})", JobLock.for_client(rt, job.name, ident)))
    held: list[JobLock] = []
    for name, lock in owners:
        if not lock.try_acquire():
            for other in held:
                other.release()
            raise ZreplError(f"job {name!r} is running (pid {lock.holder_pid() or '?'}): nothing was released; "
                             f"try again when it is idle")
        held.append(lock)
    return held


def cmd_version(args: argparse.Namespace) -> int:
    print(f"zrepl.py {__version__}")
    return EXIT_OK


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that exits with 2 and a one-line hint (usage errors are config-class errors), or
    with 3 and an UNKNOWN line on stdout for `status` (a Nagios check's usage error is UNKNOWN)."""

    usage_exit = EXIT_USAGE

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        if self.usage_exit == NAGIOS_UNKNOWN:
            print(f"UNKNOWN: usage error: {message}")
        raise SystemExit(self.usage_exit)


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--config, --log-level, --debug. The top-level parser has the defaults; each subcommand parser
    repeats the options without defaults (SUPPRESS), so `zrepl.py status --config F` works as well
    as `zrepl.py --config F status`, and a value given before the subcommand is not reset after it."""
    keep: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", metavar="FILE", help="config file (default: $ZREPL_CONFIG, "
                        "/etc/zrepl/zrepl.toml, /usr/local/etc/zrepl/zrepl.toml)", **keep)
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="override the configured log level (default: warn, quiet when all is well; "
                             "info: a line per step)", **keep)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors", **keep)


_EXIT_CODES = "exit codes: 0 all well, 1 some job or filesystem failed, 2 config, usage or setup error"
_HELP_TEXT = {
    "run": ("run jobs once: snapshot if due, replicate, prune (jobs run at once, each in its own thread)",
            f"{_EXIT_CODES}; 128+N stopped by signal N\n"
            "examples:\n  zrepl.py run --dry-run -v home   what would happen, and why each snapshot stays\n"
            "  zrepl.py run                      every job but sinks (from cron or a systemd timer)"),
    "status": ("summarize the status file for people and Nagios (exit code = level)",
               "exit codes (Nagios): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also usage errors, an unreadable "
               "config or status file)\n"
               "examples:\n  zrepl.py status -v\n  zrepl.py status --watch   a live view while a run replicates\n"
               "  zrepl.py status --status-file /var/lib/zrepl/status.json --crit 6h   (as a monitoring user, "
               "no config needed)"),
    "wakeup": ("run a job now, or make the running one do one more pass (through the daemon when one runs)",
               f"{_EXIT_CODES}; 0 when the running job was asked for one more pass\n"
               "example:\n  zrepl.py wakeup backup"),
    "daemon": ("run every job on its own schedule until SIGTERM (snapshots, replication, pruning; the control "
               "socket for status, wakeup and reset)",
               "signals: SIGTERM/SIGINT stop at a resumable point (exit 0; a second one stops at once), SIGHUP "
               "reloads the config\nexit codes: 0 stopped by a signal, 2 config or setup error\n"
               "example (systemd, Type=notify):\n  ExecStart=/usr/local/bin/zrepl.py daemon"),
    "signal": ("zrepl's spelling: wakeup or reset a job of the running daemon",
               "reset cancels the job's running pass at a resumable point (the receiver keeps its resume token)\n"
               f"{_EXIT_CODES}\nexamples:\n  zrepl.py signal wakeup backup\n  zrepl.py signal reset backup"),
    "stdinserver": ("serve one ssh client on stdin/stdout (the forced command in authorized_keys of a sink or "
                    "source host)",
                    "exit codes: 0 the client was served, 1 refused or failed, 2 config or setup error\n"
                    "example (authorized_keys):\n"
                    "  command=\"/usr/local/bin/zrepl.py stdinserver prod1\",restrict ssh-ed25519 AAAA... zrepl prod1"),
    "configcheck": ("validate the config and say what it holds",
                    "exit codes: 0 valid, 2 invalid (every problem is listed with its key path)\n"
                    "example:\n  zrepl.py configcheck --config zrepl.example.toml"),
    "test": ("inspect what a job would do (filesystems, placeholder, decoderesumetoken)",
             "exit codes: 0, 1 zfs failed, 2 usage or config error\n"
             "example:\n  zrepl.py test filesystems --job backup"),
    "filesystems": ("print ACCEPT/REJECT per dataset for a job's filter, with the deciding pattern",
                    "exit codes: 0, 1 zfs failed, 2 usage or config error\n"
                    "examples:\n  zrepl.py test filesystems --job backup\n"
                    "  zrepl.py test filesystems --job backup --input tank/data/new"),
    "placeholder": ("list the placeholders (empty stand-in parents, zrepl:placeholder=on)",
                    "exit codes: 0, 1 zfs failed or the dataset does not exist, 2 usage error\n"
                    "examples:\n  zrepl.py test placeholder\n  zrepl.py test placeholder --all"),
    "decoderesumetoken": ("decode a receive_resume_token (as zfs would, nothing runs)",
                          "exit codes: 0, 2 not a resume token\nexample:\n"
                          "  zrepl.py test decoderesumetoken --token \"$(zfs get -Hpo value receive_resume_token "
                          "backup/sink/host/tank/data)\""),
    "zfs-abstractions": ("list or release zrepl's holds and bookmarks",
                         "actions:\n  list           every step hold, last-received hold, replication cursor and "
                         "tentative cursor\n"
                         "  release-stale  per job, what no longer protects anything (all but the newest cursor, "
                         "older step holds, all but the newest last-received hold)\n"
                         "  release-all    everything of --job or --fs (the next replication may need a full send)\n"
                         "exit codes: 0, 1 zfs failed or a job is running, 2 usage error\n"
                         "examples:\n  zrepl.py zfs-abstractions list --job backup\n"
                         "  zrepl.py zfs-abstractions release-stale --dry-run"),
    "version": ("print the version", "exit code: 0\nexample:\n  zrepl.py version   (or zrepl.py --version)"),
}


def _watch_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds between 0.1 and 3600")
    return value


def _subparser(sub: Any, name: str, common: argparse.ArgumentParser, **kwargs: Any) -> argparse.ArgumentParser:
    text, epilog = _HELP_TEXT[name]
    return sub.add_parser(name, parents=[common], help=text, description=text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="zrepl.py", description="ZFS snapshots, replication and pruning (zrepl-compatible).",
                             epilog=f"{_EXIT_CODES} (status: Nagios codes)\nexamples:\n  zrepl.py configcheck\n"
                                    "  zrepl.py run --dry-run\n  zrepl.py status -v\n"
                                    "each command has its own --help",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"zrepl.py {__version__}")
    common = _ArgumentParser(add_help=False)
    _add_global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser, metavar="COMMAND")

    p = _subparser(sub, "run", common)
    p.add_argument("jobs", nargs="*", metavar="JOB", help="job names (default: every job but sinks, which serve "
                   "when a client connects)")
    p.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing (takes no lock)")
    p.add_argument("-v", "--verbose", action="store_true", help="dry run: each snapshot with the rule that keeps it")
    p.set_defaults(func=cmd_run)

    p = _subparser(sub, "status", common)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="details per job: filesystems (a table while running), hooks, pruning, recovery commands")
    p.add_argument("--json", action="store_true", help="print the status document with the verdict under \"check\" "
                   "(level, summary, per job the filesystems failing a check); the exit code is the level")
    p.add_argument("--warn", metavar="DURATION", help="warn when a job had no successful run for this long "
                   "(default: [global.status] warn_no_success_after, 2h)")
    p.add_argument("--crit", metavar="DURATION", help="critical when a job had no successful run for this long "
                   "(default: [global.status] crit_no_success_after, 6h)")
    p.add_argument("--status-file", metavar="FILE", help="read this status file and judge the jobs it records; "
                   "needs no config (for a monitoring user who may not read it)")
    p.add_argument("--watch", nargs="?", const=2.0, type=_watch_interval, metavar="SECONDS",
                   help="redraw a terminal view every SECONDS (default 2) until Ctrl-C: a line per job, problems "
                        "first, and per running filesystem a progress bar with bytes, rate and ETA; without a "
                        "terminal, the plain summary once")
    p.set_defaults(func=cmd_status)

    p = _subparser(sub, "wakeup", common)
    p.add_argument("job", metavar="JOB", help="the job to run (not a sink)")
    p.set_defaults(func=cmd_wakeup)

    p = _subparser(sub, "daemon", common)
    p.set_defaults(func=cmd_daemon)

    p = _subparser(sub, "signal", common)
    p.add_argument("op", choices=("wakeup", "reset"), metavar="OP", help="wakeup or reset")
    p.add_argument("job", metavar="JOB", help="the job")
    p.set_defaults(func=cmd_signal)

    p = _subparser(sub, "stdinserver", common)
    p.add_argument("identity", metavar="IDENTITY",
                   help="the client identity: one of a sink/source job's serve.client_identities")
    p.set_defaults(func=cmd_stdinserver)

    p = _subparser(sub, "configcheck", common)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the config is valid")
    p.set_defaults(func=cmd_configcheck)

    p = _subparser(sub, "test", common)
    tsub = p.add_subparsers(dest="test_command", required=True, parser_class=_ArgumentParser, metavar="WHAT")
    t = _subparser(tsub, "filesystems", common)
    t.add_argument("--job", required=True, metavar="JOB", help="the job whose filesystems filter to test")
    group = t.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="every dataset of every pool")
    group.add_argument("--input", metavar="FS", help="one dataset name (need not exist)")
    t.set_defaults(func=cmd_test_filesystems)

    t = _subparser(tsub, "placeholder", common)
    group = t.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="every dataset, each with its state")
    group.add_argument("--dataset", metavar="DS", help="one dataset")
    t.set_defaults(func=cmd_test_placeholder)
    t = _subparser(tsub, "decoderesumetoken", common)
    t.add_argument("--token", required=True, metavar="TOKEN", help="the receive_resume_token property's value")
    t.set_defaults(func=cmd_test_decoderesumetoken)

    p = _subparser(sub, "zfs-abstractions", common)
    p.add_argument("action", choices=("list", "release-stale", "release-all"), metavar="ACTION",
                   help="list, release-stale or release-all (see below)")
    p.add_argument("--job", metavar="JOB", help="only this job's abstractions (a source's client: JOB:IDENTITY)")
    p.add_argument("--fs", metavar="FS", help="only this dataset and its descendants")
    p.add_argument("--dry-run", action="store_true", help="show what would be released, change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_zfs_abstractions)

    p = _subparser(sub, "version", common)
    p.set_defaults(func=cmd_version)
    return parser


def _subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand in argv (before parsing, to choose how usage errors exit)."""
    it = iter(argv)
    for token in it:
        if token in ("--config", "--log-level"):
            next(it, None)
        elif not token.startswith("-"):
            return token
    return None


def main(argv: Sequence[str] | None = None, *, zfs: Zfs | None = None) -> int:
    """The command line. `zfs` replaces the ZFS layer (tests pass an in-process double)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    usage_exit = NAGIOS_UNKNOWN if _subcommand(argv) == "status" else EXIT_USAGE
    for each in [parser, *_all_subparsers(parser)]:
        each.usage_exit = usage_exit  # type: ignore[attr-defined]
    args = parser.parse_args(argv)
    args.real_zfs = zfs is None
    args.zfs = zfs if zfs is not None else _TrackedZfs()
    if not log.handlers:
        setup_logging([LoggingConfig()], args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"zrepl.py: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"zrepl.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SetupError as exc:
        print(f"zrepl.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ZreplError, ValueError) as exc:
        print(f"zrepl.py: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("zrepl.py: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, traceback only on request
        if args.debug:
            raise
        print(f"zrepl.py: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_all_subparsers(child)]
    return found


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before a command runs (main catches it from there on)
        sys.stderr.write("zrepl.py: interrupted\n")
        sys.exit(130)
