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

import bisect
import math
import zoneinfo

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
            raise ValueError(f"{what} {name!r} contains a control character ({ch!r})")
        if ch in "@#":
            raise ValueError(f"{what} {name!r} contains {ch!r}, which separates a dataset from a "
                             f"{'snapshot' if ch == '@' else 'bookmark'} name")
        raise ValueError(f"{what} {name!r} contains {ch!r}; ZFS allows only {_ZFS_ALLOWED_TEXT}")


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
        raise ValueError(f"dataset name {name!r} must not start or end with '/' "
                         f"(write 'pool/fs', not a mountpoint path)")
    _check_name_chars("dataset name", name, also_allowed="/")
    components = name.split("/")
    for comp in components:
        if comp == "":
            raise ValueError(f"dataset name {name!r} contains an empty component ('//')")
        if comp in (".", ".."):
            raise ValueError(f"dataset name {name!r} contains the component {comp!r}, which ZFS refuses")
        if len(comp) > ZFS_NAME_MAX:  # unreachable with the total limit, kept for clarity of intent
            raise ValueError(f"dataset name component {comp[:40]!r}... is longer than {ZFS_NAME_MAX} characters")
    pool = components[0]
    if not ("a" <= pool[0].lower() <= "z"):
        raise ValueError(f"pool name {pool!r} (in dataset name {name!r}) must start with a letter")
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
        raise ValueError(f"snapshot name {name!r} is not allowed")
    if "/" in name:
        raise ValueError(f"snapshot name {name!r} contains '/'; ZFS allows only {_ZFS_ALLOWED_TEXT}")
    _check_name_chars("snapshot name", name)
    return name


