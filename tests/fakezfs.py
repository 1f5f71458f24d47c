"""An in-process ZFS double: `FakeZfs(zrepl.Zfs)` answers the argv zrepl.py builds from a small
in-memory `World`, with the output, error texts and exit codes of OpenZFS 2.3.

It overrides only the two process methods of `zrepl.Zfs` (`run` and `spawn`), so everything above
them (argv builders, the listing parser, error classification, endpoints, the protocol) is the
real code. `spawn` returns a Popen-like `FakeProcess` whose stdin/stdout/stderr are real pipes, so
the protocol can splice them or pass their file descriptors; the command runs in a thread.

    fake = FakeZfs()
    w = fake.world
    w.tree("src", "data @a @b\\ndata/child @a")   # the tree grammar of support.parse_tree_spec
    w.tree("dst", "sink")
    ... zrepl runs against `fake` ...
    assert fake.calls[0][:2] == ["zfs", "list"]   # every argv, in order (setup is not recorded)
    assert w.snapshots("dst/sink/client1/src/data") == ["b"]

What the world models: pools and datasets (filesystems and volumes) with guid, createtxg,
creation and properties with their source (local, received, inherited from X, default; user
properties such as zrepl:placeholder are inherited as `zfs get` shows them, by snapshots too);
snapshots (guid, createtxg, creation, holds) and bookmarks; data written since a snapshot
(`write`, so "modified since the most recent snapshot" and stream sizes exist); encryption
(encryption, encryptionroot, keystatus; raw sends keep the ciphertext); resumable receive state
with byte-identical OpenZFS resume tokens (a native nvlist, zlib, fletcher-4: `encode_token`).
One global txg counter (each changing command is one txg) and an injectable clock for creation
times.

Commands and texts: list, get, set, inherit, create, snapshot, destroy (snapshots in batches,
-nv, bookmarks), bookmark, hold, release, holds, send (full, -i, -I, from bookmarks, -n -v -P
estimates, -v -P progress on stderr, -t, -n -v -t token contents), recv (-u -s -F -x -o, full,
incremental, resume, -A). The texts were taken from OpenZFS 2.3.2 in the test guest: every
refusal zrepl can meet (destination exists, has snapshots, modified since most recent snapshot,
does not match incremental source, partially-complete state, held snapshots, missing datasets,
corrupt tokens, cut streams). Where a message was not observed it is marked "approximate" below.

Not modelled (a command that needs it raises `Unsupported`, loudly, instead of guessing):
recursive flags (-r, -R), -d/-e receive targets, clones, rename, rollback, zpool, mounting and
file contents, quotas and space accounting beyond `referenced`, user properties on snapshots,
permissions (everything runs as root), zfs send -I from a bookmark.

Fault injection (rules match the verb and an optional substring of the joined argv, like
tests/zfs/zfstest.ZfsShim): `fake.fail(verb, stderr=..., exit_code=1)`, `fake.cut("send",
nbytes)` (the stream stops after N bytes), `fake.hang(verb)` (returns the rule: `.entered`
is set once a command hangs, `.release()` lets it go on). `fake.tamper` sets hostile values
(properties with TABs and newlines, inherited placeholders, creation dates in the future).
"""

from __future__ import annotations

import contextlib
import getopt
import json
import os
import random
import selectors
import shlex
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import support
import zrepl


class Unsupported(AssertionError):
    """The double was asked for something it does not model: extend it rather than guess."""


# =================================================================================================
# Resume tokens: OpenZFS's own format (a packed native nvlist, zlib level 6, fletcher-4 word 0)
# =================================================================================================

_NV_UINT64, _NV_STRING, _NV_BOOLEAN = 8, 9, 1
TOKEN_FLAGS = ("largeblockok", "embedok", "compressok", "rawok")


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _pack_nvlist(fields: dict[str, int | str | bool]) -> bytes:
    """NV_ENCODE_NATIVE, little endian, NV_UNIQUE_NAME: what the kernel packs into a token."""
    out = bytearray(b"\x00\x01\x00\x00") + struct.pack("<iI", 0, 1)
    for name, value in fields.items():
        key = name.encode() + b"\0"
        if isinstance(value, bool):
            kind, nelem, data = _NV_BOOLEAN, 0, b""
        elif isinstance(value, int):
            kind, nelem, data = _NV_UINT64, 1, struct.pack("<Q", value)
        else:
            raw = value.encode() + b"\0"
            kind, nelem, data = _NV_STRING, 1, raw + b"\0" * (_pad8(len(raw)) - len(raw))
        size = 16 + _pad8(len(key)) + len(data)
        out += struct.pack("<ihhii", size, len(key), 0, nelem, kind)
        out += key + b"\0" * (_pad8(len(key)) - len(key)) + data
    return bytes(out + struct.pack("<i", 0))


def _unpack_nvlist(packed: bytes) -> dict[str, int | str | bool]:
    if packed[:2] != b"\x00\x01":
        raise ValueError("not a native little-endian nvlist")
    fields: dict[str, int | str | bool] = {}
    pos = 12
    while True:
        (size,) = struct.unpack_from("<i", packed, pos)
        if size == 0:
            return fields
        _, name_size, _, nelem, kind = struct.unpack_from("<ihhii", packed, pos)
        name = packed[pos + 16:pos + 16 + name_size - 1].decode()
        value_at = pos + 16 + _pad8(name_size)
        if kind == _NV_BOOLEAN:
            fields[name] = True
        elif kind == _NV_UINT64:
            fields[name] = struct.unpack_from("<Q", packed, value_at)[0]
        elif kind == _NV_STRING:
            fields[name] = packed[value_at:packed.index(b"\0", value_at)].decode()
        else:
            raise ValueError(f"nvpair type {kind} is not used in resume tokens")
        pos += size


def _fletcher4_word0(data: bytes) -> int:
    words = len(data) // 4  # the kernel ignores a tail shorter than a word
    return sum(struct.unpack_from(f"<{words}I", data)) & (2**64 - 1)


def encode_token(fields: dict[str, int | str | bool]) -> str:
    """A receive_resume_token as OpenZFS writes it: `1-<cksum>-<packed size>-<zlib hex>`."""
    packed = _pack_nvlist(fields)
    compressed = zlib.compress(packed, 6)
    return f"1-{_fletcher4_word0(compressed):x}-{len(packed):x}-{compressed.hex()}"


class TokenError(Exception):
    """Why `zfs send -t` refuses a token (the text after "resume token is corrupt")."""


def decode_token(token: str) -> dict[str, int | str | bool]:
    """The fields of a token, or TokenError with zfs's reason (it reads `%u-%llx-%llx-` first)."""
    parts = token.split("-", 3)
    try:
        version, checksum, size = int(parts[0]), int(parts[1], 16), int(parts[2], 16)
        compressed = bytes.fromhex(parts[3] if len(parts) > 3 else "")
    except (ValueError, IndexError):
        raise TokenError("invalid format") from None
    if version != 1:
        raise TokenError("invalid version")  # approximate
    if _fletcher4_word0(compressed) != checksum:
        raise TokenError("incorrect checksum")
    try:
        packed = zlib.decompress(compressed)
        if len(packed) != size:
            raise ValueError
        return _unpack_nvlist(packed)
    except (zlib.error, ValueError, struct.error, UnicodeDecodeError):
        raise TokenError("uncompress failed") from None  # approximate


def token_contents(fields: dict[str, int | str | bool]) -> str:
    """What `zfs send -nvt` prints before its size estimate."""
    lines = ["resume token contents:", "nvlist version: 0"]
    for name, value in fields.items():
        shown = "1" if value is True else (f"0x{value:x}" if isinstance(value, int) else value)
        lines.append(f"\t{name} = {shown}")
    return "\n".join(lines) + "\n"


# =================================================================================================
# The world
# =================================================================================================

