"""`zrepl.py stdinserver IDENTITY` (the ssh forced command) against hostile and ordinary clients,
without ZFS: a fake `zfs` first in PATH logs every call and answers from a small JSON world.

After every test the log is checked: no zfs call may name a dataset outside what the identity's
job allows (a sink client: below root_fs/<identity>, reads of root_fs itself excepted; a source
client: what its filesystems filter accepts).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import support
import zrepl
from support import sink_job, source_job, stdinserver

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

WORLD = {
    # dataset -> list of (snapshot, guid); createtxg follows the order
    "datasets": {
        "tank": [], "tank/sink": [], "tank/sink/client1": [],
        "tank/sink/client1/prod": [], "tank/sink/client1/prod/fs": [["s1", 11]],
        "tank/sink/client2": [], "tank/sink/client2/prod": [], "tank/sink/client2/prod/fs": [["s1", 21]],
        "tank/data": [["a", 31]], "tank/data/secret": [["a", 41]], "tank/other": [["a", 51]],
    },
    # resume token -> toname (what `zfs send -nvt` decodes)
    "tokens": {"1-foreign-token": "tank/other@a", "1-own-token": "tank/data@a"},
    "send_bytes": 0,
}

FAKE_ZFS = r'''#!/usr/bin/env python3
import json, os, sys, time
DIR = os.path.dirname(os.path.abspath(__file__))
argv = sys.argv[1:]
with open(os.path.join(DIR, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
world = json.load(open(os.path.join(DIR, "world.json")))
verb = argv[0] if argv else ""
if verb == "list":
    props = argv[argv.index("-o") + 1].split(",")
    values = {argv[argv.index(o) + 1] for o in ("-o", "-t", "-d") if o in argv}
    depth = int(argv[argv.index("-d") + 1]) if "-d" in argv else None
    roots = [a for a in argv[1:] if not a.startswith("-") and a not in values]
    txg = 100
    out = []
    for root in roots:
        if root not in world["datasets"]:
            sys.stderr.write(f"cannot open '{root}': dataset does not exist\n")
            sys.exit(1)
    for name, snaps in sorted(world["datasets"].items()):
        if not any(name == r or name.startswith(r + "/") for r in roots):
            continue
        if depth is not None and not any(name == r or "/" not in name[len(r) + 1:] for r in roots):
            continue  # -d 1: the root, its direct children and the root's own snapshots
        rows = [(name, "filesystem", 1000 + len(out), txg)]
        for snap, guid in (snaps if depth is None or name in roots else []):
            txg += 1
            rows.append((f"{name}@{snap}", "snapshot", guid, txg))
        for n, kind, guid, t in rows:
            values = {"name": n, "type": kind, "guid": str(guid), "createtxg": str(t), "creation": "1700000000",
                      "userrefs": "0"}
            out.append("\t".join(values.get(p, "-") for p in props))
    print("\n".join(out))
elif verb == "send" and "-t" in argv and "-n" in argv:
    token = argv[argv.index("-t") + 1]
    if token not in world["tokens"]:
        sys.stderr.write("cannot resume send: invalid token\n")
        sys.exit(1)
    print(f"toguid = 0x1f\ntoname = {world['tokens'][token]}\n")
elif verb == "send" and "-n" in argv:
    print("size\t1000")
elif verb == "send":
    left = world["send_bytes"]
    chunk = b"\0" * 65536
    while left > 0:
        n = os.write(1, chunk[:min(left, len(chunk))])
        left -= n
elif verb in ("recv", "receive"):
    while os.read(0, 1 << 20):
        pass
elif verb == "get":
    print("off")
sys.exit(0)
'''

FAKE_SSH = r'''#!/bin/sh
# Stands in for ssh: records its arguments, then runs the forced command locally.
printf '%s\n' "$@" > "{dir}/ssh-argv"
exec {python} {zrepl} --config {config} stdinserver {identity}
'''


def write_config(tmp_path: Path, *extra_jobs: support.Job) -> Path:
    """Sink `sink` (clients client1, client2) and source `source` (client puller), both stdinserver."""
    return support.write_config(
        tmp_path,
        sink_job("sink", root_fs="tank/sink", serve=stdinserver("client1", "client2")),
        source_job("source", filesystems={"tank/data<": True, "tank/data/secret": False}, serve=stdinserver("puller")),
        *extra_jobs)


class FakeZfsOnPath:
    """The fake zfs directory: `calls()` are the argv lists it was run with."""

    def __init__(self, directory: Path, world: dict):
        self.dir = directory
        directory.mkdir()
        (directory / "zfs").write_text(FAKE_ZFS)
        (directory / "zfs").chmod(0o755)
        (directory / "calls.jsonl").write_text("")
        self.set_world(world)

    def set_world(self, world: dict) -> None:
        (self.dir / "world.json").write_text(json.dumps(world))

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.dir / "calls.jsonl").read_text().splitlines()]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def setup(tmp_path):
    fake = FakeZfsOnPath(tmp_path / "fakezfs", WORLD)
    cfg = write_config(tmp_path)
    servers: list[zrepl.Connection] = []

    def connect(identity: str, claimed: str | None = None, handshake: bool = True,
                log_level: str = "info", timeout: float = 20) -> zrepl.Connection:
        conn = zrepl.ssh_connect([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg),
                                  "--log-level", log_level, "stdinserver", identity],
                                 name="stdinserver", timeout=timeout, env=fake.env)
        servers.append(conn)
        if handshake:
            conn.handshake_client(claimed or identity)
        return conn

    yield fake, cfg, connect
    for conn in servers:
        conn.close()


def names_in(argv: list[str]) -> list[str]:
    """Dataset names (the part before @/#) that a zfs argv addresses."""
    verb, rest = argv[0], argv[1:]
    takes_value = {"-o", "-x", "-t", "-s", "-S", "-d"}
    positional, skip = [], False
    for arg in rest:
        if skip:
            skip = False
            continue
        if arg in takes_value and not (verb == "send" and arg == "-t" and False):
            skip = True
            continue
        if arg.startswith("-"):
            continue
        positional.append(arg)
    if verb in ("hold", "release"):
        positional = positional[1:]  # the tag
    if verb == "get":
        positional = positional[1:]  # the property
    return [p.split("@")[0].split("#")[0] for p in positional]


def assert_confined(fake: FakeZfsOnPath, allowed, read_also: set[str] = frozenset()) -> None:
    for argv in fake.calls():
        for name in names_in(argv):
            ok = allowed(name) or (argv[0] == "list" and name in read_also)
            assert ok, f"zfs call outside the client's confinement: {argv}"


def in_client1(name: str) -> bool:
    return zrepl.is_descendant(name, "tank/sink/client1", include_self=True)


SOURCE_FILTER = zrepl.DatasetFilter({"tank/data<": True, "tank/data/secret": False})


# ---- identities ---------------------------------------------------------------------------------

def test_unknown_identity_is_refused_with_a_clear_message_before_any_zfs_call(setup):
    fake, cfg, connect = setup
    conn = connect("mallory", handshake=False)
    with pytest.raises(zrepl.ProtocolError) as ei:
        conn.handshake_client("mallory")
    msg = str(ei.value)
    assert "handshake refused" in msg and "unknown client identity 'mallory'" in msg
    assert "client1" in msg and ei.value.temporary is False
    conn.close()
    proc = conn._child
    assert proc.returncode == 1
    stderr = conn._child_stderr.text()
    assert "unknown client identity 'mallory'" in stderr and "Traceback" not in stderr
    assert fake.calls() == []


def test_second_connection_of_one_identity_is_refused_as_temporary(setup, monkeypatch):
    fake, cfg, connect = setup
    first = connect("client1")
    # the server waits STDINSERVER_LOCK_WAIT (here shortened) for the first connection to end, then refuses
    monkeypatch.setenv("ZREPL_STDINSERVER_LOCK_WAIT", "0.5")
    second = connect("client1", handshake=False, timeout=20)
    with pytest.raises(zrepl.ProtocolError) as ei:
        second.handshake_client("client1")
    assert "handshake refused" in str(ei.value) and ei.value.temporary is True  # worth dialing again
    assert first.request("endpoint.info", {})["root"] == "tank/sink/client1"  # the first is still served


class FakeClock(zrepl.Clock):
    """Time that moves only when something sleeps (CPython's test_sched model)."""

    def __init__(self, start: float = 1_000.0):
        self.now, self.slept = start, []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_client_lock_waits_for_the_previous_connection_then_refuses(tmp_path):
    holder = zrepl.JobLock.for_client(str(tmp_path), "sink", "c1")
    assert holder.try_acquire()
    clock = FakeClock()
    with pytest.raises(zrepl.ClientBusy) as ei:
        zrepl.acquire_client_lock(str(tmp_path), "sink", "c1", wait=30, clock=clock)
    assert ei.value.temporary and "still being served" in str(ei.value)
    assert 29.9 <= sum(clock.slept) <= 30.3 and max(clock.slept) <= 0.2  # polled, never a blind 30 s sleep
    holder.release()
    lock = zrepl.acquire_client_lock(str(tmp_path), "sink", "c1", wait=30, clock=clock)
    assert lock is not None
    lock.release()


def test_unknown_identity_without_a_client_exits_with_the_message(setup):
    fake, cfg, _ = setup
    proc = subprocess.run([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "stdinserver", "nobody"],
                          capture_output=True, env=fake.env, stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 1
    stderr = proc.stderr.decode()
    assert "unknown client identity 'nobody'" in stderr and "Traceback" not in stderr
    assert fake.calls() == []


def test_identity_comes_from_the_forced_command_not_from_the_client(setup):
    fake, cfg, connect = setup
    conn = connect("client1", claimed="client2")
    info = conn.request("endpoint.info", {})
    assert info["root"] == "tank/sink/client1" and info["job"] == "sink"
    listing = dict(zrepl.fetch_listing(conn, "receiver.list"))
    assert sorted(listing) == ["prod", "prod/fs"]
    guids = [v.guid for v in listing["prod/fs"].versions]
    assert guids == [11]  # client1's snapshot, never client2's (guid 21)
    assert_confined(fake, in_client1, read_also={"tank/sink"})


def test_identity_listed_by_two_jobs_is_refused(tmp_path):
    fake = FakeZfsOnPath(tmp_path / "fakezfs", WORLD)
    cfg = write_config(tmp_path, sink_job("sink2", root_fs="tank/other", serve=stdinserver("client1")))
    proc = subprocess.run([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "stdinserver", "client1"],
                          capture_output=True, env=fake.env, stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 1 and "listed by several jobs (sink, sink2)" in proc.stderr.decode()
    assert proc.stdout.startswith(zrepl.FRAME_MAGIC)  # the client gets it as an ERROR frame
    assert fake.calls() == []


# ---- path traversal and bad names ---------------------------------------------------------------

BAD_FS = ["../client2/prod/fs", "prod/../../client2/prod/fs", "/tank/sink/client2/prod/fs", "prod/fs/",
          "prod/fs@s1", "prod/fs#bm", "prod/f\x00s", "prod/f\ns", "prod/f\x1bs", "a" * 300, "prod//fs", "",
          ".", "..", "prod/./fs", "prod/fs,tank/x", "prod/fs%x", 7, None, ["prod/fs"]]
BAD_SNAPSHOTS = ["s1,s2", "a%z", "x/y", "@s1", "#s1", "s\x00", "..", "", "s" * 300, 5, None]


def test_sink_refuses_bad_names_before_any_zfs_call(setup):
    fake, cfg, connect = setup
    conn = connect("client1")
    before = len(fake.calls())
    for fs in BAD_FS:
        for kind, body in (("receiver.destroy", {"fs": fs, "names": ["s1"]}),
                           ("receiver.clear_token", {"fs": fs})):
            with pytest.raises(zrepl.RemoteError) as ei:
                conn.request(kind, body)
            assert "internal error" not in str(ei.value), (kind, fs, str(ei.value))
    for name in BAD_SNAPSHOTS:
        with pytest.raises(zrepl.RemoteError):
            conn.request("receiver.destroy", {"fs": "prod/fs", "names": [name]})
    assert fake.calls()[before:] == []  # every one refused before zfs ran
    assert conn.request("endpoint.info", {})["root"] == "tank/sink/client1"  # still usable


@pytest.mark.parametrize("size", [1000, 2 * MiB])  # small: the whole stream is out before the refusal
def test_sink_receive_with_a_traversing_name_never_starts_zfs_recv(setup, size):
    fake, cfg, connect = setup
    conn = connect("client1")
    for fs in ("../client2/prod/fs", "prod/fs@evil", "/etc"):
        producer = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        req = {"fs": fs, "to": "s2", "to_guid": 5, "from": None}
        with pytest.raises(zrepl.RemoteError, match="invalid"):
            conn.request("receiver.receive", req, stream_in=zrepl.OutgoingStream.from_process(producer, "head"))
        producer.wait()
    assert not any(argv[0] in ("recv", "receive", "create") for argv in fake.calls())
    assert conn.request("endpoint.info", {})["root"] == "tank/sink/client1"


def test_names_of_another_identity_land_inside_the_own_subtree(setup):
    fake, cfg, connect = setup
    conn = connect("client1")
    # "client2/prod/fs" is just a sender path to the sink: it maps below client1
    res = conn.request("receiver.destroy", {"fs": "client2/prod/fs", "names": ["s1"]})
    assert res["destroyed"] == ["s1"]
    conn.request("receiver.destroy", {"fs": "prod/fs", "names": ["s1"]})
    destroys = [argv for argv in fake.calls() if argv[0] == "destroy"]
    assert destroys == [["destroy", "tank/sink/client1/client2/prod/fs@s1"],
                        ["destroy", "tank/sink/client1/prod/fs@s1"]]
    assert_confined(fake, in_client1, read_also={"tank/sink"})


def test_malformed_bodies_are_refused_as_the_clients_error(setup):
    fake, cfg, connect = setup
    conn = connect("client1")
    for kind, body in (("receiver.destroy", {"fs": "prod/fs", "names": 5}),
                       ("receiver.destroy", {"fs": "prod/fs", "names": "s1"}),
                       ("receiver.destroy", {"fs": {"a": 1}, "names": []}),
                       ("receiver.receive", {"fs": "prod/fs", "to": "s2"})):
        with pytest.raises(zrepl.RemoteError) as ei:
            conn.request(kind, body)
        assert "internal error" not in str(ei.value)
    assert not any(argv[0] != "list" for argv in fake.calls())


def test_source_client_reaches_only_its_filesystems_filter(setup):
    fake, cfg, connect = setup
    fake.set_world({**WORLD, "send_bytes": 1000})
    conn = connect("puller")
    listed = [ds.name for _, ds in zrepl.fetch_listing(conn, "sender.list")]
    assert listed == ["tank/data"]
    for fs in ("tank/other", "tank/data/secret", "tank/sink/client1/prod/fs", "tank", "tank/data/../other"):
        req = {"fs": fs, "to": "a", "to_guid": 51}
        for kind, body in (("sender.send", req), ("sender.estimate", req),
                           ("sender.destroy", {"fs": fs, "names": ["a"]}),
                           ("sender.protect", {"fs": fs, "level": "guarantee_resumability",
                                               "snapshots": [["a", 51]], "source": None}),
                           ("sender.complete", {"fs": fs, "to": "a", "to_guid": 51,
                                                "level": "guarantee_resumability"})):
            with pytest.raises(zrepl.RemoteError) as ei:
                conn.request(kind, body, stream_out=lambda b, s: s.discard())
            assert "internal error" not in str(ei.value)
    # a resume token of another dataset, smuggled into a request for an allowed one
    foreign = zrepl.encode_resume_token({"object": 1, "offset": 0, "bytes": 0, "toguid": 0x1F,
                                         "toname": "tank/other@a"})
    with pytest.raises(zrepl.RemoteError, match="continues 'tank/other@a', not a snapshot of tank/data"):
        conn.request("sender.send", {"fs": "tank/data", "to": "a", "to_guid": 31, "resume_token": foreign},
                     stream_out=lambda b, s: s.discard())
    for bad in (["a@b", 1], ["../x", 1], ["a", "x"], "xx", [["a"]]):
        with pytest.raises(zrepl.RemoteError) as ei:
            conn.request("sender.protect", {"fs": "tank/data", "level": "guarantee_resumability",
                                            "snapshots": [bad] if not isinstance(bad, str) else bad, "source": None})
        assert "internal error" not in str(ei.value)
    with pytest.raises(zrepl.RemoteError):
        conn.request("sender.protect", {"fs": "tank/data", "level": "rm -rf", "snapshots": [], "source": None})
    # what is allowed works
    got = {}
    conn.request("sender.send", {"fs": "tank/data", "to": "a", "to_guid": 31},
                 stream_out=lambda b, s: got.update(n=s.copy_to(os.open(os.devnull, os.O_WRONLY))))
    assert got["n"] == 1000
    assert_confined(fake, SOURCE_FILTER.accepts, read_also={"tank"})  # listings cover pools, filtered after
    assert not any(argv[0] in ("destroy", "hold", "release", "bookmark") for argv in fake.calls())


# ---- garbage on the wire ------------------------------------------------------------------------

def raw_frame(ftype: int, payload: bytes = b"") -> bytes:
    return zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, ftype, len(payload)) + payload


def json_frame(ftype: int, body: dict) -> bytes:
    return raw_frame(ftype, json.dumps(body).encode())


HELLO = json_frame(zrepl.FRAME_HELLO, {"protocol": zrepl.PROTOCOL_NAME, "version": zrepl.PROTOCOL_VERSION,
                                       "identity": "client1", "accept_fds": False})
GARBAGE = {
    "ssh banner instead of hello": (False, b"SSH-2.0-OpenSSH_9.6\r\n" * 4),
    "request before hello": (False, json_frame(zrepl.FRAME_REQUEST, {"id": 1, "kind": "receiver.list", "body": {}})),
    "bad magic": (True, b"GARBAGE!" * 4),
    "unknown frame type": (True, zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, 77, 0)),
    "oversized header": (True, zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_REQUEST,
                                                       zrepl.MAX_HEADER_SIZE + 1) + b"{"),
    "invalid json": (True, raw_frame(zrepl.FRAME_REQUEST, b'{"id": 1, "kind": ')),
    "header not an object": (True, raw_frame(zrepl.FRAME_REQUEST, b"[1, 2]")),
    "unknown request type": (True, json_frame(zrepl.FRAME_REQUEST, {"id": 1, "kind": "zfs.destroy",
                                                                    "body": {"fs": "tank"}})),
    "fd stream over a pipe": (True, json_frame(zrepl.FRAME_REQUEST, {"id": 1, "kind": "receiver.receive",
                                                                     "body": {}, "stream": "fd"})),
    "data outside a stream": (True, raw_frame(zrepl.FRAME_DATA, b"xyz")),
    "oversized data frame": (True, zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_DATA, 1 << 30)),
}


