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

# One framed protocol for every transport. Design in short:
#
# * Every frame is `FRAME_HEADER` (magic, type, payload length) + payload. Control frames carry a JSON
#   object (at most MAX_HEADER_SIZE bytes); DATA frames carry raw stream bytes; HEARTBEAT is empty.
# * A connection starts with a HELLO exchange (protocol name, version, identity, fd acceptance).
#   Then the active side sends REQUESTs and the passive side answers each with RESPONSE or ERROR,
#   one request at a time.
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
# * Everything that waits goes through selectors with a wake-up pipe, so Connection.cancel() from
#   another thread makes the blocked call raise Cancelled promptly.
# * bandwidth limits (TokenBucket) apply to copying. A limited sender never passes its fd (it
#   copies DATA frames even over AF_UNIX) and a side with a receive limit announces in its HELLO /
#   REQUEST that it does not accept fds: forcing the copying path keeps one code path for limiting
#   instead of a limiter thread interposed between two pipes.

import array

PROTOCOL_NAME = "zrepl.py"
PROTOCOL_VERSION = 1
FRAME_MAGIC = b"ZRPL"
FRAME_HEADER = struct.Struct(">4sBI")  # magic, frame type, payload length
MAX_HEADER_SIZE = 1 << 20  # JSON payload limit of control frames
MAX_DATA_SIZE = 4 << 20  # payload limit of DATA frames (we send at most STREAM_CHUNK)
STREAM_CHUNK = 1 << 20  # bytes moved per DATA frame at most
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_PEER_TIMEOUT = 60.0
_PROTO_LIMIT_GRANULE = 128 << 10  # smallest grant worth waiting for under a bandwidth limit
_PROTO_MAX_FDS = 4  # ancillary space per read; a peer sending more is garbage

FRAME_HELLO = 1
FRAME_REQUEST = 2
FRAME_RESPONSE = 3
FRAME_ERROR = 4
FRAME_DATA = 5
FRAME_END = 6
FRAME_HEARTBEAT = 7
FRAME_FDPASS = 8
FRAME_ABORT = 9
FRAME_NAMES = {
    FRAME_HELLO: "HELLO", FRAME_REQUEST: "REQUEST", FRAME_RESPONSE: "RESPONSE", FRAME_ERROR: "ERROR",
    FRAME_DATA: "DATA", FRAME_END: "END", FRAME_HEARTBEAT: "HEARTBEAT", FRAME_FDPASS: "FDPASS",
    FRAME_ABORT: "ABORT",
}

# ssh stderr lines that mean "retrying will not help" (the rest of connection losses are temporary)
_PROTO_PERMANENT_MARKERS = (
    "Permission denied", "Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "command not found", "Bad configuration option", "No such file or directory",
)


class ProtocolError(ZreplError):
    """The conversation with the peer broke: garbage, version mismatch, or a lost connection.

    The connection is unusable afterwards. `temporary` tells the replication runner whether waiting
    for the network and reconnecting may help; `kind` is the request in progress (if any) and
    `peer` names the other side.
    """

    temporary: bool = False

    def __init__(self, message: str, *, kind: str | None = None, peer: str | None = None,
                 temporary: bool | None = None):
        self.message, self.kind, self.peer = message, kind, peer
        if temporary is not None:
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
    """Connection.cancel() was called (watchdog, `signal reset`, shutdown) while a call was blocked."""

    temporary = False


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
    said so) or the local consumer stopped reading. The connection stays usable."""

    def __init__(self, message: str, *, kind: str | None = None, temporary: bool = False):
        self.message, self.kind, self.temporary = message, kind, temporary
        super().__init__(f"request {kind!r}: {message}" if kind else message)


@dataclass
class WireFrame:
    """One decoded frame. DATA frames leave their payload (`length` bytes) unread in the socket."""

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


def _proto_fionread(fd: int) -> int | None:
    """Bytes readable without blocking (pipes, sockets, files), None where the kernel can't tell."""
    import termios
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