# Native properties the double knows: default value, inheritable. Others are refused like zfs does.
_SETTABLE: dict[str, tuple[str, bool]] = {
    "mountpoint": ("", True), "canmount": ("on", False), "readonly": ("off", True), "compression": ("on", True),
    "atime": ("on", True), "sharenfs": ("off", True), "sharesmb": ("off", True), "volmode": ("default", True),
    "recordsize": ("131072", True), "keyformat": ("none", False), "keylocation": ("none", False),
    "quota": ("0", False), "snapdir": ("hidden", True),
}
_READ_ONLY = ("name", "type", "guid", "createtxg", "creation", "userrefs", "receive_resume_token", "encryption",
              "encryptionroot", "keystatus", "referenced", "written", "origin", "snapshots_changed")
_CREATE_ONLY = ("encryption", "pbkdf2iters", "volsize")
ENCRYPTED = "aes-256-gcm"


@dataclass
class Snapshot:
    name: str
    guid: int
    createtxg: int
    creation: int
    referenced: int  # bytes the dataset held when it was taken: the size of a full stream
    holds: dict[str, int] = field(default_factory=dict)  # tag -> when it was placed


@dataclass
class Bookmark:
    name: str
    guid: int
    createtxg: int
    creation: int
    referenced: int


@dataclass
class Partial:
    """The saved state of an interrupted `zfs recv -s` (what receive_resume_token describes)."""

    header: dict[str, Any]  # the stream being received (its header, see _header_bytes)
    received: int  # payload bytes that arrived
    new_fs: bool  # the receive created the dataset: `zfs recv -A` destroys it again


@dataclass
class Dataset:
    name: str
    type: str  # filesystem | volume
    guid: int
    createtxg: int
    creation: int
    local: dict[str, str] = field(default_factory=dict)  # set here (zfs set, create -o, recv -o)
    received: dict[str, str] = field(default_factory=dict)  # came with a stream (send -p / -b)
    snapshots: list[Snapshot] = field(default_factory=list)  # createtxg order
    bookmarks: list[Bookmark] = field(default_factory=list)
    referenced: int = 0
    written_txg: int = 0  # the last txg that changed its data (0: nothing since creation)
    encryption: str = "off"
    encryption_root: str = ""
    key_loaded: bool = True
    partial: Partial | None = None
    snapshots_changed: int = 0  # OpenZFS 2.2+: the second its list of snapshots last changed (0: never)

    def snapshot(self, name: str) -> Snapshot | None:
        return next((s for s in self.snapshots if s.name == name), None)

    def bookmark(self, name: str) -> Bookmark | None:
        return next((b for b in self.bookmarks if b.name == name), None)


class World:
    """Datasets, snapshots, bookmarks, holds, properties and resume state of all pools.

    The methods below set up and inspect a world for tests; they are never recorded as calls.
    Commands run under `lock` (FakeZfs is used from several threads: both sides of a local
    replication share it)."""

    def __init__(self, clock: Callable[[], float] = time.time, seed: int = 0):
        self.clock = clock
        self.datasets: dict[str, Dataset] = {}
        self.txg = 1
        self.lock = threading.RLock()
        self._random = random.Random(seed)
        self._guids: set[int] = set()

    # -- ids and time --------------------------------------------------------------------------------
    def next_txg(self) -> int:
        self.txg += 1
        return self.txg

    def new_guid(self) -> int:
        while True:
            guid = self._random.getrandbits(64)
            if guid and guid not in self._guids:
                self._guids.add(guid)
                return guid

    def now(self) -> int:
        return int(self.clock())

    # -- lookups ---------------------------------------------------------------------------------
    def dataset(self, name: str) -> Dataset:
        ds = self.datasets.get(name)
        if ds is None:
            raise KeyError(f"{name}: no such dataset in the fake world")
        return ds

    def find(self, name: str) -> Dataset | Snapshot | Bookmark | None:
        """A dataset, `fs@snap` or `fs#bookmark` by full name."""
        for sep in "@#":
            if sep in name:
                fs, _, short = name.partition(sep)
                ds = self.datasets.get(fs)
                if ds is None:
                    return None
                return ds.snapshot(short) if sep == "@" else ds.bookmark(short)
        return self.datasets.get(name)

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def children(self, name: str) -> list[Dataset]:
        return [d for n, d in sorted(self.datasets.items()) if n.startswith(name + "/")]

    def snapshots(self, fs: str) -> list[str]:
        return [s.name for s in self.dataset(fs).snapshots]

    def bookmarks(self, fs: str) -> list[str]:
        return sorted(b.name for b in self.dataset(fs).bookmarks)

    def holds(self, snapshot: str) -> set[str]:
        snap = self.find(snapshot)
        if not isinstance(snap, Snapshot):
            raise KeyError(f"{snapshot}: no such snapshot in the fake world")
        return set(snap.holds)

    def guid(self, name: str) -> int:
        obj = self.find(name)
        if obj is None:
            raise KeyError(f"{name}: not in the fake world")
        return obj.guid

    def get(self, name: str, prop: str) -> str:
        """The value `zfs get -H -p -o value PROP NAME` prints."""
        return self.property(name, prop)[0]

    def resume_token(self, fs: str) -> str | None:
        ds = self.dataset(fs)
        return None if ds.partial is None else self._token(ds)

    # -- building ------------------------------------------------------------------------------------
    def create(self, name: str, *, props: dict[str, str] | None = None, volume: bool = False,
               parents: bool = False, encrypted: bool = False) -> Dataset:
        """A filesystem (or volume); a name without '/' is a pool. `encrypted` makes it an
        encryption root with its key loaded; children of an encrypted dataset inherit it."""
        with self.lock:
            if name in self.datasets:
                raise ValueError(f"{name} exists already")
            parent = name.rpartition("/")[0]
            if parent and parent not in self.datasets:
                if not parents:
                    raise ValueError(f"{name}: parent {parent} does not exist")
                self.create(parent, parents=True)
            ds = Dataset(name, "volume" if volume else "filesystem", self.new_guid(), self.next_txg(), self.now())
            ds.local.update(props or {})
            encryption = ds.local.pop("encryption", "on" if encrypted else "")
            if encryption not in ("", "off"):
                ds.encryption, ds.encryption_root = ENCRYPTED, name
            elif encryption == "" and parent:
                above = self.datasets[parent]
                ds.encryption, ds.encryption_root, ds.key_loaded = above.encryption, above.encryption_root, \
                    above.key_loaded
            self.datasets[name] = ds
            return ds

    def snapshot(self, *full_names: str) -> None:
        """Snapshots taken atomically in one txg, like one `zfs snapshot a@s b@s`."""
        with self.lock:
            txg, now = self.next_txg(), self.now()
            for full in full_names:
                fs, _, short = full.partition("@")
                ds = self.dataset(fs)
                if ds.snapshot(short):
                    raise ValueError(f"{full} exists already")
                ds.snapshots.append(Snapshot(short, self.new_guid(), txg, now, ds.referenced))
                ds.snapshots_changed = now

    def bookmark(self, source: str, bookmark: str) -> None:
        with self.lock:
            origin = self.find(source)
            fs, _, short = bookmark.partition("#")
            if not isinstance(origin, (Snapshot, Bookmark)) or self.dataset(fs).bookmark(short):
                raise ValueError(f"cannot bookmark {source} as {bookmark}")
            self.dataset(fs).bookmarks.append(Bookmark(short, origin.guid, origin.createtxg, origin.creation,
                                                       origin.referenced))

    def hold(self, tag: str, *snapshots: str) -> None:
        with self.lock:
            for name in snapshots:
                snap = self.find(name)
                if not isinstance(snap, Snapshot):
                    raise ValueError(f"{name} is not a snapshot")
                snap.holds[tag] = self.now()

    def write(self, fs: str, nbytes: int = 4096) -> None:
        """Data written to a dataset: it is now modified since its most recent snapshot, and the
        next snapshot's streams carry nbytes more."""
        with self.lock:
            ds = self.dataset(fs)
            ds.referenced += nbytes
            ds.written_txg = self.next_txg()

    def set(self, name: str, prop: str, value: str, *, received: bool = False) -> None:
        """Set a property locally (or as received), any value: hostile values included."""
        with self.lock:
            ds = self.dataset(name)
            (ds.received if received else ds.local)[prop] = value

    def inherit(self, name: str, prop: str) -> None:
        with self.lock:
            self.dataset(name).local.pop(prop, None)

    def destroy(self, name: str) -> None:
        """Remove a snapshot, a bookmark or a dataset with everything below it (setup only:
        holds are not checked)."""
        with self.lock:
            obj = self.find(name)
            if obj is None:
                raise KeyError(f"{name}: not in the fake world")
            if isinstance(obj, Snapshot):
                self.dataset(name.partition("@")[0]).snapshots.remove(obj)
                self.dataset(name.partition("@")[0]).snapshots_changed = self.now()
            elif isinstance(obj, Bookmark):
                self.dataset(name.partition("#")[0]).bookmarks.remove(obj)
            else:
                for victim in [name] + [d.name for d in self.children(name)]:
                    del self.datasets[victim]

    def tree(self, pool: str, spec: str, *, data: bool = True) -> None:
        """Datasets, snapshots and bookmarks from a spec (support.parse_tree_spec); the pool and
        missing parents are created. With data, 4 KiB are written before each snapshot (like
        zfstest.build_tree on real ZFS)."""
        with self.lock:
            if pool not in self.datasets:
                self.create(pool)
            for line in support.parse_tree_spec(spec):
                name = support.tree_dataset(pool, line.path)
                props = dict(line.props)
                volume = props.pop("volsize", None) is not None
                if name not in self.datasets:
                    self.create(name, props=props, volume=volume, parents=True)
                elif props:
                    raise ValueError(f"{name} exists already; properties only apply at creation")
                last = ""
                for op in line.ops:
                    if op[0] == "snap":
                        if data:
                            self.write(name)
                        self.snapshot(f"{name}@{op[1]}")
                        last = op[1]
                    elif op[0] == "bookmark":
                        self.bookmark(f"{name}@{op[2] or last}", f"{name}#{op[1]}")
                    else:
                        self.destroy(f"{name}@{op[1]}")

    # -- properties ------------------------------------------------------------------------------
    def property(self, name: str, prop: str) -> tuple[str, str]:
        """(value, source) as `zfs get -H -p -o value,source` shows them."""
        obj = self.find(name)
        if obj is None:
            raise KeyError(name)
        if isinstance(obj, Bookmark):
            if prop in ("name", "type", "guid", "createtxg", "creation"):
                return self._native(name, obj, prop), "-"
            return "-", "-"
        fs = name.partition("@")[0]
        ds = self.datasets[fs]
        if prop in _READ_ONLY:
            return self._native(name, obj, prop), "-"
        if isinstance(obj, Snapshot):
            if ":" not in prop:
                return "-", "-"
            value, source = self._inherited(ds, prop, ("", True))
            return value, (f"inherited from {fs}" if source in ("local", "received") else source)
        if ":" in prop:
            return self._inherited(ds, prop, ("", True))
        if prop not in _SETTABLE:
            raise Unsupported(f"property {prop!r} is not modelled")
        return self._inherited(ds, prop, _SETTABLE[prop])

    def _inherited(self, ds: Dataset, prop: str, default: tuple[str, bool]) -> tuple[str, str]:
        value, inheritable = default
        for source_name in [ds.name] + _ancestors(ds.name):
            here = self.datasets.get(source_name)
            if here is None:
                break
            found = here.local.get(prop, here.received.get(prop))
            if found is not None:
                if source_name == ds.name:
                    return found, "local" if prop in here.local else "received"
                if prop == "mountpoint" and found not in ("none", "legacy"):
                    found = found.rstrip("/") + ds.name[len(source_name):]
                return found, f"inherited from {source_name}"
            if not inheritable:
                break
        if prop == "mountpoint":
            return "/" + ds.name, "default"
        return (value, "default") if value else ("-", "-")

    def _native(self, name: str, obj: Dataset | Snapshot | Bookmark, prop: str) -> str:
        ds = self.datasets[name.partition("@")[0].partition("#")[0]]
        kind = ("snapshot" if isinstance(obj, Snapshot) else "bookmark" if isinstance(obj, Bookmark)
                else ds.type)
        if prop == "name":
            return name
        if prop == "type":
            return kind
        if prop in ("guid", "createtxg", "creation", "referenced"):
            return str(getattr(obj, prop))
        if prop == "userrefs":
            return str(len(obj.holds)) if isinstance(obj, Snapshot) else "-"
        if prop == "receive_resume_token":
            return self._token(ds) if isinstance(obj, Dataset) and ds.partial else "-"
        if prop == "encryption":
            return ds.encryption
        if prop == "encryptionroot":
            return ds.encryption_root if ds.encryption != "off" else "-"
        if prop == "keystatus":
            return ("available" if ds.key_loaded else "unavailable") if ds.encryption != "off" else "-"
        if prop == "written":
            return "0"
        if prop == "snapshots_changed":
            return str(ds.snapshots_changed) if isinstance(obj, Dataset) and ds.snapshots_changed else "-"
        return "-"  # origin: no clones here

    def _token(self, ds: Dataset) -> str:
        assert ds.partial is not None
        h, got = ds.partial.header, ds.partial.received
        fields: dict[str, int | str | bool] = {}
        if h["fromguid"]:
            fields["fromguid"] = h["fromguid"]
        fields.update(object=0x81 + got // (1 << 20), offset=got & ~0xFFFF, bytes=got, toguid=h["toguid"],
                      toname=f"{h['fs']}@{h['to']}")
        fields.update({flag: True for flag in TOKEN_FLAGS if h["flags"].get(flag)})
        return encode_token(fields)


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