def read_frames(proc: subprocess.Popen, timeout: float = 20) -> list[tuple[int, bytes]]:
    """Every frame the server writes until it closes stdout."""
    data = b""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    frames = []
    while data:
        magic, ftype, length = zrepl.FRAME_HEADER.unpack(data[:zrepl.FRAME_HEADER.size])
        assert magic == zrepl.FRAME_MAGIC, data[:64]
        frames.append((ftype, data[zrepl.FRAME_HEADER.size:zrepl.FRAME_HEADER.size + length]))
        data = data[zrepl.FRAME_HEADER.size + length:]
    return frames


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_gets_an_error_frame_and_a_disconnect_without_traceback(setup, case):
    fake, cfg, _ = setup
    after_hello, garbage = GARBAGE[case]
    proc = subprocess.Popen([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "stdinserver", "client1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=fake.env)
    proc.stdin.write((HELLO if after_hello else b"") + garbage)
    proc.stdin.flush()
    frames = read_frames(proc)
    proc.stdin.close()
    rc = proc.wait(timeout=20)
    stderr = proc.stderr.read().decode()
    types = [t for t, _ in frames if t != zrepl.FRAME_HEARTBEAT]
    assert types == ([zrepl.FRAME_HELLO] if after_hello else []) + [zrepl.FRAME_ERROR], (types, stderr)
    err = json.loads(frames[-1][1] if frames[-1][0] == zrepl.FRAME_ERROR else
                     next(p for t, p in frames if t == zrepl.FRAME_ERROR))
    assert err["fatal"] is True
    assert rc == 1 and "Traceback" not in stderr and "ERROR" in stderr
    assert fake.calls() == []
    client = json.loads((Path(cfg).parent / "status.json").read_text())["jobs"]["sink"]["clients"]["client1"]
    assert client["last_connection"]["result"] == "error" and client["last_connection"]["error"]


def test_truncated_frame_ends_the_connection(setup):
    fake, cfg, _ = setup
    proc = subprocess.Popen([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "stdinserver", "client1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=fake.env)
    proc.stdin.write(HELLO + zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_REQUEST, 100) + b'{"id": 1')
    proc.stdin.close()
    frames = read_frames(proc)
    rc = proc.wait(timeout=20)
    stderr = proc.stderr.read().decode()
    assert frames[0][0] == zrepl.FRAME_HELLO
    assert rc == 1 and "truncated" in stderr and "Traceback" not in stderr
    assert fake.calls() == []


def test_one_connection_per_identity_a_reconnect_waits_for_the_previous(setup):
    fake, cfg, connect = setup
    first = connect("client1")
    first.request("receiver.list", {})
    other = connect("client2")  # another identity is not held up
    assert other.request("endpoint.info", {})["root"] == "tank/sink/client2"
    second = connect("client1", handshake=False)
    done = {}
    t = threading.Thread(target=lambda: done.update(hello=second.handshake_client("client1"),
                                                    at=time.monotonic()))
    t.start()
    time.sleep(2)
    assert "hello" not in done  # still waiting for the first connection's server to exit
    closed_at = time.monotonic()
    first.close()
    t.join(20)
    assert done["at"] >= closed_at
    assert second.request("endpoint.info", {})["root"] == "tank/sink/client1"


# ---- bandwidth limits on the passive side ------------------------------------------------------

def test_passive_side_applies_its_bandwidth_limits(tmp_path):
    fake = FakeZfsOnPath(tmp_path / "fakezfs", {**WORLD, "send_bytes": 3 * MiB})
    limit = {"bandwidth_limit": {"max": "1 MiB", "bucket_capacity": "256 KiB"}}
    cfg = support.write_config(
        tmp_path, sink_job("sink", root_fs="tank/sink", serve=stdinserver("client1"), recv=limit),
        source_job("source", filesystems={"tank/data<": True}, serve=stdinserver("puller"), send=limit))

    def connect(identity: str) -> zrepl.Connection:
        conn = zrepl.ssh_connect([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg),
                                  "stdinserver", identity], name="stdinserver", timeout=20, env=fake.env)
        conn.handshake_client(identity)
        return conn

    with connect("puller") as conn:
        start = time.monotonic()
        got = {}
        conn.request("sender.send", {"fs": "tank/data", "to": "a", "to_guid": 31},
                     stream_out=lambda b, s: got.update(n=s.copy_to(os.open(os.devnull, os.O_WRONLY))))
        elapsed = time.monotonic() - start
    assert got["n"] == 3 * MiB
    assert elapsed >= 2.3, elapsed  # 3 MiB at 1 MiB/s with a 256 KiB head start
    sent = json.loads((tmp_path / "status.json").read_text())["jobs"]["source"]["clients"]["puller"]
    assert sent["last_transfer"]["sent"] == "tank/data@a" and sent["last_transfer"]["bytes"] == 3 * MiB
    assert sent["last_transfer"]["seconds"] >= 2.3

    with connect("client1") as conn:
        producer = subprocess.Popen(["head", "-c", str(3 * MiB), "/dev/zero"], stdout=subprocess.PIPE)
        start = time.monotonic()
        with pytest.raises(zrepl.RemoteError):  # the fake recv "receives" nothing to verify
            conn.request("receiver.receive", {"fs": "prod/fs", "to": "s2", "to_guid": 5, "from": "@s1",
                                              "from_guid": 11},
                         stream_in=zrepl.OutgoingStream.from_process(producer, "head"))
        elapsed = time.monotonic() - start
        producer.wait()
    assert elapsed >= 2.3, elapsed
    recvs = [argv for argv in fake.calls() if argv[0] == "recv"]
    assert recvs and recvs[0][-1] == "tank/sink/client1/prod/fs"


# ---- the active side's ssh transport ------------------------------------------------------------

class ProcessSource:
    """A StreamSource over a producer process's stdout (what SendProcess is for `zfs send`)."""

    def __init__(self, proc: subprocess.Popen):
        self.stream = zrepl.OutgoingStream.from_process(proc, proc.args[0])

    def open_fd(self) -> int:
        return self.stream.fd

    def finish(self) -> str | None:
        return self.stream.finish() if self.stream.finish else None

    def abandon(self) -> None:
        pass


def ssh_job(identity_file: str = "/etc/zrepl/id", options: list[str] | None = None, **kw) -> zrepl.JobConfig:
    connect = zrepl.ConnectConfig(type="ssh+stdinserver", host="backup.example.com", user="zrepl", port=2222,
                                  identity_file=identity_file, options=options or [], **kw)
    return zrepl.JobConfig(name="push", type="push", connect=connect,
                           filesystems=zrepl.DatasetFilter({"tank/data<": True}))


def test_ssh_argv_is_exactly_the_documented_command():
    job = ssh_job(options=["Compression=yes", "StrictHostKeyChecking=yes"], dial_timeout=7)
    assert zrepl.ssh_argv(job.connect) == [
        "ssh", "-T", "-o", "BatchMode=yes", "-o", "Compression=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", "ConnectTimeout=7", "-i", "/etc/zrepl/id", "-p", "2222", "zrepl@backup.example.com"]
    # ssh keeps the first value of an option: a configured ConnectTimeout beats dial_timeout
    job = ssh_job(options=["ConnectTimeout=30"], ssh_command="/usr/local/bin/myssh")
    argv = zrepl.ssh_argv(job.connect)
    assert argv[0] == "/usr/local/bin/myssh"
    assert argv.index("ConnectTimeout=30") < argv.index("ConnectTimeout=10")


def test_connect_ssh_runs_ssh_without_a_remote_command_and_talks_to_stdinserver(setup, tmp_path):
    fake, cfg, _ = setup
    script = tmp_path / "fake-ssh"
    script.write_text(FAKE_SSH.format(dir=tmp_path, python=sys.executable, zrepl=REPO / "zrepl.py", config=cfg,
                                      identity="client1"))
    script.chmod(0o755)
    job = ssh_job(ssh_command=str(script))
    env_path = os.environ["PATH"]
    os.environ["PATH"] = fake.env["PATH"]
    try:
        peer = zrepl.connect_ssh(job, zrepl.Progress())
        try:
            receiver = zrepl.RemoteReceiver(peer.conn)
            assert sorted(receiver.list_filesystems()) == ["prod", "prod/fs"]
            assert receiver.info.root == "tank/sink/client1" and receiver.info.job == "sink"
        finally:
            peer.close()
    finally:
        os.environ["PATH"] = env_path
    argv = (tmp_path / "ssh-argv").read_text().splitlines()
    assert argv == zrepl.ssh_argv(job.connect)[1:]
    assert argv[-1] == "zrepl@backup.example.com"  # nothing after user@host: no remote command


def test_connect_ssh_applies_the_push_jobs_send_limit(setup, tmp_path):
    fake, cfg, _ = setup
    script = tmp_path / "fake-ssh"
    script.write_text(FAKE_SSH.format(dir=tmp_path, python=sys.executable, zrepl=REPO / "zrepl.py", config=cfg,
                                      identity="client1"))
    script.chmod(0o755)
    job = ssh_job(ssh_command=str(script))
    job.send.bandwidth_limit = zrepl.BandwidthLimit(max=1 * MiB, bucket_capacity=256 << 10)
    env_path = os.environ["PATH"]
    os.environ["PATH"] = fake.env["PATH"]
    try:
        peer = zrepl.connect_ssh(job, zrepl.Progress())
        try:
            producer = subprocess.Popen(["head", "-c", str(3 * MiB), "/dev/zero"], stdout=subprocess.PIPE)
            start = time.monotonic()
            with pytest.raises(zrepl.RemoteError):  # the fake recv leaves nothing to verify
                zrepl.RemoteReceiver(peer.conn).receive(
                    zrepl.StepRequest(fs="prod/fs", to="s2", to_guid=5, from_="@s1", from_guid=11),
                    ProcessSource(producer))
            elapsed = time.monotonic() - start
            producer.wait()
        finally:
            peer.close()
    finally:
        os.environ["PATH"] = env_path
    assert elapsed >= 2.3, elapsed


def test_redialing_connection_dials_again_after_a_lost_connection():
    handlers = {"echo": lambda body, ctx: {"echo": body}}
    servers: list[zrepl.Connection] = []

    def dial() -> zrepl.Connection:
        client, server = zrepl.local_pair(timeout=5)
        servers.append(server)
        threading_serve(server, handlers)
        client.handshake_client("c")
        return client

    conn = zrepl.RedialingConnection(dial)
    assert conn.request("echo", {"n": 1}) == {"echo": {"n": 1}}
    servers[-1]._sock.shutdown(2)  # the network goes away
    with pytest.raises(zrepl.ConnectionLost) as ei:
        conn.request("echo", {"n": 2})
    assert zrepl.is_temporary(ei.value)
    assert conn.request("echo", {"n": 3}) == {"echo": {"n": 3}}
    assert conn.dials == 2
    conn.cancel("stop")
    with pytest.raises(zrepl.Cancelled):
        conn.request("echo", {"n": 4})
    assert conn.dials == 2  # cancelled: never redials
    conn.close()


def test_redial_failure_closes_the_stream_handed_over():
    calls = {"n": 0}
    servers = []

    def dial() -> zrepl.Connection:
        calls["n"] += 1
        if calls["n"] > 1:
            raise zrepl.ConnectionLost("ssh: connect to host b port 22: Connection refused")
        client, server = zrepl.local_pair(timeout=5)
        servers.append(server)
        threading_serve(server, {"echo": lambda body, ctx: {}})
        client.handshake_client("c")
        return client

    conn = zrepl.RedialingConnection(dial)
    servers[0]._sock.shutdown(2)
    with pytest.raises(zrepl.ConnectionLost):
        conn.request("echo", {})
    r, w = os.pipe()
    with pytest.raises(zrepl.ConnectionLost, match="refused"):
        conn.request("echo", {}, stream_in=r)
    with pytest.raises(OSError):
        os.fstat(r)  # closed for us
    os.close(w)
    conn.close()


def threading_serve(server: zrepl.Connection, handlers: dict) -> None:

    def run() -> None:
        try:
            zrepl.serve_connection(server, handlers)
        except zrepl.ZreplError:
            pass
        finally:
            server.close()

    threading.Thread(target=run, daemon=True).start()


# ---- passive status -------------------------------------------------------------------------------

def test_status_records_each_clients_connections_and_shows_them(setup, tmp_path):
    fake, cfg, connect = setup
    conn = connect("client1")
    conn.request("receiver.list", {})
    conn.close()
    conn = connect("client2")
    with pytest.raises(zrepl.RemoteError):
        conn.request("receiver.destroy", {"fs": "../x", "names": ["s1"]})
    conn.close()
    doc = json.loads((tmp_path / "status.json").read_text())["jobs"]["sink"]
    c1, c2 = doc["clients"]["client1"], doc["clients"]["client2"]
    assert c1["last_connection"]["result"] == "ok" and c1["last_success"]
    assert c1["last_connection"]["requests"] == 1
    assert c2["last_connection"]["result"] == "error" and "last_success" not in c2
    assert "receiver.destroy" in c2["last_connection"]["error"] and c2["errors"][0]["request"] == "receiver.destroy"
    proc = subprocess.run([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "status"],
                          capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert proc.returncode == zrepl.NAGIOS_WARNING, proc.stdout
    sink_line = next(ln for ln in lines if " sink " in ln)
    assert "2 client(s), 1 need attention" in sink_line
    assert any(ln.strip().startswith("client client1: last connection") and "ok" in ln for ln in lines)
    assert any(ln.strip().startswith("client client2: last connection") and "FAILED" in ln for ln in lines)


def test_job_runs_keep_the_clients_recorded_by_stdinserver(tmp_path):
    store = zrepl.StatusStore(str(tmp_path / "status.json"), str(tmp_path / "run"))
    store.update("source", lambda d: d.setdefault("clients", {}).update(puller={"last_success": "x"}))
    store.publish("source", {"type": "source", "state": "idle"})
    doc = store.read()["jobs"]["source"]
    assert doc["state"] == "idle" and doc["clients"] == {"puller": {"last_success": "x"}}


def test_evaluate_clients_levels():
    now = 1_700_000_000.0
    mon = zrepl.MonitoringConfig()
    iso = zrepl.iso_time
    ok = {"last_connection": {"start": iso(now - 70), "end": iso(now - 60), "result": "ok"},
          "last_success": iso(now - 60),
          "last_transfer": {"received": "tank/data@s3", "time": iso(now - 60)}}
    level, lines = zrepl.evaluate_clients("sink", {"a": ok}, now, mon)
    assert level == zrepl.NAGIOS_OK
    assert lines == ["client a: last connection 1m ago ok; last pushed tank/data@s3 1m ago"]
    stale = dict(ok, last_success=iso(now - mon.crit_no_success_after - 10))
    assert zrepl.evaluate_clients("sink", {"a": stale}, now, mon)[0] == zrepl.NAGIOS_CRITICAL
    died = {"last_connection": {"start": iso(now - 5), "end": None, "result": "running", "pid": 2 ** 22 + 7}}
    level, lines = zrepl.evaluate_clients("source", {"b": died}, now, mon)
    assert level == zrepl.NAGIOS_WARNING and "died" in lines[0] and "no successful connection ever" in lines[0]


# ---- signals ---------------------------------------------------------------------------------

def test_sigterm_ends_the_stdinserver_with_its_reason_recorded_and_the_client_lock_released(setup, tmp_path):
    fake, cfg, connect = setup
    conn = connect("client1")
    conn.request("receiver.list", {})
    proc = conn.channel.process.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == zrepl.EXIT_FAILED
    last = json.loads((tmp_path / "status.json").read_text())["jobs"]["sink"]["clients"]["client1"]["last_connection"]
    assert last["result"] == "error" and "terminated by SIGTERM" in last["error"], last
    # the lock went with the process: the next connection of client1 is served, not refused
    assert connect("client1").request("endpoint.info", {})["root"] == "tank/sink/client1"


def test_a_signal_while_the_main_thread_holds_the_lock_cancel_needs_does_not_hang():
    """A handler that called conn.cancel() itself could interrupt the main thread inside the
    LaneMux's lock (or a heartbeat Event's) and then wait for that lock forever: the stdinserver
    hung on SIGTERM with its client lock held. CancelOnSignals' handler only notes the signal."""
    lock = threading.Lock()
    reasons: list[str] = []

    def cancel(reason: str) -> None:
        with lock:  # as LaneMux.cancel takes its lock
            reasons.append(reason)

    with zrepl.CancelOnSignals(cancel) as on_signals:
        with lock:  # the main thread inside the lock when the signal arrives
            returned = threading.Event()
            handler = threading.Thread(target=lambda: (on_signals.on_signal(signal.SIGTERM), returned.set()),
                                       daemon=True)
            handler.start()
            assert returned.wait(10)  # the handler returned while the lock is still held
            assert reasons == []
        deadline = time.monotonic() + 10
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.01)
    assert reasons == ["terminated by SIGTERM"]  # made by the watcher once the lock was free


def test_leaving_cancel_on_signals_without_a_signal_cancels_nothing_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    reasons: list[str] = []
    with zrepl.CancelOnSignals(reasons.append) as on_signals:
        assert signal.getsignal(signal.SIGTERM) == on_signals.on_signal
    assert signal.getsignal(signal.SIGTERM) == previous and reasons == []
