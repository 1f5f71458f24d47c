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
_JOB_AND_GUID_RE = re.compile(r"^(.+)_G_([0-9a-f]{16})_J_(.+)$")
# Characters ZFS accepts in a dataset/snapshot/bookmark name component.
_ZFS_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_\-:. ]+$")


def _check_job_for_names(job: str) -> None:
    """Job names end up inside hold tags and bookmark names: refuse ones ZFS would reject."""
    if not job or job in (".", "..") or not _ZFS_COMPONENT_RE.match(job):
        raise ValueError(f"job name {job!r} cannot be used in ZFS hold tags and bookmark names "
                         "(allowed: letters, digits, '_', '-', ':', '.', space; not '.' or '..')")


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
    """Hold tag -> (abstraction type, job), or None for a tag that is not ours."""
    for prefix, kind in ((_STEP_HOLD_PREFIX, ABSTRACTION_STEP_HOLD),
                         (_LAST_RECEIVED_HOLD_PREFIX, ABSTRACTION_LAST_RECEIVED_HOLD)):
        if tag.startswith(prefix) and len(tag) > len(prefix):
            return kind, tag[len(prefix):]
    return None


def parse_bookmark_abstraction(short_name: str) -> tuple[str, int, str] | None:
    """Bookmark name (after '#'; a full `fs#name` is accepted too) -> (type, guid, job), or None."""
    name = short_name.rsplit("#", 1)[-1]
    m = _JOB_AND_GUID_RE.match(name)
    if not m:
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
        def of(kind: str) -> list[Abstraction]:
            return sorted((a for a in items if a.type == kind), key=lambda a: (a.createtxg, a.name))
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
PLACEHOLDER_PROPERTY = "zrepl:placeholder"


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

    def protection_for(self, step: "Step") -> str:
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


@dataclass
class PlanError:
    """Why a filesystem cannot be replicated now. kind: diverged | no-common-base |
    receiver-has-data | conflict-fail | encryption. details always has `recovery_commands`
    (commands for a human, run on the receiver unless the message says otherwise; may be empty)."""

    message: str
    kind: str
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


@dataclass
class FilesystemPlan:
    """The decision for one filesystem: steps to run, or an error, or a single action.

    clear_resume_token: the resume token's source is gone; the runner runs `zfs recv -A` and
    replans. replace_placeholder: the first (full) step receives with -F into a placeholder.
    depends_on: a parent whose initial replication must run first; blocked_by: a parent whose
    plan failed, so this (not yet existing) child cannot be created now."""

    sender_fs: str
    receiver_fs: str
    receiver_exists: bool = False
    steps: list[Step] = field(default_factory=list)
    error: PlanError | None = None
    clear_resume_token: bool = False
    replace_placeholder: bool = False
    up_to_date: bool = False
    note: str = ""
    blocked_by: str | None = None
    depends_on: str | None = None

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
        lines = [f"{head}: {len(self.steps)} step(s)" + (" (replacing placeholder)" if self.replace_placeholder else "")]
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
    plan = FilesystemPlan(sender_fs=sender.name, receiver_fs=target, receiver_exists=receiver is not None)

    problem = check_send_encryption(settings.encrypted, settings.raw, dataset_is_encrypted(sender))
    if problem:
        plan.error = PlanError(f"{sender.name}: {problem}", "encryption", {"recovery_commands": []})
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
            "receiver-has-data",
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
            "no-common-base",
            {"receiver_snapshots": [r.name for r in rsnaps], "sender_snapshots": [s.name for s in snaps],
             "recovery_commands": [_q("zfs", "rename", target, aside)]})
        return plan

    source = _sender_version_with_guid(sender, common_recv.guid)
    assert source is not None
    pending = _newer_than(snaps, source)
    if common_recv is not rsnaps[-1]:
        plan.error = _diverged_error(plan, source, common_recv, pending, _newer_than(rsnaps, common_recv), settings)
        return plan

    if not pending:
        plan.up_to_date = True
        plan.note = f"up to date at {common_recv.name}"
        return plan
    plan.steps = _incremental_steps(source, pending)
    return plan


def _plan_initial(plan: FilesystemPlan, snaps: list[Version], settings: PlanSettings) -> FilesystemPlan:
    what = "is a placeholder" if plan.replace_placeholder else "does not exist"
    if settings.initial == "fail":
        plan.error = PlanError(
            f"{plan.receiver_fs} {what} and conflict_resolution.initial_replication = 'fail': not "
            f"replicating {plan.sender_fs}. Set it to 'most_recent' or 'all' to allow a full send.",
            "conflict-fail", {"sender_snapshots": [s.name for s in snaps], "recovery_commands": []})
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
    return PlanError(msg, "diverged", {
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


# ---- abstractions from listings (see section 2b for names and the stale rule) ----

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