# =================================================================================================
# Streams: what a fake `zfs send` writes into its pipe and a fake `zfs recv` reads
# =================================================================================================

# One stream per snapshot (a -I package is several in a row): a header line, then `size - offset`
# filler bytes, `size` being the data the snapshot adds (so byte counts and progress are real).
STREAM_MAGIC = b"FAKEZFS-STREAM "
CHUNK = 64 * 1024


def _header_bytes(header: dict[str, Any]) -> bytes:
    return STREAM_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"


def stream_length(header: dict[str, Any]) -> int:
    return len(_header_bytes(header)) + header["size"] - header["offset"]


def _nice(n: int) -> str:
    """zfs_nicebytes: 624B, 13.6K, 6.14M."""
    exp = 0
    while n >= 1024 ** (exp + 1) and exp < 6:
        exp += 1
    if exp == 0:
        return f"{n}B"
    value = n / 1024 ** exp
    text = next(t for t in (f"{value:.2f}", f"{value:.1f}", f"{value:.0f}") if len(t) <= 4 or t == f"{value:.0f}")
    return text + "KMGTPE"[exp - 1]


# =================================================================================================
# Processes: a Popen-like object over real pipes, the command running in a thread
# =================================================================================================

_pids = iter(range(900_000, 2**31))


class _Killed(Exception):
    pass