def split_version_name(full: str) -> tuple[str, str, str]:
    """'pool/fs@snap' -> ('pool/fs', '@', 'snap'); 'pool/fs#bm' -> ('pool/fs', '#', 'bm').
    Both parts are validated; ValueError if invalid."""
    if not isinstance(full, str):
        raise ValueError(f"snapshot or bookmark name must be a string, got {type(full).__name__}")
    seps = [i for i, ch in enumerate(full) if ch in "@#"]
    if not seps:
        raise ValueError(f"{full!r} is not a snapshot or bookmark name "
                         f"(expected 'pool/fs@name' or 'pool/fs#name')")
    if len(seps) > 1:
        raise ValueError(f"{full!r} contains more than one '@' or '#'")
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
                raise ValueError(f"filesystems pattern {pattern!r} must be a string")
            if not isinstance(value, bool):
                raise ValueError(f"filesystems pattern {pattern!r}: value must be true or false, got {value!r}")
            if pattern.count("<") > 1 or ("<" in pattern and not pattern.endswith("<")):
                raise ValueError(f"filesystems pattern {pattern!r}: '<' is allowed only once, at the end "
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
            raise ValueError(f"filesystems pattern {pattern!r} is not a valid dataset pattern: {e}") from None

    @classmethod
    def accept_all(cls) -> "DatasetFilter":
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

    def __repr__(self) -> str:
        return f"DatasetFilter({self._mapping!r})"


# ---- time zones and timestamp formats ----

def resolve_zone(location: str = "UTC") -> dt.tzinfo:
    """'UTC', 'Local' (the host's zone) or an IANA name like 'Europe/Berlin' -> tzinfo. ValueError if unknown."""
    if not isinstance(location, str) or not location:
        raise ValueError(f"time zone must be 'UTC', 'Local' or an IANA name like 'Europe/Berlin', "
                         f"got {location!r}")
    if location == "UTC":
        return dt.timezone.utc
    if location == "Local":
        return _local_zone()
    try:
        return zoneinfo.ZoneInfo(location)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {location!r}: use 'UTC', 'Local' or an IANA name "
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
        return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc


TIMESTAMP_FORMATS = ("dense", "human", "iso-8601", "unix-seconds")
# Formats without a zone offset would collide or go backwards across DST changes, so zrepl
# refuses them with any location but UTC; we do the same.
_UTC_ONLY_FORMATS = ("dense", "human", "unix-seconds")


def format_timestamp(fmt: str, when: float, location: str = "UTC") -> str:
    """Format unix time `when` the way zrepl names snapshots.

    dense `20060102_150405_000`, human `2006-01-02_15:04:05`, iso-8601 `2006-01-02T15:04:05.000Z`
    (`Z` in UTC, else the offset as `_0200` / `-0500`), unix-seconds, or any other string as a
    strftime pattern. A '+' of a zone offset becomes '_' (ZFS does not allow '+'); a literal '+'
    in a custom pattern is refused because it would be indistinguishable from that.
    """
    if not isinstance(fmt, str) or not fmt:
        raise ValueError("timestamp format must be a non-empty string")
    tz = resolve_zone(location)
    kind = fmt.lower()
    if kind in _UTC_ONLY_FORMATS and location != "UTC":
        raise ValueError(f"timestamp format {fmt!r} contains no zone offset and requires location 'UTC' "
                         f"(got {location!r}); use 'iso-8601' or a custom format with %z for local time")
    moment = dt.datetime.fromtimestamp(when, tz)
    if kind == "dense":
        return moment.strftime("%Y%m%d_%H%M%S") + "_000"
    if kind == "human":
        return moment.strftime("%Y-%m-%d_%H:%M:%S")
    if kind == "unix-seconds":
        return str(math.floor(when))
    if kind == "iso-8601":
        offset = moment.utcoffset() or dt.timedelta(0)
        zone = "Z" if offset == dt.timedelta(0) else moment.strftime("%z")
        return (moment.strftime("%Y-%m-%dT%H:%M:%S") + ".000" + zone).replace("+", "_")
    if "+" in fmt:
        raise ValueError(f"timestamp format {fmt!r} contains '+', which ZFS does not allow in names "
                         f"(a '+' of a zone offset from %z is replaced by '_' automatically)")
    try:
        text = moment.strftime(fmt)
    except ValueError as e:
        raise ValueError(f"timestamp format {fmt!r} is not a valid strftime pattern: {e}") from None
    return text.replace("+", "_")


def snapshot_name(prefix: str, fmt: str, when: float, location: str = "UTC") -> str:
    """prefix + timestamp, checked to be a valid snapshot name (the part after '@')."""
    name = prefix + format_timestamp(fmt, when, location)
    try:
        validate_snapshot_short_name(name)
    except ValueError as e:
        raise ValueError(f"prefix {prefix!r} with timestamp format {fmt!r} gives an invalid "
                         f"snapshot name: {e}") from None
    return name


def validate_timestamp_format(fmt: str, location: str = "UTC") -> None:
    """Raise ValueError unless `fmt`/`location` produce valid, changing snapshot names."""
    sample = 1136214245.0  # 2006-01-02 15:04:05 UTC (a Monday), Go's reference time
    later = sample + 400 * 86400 + 3661  # differs in year, month, day, weekday, hour, minute, second
    first = format_timestamp(fmt, sample, location)
    try:
        validate_snapshot_short_name(first)
    except ValueError as e:
        raise ValueError(f"timestamp format {fmt!r} gives an invalid snapshot name: {e}") from None
    if first == format_timestamp(fmt, later, location):
        raise ValueError(f"timestamp format {fmt!r} contains no date or time field: every snapshot "
                         f"would get the same name {first!r}")


# ---- cron specs ----

_CRON_FIELDS = (  # name, low, high, names
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}),
    ("day-of-week", 0, 7, {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}),
)
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_MONTH_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MINUTE = dt.timedelta(minutes=1)
_CRON_SEARCH_YEARS = 12  # Feb 29 schedules fire at least every 8 years