class Connection:
    """One protocol connection over a connected AF_UNIX socket (fds can be passed) or a pair of
    pipe fds (stdio, ssh). Create with local_pair(), Connection.from_stdio() or ssh_connect().

    Client side: handshake_client(), then request(). Server side: serve_connection() (or
    handshake_server() and the loop yourself). Attributes you may set before the handshake:
    `send_limit` / `recv_limit` (TokenBucket, bandwidth limits for streams), `progress` (called
    with the byte count of every stream chunk moved, from whichever thread moves it), `fd_passing`
    (False forces DATA frames even over AF_UNIX), `timeout` and `heartbeat_interval`.
    """

    def __init__(self, *, sock: socket.socket | None = None, rfd: int | None = None,
                 wfd: int | None = None, name: str = "peer", timeout: float = DEFAULT_PEER_TIMEOUT,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 child: subprocess.Popen | None = None, child_stderr: RingBuffer | None = None,
                 child_stderr_thread: threading.Thread | None = None, restore_blocking: bool = False):
        self._sock = sock
        if sock is not None:
            sock.setblocking(False)
            self._rfd = self._wfd = sock.fileno()
        else:
            if rfd is None or wfd is None:
                raise ValueError("Connection needs a socket or both rfd and wfd")
            self._rfd, self._wfd = rfd, wfd
        self._restore = ([(fd, os.get_blocking(fd)) for fd in {self._rfd, self._wfd}]
                         if restore_blocking else [])
        for fd in {self._rfd, self._wfd}:
            os.set_blocking(fd, False)
        self.name = name
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.send_limit: TokenBucket | None = None
        self.recv_limit: TokenBucket | None = None
        self.progress: Callable[[int], None] | None = None
        self.fd_passing = sock is not None and sock.family == socket.AF_UNIX
        self.stats = ConnectionStats()
        self.peer_hello: dict[str, Any] = {}
        self.identity: str | None = None
        self._child, self._child_stderr, self._child_stderr_thread = child, child_stderr, child_stderr_thread
        self._wake_r, self._wake_w = _proto_pipe()
        os.set_blocking(self._wake_w, False)
        self._send_lock = _OwnedLock()
        self._request_lock = threading.Lock()
        self._fd_queue: list[int] = []
        self._last_recv = self._last_write = time.monotonic()
        self._cancel_reason: str | None = None
        self._broken: BaseException | None = None
        self._closed = False
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._next_id = 1
        self._is_client = False
        self._current_kind: str | None = None
        self._stream_stop = False  # peer asked us to stop the stream we are sending
        self._stream_id: int | None = None  # request id of that stream (a late ABORT names an older one)
        self._early: WireFrame | None = None  # answer that arrived while we were still sending

    # ---- construction helpers -----------------------------------------------------------------

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
    def is_socket(self) -> bool:
        """True when fds can travel (a connected AF_UNIX socket)."""
        return self._sock is not None and self._sock.family == socket.AF_UNIX

    def _accepts_fds(self) -> bool:
        return self.is_socket and self.fd_passing and self.recv_limit is None

    def _may_pass_fd(self, peer_accepts: bool) -> bool:
        return peer_accepts and self.is_socket and self.fd_passing and self.send_limit is None

    # ---- lifecycle ----------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """Abort whatever this connection is doing, from any thread: every blocked call raises
        Cancelled promptly (the wake-up pipe stays readable). The connection is unusable after."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._hb_stop.set()
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def close(self) -> None:
        """Cancel, close the fds and stop the transport process (ssh) if there is one. Call it from
        the owning thread once nothing uses the connection; other threads use cancel()."""
        if self._closed:
            return
        self.cancel("connection closed")
        self._closed = True
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(timeout=2)
        for fd in self._fd_queue:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd_queue.clear()
        for fd, blocking in self._restore:
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
        if self._sock is not None:
            self._sock.close()
        elif self._child is not None:
            for f in (self._child.stdin, self._child.stdout):
                if f is not None:
                    f.close()
        else:
            for fd in {self._rfd, self._wfd}:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._child is not None:
            self._stop_child()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _stop_child(self) -> None:
        proc = self._child
        assert proc is not None
        try:
            proc.wait(timeout=1)  # ssh exits by itself once its stdin is closed
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._child_stderr_thread is not None:
            self._child_stderr_thread.join(timeout=2)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- errors -------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._cancel_reason is not None:
            raise Cancelled(f"{self.name}: {self._cancel_reason}")
        if self._closed:
            raise ProtocolError("connection is closed", peer=self.name)
        if self._broken is not None:
            raise ProtocolError(f"connection unusable after an earlier error: {self._broken}",
                                peer=self.name, temporary=getattr(self._broken, "temporary", False))

    def _cancelled(self) -> Cancelled:
        return Cancelled(f"{self.name}: {self._cancel_reason or 'cancelled'}")

    def _child_report(self) -> tuple[str, bool | None]:
        """What the transport process (ssh) said and whether it looks permanent."""
        proc = self._child
        if proc is None:
            return "", None
        try:
            rc = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            rc = None
        if self._child_stderr_thread is not None:
            self._child_stderr_thread.join(timeout=1)
        tail = self._child_stderr.text().strip()[-2000:] if self._child_stderr is not None else ""
        what = os.path.basename(str(proc.args[0] if isinstance(proc.args, (list, tuple)) else proc.args))
        state = "is still running" if rc is None else f"exited with status {rc}"
        permanent = any(m in tail for m in _PROTO_PERMANENT_MARKERS)
        return f"; {what} {state}" + (f": {tail}" if tail else ""), (False if permanent else None)

    def _lost(self, message: str, cls: type[ConnectionLost] = ConnectionLost) -> ConnectionLost:
        if self._cancel_reason is not None:
            raise self._cancelled()
        extra, temporary = self._child_report()
        err = cls(message + extra, kind=self._current_kind, peer=self.name, temporary=temporary)
        self._broken = self._broken or err
        return err

    def _fail_protocol(self, message: str) -> ProtocolError:
        """Tell the peer (best effort), mark the connection broken and return the error to raise."""
        err = ProtocolError(message, kind=self._current_kind, peer=self.name)
        if self._broken is None:
            self._broken = err
            self._send_error_best_effort({"error": message, "type": "ProtocolError", "fatal": True,
                                          "temporary": False, "kind": self._current_kind})
        return err

    def _send_error_best_effort(self, body: dict[str, Any]) -> None:
        if self._send_lock.owner == threading.get_ident() or not self._send_lock.acquire(timeout=1):
            return
        try:
            self._write_all(self._pack(FRAME_ERROR, body), deadline=time.monotonic() + 1)
            self.stats.count(self.stats.frames_sent, "ERROR")
        except ZreplError:
            pass
        finally:
            self._send_lock.release()

    def _timeout_error(self, deadline_hit: bool = False) -> ConnectionLost:
        if deadline_hit:
            return self._lost("no answer within the request timeout", PeerTimeout)
        return self._lost(f"nothing (not even a heartbeat) received from the peer for {self.timeout:g}s; "
                          "the peer or the network is gone", PeerTimeout)

    # ---- waiting ------------------------------------------------------------------------------

    def _wait(self, reads: Iterable[int], writes: Iterable[int], timeout: float | None,
              extra_wake: int | None = None) -> tuple[set[int], set[int]]:
        """Poll until one of the fds is ready, the timeout passes or cancel() is called."""
        if self._cancel_reason is not None:
            raise self._cancelled()
        masks: dict[int, int] = {}
        for fd in reads:
            masks[fd] = masks.get(fd, 0) | selectors.EVENT_READ
        for fd in writes:
            masks[fd] = masks.get(fd, 0) | selectors.EVENT_WRITE
        for fd in (self._wake_r, extra_wake):
            if fd is not None:
                masks[fd] = masks.get(fd, 0) | selectors.EVENT_READ
        sel = selectors.PollSelector()
        try:
            for fd, mask in masks.items():
                sel.register(fd, mask)
            ready = sel.select(None if timeout is None else max(0.0, timeout))
        finally:
            sel.close()
        if self._cancel_reason is not None:
            raise self._cancelled()
        readable = {key.fd for key, ev in ready if ev & selectors.EVENT_READ}
        writable = {key.fd for key, ev in ready if ev & selectors.EVENT_WRITE}
        return readable, writable

    def _credit_peer(self) -> None:
        """We were not listening (a handler or consumer ran): don't blame the peer for that time."""
        self._last_recv = max(self._last_recv, time.monotonic())

    def _wait_readable(self, deadline: float | None) -> None:
        now = time.monotonic()
        alive_until = self._last_recv + self.timeout
        limit = alive_until if deadline is None else min(alive_until, deadline)
        if limit <= now:
            raise self._timeout_error(deadline_hit=deadline is not None and deadline <= alive_until)
        self._wait([self._rfd], [], limit - now)

    # ---- reading ------------------------------------------------------------------------------

    def _read_some(self, n: int) -> bytes | None:
        """One non-blocking read of up to n bytes: b'' at EOF, None if nothing is there yet."""
        try:
            if self._sock is not None:
                data, anc, flags, _ = self._sock.recvmsg(
                    n, socket.CMSG_SPACE(_PROTO_MAX_FDS * 4), getattr(socket, "MSG_CMSG_CLOEXEC", 0))
                for level, ctype, cdata in anc:
                    if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                        self._fd_queue.extend(fds)
                        self.stats.fds_received += len(fds)
                if flags & socket.MSG_CTRUNC:
                    raise self._fail_protocol("peer sent more file descriptors than fit in one message")
            else:
                data = os.read(self._rfd, n)
        except BlockingIOError:
            return None
        except (ConnectionResetError, BrokenPipeError):
            raise self._lost("connection reset by peer") from None
        except OSError as e:
            if self._cancel_reason is not None:
                raise self._cancelled() from None
            raise self._lost(f"reading from the peer failed: {e.strerror}") from None
        if data:
            self._last_recv = time.monotonic()
        return data

    def _read_exact(self, n: int, *, deadline: float | None = None, allow_eof: bool = False,
                    what: str = "frame") -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            data = self._read_some(n - len(buf))
            if data is None:
                self._wait_readable(deadline)
                continue
            if not data:
                if not buf and allow_eof:
                    return None
                raise self._lost("connection closed by the peer"
                                 + (f" in the middle of a {what} (truncated frame)" if buf or what != "frame" else ""))
            buf += data
        return bytes(buf)

    def _garbage_hint(self, head: bytes) -> str:
        try:
            more = self._read_some(72) or b""
        except ZreplError:
            more = b""
        sample = (head + more).decode("utf-8", "replace")
        hint = ("the peer does not speak the zrepl.py protocol; over ssh make sure nothing (a shell rc "
                "file, a motd) prints to stdout before the forced command runs")
        return f"bad frame magic: expected {FRAME_MAGIC!r}, got {head[:4]!r} (data starts with {sample!r}): {hint}"

    def _read_frame(self, *, deadline: float | None = None, allow_eof: bool = False) -> WireFrame | None:
        """Read one frame; DATA payloads stay unread for the caller. Garbage -> ProtocolError."""
        if self._cancel_reason is not None:
            raise self._cancelled()
        head = self._read_exact(FRAME_HEADER.size, deadline=deadline, allow_eof=allow_eof)
        if head is None:
            return None
        magic, ftype, length = FRAME_HEADER.unpack(head)
        if magic != FRAME_MAGIC:
            raise self._fail_protocol(self._garbage_hint(head))
        name = FRAME_NAMES.get(ftype)
        if name is None:
            raise self._fail_protocol(f"unknown frame type {ftype}")
        self.stats.count(self.stats.frames_received, name)
        if ftype == FRAME_DATA:
            if not 0 < length <= MAX_DATA_SIZE:
                raise self._fail_protocol(f"DATA frame of {length} bytes (allowed 1..{MAX_DATA_SIZE})")
            return WireFrame(ftype, None, length)
        if length > MAX_HEADER_SIZE:
            raise self._fail_protocol(f"oversized {name} frame: {length} bytes, the limit is {MAX_HEADER_SIZE}")
        if ftype == FRAME_HEARTBEAT:
            if length:
                raise self._fail_protocol(f"HEARTBEAT frame with a {length} byte payload")
            return WireFrame(ftype, None, 0)
        payload = self._read_exact(length, deadline=deadline, what=f"{name} frame") if length else b""
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise self._fail_protocol(f"invalid JSON in {name} frame: {e}") from None
        if not isinstance(body, dict):
            raise self._fail_protocol(f"{name} frame header is not a JSON object but {type(body).__name__}")
        frame = WireFrame(ftype, body, length)
        if ftype == FRAME_FDPASS:
            if not self._fd_queue:
                raise self._fail_protocol("FDPASS frame arrived without a file descriptor")
            frame.fd = self._fd_queue.pop(0)
        return frame

    # ---- writing ------------------------------------------------------------------------------

    @staticmethod
    def _pack(ftype: int, body: dict[str, Any] | bytes | None) -> bytes:
        if isinstance(body, dict):
            payload = json.dumps(body, separators=(",", ":")).encode()
        else:
            payload = body or b""
        return FRAME_HEADER.pack(FRAME_MAGIC, ftype, len(payload)) + payload

    def _send_frame(self, ftype: int, body: dict[str, Any] | None = None, *, fds: list[int] | None = None,
                    service: bool = False) -> None:
        data = self._pack(ftype, body)
        if len(data) - FRAME_HEADER.size > MAX_HEADER_SIZE:
            raise ZreplError(f"{self.name}: refusing to send a {FRAME_NAMES[ftype]} header of "
                             f"{len(data)} bytes (limit {MAX_HEADER_SIZE})")
        with self._send_lock:
            self._write_all(data, fds=fds, service=service)
        self.stats.count(self.stats.frames_sent, FRAME_NAMES[ftype])

    def _write_all(self, data: bytes | memoryview, *, fds: list[int] | None = None, service: bool = False,
                   deadline: float | None = None) -> None:
        """Write everything (caller holds the send lock). With `service`, control frames from the
        peer are handled while we wait (stream sending); otherwise the peer must drain our data
        or show life (its unread bytes grow) within the timeout."""
        view = memoryview(data)
        alive_mark, probe = time.monotonic(), -1
        while view:
            if self._cancel_reason is not None:
                raise self._cancelled()
            try:
                if fds:
                    n = self._sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     array.array("i", fds))])  # type: ignore[union-attr]
                elif self._sock is not None:
                    n = self._sock.send(view)
                else:
                    n = os.write(self._wfd, view)
            except BlockingIOError:
                n = 0
            except (BrokenPipeError, ConnectionResetError):
                raise self._lost("connection closed by the peer while sending") from None
            except OSError as e:
                if self._cancel_reason is not None:
                    raise self._cancelled() from None
                raise self._lost(f"writing to the peer failed: {e.strerror}") from None
            if n:
                view = view[n:]
                fds = None  # the descriptors travel with the first byte
                self._last_write = alive_mark = time.monotonic()
                continue
            if service and self._early is None:
                self._stream_wait(write_fd=self._wfd)
                continue
            now = time.monotonic()
            pending = _proto_fionread(self._rfd)
            if probe == -1:
                probe = pending
            elif pending is not None and pending != probe:
                probe, alive_mark = pending, now  # the peer keeps talking: alive, just not reading yet
            limit = alive_mark + self.timeout if deadline is None else deadline
            if now >= limit:
                raise self._lost(f"the peer has not read anything for {limit - alive_mark:g}s", PeerTimeout)
            self._wait([], [self._wfd], limit - now)

    def _start_heartbeat(self) -> None:
        if self._hb_thread is None and self.heartbeat_interval > 0:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                               name=f"heartbeat {self.name}")
            self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        frame = FRAME_HEADER.pack(FRAME_MAGIC, FRAME_HEARTBEAT, 0)
        while not self._hb_stop.wait(min(1.0, self.heartbeat_interval / 2)):
            if self._broken is not None or self._closed:
                return
            if time.monotonic() - self._last_write < self.heartbeat_interval:
                continue
            if not self._send_lock.acquire(blocking=False):
                continue  # someone is writing: that is a sign of life already
            try:
                try:
                    n = self._sock.send(frame) if self._sock is not None else os.write(self._wfd, frame)
                except BlockingIOError:
                    continue  # the peer isn't reading, so it isn't waiting for us either
                except OSError:
                    return  # the owner notices the broken connection itself
                if n < len(frame):
                    self._write_all(frame[n:], deadline=time.monotonic() + self.timeout)
                self._last_write = time.monotonic()
                self.stats.count(self.stats.frames_sent, "HEARTBEAT")
            except ZreplError:
                return
            finally:
                self._send_lock.release()

    # ---- handshake ----------------------------------------------------------------------------

    def _hello(self, identity: str | None) -> dict[str, Any]:
        hello: dict[str, Any] = {"protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION,
                                 "software": __version__, "accept_fds": self._accepts_fds()}
        if identity is not None:
            hello["identity"] = identity
        return hello

    def _check_hello(self, body: dict[str, Any]) -> None:
        if body.get("protocol") != PROTOCOL_NAME:
            raise self._fail_protocol(f"peer is not a zrepl.py endpoint (protocol {body.get('protocol')!r})")
        version = body.get("version")
        if version != PROTOCOL_VERSION:
            peer, me = ("server", "client") if self._is_client else ("client", "server")
            raise self._fail_protocol(
                f"protocol version mismatch: the {peer} (zrepl.py {body.get('software', '?')}) speaks "
                f"version {version!r}, the {me} (zrepl.py {__version__}) speaks version {PROTOCOL_VERSION}; "
                "install the same zrepl.py on both hosts")

    def handshake_client(self, identity: str) -> dict[str, Any]:
        """Active side: introduce ourselves as `identity`; returns the server's HELLO body.
        Raises ProtocolError with the server's message when it refuses (e.g. version mismatch)."""
        self._check_usable()
        self._is_client = True
        try:
            self._send_frame(FRAME_HELLO, self._hello(identity))
            deadline = time.monotonic() + self.timeout
            while True:
                frame = self._read_frame(deadline=deadline)
                assert frame is not None
                if frame.type != FRAME_HEARTBEAT:
                    break
            if frame.type == FRAME_ERROR:
                msg = str((frame.body or {}).get("error", "no reason given"))
                self._broken = ProtocolError(f"handshake refused: {msg}", peer=self.name)
                raise self._broken
            if frame.type != FRAME_HELLO:
                raise self._fail_protocol(f"expected HELLO from the server, got {frame.name}")
            assert frame.body is not None
            self._check_hello(frame.body)
        except ConnectionLost as e:
            e.message = f"handshake failed: {e.message}"
            raise
        self.peer_hello, self.identity = frame.body, identity
        self._start_heartbeat()
        return frame.body

    def handshake_server(self, identity: str | None = None) -> str:
        """Passive side: read the client's HELLO, check the version, answer with ours. Returns the
        client identity: `identity` if given (stdinserver: it comes from the forced command and
        the client's claim is ignored), else the one the client sent (local transport)."""
        self._check_usable()
        frame = self._read_frame(deadline=time.monotonic() + self.timeout, allow_eof=True)
        if frame is None:
            raise self._lost("peer closed the connection before the handshake")
        if frame.type != FRAME_HELLO:
            raise self._fail_protocol(f"expected HELLO as the first frame, got {frame.name}")
        assert frame.body is not None
        self._check_hello(frame.body)
        if identity is None:
            claimed = frame.body.get("identity")
            if (not isinstance(claimed, str) or not 0 < len(claimed) <= 255
                    or any(ord(c) < 32 or c in "/@#" for c in claimed)):
                raise self._fail_protocol(f"invalid client identity {claimed!r}")
            identity = claimed
        self._send_frame(FRAME_HELLO, self._hello(None))
        self.peer_hello, self.identity = frame.body, identity
        self._start_heartbeat()
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

        Raises RemoteError (the handler failed; connection still usable), StreamError,
        ProtocolError / ConnectionLost / PeerTimeout (connection unusable) or Cancelled.
        """
        with self._request_lock:
            try:
                self._check_usable()
                if not self.peer_hello:
                    raise ProtocolError("request before handshake", kind=kind, peer=self.name)
            except ZreplError:
                if stream_in is not None:  # ownership passed to us: don't leak it
                    os.close(stream_in if isinstance(stream_in, int) else stream_in.fd)
                raise
            self._current_kind = kind
            try:
                return self._request(kind, body or {}, stream_in, stream_out, timeout,
                                     progress or self.progress)
            except (ProtocolError, Cancelled) as e:
                self._broken = self._broken or e
                raise
            finally:
                self._current_kind = None

    def _request(self, kind: str, body: dict[str, Any], stream_in: OutgoingStream | int | None,
                 stream_out: Callable[[dict[str, Any], IncomingStream], Any] | None,
                 timeout: float | None, progress: Callable[[int], None] | None) -> dict[str, Any]:
        out = OutgoingStream(stream_in) if isinstance(stream_in, int) else stream_in
        mode = None
        if out is not None:
            mode = "fd" if self._may_pass_fd(bool(self.peer_hello.get("accept_fds"))) else "data"
        accept_fd = stream_out is not None and self._accepts_fds()
        rid, self._next_id = self._next_id, self._next_id + 1
        self._credit_peer()
        try:
            self._send_frame(FRAME_REQUEST, {"id": rid, "kind": kind, "body": body, "stream": mode,
                                             "accept_fd": accept_fd})
        except BaseException:
            if out is not None:
                os.close(out.fd)
            raise
        early = self._send_stream(out, mode, progress, rid) if out is not None and mode else None
        reply = early or self._read_reply(rid, None if timeout is None else time.monotonic() + timeout)
        assert reply.body is not None
        if reply.type == FRAME_ERROR:
            raise self._remote_error(reply.body, kind)
        resp_body = reply.body.get("body", {})
        smode = reply.body.get("stream")
        if reply.body.get("id") != rid or not isinstance(resp_body, dict) or smode not in (None, "fd", "data"):
            raise self._fail_protocol(f"malformed RESPONSE header {reply.body!r:.200}")
        if smode == "fd" and not accept_fd:
            raise self._fail_protocol("peer passed a file descriptor we did not accept")
        if smode is not None:
            stream = IncomingStream(self, smode, kind, progress, rid)
            if stream_out is None:
                stream.discard()
                raise self._fail_protocol("peer answered with a stream to a request that expects none")
            try:
                stream_out(resp_body, stream)
            except BaseException:
                stream.discard()
                raise
            stream.finish()
        return resp_body

    def _read_reply(self, rid: int, deadline: float | None) -> WireFrame:
        while True:
            frame = self._read_frame(deadline=deadline)
            assert frame is not None
            if frame.type in (FRAME_HEARTBEAT, FRAME_ABORT):
                continue  # a late ABORT refers to a stream that has ended already
            if frame.type in (FRAME_RESPONSE, FRAME_ERROR):
                return frame
            raise self._fail_protocol(f"unexpected {frame.name} frame while waiting for the answer")

    def _remote_error(self, body: dict[str, Any], kind: str) -> ZreplError:
        msg = str(body.get("error", "no reason given"))
        if body.get("fatal"):
            err = ProtocolError(f"the peer rejected the request: {msg}", kind=kind, peer=self.name)
            self._broken = err
            return err
        return RemoteError(msg, kind=kind, peer=self.name, remote_type=str(body.get("type", "")),
                           temporary=bool(body.get("temporary")))

    # ---- sending streams ----------------------------------------------------------------------

    def _stream_wait(self, *, read_fd: int | None = None, write_fd: int | None = None,
                     timeout: float | None = None) -> tuple[set[int], set[int]]:
        """Wait for read_fd / write_fd while handling the peer's control frames (heartbeats,
        ABORT, an early answer). Returns the ready subsets; empty after a frame or a timeout."""
        now = time.monotonic()
        listen = self._early is None
        if listen:
            alive_left = self._last_recv + self.timeout - now
            if alive_left <= 0:
                raise self._timeout_error()
            timeout = alive_left if timeout is None else min(timeout, alive_left)
        reads = ([self._rfd] if listen else []) + ([read_fd] if read_fd is not None else [])
        readable, writable = self._wait(reads, [write_fd] if write_fd is not None else [], timeout)
        if listen and self._rfd in readable:
            frame = self._read_frame()
            assert frame is not None
            self._handle_stream_control(frame)
        return ({read_fd} & readable if read_fd is not None else set(),
                {write_fd} & writable if write_fd is not None else set())

    def _handle_stream_control(self, frame: WireFrame) -> None:
        if frame.type == FRAME_HEARTBEAT:
            return
        body = frame.body or {}
        if frame.type == FRAME_ABORT:
            if body.get("id") == self._stream_id:
                self._stream_stop = True
            return
        if frame.type == FRAME_ERROR and body.get("fatal"):
            self._broken = ProtocolError(f"the peer reported a protocol error: {body.get('error')}",
                                         kind=self._current_kind, peer=self.name)
            raise self._broken
        if self._is_client and frame.type in (FRAME_RESPONSE, FRAME_ERROR):
            self._early, self._stream_stop = frame, True
            return
        raise self._fail_protocol(f"unexpected {frame.name} frame while sending a stream")

    def _call_servicing(self, fn: Callable[[], str | None]) -> tuple[bool, str | None]:
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

        threading.Thread(target=run, daemon=True, name=f"stream finish {self.name}").start()
        try:
            while not self._stream_stop:
                readable, _ = self._stream_wait(read_fd=r)
                if readable:
                    return True, box.get("result")
            return False, None
        finally:
            os.close(r)

    def _send_stream(self, out: OutgoingStream, mode: str, progress: Callable[[int], None] | None,
                     rid: int) -> WireFrame | None:
        """Send the stream of request `rid` (FDPASS or DATA frames) and its END. Returns an answer
        that arrived early."""
        self._stream_stop, self._early, self._stream_id = False, None, rid
        fd_open = True
        try:
            if mode == "fd":
                with self._send_lock:
                    self._write_all(self._pack(FRAME_FDPASS, {}), fds=[out.fd], service=True)
                self.stats.count(self.stats.frames_sent, "FDPASS")
                self.stats.fds_sent += 1
                os.close(out.fd)  # the peer holds its own reference now
                fd_open = False
                total: int | None = None
                src_error = None
            else:
                total, src_error = self._copy_out(out.fd, progress)
            if self._stream_stop:
                status, error = "aborted", "the receiving side stopped the stream"
            elif src_error is not None:
                status, error = "error", src_error
            else:
                done, error = self._call_servicing(out.finish) if out.finish else (True, None)
                status = "aborted" if not done else ("error" if error else "ok")
            self._send_frame(FRAME_END, {"status": status, "error": error, "bytes": total}, service=True)
            return self._early
        finally:
            if fd_open:
                os.close(out.fd)
            self._stream_stop = False

    def _copy_out(self, src: int, progress: Callable[[int], None] | None) -> tuple[int, str | None]:
        """DATA frames from src until EOF or until the peer stops us. Returns (bytes sent, error
        reading the source or None)."""
        os.set_blocking(src, False)
        _proto_grow_pipe(src)
        counted = _proto_fionread(src) is not None  # know the frame size before moving the bytes
        use_splice = counted and hasattr(os, "splice")
        limit = self.send_limit
        total = 0
        while not self._stream_stop:
            readable, _ = self._stream_wait(read_fd=src)
            if not readable:
                continue
            if counted:
                want = min(_proto_fionread(src) or 0, STREAM_CHUNK)
                if want == 0:
                    break  # readable with nothing in it: EOF
            else:
                want = STREAM_CHUNK
            if limit is not None:
                granted, delay = limit.take(want, min(want, _PROTO_LIMIT_GRANULE))
                if not granted:
                    self._stream_wait(timeout=delay)
                    continue
                want = granted
            if counted:
                use_splice = self._send_counted_frame(src, want, progress, use_splice)
                moved = want
            else:
                try:
                    data = os.read(src, want)
                except BlockingIOError:
                    data = None
                except OSError as e:
                    return total, f"reading the stream source failed: {e.strerror}"
                moved = len(data) if data else 0
                if data:
                    with self._send_lock:
                        self._write_all(self._pack(FRAME_DATA, data), service=True)
                    self._count_data_sent(moved, progress)
                if limit is not None:
                    limit.give_back(want - moved)
                if data == b"":
                    break
            total += moved
        return total, None

    def _count_data_sent(self, n: int, progress: Callable[[int], None] | None) -> None:
        self.stats.count(self.stats.frames_sent, "DATA")
        self.stats.stream_bytes_sent += n
        if progress is not None:
            progress(n)

    def _send_counted_frame(self, src: int, n: int, progress: Callable[[int], None] | None,
                            use_splice: bool) -> bool:
        """One DATA frame of exactly n bytes that are already readable from src: the header first,
        then the payload spliced kernel-side (read/write where splice can't). Returns use_splice."""
        with self._send_lock:
            self._write_all(FRAME_HEADER.pack(FRAME_MAGIC, FRAME_DATA, n), service=True)
            left = n
            while left:
                if use_splice:
                    try:
                        k = os.splice(src, self._wfd, left, flags=_SPLICE_FLAGS)
                        self.stats.spliced_bytes += k
                    except BlockingIOError:
                        self._stream_wait(write_fd=self._wfd)
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        raise self._lost("connection closed by the peer while sending a stream") from None
                    except OSError as e:
                        if e.errno in _SPLICE_UNSUPPORTED or e.errno is None:
                            use_splice = False
                            continue
                        raise self._lost(f"sending the stream failed: {e.strerror}") from None
                else:
                    try:
                        data = os.read(src, left)
                    except BlockingIOError:
                        self._stream_wait(read_fd=src)
                        continue
                    if data:
                        self._write_all(data, service=True)
                    k = len(data)
                if k == 0:
                    # the frame header promised n bytes; the framing can't be repaired
                    raise self._fail_protocol("the stream source shrank while being sent")
                left -= k
                self._last_write = time.monotonic()
                self.stats.stream_bytes_sent += k
                if progress is not None:
                    progress(k)
        self.stats.count(self.stats.frames_sent, "DATA")
        return use_splice


class IncomingStream:
    """A stream arriving over a connection (the request's for a server handler, the response's in
    a client's stream_out callback).

    Use exactly one of: `open_fd()` -> an fd to give a subprocess as stdin (then close your copy);
    over AF_UNIX this is the passed pipe itself, otherwise a pipe fed by a pump thread;
    `copy_to(fd)` -> copy it into fd in the calling thread; `discard()`. Then `finish()` waits for
    the END and raises StreamError if the producer failed or the consumer stopped early.
    """

    def __init__(self, conn: Connection, mode: str, kind: str | None,
                 progress: Callable[[int], None] | None, rid: int):
        self.mode, self.kind, self.rid = mode, kind, rid
        self.nbytes = 0  # bytes copied (stays 0 when the fd was passed: Python never sees them)
        self.sender_status: str | None = None
        self.sender_error: str | None = None
        self.consumer_gone = False
        self._conn, self._progress = conn, progress
        self._fd: int | None = None
        self._opened = False
        self._done = False
        self._finished = False
        self._abandoned = False
        self._abort_sent = False
        self._consumer_error: str | None = None
        self._thread: threading.Thread | None = None
        self._pump_error: BaseException | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        if mode == "fd":
            while True:
                frame = conn._read_frame()
                assert frame is not None
                if frame.type != FRAME_HEARTBEAT:
                    break
            if frame.type != FRAME_FDPASS:
                raise conn._fail_protocol(f"expected FDPASS after announcing a passed stream, got {frame.name}")
            self._fd = frame.fd
        self._wake_r, self._wake_w = _proto_pipe()  # abandon() wakes a pump waiting for its consumer
        os.set_blocking(self._wake_w, False)

    @property
    def done(self) -> bool:
        """END has been received."""
        return self._done

    def open_fd(self) -> int:
        """An fd for a consumer's stdin. The caller owns it (close it after handing it over)."""
        if self._opened or self._abandoned:
            raise ZreplError("the stream was already opened or discarded")
        self._opened = True
        if self.mode == "fd":
            fd, self._fd = self._fd, None
            assert fd is not None
            return fd
        r, w = _proto_pipe()
        _proto_grow_pipe(w)
        os.set_blocking(w, False)
        self._thread = threading.Thread(target=self._pump_thread, args=(w,), daemon=True,
                                        name=f"stream pump {self._conn.name}")
        self._thread.start()
        return r

    def copy_to(self, fd: int) -> int:
        """Copy the whole stream into fd (a file or pipe; not closed) in this thread; returns the
        byte count. In fd mode the passed pipe is read and copied."""
        if self._opened or self._abandoned:
            raise ZreplError("the stream was already opened or discarded")
        self._opened = True
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
            self.finish()
            return self.nbytes
        self._pump(fd, close_dst=False)
        self.finish()
        return self.nbytes

    def abandon(self) -> None:
        """Stop consuming: the sender is told (ABORT) and the rest is discarded by finish()."""
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
        """Abandon and drain to END; only connection errors are raised."""
        self.abandon()
        try:
            self.finish()
        except StreamError:
            pass

    def finish(self) -> int:
        """Wait for END. Returns the bytes copied; raises StreamError (sender failed, or consumer
        stopped early), ProtocolError/ConnectionLost (connection broke) or Cancelled."""
        conn = self._conn
        if not self._finished:
            self._finished = True
            try:
                if self.mode == "fd":
                    if self._fd is not None and not self._opened:
                        self.abandon()
                    conn._credit_peer()
                    while not self._done:
                        frame = conn._read_frame()
                        assert frame is not None
                        if frame.type in (FRAME_HEARTBEAT, FRAME_ABORT):
                            continue
                        if frame.type != FRAME_END:
                            raise conn._fail_protocol(f"unexpected {frame.name} frame after a passed stream")
                        self._record_end(frame.body or {})
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
        if self.sender_status == "error":
            raise StreamError(f"the sending side failed: {self.sender_error}", kind=self.kind)
        if self._consumer_error is not None:
            raise StreamError(self._consumer_error, kind=self.kind)
        if self.consumer_gone:
            raise StreamError(f"the stream's consumer stopped reading after {self.nbytes} bytes", kind=self.kind)
        if self.sender_status == "aborted" and not self._abandoned:
            raise StreamError(f"the sending side aborted the stream: {self.sender_error}", kind=self.kind)
        return self.nbytes

    def _send_abort(self) -> None:
        if not self._abort_sent and not self._done:
            self._abort_sent = True
            self._conn._send_frame(FRAME_ABORT, {"id": self.rid,
                                                 "reason": "the receiving side stopped consuming the stream"})

    def _record_end(self, body: dict[str, Any]) -> None:
        status, count = body.get("status"), body.get("bytes")
        if status not in ("ok", "error", "aborted") or not (count is None or isinstance(count, int)):
            raise self._conn._fail_protocol(f"malformed END frame {body!r:.200}")
        if self.mode == "data" and status == "ok" and count != self.nbytes:
            raise self._conn._fail_protocol(f"stream length mismatch: the peer sent {count} bytes, "
                                            f"{self.nbytes} arrived")
        self.sender_status, self.sender_error = status, body.get("error")
        self._done = True

    def _pump_thread(self, dst: int) -> None:
        try:
            self._pump(dst, close_dst=True)
        except BaseException as e:  # re-raised by finish() in the owner's thread
            self._pump_error = e

    def _wait_pump(self, dst: int) -> None:
        """splice said EAGAIN: wait for the side that is not ready. The consumer's pace is not the
        peer's fault, so only waiting for the peer counts against the timeout."""
        conn = self._conn
        if (_proto_fionread(conn._rfd) or 0) > 0:
            conn._wait([], [dst], None, extra_wake=self._wake_r)
            conn._credit_peer()
        else:
            conn._wait_readable(None)

    def _pump(self, dst: int | None, *, close_dst: bool) -> None:
        """Read frames until END, moving DATA payloads into dst (discarding once abandoned or the
        consumer is gone)."""
        conn = self._conn
        use_splice = hasattr(os, "splice")
        limit = conn.recv_limit
        try:
            while not self._done:
                frame = conn._read_frame()
                assert frame is not None
                if frame.type in (FRAME_HEARTBEAT, FRAME_ABORT):
                    continue
                if frame.type == FRAME_END:
                    self._record_end(frame.body or {})
                    break
                if frame.type == FRAME_ERROR and (frame.body or {}).get("fatal"):
                    raise ProtocolError(f"the peer reported a protocol error: {(frame.body or {}).get('error')}",
                                        kind=self.kind, peer=conn.name)
                if frame.type != FRAME_DATA:
                    raise conn._fail_protocol(f"unexpected {frame.name} frame inside a stream")
                left = frame.length
                while left:
                    if dst is not None and (self._abandoned or self.consumer_gone or self._consumer_error):
                        if close_dst:
                            os.close(dst)
                        dst = None
                    if dst is None:
                        self._send_abort()
                        n = self._discard_some(left)
                        left -= n
                        continue
                    step = left
                    if limit is not None:
                        step, delay = limit.take(left, min(left, _PROTO_LIMIT_GRANULE))
                        if not step:
                            conn._wait([], [], delay, extra_wake=self._wake_r)
                            conn._credit_peer()
                            continue
                    try:
                        k = self._move(dst, step, use_splice)
                    except BlockingIOError:
                        k = -1
                    except OSError as e:
                        if use_splice and (e.errno in _SPLICE_UNSUPPORTED or e.errno is None):
                            use_splice = False  # e.g. socket -> regular file
                            k = -1
                        else:
                            raise
                    if limit is not None:
                        limit.give_back(step - max(k, 0))
                    if k < 0:
                        if dst is not None and not self.consumer_gone and self._consumer_error is None:
                            self._wait_pump(dst)
                        continue
                    if k == 0 and dst is not None and not self.consumer_gone and self._consumer_error is None:
                        raise conn._lost("connection closed by the peer in the middle of a stream")
                    left -= k
        finally:
            if close_dst and dst is not None:
                os.close(dst)

    def _count(self, k: int) -> None:
        self.nbytes += k
        self._conn.stats.stream_bytes_received += k
        if self._progress is not None:
            self._progress(k)

    def _move(self, dst: int, n: int, use_splice: bool) -> int:
        """Move up to n payload bytes from the connection into dst. Returns bytes consumed from the
        connection (-1 via BlockingIOError when nothing could move). A dead consumer flips
        consumer_gone and the bytes already taken are dropped."""
        conn = self._conn
        if use_splice:
            try:
                k = os.splice(conn._rfd, dst, n, flags=_SPLICE_FLAGS)
            except BrokenPipeError:
                self.consumer_gone = True
                return 0
            if k:
                conn._last_recv = time.monotonic()
                conn.stats.spliced_bytes += k
                self._count(k)
            return k
        data = conn._read_some(min(n, STREAM_CHUNK))
        if data is None:
            raise BlockingIOError
        if not data:
            return 0
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(dst, view):]
            except BlockingIOError:
                conn._wait([], [dst], None, extra_wake=self._wake_r)
                conn._credit_peer()
                if self._abandoned:
                    break
            except BrokenPipeError:
                self.consumer_gone = True
                break
            except OSError as e:
                self._consumer_error = f"writing the stream failed: {e.strerror}"
                break
        self._count(len(data))
        return len(data)

    def _discard_some(self, n: int) -> int:
        conn = self._conn
        data = conn._read_some(min(n, STREAM_CHUNK))
        while data is None:
            conn._wait_readable(None)
            data = conn._read_some(min(n, STREAM_CHUNK))
        if not data:
            raise conn._lost("connection closed by the peer in the middle of a stream")
        return len(data)