class FakeProcess:
    """What `FakeZfs.spawn` returns (and what `run` uses inside): args, pid, returncode, stdin,
    stdout, stderr (binary file objects over real pipes when PIPE was asked for), poll, wait,
    communicate, kill, terminate, send_signal. The command sees EOF on stdin for DEVNULL/None and
    its output is discarded where no pipe or fd was given."""

    def __init__(self, fake: FakeZfs, argv: Sequence[str], stdin: Any, stdout: Any, stderr: Any):
        self.args, self.pid, self.returncode = list(argv), next(_pids), None
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self._fake = fake
        self._done = threading.Event()
        self._killed: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._in = self._child_end(stdin, reading=True)
        self._out = self._child_end(stdout, reading=False, attr="stdout")
        self._err = self._child_end(stderr, reading=False, attr="stderr")
        self.error: BaseException | None = None  # a bug in the double (re-raised by run)
        self.rule: Rule | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._readers: list[threading.Thread] | None = None
        self._output: dict[str, bytes] = {}

    def _child_end(self, spec: Any, *, reading: bool, attr: str = "stdin") -> int | None:
        if spec == subprocess.PIPE:
            r, w = os.pipe()
            mine, theirs = (r, w) if reading else (w, r)
            setattr(self, attr, os.fdopen(theirs, "wb" if reading else "rb"))
            if not reading:
                os.set_blocking(mine, False)  # our own pipe: writes wait in select, so kill() works
            return mine
        if spec in (None, subprocess.DEVNULL):
            return None
        return os.dup(spec if isinstance(spec, int) else spec.fileno())

    # -- the command's side ------------------------------------------------------------------------
    def _wait(self, fd: int, event: int) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, event)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                if self._killed is not None:
                    raise _Killed
                if any(key.fd == fd for key, _ in sel.select()):
                    return

    def read(self, n: int) -> bytes:
        """Up to n bytes of stdin, b"" at its end."""
        if self._in is None:
            return b""
        self._wait(self._in, selectors.EVENT_READ)
        try:
            return os.read(self._in, n)
        except ConnectionResetError:
            return b""

    def write(self, data: bytes, *, err: bool = False) -> None:
        """All of data to stdout (stderr); BrokenPipeError when nobody reads any more."""
        fd = self._err if err else self._out
        if fd is None:
            return
        view = memoryview(data)
        while view:
            self._wait(fd, selectors.EVENT_WRITE)
            try:
                view = view[os.write(fd, view[:CHUNK]):]
            except BlockingIOError:
                continue

    def say(self, text: str, *, err: bool = True) -> None:
        self.write(text.encode(), err=err)

    def hang_until(self, event: threading.Event) -> None:
        while not event.wait(0.01):
            if self._killed is not None:
                raise _Killed

    def start(self, body: Callable[[FakeProcess], int]) -> FakeProcess:
        threading.Thread(target=self._main, args=(body,), name=f"fake {shlex.join(self.args)}"[:60],
                         daemon=True).start()
        return self

    def _main(self, body: Callable[[FakeProcess], int]) -> None:
        rc: int
        try:
            rc = body(self)
        except _Killed:
            rc = 0
        except BrokenPipeError:
            rc = -signal.SIGPIPE  # zfs does not ignore SIGPIPE: a vanished reader kills it
        except BaseException as exc:
            self.error = exc
            self._fake.errors.append(exc)
            with contextlib.suppress(OSError):
                self.say(f"fakezfs: internal error: {type(exc).__name__}: {exc}\n")
            rc = 99
        with self._lock:  # after this, kill() must not write to a closed (or reused) fd number
            self._closed = True
            for fd in (self._in, self._out, self._err, self._wake_r, self._wake_w):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.returncode = -self._killed if self._killed is not None else rc
        self._done.set()

    # -- the caller's side -------------------------------------------------------------------------
    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self._closed or self._killed is not None:
                return
            self._killed = sig
            os.write(self._wake_w, b"x")

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Like Popen.communicate; after a TimeoutExpired it may be called again."""
        if self._readers is None:
            self._readers = []
            if self.stdin is not None:
                self._readers.append(threading.Thread(target=self._feed, args=(self.stdin, input or b""),
                                                      daemon=True))
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if stream is not None and not stream.closed:  # like Popen: a closed pipe is skipped
                    self._readers.append(threading.Thread(target=self._drain, args=(name, stream), daemon=True))
            for t in self._readers:
                t.start()
        self.wait(timeout)
        for t in self._readers:
            t.join()
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return (self._output.get("stdout") if self.stdout is not None else None,
                self._output.get("stderr") if self.stderr is not None else None)

    def _drain(self, name: str, stream: IO[bytes]) -> None:
        self._output[name] = stream.read()

    @staticmethod
    def _feed(stream: IO[bytes], data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError):
            stream.write(data)
        with contextlib.suppress(BrokenPipeError):
            stream.close()

    def __enter__(self) -> FakeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


# =================================================================================================
# Fault injection
# =================================================================================================

@dataclass
class Rule:
    """One fault: which commands (verb, substring of the joined argv, how many times) and what."""

    verb: str
    action: str  # fail | hang | cut
    match: str | None = None
    times: int | None = None
    exit_code: int = 1
    stderr: str = ""
    nbytes: int = 0
    used: int = 0
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, argv: Sequence[str]) -> bool:
        verb = {"receive": "recv"}.get(argv[1], argv[1]) if len(argv) > 1 else ""
        if verb != self.verb or (self.match and self.match not in " ".join(argv[1:])):
            return False
        return self.times is None or self.used < self.times

    def release(self) -> None:
        """Let a hung command go on (it then runs normally)."""
        self.released.set()


class Tamper:
    """Hostile states for tests of what zrepl does with them."""

    def __init__(self, world: World):
        self.world = world

    def property(self, name: str, prop: str, value: str, *, received: bool = False) -> None:
        """Any value, TABs and newlines included: zfs prints it as it is."""
        self.world.set(name, prop, value, received=received)

    def inherited_placeholder(self, dataset: str) -> None:
        """zrepl:placeholder=on set on the parent only: `zfs list` shows it on `dataset` too."""
        self.world.set(dataset.rpartition("/")[0], zrepl.PLACEHOLDER_PROPERTY, "on")

    def creation(self, name: str, when: float) -> None:
        """A snapshot's (or bookmark's) creation time, e.g. years in the future."""
        obj = self.world.find(name)
        if not isinstance(obj, (Snapshot, Bookmark)):
            raise KeyError(f"{name} is not a snapshot or bookmark")
        obj.creation = int(when)


# =================================================================================================
# The commands
# =================================================================================================

_USAGE = {
    "snapshot": "\tsnapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...\n",
    "bookmark": "\tbookmark <snapshot|bookmark> <newbookmark>\n",
    "receive": ("\treceive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ...\n"
                "\t    <filesystem|volume|snapshot>\n"
                "\treceive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ... \n"
                "\t    [-d | -e] <filesystem>\n\treceive -A <filesystem|volume>\n"),
}
_USAGE_TAIL = ("\nFor the property list, run: zfs set|get\n\nFor the delegated permission list, run: zfs "
               "allow|unallow\n\nFor further help on a command or topic, run: zfs help [<topic>]\n")


class UsageError(Exception):
    """zfs prints the message and the command's usage, and exits 2."""


def _usage(verb: str, message: str) -> UsageError:
    # the property table zfs prints after "bad property list" is left out
    return UsageError(f"{message}\nusage:\n{_USAGE.get(verb, '')}{_USAGE_TAIL if verb in _USAGE else ''}")


def _options(args: Sequence[str], spec: str, verb: str) -> tuple[dict[str, list[str]], list[str]]:
    try:
        pairs, rest = getopt.gnu_getopt(list(args), spec)
    except getopt.GetoptError as exc:
        raise _usage(verb, f"invalid option '{exc.opt}'") from None
    opts: dict[str, list[str]] = {}
    for flag, value in pairs:
        opts.setdefault(flag[1], []).append(value)
    return opts, rest


def _unsupported_flags(opts: dict[str, list[str]], flags: str, verb: str) -> None:
    for flag in flags:
        if flag in opts:
            raise Unsupported(f"zfs {verb} -{flag} is not modelled")


_TYPES = {"filesystem": "filesystem", "fs": "filesystem", "volume": "volume", "vol": "volume",
          "snapshot": "snapshot", "snap": "snapshot", "bookmark": "bookmark", "all": "all"}