def _parse_cron_field(spec: str, text: str, index: int) -> tuple[frozenset[int], bool]:
    """One cron field -> (values, unrestricted?). Unrestricted = starts with '*' (Vixie's rule)."""
    name, low, high, names = _CRON_FIELDS[index]

    def number(tok: str) -> int:
        up = tok.upper()
        if names and up in names:
            return names[up]
        if not tok.isdigit():
            raise ValueError(f"{name} field {tok!r} is not a number{' or name' if names else ''} "
                             f"(in cron spec {spec!r})")
        value = int(tok)
        if not low <= value <= high:
            raise ValueError(f"{name} field {tok!r} out of range {low}-{high} (in cron spec {spec!r})")
        return value

    values: set[int] = set()
    for part in text.split(","):
        if part == "":
            raise ValueError(f"{name} field {text!r} has an empty list element (in cron spec {spec!r})")
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{name} field {part!r}: step must be a positive number (in cron spec {spec!r})")
            step = int(step_text)
        if rng in ("*", "?"):
            start, end = low, high
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start, end = number(a), number(b)
            if start > end:
                raise ValueError(f"{name} field {part!r}: range start is after its end (in cron spec {spec!r})")
        else:
            start = number(rng)
            end = high if slash else start  # 'a/n' means a-max/n
        values.update(range(start, end + 1, step))
    if index == 4 and 7 in values:  # 7 is another name for Sunday
        values.discard(7)
        values.add(0)
    return frozenset(values), text.startswith(("*", "?"))