# ---- serving ------------------------------------------------------------------------------------

def serve_connection(conn: Connection, handlers: dict[str, Handler], *, identity: str | None = None) -> None:
    """Serve one connection until the client disconnects (returns normally).

    Handshakes first if not done (`identity` as in handshake_server). Each REQUEST goes to
    handlers[kind](body, ctx); a ZreplError from a handler becomes an ERROR answer (the
    connection goes on); any other exception too, logged as an internal error. Garbage from the
    peer (bad magic, unknown frame type, oversized header, truncated frame, invalid JSON, header
    not an object, unknown request kind) gets an ERROR frame and ends serving with ProtocolError.
    A dead peer raises ConnectionLost, cancel() raises Cancelled.
    """
    if not conn.peer_hello:
        conn.handshake_server(identity)
    while True:
        conn._credit_peer()
        frame = conn._read_frame(allow_eof=True)
        if frame is None:
            return
        if frame.type in (FRAME_HEARTBEAT, FRAME_ABORT):
            continue
        if frame.type != FRAME_REQUEST:
            raise conn._fail_protocol(f"expected a REQUEST frame, got {frame.name}")
        try:
            _serve_request(conn, frame.body or {}, handlers)
        finally:
            conn._current_kind = None


def _serve_request(conn: Connection, header: dict[str, Any], handlers: dict[str, Handler]) -> None:
    rid, kind, body = header.get("id"), header.get("kind"), header.get("body", {})
    smode, accept_fd = header.get("stream"), header.get("accept_fd", False)
    if (not isinstance(rid, int) or isinstance(rid, bool) or not isinstance(kind, str)
            or not isinstance(body, dict) or smode not in (None, "data", "fd")
            or (smode == "fd" and not conn._accepts_fds()) or not isinstance(accept_fd, bool)):
        raise conn._fail_protocol(f"malformed REQUEST header {header!r:.200}")
    conn._current_kind = kind
    handler = handlers.get(kind)
    if handler is None:
        raise conn._fail_protocol(f"unknown request type {kind!r}")
    incoming = IncomingStream(conn, smode, kind, conn.progress, rid) if smode else None
    ctx = RequestContext(kind=kind, identity=conn.identity or "", conn=conn, stream=incoming,
                         accept_fd=accept_fd)
    reply: Reply | None = None
    error: dict[str, Any] | None = None
    try:
        result = handler(body, ctx)
        reply = result if isinstance(result, Reply) else Reply({} if result is None else result)
        if not isinstance(reply.body, dict):
            raise TypeError(f"handler returned {type(reply.body).__name__}, not a dict")
        json.dumps(reply.body)  # unencodable answers are the handler's error, not a broken connection
    except (ProtocolError, Cancelled) as e:
        if conn._broken is not None or conn._cancel_reason is not None:
            raise  # our own connection broke: nothing more can be said on it
        error = {"error": str(e), "type": type(e).__name__, "temporary": bool(getattr(e, "temporary", False))}
    except ZreplError as e:
        error = {"error": str(e), "type": type(e).__name__, "temporary": bool(getattr(e, "temporary", False))}
    except Exception as e:  # a bug in a handler must not kill the server nor print a traceback
        log.error("internal error while handling %r: %s: %s", kind, type(e).__name__, e,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        error = {"error": f"internal error on the serving side: {type(e).__name__}: {e}",
                 "type": "InternalError", "temporary": False}
        if reply is not None and reply.stream is not None:
            os.close(reply.stream.fd)
            reply = None
    conn._credit_peer()
    if error is not None:
        conn._send_frame(FRAME_ERROR, {"id": rid, "kind": kind, "fatal": False, **error})
    else:
        assert reply is not None
        out = reply.stream
        mode = None if out is None else ("fd" if conn._may_pass_fd(accept_fd) else "data")
        try:
            conn._send_frame(FRAME_RESPONSE, {"id": rid, "body": reply.body, "stream": mode})
        except BaseException:
            if out is not None:
                os.close(out.fd)
            raise
        if out is not None and mode is not None:
            conn._send_stream(out, mode, conn.progress, rid)
    if incoming is not None and not incoming._finished:
        incoming.discard()  # the handler did not consume all of it; the client stops on our answer


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
            serve_connection(conn, self.handlers, identity=identity)
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
    closing the connection stops the process."""
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
                      heartbeat_interval=heartbeat_interval, child=proc, child_stderr=ring,
                      child_stderr_thread=thread)


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