class Commands:
    """Each `zfs VERB` as a method taking the process and the arguments after the verb."""

    def __init__(self, fake: FakeZfs):
        self.fake, self.world = fake, fake.world

    # -- listing and properties --------------------------------------------------------------------
    def list(self, p: FakeProcess, args: list[str]) -> int:
        opts, roots = _options(args, "Hprd:t:o:s:S:j", "list")
        _unsupported_flags(opts, "sSj", "list")
        if "H" not in opts or "p" not in opts:
            raise Unsupported("zfs list without -H -p (human-readable output) is not modelled")
        props = (opts.get("o") or ["name,used,available,referenced,mountpoint"])[-1].split(",")
        types = {_TYPES.get(t, t) for t in (opts.get("t") or ["filesystem,volume"])[-1].split(",")}
        if "all" in types:
            types = {"filesystem", "volume", "snapshot", "bookmark"}
        depth = int(opts["d"][-1]) if "d" in opts else (None if "r" in opts else 0)
        if not roots:
            roots, depth = [n for n in self.world.datasets if "/" not in n], None if "r" in opts or "d" in opts \
                else 0
        with self.world.lock:
            self._check_props(props, "list")
            rows: dict[str, tuple] = {}
            rc = 0
            for root in roots:
                found = self.world.find(root)
                if found is None:
                    p.say(f"cannot open '{root}': dataset does not exist\n")
                    rc = 1
                    continue
                for name, key in self._walk(root, depth, types):
                    rows[name] = key
            lines = ["\t".join(self.world.property(name, prop)[0] for prop in props)
                     for name in sorted(rows, key=rows.__getitem__)]
        p.say("".join(line + "\n" for line in lines), err=False)
        return rc

    def _walk(self, root: str, depth: int | None, types: set[str]) -> Iterator[tuple[str, tuple]]:
        obj = self.world.find(root)
        if not isinstance(obj, Dataset):
            kind = "snapshot" if isinstance(obj, Snapshot) else "bookmark"
            if kind in types:
                yield root, (tuple(root.split("/")), 0, 0, root)
            return
        for ds in [obj] + self.world.children(root):
            level = ds.name.count("/") - root.count("/")
            path = tuple(ds.name.split("/"))
            if depth is not None and level > depth:
                continue
            if ds.type in types:
                yield ds.name, (path, 0, 0, "")
            if depth is not None and level + 1 > depth:
                continue
            if "snapshot" in types:
                for s in ds.snapshots:
                    yield f"{ds.name}@{s.name}", (path, 1, s.createtxg, s.name)
            if "bookmark" in types:
                for b in ds.bookmarks:
                    yield f"{ds.name}#{b.name}", (path, 2, b.createtxg, b.name)

    def _check_props(self, props: Sequence[str], verb: str) -> None:
        for prop in props:
            if ":" not in prop and prop not in _READ_ONLY and prop not in _SETTABLE:
                raise _usage(verb, f"bad property list: invalid property '{prop}'")

    def get(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "Hprd:o:s:t:j", "get")
        _unsupported_flags(opts, "rdtj", "get")
        if "H" not in opts:
            raise Unsupported("zfs get without -H is not modelled")
        if len(rest) < 2:
            raise _usage("get", "missing property argument" if not rest else "missing dataset argument")
        fields = (opts.get("o") or ["name,property,value,source"])[-1].split(",")
        sources = set((opts.get("s") or ["local,default,inherited,temporary,received,none"])[-1].split(","))
        props = rest[0].split(",")
        if props == ["all"]:
            props = [*_READ_ONLY, *_SETTABLE]
        rc, out = 0, []
        with self.world.lock:
            self._check_props(props, "get")
            for name in rest[1:]:
                if not self.world.exists(name):
                    p.say(f"cannot open '{name}': dataset does not exist\n")
                    rc = 1
                    continue
                for prop in props:
                    value, source = self.world.property(name, prop)
                    kind = "inherited" if source.startswith("inherited") else ("none" if source == "-" else source)
                    if kind not in sources:
                        continue
                    row = {"name": name, "property": prop, "value": value, "source": source,
                           "received": self.world.datasets[name].received.get(prop, "-")
                           if name in self.world.datasets else "-"}
                    out.append("\t".join(row[f] for f in fields))
        p.say("".join(line + "\n" for line in out), err=False)
        return rc

    def set(self, p: FakeProcess, args: list[str]) -> int:
        if len(args) < 2 or "=" not in args[0]:
            raise Unsupported(f"zfs set {shlex.join(args)}")
        prop, _, value = args[0].partition("=")
        with self.world.lock:
            for name in args[1:]:
                if name not in self.world.datasets:
                    p.say(f"cannot open '{name}': dataset does not exist\n")
                    return 1
                if prop in _READ_ONLY or prop in _CREATE_ONLY:
                    p.say(f"cannot set property for '{name}': '{prop}' is readonly\n")  # approximate
                    return 1
                self.world.set(name, prop, value)
        return 0

    def inherit(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "rS", "inherit")
        _unsupported_flags(opts, "rS", "inherit")
        with self.world.lock:
            for name in rest[1:]:
                if name not in self.world.datasets:
                    p.say(f"cannot open '{name}': dataset does not exist\n")
                    return 1
                self.world.inherit(name, rest[0])
        return 0

    # -- creating, snapshots, bookmarks, holds, destroying ---------------------------------------
    def create(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "po:V:sb:u", "create")
        _unsupported_flags(opts, "sb", "create")
        props = dict(o.partition("=")[::2] for o in opts.get("o", []))
        name = rest[-1]
        with self.world.lock:
            if name in self.world.datasets:
                p.say(f"cannot create '{name}': dataset already exists\n")
                return 1
            parent = name.rpartition("/")[0]
            if parent not in self.world.datasets and "p" not in opts:
                p.say(f"cannot create '{name}': parent does not exist\n")
                return 1
            props.pop("pbkdf2iters", None)  # key derivation is not modelled
            self.world.create(name, props=props, volume="V" in opts, parents="p" in opts)
        return 0

    def snapshot(self, p: FakeProcess, args: list[str]) -> int:
        opts, names = _options(args, "ro:", "snapshot")
        _unsupported_flags(opts, "ro", "snapshot")
        with self.world.lock:
            for full in names:
                fs = full.partition("@")[0]
                if fs not in self.world.datasets:
                    raise _usage("snapshot", f"cannot open '{fs}': dataset does not exist")
            existing = [full for full in names if self.world.exists(full)]
            if existing:
                p.say(f"cannot create snapshot '{existing[0]}': dataset already exists\n"
                      + ("no snapshots were created\n" if len(names) > 1 else ""))
                return 1
            self.world.snapshot(*names)
        return 0

    def bookmark(self, p: FakeProcess, args: list[str]) -> int:
        if len(args) != 2:
            raise _usage("bookmark", "wrong number of arguments")
        source, target = args
        with self.world.lock:
            if not self.world.exists(source):
                raise _usage("bookmark", f"cannot open '{source}': dataset does not exist")
            if source.partition("@")[0].partition("#")[0] != target.partition("#")[0]:
                raise Unsupported("a bookmark in another dataset than its source")
            if self.world.exists(target):
                p.say(f"cannot create bookmark '{target}': bookmark exists\n")
                return 1
            self.world.bookmark(source, target)
            self.world.next_txg()
        return 0

    def hold(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "r", "hold")
        _unsupported_flags(opts, "r", "hold")
        tag, rc = rest[0], 0
        with self.world.lock:
            for name in rest[1:]:  # each on its own: the others are held even when one fails
                snap = self.world.find(name)
                if "@" not in name:
                    p.say(f"'{name}' is not a snapshot\n")
                    rc = 1
                elif not isinstance(snap, Snapshot):
                    p.say(f"cannot hold snapshot '{name}': dataset does not exist\n")
                    rc = 1
                elif tag in snap.holds:
                    p.say(f"cannot hold snapshot '{name}': tag already exists on this dataset\n")
                    rc = 1
                else:
                    self.world.hold(tag, name)
        return rc

    def release(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "r", "release")
        _unsupported_flags(opts, "r", "release")
        tag, rc = rest[0], 0
        with self.world.lock:
            for name in rest[1:]:
                snap = self.world.find(name)
                if not isinstance(snap, Snapshot):
                    p.say(f"cannot release hold from snapshot '{name}': dataset does not exist\n")
                    rc = 1
                elif tag not in snap.holds:
                    p.say(f"cannot release hold from snapshot '{name}': no such tag on this dataset\n")
                    rc = 1
                else:
                    del snap.holds[tag]
        return rc

    def holds(self, p: FakeProcess, args: list[str]) -> int:
        opts, names = _options(args, "rHp", "holds")
        _unsupported_flags(opts, "r", "holds")
        if "H" not in opts:
            raise Unsupported("zfs holds without -H is not modelled")
        rc, out = 0, []
        with self.world.lock:
            for name in names:
                snap = self.world.find(name)
                if not isinstance(snap, Snapshot):
                    p.say(f"cannot open '{name}': dataset does not exist\n")
                    rc = 1
                    continue
                for tag, when in sorted(snap.holds.items()):
                    shown = str(when) if "p" in opts else time.strftime("%a %b %e %H:%M %Y", time.localtime(when))
                    out.append(f"{name}\t{tag}\t{shown}\n")
        p.say("".join(out), err=False)
        return rc

    def destroy(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "nvrRfdp", "destroy")
        _unsupported_flags(opts, "rRdp", "destroy")
        if len(rest) != 1:
            raise Unsupported(f"zfs destroy {shlex.join(args)}")
        target = rest[0]
        with self.world.lock:
            if "#" in target:
                fs, _, short = target.partition("#")
                ds = self.world.datasets.get(fs)
                bm = ds.bookmark(short) if ds else None
                if bm is None or ds is None:
                    p.say(f"bookmark '{target}' does not exist.\n")
                    return 1
                if "n" not in opts:
                    ds.bookmarks.remove(bm)
                return 0
            if "@" not in target:
                raise Unsupported("destroying datasets (zrepl never does)")
            fs, _, shorts = target.partition("@")
            ds = self.world.datasets.get(fs)
            if ds is None:
                p.say(f"cannot open '{fs}': dataset does not exist\n")
                return 1
            if "%" in shorts:
                raise Unsupported("snapshot ranges (a%b)")
            victims = [s for name in shorts.split(",") if (s := ds.snapshot(name)) is not None]
            if not victims:
                p.say("could not find any snapshots to destroy; check snapshot names.\n")
                return 1
            if "n" in opts:
                if "v" in opts:
                    p.say("".join(f"would destroy {fs}@{s.name}\n" for s in victims) + "would reclaim 0B\n", err=False)
                return 0
            held = [s for s in victims if s.holds]
            if held:  # one transaction: nothing is destroyed when one of them is held
                # zfs names each held one, in an order that varies (it comes from an nvlist)
                p.say("".join(f"cannot destroy snapshot {fs}@{s.name}: it's being held. Run 'zfs holds -r "
                              f"{fs}@{s.name}' to see holders.\n" for s in held))
                return 1
            self.world.next_txg()
            for s in victims:
                ds.snapshots.remove(s)
            ds.snapshots_changed = self.world.now()
        return 0

    # -- send ------------------------------------------------------------------------------------
    def send(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "nvPwpbLceSt:i:I:DRhV", "send")
        _unsupported_flags(opts, "DRhVS", "send")
        try:
            with self.world.lock:
                if "t" in opts:
                    headers = self._resume_send(p, opts, opts["t"][-1])
                else:
                    headers = self._plan_send(opts, rest)
        except _SendRefused as exc:
            p.say(exc.message)
            return exc.code
        verbose_err = "n" not in opts  # a dry run prints to stdout, a real send to stderr
        if "v" in opts:
            p.say(self._estimate_lines(opts, headers), err=verbose_err)
        if "n" in opts:
            return 0
        return self._write_streams(p, headers, progress="v" in opts and "P" in opts)

    def _write_streams(self, p: FakeProcess, headers: list[dict[str, Any]], progress: bool) -> int:
        """Header, then filler in chunks, with a progress line after each chunk (as if each took
        a second; the count restarts per snapshot and leaves out what a resumed stream skips).
        A cut rule lets only its first nbytes out; a stream shorter than that passes whole."""
        cut = self.fake.active_rule(p, "cut")
        budget = cut.nbytes if cut is not None else None
        for h in headers:
            pieces = [_header_bytes(h)]
            left = h["size"] - h["offset"]
            while left:
                pieces.append(bytes(min(CHUNK, left)))
                left -= len(pieces[-1])
            sent = 0
            for i, piece in enumerate(pieces):
                if cut is not None and budget is not None and len(piece) > budget:
                    p.write(piece[:budget])
                    p.say(cut.stderr)
                    return cut.exit_code
                p.write(piece)
                if budget is not None:
                    budget -= len(piece)
                if i and progress:
                    sent += len(piece)
                    when = time.strftime("%H:%M:%S", time.localtime(self.world.now()))
                    p.say(f"{when}\t{sent}\t{h['fs']}@{h['to']}\n")
        return 0

    def _estimate_lines(self, opts: dict[str, list[str]], headers: list[dict[str, Any]]) -> str:
        lines = [token_contents(decode_token(opts["t"][-1]))] if "t" in opts else []
        total = 0
        for h in headers:
            size, to = stream_length(h), f"{h['fs']}@{h['to']}"
            total += size
            if "P" in opts:
                lines.append(f"full\t{to}\t{size}\n" if not h["fromguid"] else
                             f"incremental\t{h['from_shown']}\t{to}\t{size}\n")
            else:
                lines.append(f"full send of {to} estimated size is {_nice(size)}\n" if not h["fromguid"] else
                             f"send from {h['from_shown']} to {to} estimated size is {_nice(size)}\n")
        lines.append(f"size\t{total}\n" if "P" in opts else f"total estimated size is {_nice(total)}\n")
        return "".join(lines)

    def _plan_send(self, opts: dict[str, list[str]], rest: list[str]) -> list[dict[str, Any]]:
        if len(rest) != 1 or "@" not in rest[0]:
            raise Unsupported(f"zfs send of {rest!r}")
        to = rest[0]
        fs = to.partition("@")[0]
        snap = self.world.find(to)
        if not isinstance(snap, Snapshot):
            raise _SendRefused(f"cannot open '{to}': dataset does not exist\n")
        ds = self.world.datasets[fs]
        raw = "w" in opts
        if ds.encryption != "off" and not raw:
            if "p" in opts or "b" in opts:
                raise _SendRefused(f"cannot send {to}: encrypted dataset {fs} may not be sent with properties "
                                   f"without the raw flag\nwarning: cannot send '{to}': backup failed\n")
            if not ds.key_loaded:
                raise _SendRefused(f"warning: cannot send '{to}': Permission denied\n")  # approximate
        flags = {"largeblockok": "L" in opts, "embedok": "e" in opts, "compressok": "c" in opts or raw,
                 "rawok": raw}
        base = {"fs": fs, "type": ds.type, "raw": raw, "encrypted": raw and ds.encryption != "off", "flags": flags,
                "props": self._stream_props(ds, opts), "offset": 0}
        source = (opts.get("i") or opts.get("I") or [None])[-1]
        if source is None:
            return [{**base, **self._to_fields(snap), "fromguid": 0, "from_shown": "", "size": snap.referenced}]
        if source.startswith(("@", "#")):
            source = fs + source
        origin = self.world.find(source)
        if origin is None or isinstance(origin, Dataset):
            raise _SendRefused(f"cannot open '{source}': dataset does not exist\n")
        if source.partition("@")[0].partition("#")[0] != fs or origin.createtxg >= snap.createtxg:
            raise _SendRefused(f"warning: cannot send '{to}': not an earlier snapshot from the same fs\n")
        if "I" in opts and isinstance(origin, Bookmark):
            raise Unsupported("zfs send -I from a bookmark")
        chain = [snap] if "i" in opts else [s for s in ds.snapshots if origin.createtxg < s.createtxg <= snap.createtxg]
        # zfs names the base in full for -i, by its short name for each stream of -I
        headers, prev, prev_shown = [], origin, source if "i" in opts else source.partition("@")[2]
        for s in chain:
            headers.append({**base, **self._to_fields(s), "fromguid": prev.guid, "from_shown": prev_shown,
                            "size": max(s.referenced - prev.referenced, 0)})
            prev, prev_shown = s, s.name
        return headers

    @staticmethod
    def _to_fields(snap: Snapshot) -> dict[str, Any]:
        return {"to": snap.name, "toguid": snap.guid, "creation": snap.creation, "referenced": snap.referenced}

    def _stream_props(self, ds: Dataset, opts: dict[str, list[str]]) -> dict[str, str] | None:
        if "p" in opts:
            return {**ds.received, **ds.local}
        if "b" in opts:
            return dict(ds.received)
        return None

    def _resume_send(self, p: FakeProcess, opts: dict[str, list[str]], token: str) -> list[dict[str, Any]]:
        try:
            fields = decode_token(token)
        except TokenError as exc:
            raise _SendRefused(f"cannot resume send: resume token is corrupt ({exc})\n", 255) from None
        toname = str(fields.get("toname", ""))
        fs, toguid, fromguid = toname.partition("@")[0], int(fields.get("toguid", 0)), int(fields.get("fromguid", 0))
        # like zfs: the snapshot is looked up by guid anywhere in the pool when the name moved
        pool = fs.split("/")[0]
        snap, owner = None, None
        for ds in [d for n, d in self.world.datasets.items() if n == pool or n.startswith(pool + "/")]:
            for s in ds.snapshots:
                if s.guid == toguid:
                    snap, owner = s, ds
        if snap is None or owner is None:
            if "n" in opts and "v" in opts:
                p.say(token_contents(fields), err=False)
            raise _SendRefused(f"cannot resume send: '{toname}' used in the initial send no longer exists\n", 255)
        origin: Snapshot | Bookmark | None = None
        if fromguid:
            origin = next((v for v in [*owner.snapshots, *owner.bookmarks] if v.guid == fromguid), None)
            if origin is None:
                raise _SendRefused(f"cannot resume send: incremental source {fromguid:#x} no longer exists\n",
                                   255)  # approximate
        raw = bool(fields.get("rawok"))
        flags = {flag: bool(fields.get(flag)) for flag in TOKEN_FLAGS}
        origin_name = ""
        if origin is not None:
            origin_name = f"{owner.name}{'@' if isinstance(origin, Snapshot) else '#'}{origin.name}"
        size = snap.referenced - (origin.referenced if origin else 0)
        return [{"fs": owner.name, "type": owner.type, "raw": raw, "encrypted": raw and owner.encryption != "off",
                 "flags": flags, "props": None, **self._to_fields(snap), "fromguid": fromguid,
                 "from_shown": origin_name, "size": max(size, 0), "offset": int(fields.get("bytes", 0))}]

    # -- receive -----------------------------------------------------------------------------------
    def recv(self, p: FakeProcess, args: list[str]) -> int:
        opts, rest = _options(args, "uvsFAnx:o:deMh", "receive")
        _unsupported_flags(opts, "vndeMh", "receive")
        if len(rest) != 1 or "@" in rest[0]:
            raise Unsupported(f"zfs recv into {rest!r}")
        target = rest[0]
        if "A" in opts:
            return self._abort(p, target)
        receiver = _Receiver(self, p, target, opts)
        return receiver.run()

    receive = recv

    def _abort(self, p: FakeProcess, target: str) -> int:
        with self.world.lock:
            ds = self.world.datasets.get(target)
            if ds is None:
                raise _usage("receive", f"cannot open '{target}': dataset does not exist")
            if ds.partial is None:
                p.say(f"'{target}' does not have any resumable receive state to abort\n")
                return 1
            if ds.partial.new_fs:
                self.world.destroy(target)
            else:
                ds.partial = None
            self.world.next_txg()
        return 0