@dataclass(frozen=True)
class CronSpec:
    """A 5-field cron schedule (minute hour day-of-month month day-of-week), evaluated in a time zone.

    Vixie semantics: when both day fields are restricted (neither starts with '*'), a day matches if
    EITHER matches. A fire time is every minute whose local wall-clock time matches (a repeated hour
    after a DST fall-back fires again); wall-clock times skipped by a DST jump forward fire once, at
    the instant of the jump, so a daily snapshot is never lost.
    """

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_unrestricted: bool
    weekdays_unrestricted: bool

    @classmethod
    def parse(cls, text: str) -> "CronSpec":
        if not isinstance(text, str):
            raise ValueError(f"cron spec must be a string, got {type(text).__name__}")
        spec = text.strip()
        expanded = _CRON_MACROS.get(spec.lower(), spec)
        fields = expanded.split()
        if len(fields) != 5:
            raise ValueError(f"cron spec {text!r} must have 5 fields (minute hour day-of-month month "
                             f"day-of-week), got {len(fields)}")
        parsed = [_parse_cron_field(spec, f, i) for i, f in enumerate(fields)]
        self = cls(spec, parsed[0][0], parsed[1][0], parsed[2][0], parsed[3][0], parsed[4][0],
                   parsed[2][1], parsed[4][1])
        # A day-of-month list that never exists in the chosen months would never fire (e.g. '0 0 31 2 *').
        # (With a restricted day-of-week, weekdays fire on their own, so only this case can be empty.)
        if self.weekdays_unrestricted:
            if not any(d <= _MONTH_MAX_DAYS[m - 1] for m in self.months for d in self.days):
                raise ValueError(f"cron spec {text!r} never fires: none of its days of the month exist "
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
        """The first fire time strictly after unix time `ts`, evaluated in `location`."""
        tz = resolve_zone(location)
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

    def last_at_or_before(self, ts: float, location: str = "UTC", max_days: int = 366) -> float | None:
        """The latest fire time <= unix time `ts` in `location`, looking back at most `max_days`."""
        tz = resolve_zone(location)
        t = math.floor(ts / 60) * 60.0
        horizon = ts - max_days * 86400
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

# (section 2b body)


# =================================================================================================
# 3. Keep rules
# =================================================================================================

def compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile a keep-rule regex (Python `re` syntax, searched unanchored). ValueError with re's message."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None


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


_GRID_ENTRY_RE = re.compile(r"^\s*(\d+)\s*x\s*([^()]*?)\s*(?:\((.*)\))?\s*$")


def _check_grid_order(intervals: Sequence[GridInterval], labels: Sequence[str]) -> None:
    """zrepl's rule: bucket lengths must not decrease, unless every bucket before is keep=all."""
    longest: float = 0
    all_keep_all = True
    for interval, label in zip(intervals, labels):
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
        label = f"{n} of {len(entries)} ({raw.strip()!r})"
        m = _GRID_ENTRY_RE.match(raw)
        if not m:
            raise ValueError(f"grid entry {label}: expected 'N x DURATION' with an optional '(keep=K)' "
                             f"or '(keep=all)', e.g. '24x1h'")
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
            elif value.isdigit():
                keep = int(value)
                if keep == 0:
                    raise ValueError(f"grid entry {label}: keep=0 is not allowed (a bucket must keep at "
                                     f"least 1 snapshot; leave the interval out instead)")
            else:
                raise ValueError(f"grid entry {label}: keep must be a positive number or 'all', got {value!r}")
        intervals.append(GridInterval(count, length, keep))
        labels.append(label)
    _check_grid_order(intervals, labels)
    return intervals


# ---- keep rules ----

@dataclass
class PruneContext:
    """Facts about the filesystem that rules may need: the sender's replication cursor (if any).
    Rules append human-readable notes (e.g. why nothing could be pruned)."""

    cursor_guid: int | None = None
    cursor_createtxg: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class PruneDecision:
    """Outcome for one filesystem: what stays (and which rules keep it), what goes, and notes."""

    keep: dict[str, list[str]]  # full snapshot name -> descriptions of rules that keep it
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
    Newest = latest creation, ties broken by name descending (as zrepl)."""

    count: int
    regex: str | None = None
    _re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count <= 0:
            raise ValueError(f"last_n count must be a positive integer, got {self.count!r}")
        _init_regex(self, self.regex)

    def keep(self, snapshots: list[Version], ctx: PruneContext) -> set[str]:
        matching = [s for s in _only_snapshots(snapshots) if self._re is None or self._re.search(s.name)]
        # Sort ascending by (creation, name), then take from the end: newest first, names descending.
        matching.sort(key=lambda s: (s.creation, s.name))
        return {s.full_name for s in matching[-self.count:]}

    def describe(self) -> str:
        return f"last_n(count={self.count}" + (f", regex={self.regex!r})" if self.regex is not None else ")")


@dataclass(frozen=True)
class KeepGrid(KeepRule):
    """grid: fits snapshots matching `regex` into buckets laid backwards from the youngest match.

    Bucket i covers (edge_i - length_i, edge_i]: a snapshot exactly on a boundary belongs to the older
    bucket. Each bucket keeps its `keep` oldest snapshots; matches older than the last bucket are not
    kept; non-matching snapshots are not kept by this rule (zrepl's algorithm).
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
        matching = [s for s in _only_snapshots(snapshots) if self._re.search(s.name)]
        if not matching:
            return set()
        now = max(s.creation for s in matching)
        # Edges from young to old: now, now - len_0, now - len_0 - len_1, ...; negated for bisect.
        lengths: list[float] = []
        keeps: list[int | None] = []
        for interval in self.intervals:
            lengths += [interval.length] * interval.count
            keeps += [interval.keep] * interval.count
        neg_edges = [-float(now)]
        for length in lengths:
            neg_edges.append(neg_edges[-1] + length)
        kept: set[str] = set()
        buckets: list[list[Version]] = [[] for _ in lengths]
        for s in matching:
            j = bisect.bisect_right(neg_edges, -float(s.creation))
            if j == 0:  # younger than now: cannot happen for matches, kept like zrepl would
                kept.add(s.full_name)
            elif j <= len(lengths):  # bucket j-1 covers (edge_j, edge_{j-1}]
                buckets[j - 1].append(s)
            # else: at or beyond the oldest edge -> not kept
        for bucket, keep in zip(buckets, keeps):
            bucket.sort(key=lambda s: (s.creation, s.createtxg, s.name))  # oldest first
            kept.update(s.full_name for s in (bucket if keep is None else bucket[:keep]))
        return kept

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
    Pure: no I/O, no clock (the grid measures age from the youngest matching snapshot).
    """
    ctx = ctx if ctx is not None else PruneContext()
    snaps = sorted(_only_snapshots(snapshots), key=lambda s: (s.createtxg, s.name))
    if not rules:
        ctx.notes.append("no keep rules: keeping every snapshot")
        return PruneDecision({s.full_name: ["no keep rules"] for s in snaps}, [], list(ctx.notes))
    reasons: dict[str, list[str]] = {s.full_name: [] for s in snaps}
    for rule in rules:
        description = rule.describe()
        for name in rule.keep(snaps, ctx):
            if name in reasons:
                reasons[name].append(description)
    keep = {name: why for name, why in reasons.items() if why}
    destroy = [s for s in snaps if not reasons[s.full_name]]
    return PruneDecision(keep, destroy, list(ctx.notes))


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