class _SendRefused(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message, self.code = message, code


class _Receiver:
    """One `zfs recv`: reads streams from stdin and applies each as it completes."""

    def __init__(self, commands: Commands, p: FakeProcess, target: str, opts: dict[str, list[str]]):
        self.world, self.p, self.target = commands.world, p, target
        self.force, self.resumable = "F" in opts, "s" in opts
        self.exclude = set(opts.get("x", []))
        self.override = dict(o.partition("=")[::2] for o in opts.get("o", []))
        self.buffer = b""
        self.eof = False
        cut = commands.fake.active_rule(p, "cut")
        self.budget = cut.nbytes if cut else None

    def _fill(self) -> bool:
        if self.eof:
            return False
        want = CHUNK if self.budget is None else min(CHUNK, self.budget)
        chunk = self.p.read(want) if want else b""
        if self.budget is not None:
            self.budget -= len(chunk)
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _header(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            if not self._fill() or len(self.buffer) > 1 << 20:
                return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        if not line.startswith(STREAM_MAGIC):
            return None
        return json.loads(line[len(STREAM_MAGIC):])

    def _payload(self, n: int) -> int:
        got = 0
        while got < n:
            if not self.buffer and not self._fill():
                break
            take = min(n - got, len(self.buffer))
            self.buffer = self.buffer[take:]
            got += take
        return got

    def run(self) -> int:
        first = True
        while True:
            if not self.buffer and not self._fill():
                if first:
                    self.p.say("cannot receive: failed to read from stream\n")
                    return 1
                return 0
            header = self._header()
            if header is None:
                self.p.say("cannot receive: failed to read from stream\n" if first else
                           "cannot receive: invalid stream (bad magic number)\n")  # approximate when not first
                return 1
            first = False
            kind = "resume" if header["offset"] else ("incremental" if header["fromguid"] else "new filesystem")
            with self.world.lock:
                problem = self._check(header, kind)
            if problem:
                self.p.say(problem)
                return 1
            wanted = header["size"] - header["offset"]
            got = self._payload(wanted)
            with self.world.lock:
                if got < wanted:
                    return self._cut(header, kind, got)
                problem = self._check(header, kind)  # again: the world may have changed meanwhile
                if problem:
                    self.p.say(problem)
                    return 1
                self._apply(header)

    # -- checks ------------------------------------------------------------------------------------
    def _check(self, h: dict[str, Any], kind: str) -> str | None:
        """zfs recv's refusal of this stream (its whole message), None when it may go in."""
        ds = self.world.datasets.get(self.target)
        refuse = f"cannot receive {kind} stream: "
        if kind == "resume":
            if ds is None:
                return f"{refuse}destination '{self.target}' does not exist\n"
            if ds.partial is None or ds.partial.header["toguid"] != h["toguid"] or ds.partial.received != h["offset"]:
                return (f"{refuse}Resuming recv on existing destination '{self.target}'\n"
                        "must specify -F to overwrite it\n")
            return None
        if kind == "incremental":
            if ds is None:
                return f"{refuse}destination '{self.target}' does not exist\n"
            if ds.partial is not None:
                return f'{refuse}destination {self.target} contains partially-complete state from "zfs receive -s".\n'
            if ds.snapshot(h["to"]) is not None:
                if any(s.guid == h["toguid"] for s in ds.snapshots):
                    return None  # zfs consumes and ignores a snapshot it already has
                return f"cannot restore to {self.target}@{h['to']}: destination already exists\n"
            base = next((s for s in ds.snapshots if s.guid == h["fromguid"]), None)
            if base is None:
                return f"{refuse}most recent snapshot of {self.target} does not\nmatch incremental source\n"
            # not only the newest snapshot: any base will do while nothing was written since
            modified = ds.written_txg > base.createtxg or (h["raw"] and ds.snapshots[-1] is not base)
            if modified and not self.force:
                return f"{refuse}destination {self.target} has been modified\nsince most recent snapshot\n"
            if h["encrypted"] != (ds.encryption != "off"):
                raise Unsupported("an incremental raw stream onto an unencrypted dataset or the reverse")
            return None
        if ds is None:
            parent = self.target.rpartition("/")[0]
            if parent not in self.world.datasets:
                return (f"cannot open '{parent}': dataset does not exist\n"
                        f"{refuse}unable to restore to destination\n")
            return None
        if not self.force:
            return f"{refuse}destination '{self.target}' exists\nmust specify -F to overwrite it\n"
        if ds.partial is not None:
            return f'{refuse}destination {self.target} contains partially-complete state from "zfs receive -s".\n'
        if ds.snapshots:
            return (f"{refuse}destination has snapshots (eg. {self.target}@{ds.snapshots[0].name})\n"
                    "must destroy them to overwrite it\n")
        if ds.encryption != "off" or h["encrypted"]:
            return (f"{refuse}zfs receive -F cannot be used to destroy an encrypted filesystem or overwrite an "
                    "unencrypted one with an encrypted one\n")
        return None

    # -- outcomes --------------------------------------------------------------------------------
    def _cut(self, h: dict[str, Any], kind: str, got: int) -> int:
        if not self.resumable:
            self.p.say(f"cannot receive {kind} stream: incomplete stream\n")
            return 1
        ds = self.world.datasets.get(self.target)
        if kind == "resume":
            assert ds is not None and ds.partial is not None
            ds.partial.received += got
        elif ds is None:
            ds = self._new_dataset(h)
            ds.partial = Partial(h, got, new_fs=True)
        else:
            ds.partial = Partial(h, got, new_fs=False)
        self.world.next_txg()
        self.p.say(f"cannot receive {kind} stream: checksum mismatch or incomplete stream.\n"
                   "Partially received snapshot is saved.\n"
                   "A resuming stream can be generated on the sending system by running:\n"
                   f"    zfs send -t {self.world.resume_token(self.target)}\n")
        return 1

    def _new_dataset(self, h: dict[str, Any]) -> Dataset:
        ds = self.world.create(self.target, volume=h["type"] == "volume", props=self.override)
        if h["encrypted"]:  # raw: the ciphertext arrives, its key stays on the sender
            ds.encryption, ds.encryption_root, ds.key_loaded = ENCRYPTED, self.target, False
        return ds

    def _apply(self, h: dict[str, Any]) -> None:
        ds = self.world.datasets.get(self.target)
        replace = False
        if h["offset"]:  # a resumed stream completes the saved one
            assert ds is not None and ds.partial is not None
            h, replace = ds.partial.header, not ds.partial.new_fs and not ds.partial.header["fromguid"]
            ds.partial = None
        elif ds is not None and h["fromguid"] and any(s.guid == h["toguid"] for s in ds.snapshots):
            return  # already there: consumed and ignored
        elif ds is not None:
            replace = not h["fromguid"]
        if ds is None:
            ds = self._new_dataset(h)
        if replace:  # a forced full receive: a new dataset under the old name, its dsl_dir props stay
            ds.guid, ds.createtxg, ds.creation = self.world.new_guid(), self.world.next_txg(), self.world.now()
            ds.received.clear()
            ds.snapshots.clear()
        elif h["fromguid"] and self.force:  # -F rolls back to the base: snapshots after it go
            base = next(s for s in ds.snapshots if s.guid == h["fromguid"])
            ds.snapshots = [s for s in ds.snapshots if s.createtxg <= base.createtxg]
        if h["props"] is not None:
            ds.received = {k: v for k, v in h["props"].items() if k not in self.exclude}
        ds.local.update(self.override)
        ds.referenced, ds.written_txg = h["referenced"], 0
        ds.snapshots.append(Snapshot(h["to"], h["toguid"], self.world.next_txg(), h["creation"], h["referenced"]))
        ds.snapshots_changed = self.world.now()


# =================================================================================================
# FakeZfs
# =================================================================================================

class FakeZfs(zrepl.Zfs):
    """zrepl's ZFS layer over a World. `calls` is every argv run or spawned, in order."""

    def __init__(self, world: World | None = None, *, clock: Callable[[], float] | None = None):
        super().__init__()
        self.world = world or World(clock=clock or time.time)
        self.calls: list[list[str]] = []
        self.rules: list[Rule] = []
        self.errors: list[BaseException] = []  # bugs in the double met inside spawned commands
        self.tamper = Tamper(self.world)
        self._commands = Commands(self)
        self._rule_lock = threading.Lock()

    @classmethod
    def with_filesystems(cls, *filesystems: str, clock: Callable[[], float] | None = None) -> FakeZfs:
        """A fake whose world has these filesystems (pools and parents created), no snapshots."""
        fake = cls(clock=clock)
        for fs in filesystems:
            pool, _, path = fs.partition("/")
            fake.world.tree(pool, path or ".")
        return fake

    # -- fault injection -----------------------------------------------------------------------------
    def fail(self, verb: str, stderr: str = "fakezfs: injected failure\n", exit_code: int = 1, *,
             times: int | None = None, match: str | None = None) -> Rule:
        """`zfs VERB` prints stderr and exits with exit_code; the world is not changed."""
        return self._add(Rule(verb, "fail", match, times, exit_code, stderr))

    def hang(self, verb: str, *, times: int | None = None, match: str | None = None) -> Rule:
        """`zfs VERB` waits until rule.release() (then runs normally) or until it is killed."""
        return self._add(Rule(verb, "hang", match, times))

    def cut(self, verb: str = "send", nbytes: int = 0, *, stderr: str = "", exit_code: int = 1,
            times: int | None = None, match: str | None = None) -> Rule:
        """send: only the first nbytes of the stream go out, then it exits with exit_code and
        stderr. recv: the stream ends for it after nbytes (as if the connection broke)."""
        return self._add(Rule(verb, "cut", match, times, exit_code, stderr, nbytes))

    def clear(self) -> None:
        self.rules.clear()

    def _add(self, rule: Rule) -> Rule:
        rule.verb = {"receive": "recv"}.get(rule.verb, rule.verb)
        self.rules.append(rule)
        return rule

    def _take_rule(self, argv: Sequence[str]) -> Rule | None:
        with self._rule_lock:
            for rule in self.rules:
                if rule.matches(argv):
                    rule.used += 1
                    return rule
        return None

    def active_rule(self, p: FakeProcess, action: str) -> Rule | None:
        return p.rule if p.rule is not None and p.rule.action == action else None

    # -- the two process methods of zrepl.Zfs ----------------------------------------------------
    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = self._start(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise zrepl.ZfsError(argv, None, "", kind="timeout") from None
        if proc.error is not None:
            raise proc.error
        if check and proc.returncode != 0:
            raise zrepl.ZfsError(argv, proc.returncode, err.decode("utf-8", "replace"))
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        unknown = set(popen_kwargs) - {"stdin", "stdout", "stderr"}
        if unknown:
            raise Unsupported(f"spawn with {sorted(unknown)}")
        proc = self._start(argv, popen_kwargs.get("stdin"), popen_kwargs.get("stdout"), popen_kwargs.get("stderr"))
        return proc  # type: ignore[return-value]  # Popen-like

    def _start(self, argv: Sequence[str], stdin: Any, stdout: Any, stderr: Any) -> FakeProcess:
        argv = [str(a) for a in argv]
        self.counters.add(argv)
        self.calls.append(argv)
        if argv[0] != "zfs" or len(argv) < 2:
            raise Unsupported(f"{shlex.join(argv)}: only zfs commands are modelled")
        verb = argv[1]
        command = getattr(self._commands, verb, None)
        if verb.startswith("_") or command is None:
            raise Unsupported(f"zfs {verb} is not modelled")
        proc = FakeProcess(self, argv, stdin, stdout, stderr)
        proc.rule = self._take_rule(argv)
        return proc.start(lambda p: self._execute(p, command, argv[2:]))

    def _execute(self, p: FakeProcess, command: Callable[[FakeProcess, list[str]], int], args: list[str]) -> int:
        rule = p.rule
        if rule is not None and rule.action == "hang":
            rule.entered.set()
            p.hang_until(rule.released)
        if rule is not None and rule.action == "fail":
            p.say(rule.stderr)
            return rule.exit_code
        try:
            return command(p, args)
        except UsageError as exc:
            p.say(f"{exc}\n" if not str(exc).endswith("\n") else str(exc))
            return 2

    def wall_time(self) -> float:  # what snapshots_changed is stamped with
        return self.world.clock()

    # -- convenience -------------------------------------------------------------------------------
    def calls_of(self, verb: str) -> list[list[str]]:
        """The recorded argv of one verb (`recv` and `receive` are one)."""
        verb = {"receive": "recv"}.get(verb, verb)
        return [c for c in self.calls if len(c) > 1 and {"receive": "recv"}.get(c[1], c[1]) == verb]
