"""Lanes (section 7, LaneMux): several sessions multiplexed on one connection, as ssh+stdinserver
runs parallel replication steps (replication.concurrency.steps).

Host tests over pipe pairs (rfd/wfd, the path ssh takes) and one over a subprocess speaking on its
stdin/stdout via ssh_connect. No sleeps as synchronisation: events and barriers say when a state is
reached; real waits have a 10x margin.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import zrepl
from test_protocol import ServerThread

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
WAIT = 30.0  # seconds any expected event may take at most (the events take milliseconds)


# ---- helpers ------------------------------------------------------------------------------------

def pipe_pair(timeout: float = WAIT, heartbeat: float = 0.0) -> tuple[zrepl.Connection, zrepl.Connection]:
    """(client, server) joined by two pipes, as ssh joins them (no fd passing)."""
    c2s_r, c2s_w = os.pipe()
    s2c_r, s2c_w = os.pipe()
    client = zrepl.Connection(rfd=s2c_r, wfd=c2s_w, name="client end", timeout=timeout, heartbeat_interval=heartbeat)
    server = zrepl.Connection(rfd=c2s_r, wfd=s2c_w, name="server end", timeout=timeout, heartbeat_interval=heartbeat)
    return client, server


def cut_transport(conn: zrepl.Connection) -> None:
    """The transport dies under conn: its pipe ends close (the peer reads EOF, its writes fail);
    /dev/null takes their fd numbers, so nothing closes a reused number later."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (conn.channel.rfd, conn.channel.wfd):
        os.dup2(devnull, fd)
    os.close(devnull)
    conn.cancel("killed")  # a poll(2) under way still waits on the old pipe: the dead process stops too


def pattern(seed: int, size: int) -> bytes:
    """size bytes that differ per seed and per position (loss, reordering or mixing show in a hash)."""
    block = hashlib.sha256(b"seed %d" % seed).digest() * 2048  # 64 KiB
    out = bytearray()
    i = 0
    while len(out) < size:
        out += bytes([i & 0xFF]) + block[1:]
        i += 1
    return bytes(out[:size])


def feeding(data: bytes, *, fail: str | None = None, cut_after: int | None = None) -> zrepl.OutgoingStream:
    """An OutgoingStream whose producer (a thread writing a pipe) sends data (or the first
    cut_after bytes of it) and then reports `fail` as its exit, like a `zfs send` that died."""
    r, w = os.pipe()
    done = threading.Event()
    part = data if cut_after is None else data[:cut_after]

    def write() -> None:
        try:
            view = memoryview(part)
            while view:
                view = view[os.write(w, view):]
        except OSError:
            pass
        finally:
            os.close(w)
            done.set()
    threading.Thread(target=write, daemon=True).start()

    def finish() -> str | None:
        done.wait(WAIT)
        return fail
    return zrepl.OutgoingStream(r, finish)


def digest_of(fd: int) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class Server(ServerThread):
    """test_protocol's ServerThread, serving as the identity "lane-client" unless told otherwise."""

    def __init__(self, conn: zrepl.Connection, handlers: dict, identity: str | None = "lane-client"):
        super().__init__(conn, handlers, identity)

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the server did not end"


def echo(body: dict, ctx: zrepl.RequestContext) -> dict:
    return {"echo": body, "identity": ctx.identity}


def receive(body: dict, ctx: zrepl.RequestContext) -> dict:
    """Stands in for `zfs recv`: hash the incoming stream."""
    assert ctx.stream is not None
    digest, n = digest_of(ctx.stream.open_fd())
    ctx.stream.finish()
    return {"sha256": digest, "bytes": n}


def send(body: dict, ctx: zrepl.RequestContext) -> zrepl.Reply:
    """Stands in for `zfs send`: a pattern stream."""
    return zrepl.Reply({"size": body["size"]}, feeding(pattern(body["seed"], body["size"])))


HANDLERS = {"echo": echo, "receive": receive, "send": send}


def hash_rest(f, h, n: int, ctx: zrepl.RequestContext) -> dict:
    """A receive handler's answer: the rest of stream file f hashed on into h (n bytes so far)."""
    while chunk := f.read(1 << 16):
        h.update(chunk)
        n += len(chunk)
    f.close()
    assert ctx.stream is not None
    ctx.stream.finish()
    return {"sha256": h.hexdigest(), "bytes": n}


def hashing(result: dict):
    def consume(body: dict, stream: zrepl.IncomingStream) -> None:
        result["sha256"], result["bytes"] = digest_of(stream.open_fd())
    return consume


@pytest.fixture
def lanes():
    """Factory: (client, server, Server thread) with `wanted` lanes asked for and agreed."""
    made = []

    def make(wanted: int = 3, handlers: dict = HANDLERS, **kw):
        client, server = pipe_pair(**kw)
        st = Server(server, handlers)
        client.lanes_wanted = wanted
        client.handshake_client("claimed-name")
        made.append((client, server, st))
        return client, server, st

    yield make
    for client, server, st in made:
        client.close()
        st.join()
        server.close()


def run_threads(fns: list) -> list:
    """Run each fn in a thread; returns what each returned or raised."""
    results: list = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "a lane's call did not return"
    return results


# ---- negotiation --------------------------------------------------------------------------------

def test_both_sides_agree_on_lanes_and_each_lane_serves_requests(lanes):
    client, server, _ = lanes(wanted=3)
    assert client.lanes == 3 and server.lanes == 3
    lane1, lane2 = client.open_lane(), client.open_lane()
    assert client.request("echo", {"n": 0}) == {"echo": {"n": 0}, "identity": "lane-client"}
    assert lane1.request("echo", {"n": 1})["echo"] == {"n": 1}
    assert lane2.request("echo", {"n": 2})["identity"] == "lane-client"  # the forced identity, not the claim
    with pytest.raises(zrepl.ProtocolError, match="all 3 lanes"):
        client.open_lane()
    assert client.stats.frames_sent.get("LANE", 0) >= 3
    assert "REQUEST" not in client.stats.frames_sent  # every request rode inside a lane
    lane1.close()
    lane2.close()


def test_the_server_caps_the_lanes_it_serves(lanes):
    client, server, _ = lanes(wanted=100)
    assert client.lanes == server.lanes == zrepl.MUX_MAX_LANES


def test_an_older_server_without_lanes_gets_todays_protocol():
    client, server = pipe_pair()
    server._hello_lanes = lambda body, most: None  # an older zrepl.py: ignores the key, sends none
    st = Server(server, HANDLERS)
    client.lanes_wanted = 4
    hello = client.handshake_client("c")
    assert "lanes" not in hello and client.lanes == 1 and server.lanes == 1
    assert client.request("echo", {"x": 1})["echo"] == {"x": 1}
    with pytest.raises(zrepl.ProtocolError, match="no lanes"):
        client.open_lane()
    assert "LANE" not in client.stats.frames_sent and client.stats.frames_sent["REQUEST"] == 1
    client.close()
    st.join()
    assert st.error is None
    server.close()


def test_a_client_that_asks_for_no_lanes_sees_the_hello_it_always_saw():
    client, server = pipe_pair()
    seen: dict = {}
    orig = server.handshake_server

    def spy(identity=None, *, lanes=1):
        out = orig(identity, lanes=lanes)
        seen.update(server.peer_hello)
        return out
    server.handshake_server = spy
    st = Server(server, HANDLERS)
    hello = client.handshake_client("c")  # lanes_wanted stays 1
    assert "lanes" not in hello and "lanes" not in seen
    assert client.request("echo", {})["identity"] == "lane-client"
    client.close()
    st.join()
    server.close()


def test_a_server_that_grants_more_lanes_than_asked_is_refused():
    client, server = pipe_pair()
    got: dict = {}

    def hostile_server() -> None:
        try:
            server.channel.read_frame()
            server.channel.send_frame(zrepl.FRAME_HELLO, {"protocol": zrepl.PROTOCOL_NAME,
                                                          "version": zrepl.PROTOCOL_VERSION, "lanes": 9})
            got["reply"] = server.channel.read_frame()
        except zrepl.ZreplError as e:
            got["error"] = e
    t = threading.Thread(target=hostile_server, daemon=True)
    t.start()
    client.lanes_wanted = 4
    with pytest.raises(zrepl.ProtocolError, match="invalid lanes 9"):
        client.handshake_client("c")
    t.join(WAIT)
    assert got["reply"].type == zrepl.FRAME_ERROR and got["reply"].body["fatal"] is True
    client.close()
    server.close()


# ---- concurrency and streams --------------------------------------------------------------------

def test_streams_on_several_lanes_arrive_whole_in_order_and_at_the_same_time(lanes):
    """Each push stream's handler waits at a barrier with half of its stream read: all three are
    in flight together (a one-at-a-time server would break the barrier). Pulls run meanwhile."""
    size = 3 * MiB + 12345
    barrier = threading.Barrier(3, timeout=WAIT)

    def receive_meeting(body: dict, ctx: zrepl.RequestContext) -> dict:
        assert ctx.stream is not None
        with os.fdopen(ctx.stream.open_fd(), "rb") as f:
            h = hashlib.sha256()
            first = f.read(size // 2)
            while len(first) < size // 2 and (more := f.read(size // 2 - len(first))):
                first += more
            h.update(first)
            barrier.wait()
            return hash_rest(f, h, len(first), ctx)

    client, _, _ = lanes(wanted=6, handlers=dict(HANDLERS, meet=receive_meeting))
    conns = [client] + [client.open_lane() for _ in range(5)]
    pushes = [lambda c=c, i=i: c.request("meet", {}, stream_in=feeding(pattern(i, size)))
              for i, c in enumerate(conns[:3])]

    def pull(c: zrepl.Connection, seed: int) -> dict:
        result: dict = {}
        c.request("send", {"seed": seed, "size": size}, stream_out=hashing(result))
        return result
    pulls = [lambda c=c, i=i: pull(c, 10 + i) for i, c in enumerate(conns[3:])]
    results = run_threads(pushes + pulls)
    for i, r in enumerate(results):
        assert not isinstance(r, BaseException), r
        seed = i if i < 3 else 10 + i - 3
        assert r["bytes"] == size and r["sha256"] == hashlib.sha256(pattern(seed, size)).hexdigest()
    for c in conns[1:]:
        c.close()


def test_a_stalled_consumer_stalls_only_its_own_lane(lanes):
    """Lane 1's receiver stops reading mid-stream (its window fills); lane 0 and lane 2 go on."""
    release, reading = threading.Event(), threading.Event()

    def slow_receive(body: dict, ctx: zrepl.RequestContext) -> dict:
        assert ctx.stream is not None
        with os.fdopen(ctx.stream.open_fd(), "rb") as f:
            h = hashlib.sha256(f.read(1000))
            reading.set()
            assert release.wait(WAIT)
            return hash_rest(f, h, 1000, ctx)

    client, _, _ = lanes(wanted=3, handlers=dict(HANDLERS, slow=slow_receive))
    lane1, lane2 = client.open_lane(), client.open_lane()
    size = 16 * MiB  # far more than the window and the pipes hold
    data = pattern(7, size)
    box: dict = {}
    pusher = threading.Thread(target=lambda: box.update(r=lane1.request("slow", {}, stream_in=feeding(data))),
                              daemon=True)
    pusher.start()
    assert reading.wait(WAIT)
    for i in range(20):  # the stream sits stuck meanwhile: small requests still pass
        assert lane2.request("echo", {"i": i})["echo"] == {"i": i}
        assert client.request("echo", {"i": i})["echo"] == {"i": i}
    pulled: dict = {}
    lane2.request("send", {"seed": 3, "size": 2 * MiB}, stream_out=hashing(pulled))
    assert pulled["sha256"] == hashlib.sha256(pattern(3, 2 * MiB)).hexdigest()
    assert pusher.is_alive()  # lane 1 is still waiting for its consumer
    release.set()
    pusher.join(WAIT)
    assert box["r"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": size}
    lane1.close()
    lane2.close()


def test_a_cut_stream_fails_only_its_own_lane(lanes):
    """A producer dies after 1.5 MiB on lane 1 (zfs send killed) while lanes 0 and 2 stream whole:
    lane 1's request fails (RemoteError from the receiver), the others succeed, and lane 1 works
    on afterwards."""
    size = 4 * MiB
    client, _, _ = lanes(wanted=3)
    lane1, lane2 = client.open_lane(), client.open_lane()
    results = run_threads([
        lambda: client.request("receive", {}, stream_in=feeding(pattern(0, size))),
        lambda: lane1.request("receive", {}, stream_in=feeding(pattern(1, size), cut_after=3 * MiB // 2,
                                                               fail="zfs send exited with status 1")),
        lambda: lane2.request("receive", {}, stream_in=feeding(pattern(2, size))),
    ])
    assert isinstance(results[1], zrepl.RemoteError)
    assert "zfs send exited with status 1" in str(results[1])
    for i in (0, 2):
        assert results[i] == {"sha256": hashlib.sha256(pattern(i, size)).hexdigest(), "bytes": size}
    assert lane1.usable and client.usable
    assert lane1.request("receive", {}, stream_in=feeding(pattern(5, MiB)))["bytes"] == MiB
    lane1.close()
    lane2.close()


def test_a_pull_stream_cut_on_one_lane_raises_stream_error_there_only(lanes):
    def cut_send(body: dict, ctx: zrepl.RequestContext) -> zrepl.Reply:
        return zrepl.Reply({}, feeding(pattern(9, 2 * MiB), cut_after=MiB, fail="zfs send: signal 9"))

    client, _, _ = lanes(wanted=2, handlers=dict(HANDLERS, cut=cut_send))
    lane1 = client.open_lane()
    got: dict = {}
    results = run_threads([
        lambda: lane1.request("cut", {}, stream_out=hashing({})),
        lambda: client.request("send", {"seed": 4, "size": 3 * MiB}, stream_out=hashing(got)),
    ])
    assert isinstance(results[0], zrepl.StreamError) and results[0].temporary
    assert got["sha256"] == hashlib.sha256(pattern(4, 3 * MiB)).hexdigest()
    assert lane1.request("echo", {"after": 1})["echo"] == {"after": 1}
    lane1.close()


def test_serve_returns_only_after_every_lanes_handler_returned(lanes):
    """The passive side's lock is released when serve returns: no lane's handler may still run."""
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def busy(body: dict, ctx: zrepl.RequestContext) -> dict:
        entered.set()
        assert release.wait(WAIT)
        order.append("handler returned")
        return {}

    client, _, st = lanes(wanted=2, handlers=dict(HANDLERS, busy=busy))
    lane1 = client.open_lane()
    t = threading.Thread(target=lambda: run_threads([lambda: lane1.request("busy", {})]), daemon=True)
    t.start()
    assert entered.wait(WAIT)
    client.close()  # the client goes away while lane 1's handler runs
    st.thread.join(0.5)
    assert st.thread.is_alive()  # still waiting for the handler
    release.set()
    st.join()
    order.append("serve returned")
    assert order == ["handler returned", "serve returned"]
    t.join(WAIT)
    lane1.close()


# ---- errors that end every lane -------------------------------------------------------------------

def test_cancel_wakes_every_lane_promptly(lanes):
    entered = threading.Barrier(4, timeout=WAIT)  # three handlers and the test
    release = threading.Event()

    def block(body: dict, ctx: zrepl.RequestContext) -> dict:
        entered.wait()
        release.wait(WAIT)
        return {}

    client, _, st = lanes(wanted=3, handlers=dict(HANDLERS, block=block))
    conns = [client, client.open_lane(), client.open_lane()]
    results: list = []
    waiter = threading.Thread(target=lambda: results.extend(run_threads([lambda c=c: c.request("block", {})
                                                                        for c in conns])), daemon=True)
    waiter.start()
    entered.wait()
    client.cancel("signal reset")
    waiter.join(WAIT)  # well before the handlers are released
    assert not waiter.is_alive()
    assert len(results) == 3 and all(isinstance(r, zrepl.Cancelled) for r in results), results
    release.set()
    for c in conns[1:]:
        c.close()


def test_a_lost_connection_fails_every_lane_with_connection_lost():
    """The server's end vanishes (ssh killed) while three lanes wait: each raises the temporary
    ConnectionLost (so the runner redials), none hangs."""
    client, server = pipe_pair()
    entered = threading.Barrier(4, timeout=WAIT)
    release = threading.Event()

    def block(body: dict, ctx: zrepl.RequestContext) -> dict:
        entered.wait()
        release.wait(WAIT)
        return {}
    st = Server(server, dict(HANDLERS, block=block))
    client.lanes_wanted = 3
    client.handshake_client("c")
    conns = [client, client.open_lane(), client.open_lane()]
    results: list = []
    waiter = threading.Thread(target=lambda: results.extend(run_threads([lambda c=c: c.request("block", {})
                                                                        for c in conns])), daemon=True)
    waiter.start()
    entered.wait()
    cut_transport(server)
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert all(isinstance(r, zrepl.ConnectionLost) and r.temporary for r in results), results
    assert not client.usable and not conns[1].usable
    with pytest.raises(zrepl.ProtocolError):
        conns[2].request("echo", {})
    with pytest.raises(zrepl.ConnectionLost):  # nor can a new lane ride on it
        client.open_lane()
    release.set()
    st.thread.join(WAIT)
    for c in conns[1:]:
        c.close()
    client.close()


class RawClient:
    """The test as a hostile client: HELLO asking for lanes, then frames of its choosing."""

    def __init__(self, lanes: int = 3):
        self.c2s_r, self.c2s_w = os.pipe()
        self.s2c_r, self.s2c_w = os.pipe()
        self.server = zrepl.Connection(rfd=self.c2s_r, wfd=self.s2c_w, name="server end", timeout=WAIT,
                                       heartbeat_interval=0)
        self.released = threading.Event()
        self.actors: list[threading.Thread] = []

        def hold(body: dict, ctx: zrepl.RequestContext) -> dict:
            self.released.wait(WAIT)
            return {}
        self.st = Server(self.server, dict(HANDLERS, hold=hold))
        self.send(zrepl.FRAME_HELLO, json.dumps({"protocol": zrepl.PROTOCOL_NAME, "version": zrepl.PROTOCOL_VERSION,
                                                 "identity": "x", "lanes": lanes}).encode())
        ftype, body = self.read()
        assert ftype == zrepl.FRAME_HELLO and json.loads(body)["lanes"] == lanes, body

    def send(self, ftype: int, payload: bytes = b"") -> None:
        self.write(zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, ftype, len(payload)) + payload)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.c2s_w, view):]

    def act(self, fn) -> None:
        """fn(self) in a thread: once the server stopped reading, a write may block until close()."""
        def run() -> None:
            try:
                fn(self)
            except OSError:  # the server closed its end
                pass
        thread = threading.Thread(target=run, daemon=True)
        self.actors.append(thread)
        thread.start()

    def ctl(self, **body) -> None:
        self.send(zrepl.FRAME_LANE_CTL, json.dumps(body).encode())

    def lane(self, lane: int, data: bytes) -> None:
        self.send(zrepl.FRAME_LANE, zrepl._LANE_ID.pack(lane) + data)

    def overfill(self) -> None:
        """Lane 0: a request whose handler does not read its stream, then more stream bytes than
        the lane's pipe and window hold."""
        inner = json.dumps({"id": 1, "kind": "hold", "body": {}, "stream": "data", "accept_fd": False}).encode()
        self.lane(0, zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_REQUEST, len(inner)) + inner
                  + zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_DATA, 4 * MiB))
        for _ in range((4 * MiB) // zrepl.LANE_CHUNK):
            self.lane(0, b"\0" * zrepl.LANE_CHUNK)

    def read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(self.s2c_r, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def read(self) -> tuple[int, bytes]:
        _, ftype, length = zrepl.FRAME_HEADER.unpack(self.read_exact(zrepl.FRAME_HEADER.size))
        return ftype, self.read_exact(length)

    def fatal_error(self) -> dict:
        """Skip to the server's ERROR frame and return its body."""
        while True:
            ftype, body = self.read()
            if ftype == zrepl.FRAME_ERROR:
                return json.loads(body)

    def close(self) -> None:
        self.released.set()
        self.st.join()
        # The server's end first: a writer still in act() then fails with EPIPE and ends. Only after
        # it has ended may our fds close: a write after that would land in whatever the next test
        # opened under the same fd number (that is how the window test's 4 MiB of zeros once reached
        # the next test's handshake: "bad frame magic").
        self.server.close()
        for thread in self.actors:
            thread.join(WAIT)
            assert not thread.is_alive(), "a writer of the test did not end"
        for fd in (self.c2s_w, self.s2c_r):
            os.close(fd)


HOSTILE = {
    "data for a lane never opened": (lambda c: c.lane(2, b"x"), "lane 2, which is not open"),
    "a lane over the negotiated count": (lambda c: c.lane(7, b"x"), "outside the 3 negotiated lanes"),
    "open over the count": (lambda c: c.ctl(op="open", lane=3), "outside the 3 negotiated lanes"),
    "open of lane 0": (lambda c: c.ctl(op="open", lane=0), "outside the 3 negotiated lanes"),
    "open twice": (lambda c: (c.ctl(op="open", lane=1), c.ctl(op="open", lane=1)), "opened before"),
    "a lane id that is no int": (lambda c: c.ctl(op="close", lane="1"), "outside the 3 negotiated lanes"),
    "close twice": (lambda c: (c.ctl(op="close", lane=0), c.ctl(op="close", lane=0)), "not open"),
    "credit for a lane never opened": (lambda c: c.ctl(op="credit", lane=2, bytes=5), "never opened"),
    "credit over the window": (lambda c: c.ctl(op="credit", lane=0, bytes=1), "more than the"),
    "a negative credit": (lambda c: c.ctl(op="credit", lane=0, bytes=-5), "credit of -5"),
    "an unknown op": (lambda c: c.ctl(op="reset", lane=0), "unknown op"),
    "more data than the window": (lambda c: c.overfill(), "more than the"),
    "an oversized LANE frame": (lambda c: c.lane(0, b"\0" * (zrepl.LANE_CHUNK + 1)), "LANE frame of"),
    "an empty LANE frame": (lambda c: c.send(zrepl.FRAME_LANE, b"\0\0"), "LANE frame of 2 bytes"),
    "a plain REQUEST outside any lane": (lambda c: c.send(zrepl.FRAME_REQUEST, b"{}"), "unexpected REQUEST"),
    "bad magic": (lambda c: c.write(b"JUNK" + b"\0" * 5), "bad frame magic"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_lane_frames_end_the_connection_with_an_error_frame(case):
    act, expected = HOSTILE[case]
    c = RawClient()
    c.act(act)
    body = c.fatal_error()
    assert body["fatal"] is True and expected in body["error"], body
    c.released.set()
    c.st.join()
    assert isinstance(c.st.error, zrepl.ProtocolError) and expected in str(c.st.error)
    c.close()


def test_garbage_inside_one_lane_ends_every_lane():
    """A lane's own protocol is checked by its session; its ProtocolError ends the connection."""
    c = RawClient()
    c.ctl(op="open", lane=1)
    c.lane(1, b"NOT A FRAME AT ALL")
    body = c.fatal_error()
    assert body["fatal"] is True
    c.st.join()
    assert isinstance(c.st.error, zrepl.ProtocolError)
    c.close()


def test_a_server_that_opens_lanes_is_refused():
    client, server = pipe_pair()
    got: dict = {}

    def hostile_server() -> None:
        server.channel.read_frame()
        server.channel.send_frame(zrepl.FRAME_HELLO, {"protocol": zrepl.PROTOCOL_NAME,
                                                      "version": zrepl.PROTOCOL_VERSION, "lanes": 2})
        server.channel.send_frame(zrepl.FRAME_LANE_CTL, {"op": "open", "lane": 1})
        while True:
            frame = server.channel.read_frame(skip_heartbeats=True)
            if frame.type == zrepl.FRAME_ERROR:
                got["error"] = frame.body
                return
    t = threading.Thread(target=hostile_server, daemon=True)
    t.start()
    client.lanes_wanted = 2
    client.handshake_client("c")
    t.join(WAIT)
    assert "only the client opens lanes" in got["error"]["error"]
    with pytest.raises(zrepl.ProtocolError, match="only the client opens lanes"):
        client.request("echo", {})
    client.close()
    server.close()


# ---- liveness -----------------------------------------------------------------------------------

def test_heartbeats_keep_idle_and_busy_lanes_alive_past_the_timeout():
    """timeout 1 s, heartbeats every 0.1 s (10x margin): a handler busy for longer than the
    timeout (measured in heartbeats the client received) ends well, on every lane."""
    client, server = pipe_pair(timeout=1.0, heartbeat=0.1)
    entered, release = threading.Event(), threading.Event()

    def busy(body: dict, ctx: zrepl.RequestContext) -> dict:
        entered.set()
        assert release.wait(WAIT)
        return {"done": True}
    st = Server(server, dict(HANDLERS, busy=busy))
    client.lanes_wanted = 2
    client.handshake_client("c")
    lane1 = client.open_lane()
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=lane1.request("busy", {})), daemon=True)
    t.start()
    assert entered.wait(WAIT)
    seen = threading.Event()

    def count_heartbeats() -> None:  # 30 of lane 1's heartbeats, 0.1 s apart: 3 timeouts long
        while not seen.is_set() and client.usable:
            if lane1.stats.frames_received.get("HEARTBEAT", 0) >= 30:
                seen.set()
            else:
                seen.wait(0.05)
    threading.Thread(target=count_heartbeats, daemon=True).start()
    assert seen.wait(WAIT)
    release.set()
    t.join(WAIT)
    assert box["r"] == {"done": True}
    assert client.request("echo", {"idle": True})["echo"] == {"idle": True}  # lane 0 idled all along
    lane1.close()
    client.close()
    st.join()
    assert st.error is None
    server.close()


# ---- over a transport process (the ssh path) -------------------------------------------------------

SERVER_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {testdir!r})
    import zrepl
    import test_protocol_lanes as t

    try:
        conn = zrepl.Connection.from_stdio(timeout=30, heartbeat_interval=0.5)
        zrepl.serve_connection(conn, t.HANDLERS, identity=sys.argv[1])
    except zrepl.ZreplError as e:
        sys.stderr.write(f"stdinserver: {{e}}\\n")
        sys.exit(1)
""")


def test_lanes_over_ssh_connect_to_a_stdio_server(tmp_path):
    script = tmp_path / "fake_stdinserver.py"
    script.write_text(SERVER_SCRIPT.format(repo=str(REPO), testdir=str(Path(__file__).parent)))
    conn = zrepl.ssh_connect([sys.executable, str(script), "backup-client"], name="fake-ssh", timeout=WAIT,
                             heartbeat_interval=0.5)
    try:
        conn.lanes_wanted = 3
        conn.handshake_client("ignored")
        assert conn.lanes == 3
        conns = [conn, conn.open_lane(), conn.open_lane()]
        size = 2 * MiB + 7
        results = run_threads([lambda c=c, i=i: c.request("receive", {}, stream_in=feeding(pattern(i, size)))
                               for i, c in enumerate(conns)])
        for i, r in enumerate(results):
            assert r == {"sha256": hashlib.sha256(pattern(i, size)).hexdigest(), "bytes": size}, r
        assert conns[2].request("echo", {})["identity"] == "backup-client"
        for c in conns[1:]:
            c.close()
    finally:
        conn.close()
    assert conn.channel.process.proc.returncode == 0, conn.channel.process.stderr.text()


# ---- the runner: parallel steps on lanes of one ssh+stdinserver connection -----------------------

STEPS_ROOT = "dst/sink/client1"
SSH = {"type": "ssh+stdinserver", "host": "backup.example.com", "user": "zrepl", "port": 22,
       "identity_file": "/etc/zrepl/id"}


class InProcessSsh:
    """Stands in for ssh_connect: a pipe pair whose far end is served in a thread exactly as
    cmd_stdinserver serves it (the sink job of the identity, its handlers, serve_connection), on
    the same ZFS double. `servers` keeps each server Connection, `errors` how serving ended."""

    def __init__(self, cfg: Path, zfs, identity: str = "client1", *, old_server: bool = False):
        self.cfg, self.zfs, self.identity, self.old_server = cfg, zfs, identity, old_server
        self.servers: list[zrepl.Connection] = []
        self.errors: list[BaseException | None] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, argv, *, name=None, timeout=zrepl.DEFAULT_PEER_TIMEOUT, **_kw) -> zrepl.Connection:
        client, server = pipe_pair(timeout=timeout, heartbeat=1.0)
        if self.old_server:
            server._hello_lanes = lambda body, most: None
        config = zrepl.load_config(str(self.cfg))
        job = zrepl.stdinserver_job(config, self.identity)
        handlers = zrepl.passive_handlers(job, self.identity, self.zfs, zrepl.ProcessRegistry(), zrepl.Progress(),
                                          zrepl.replication_guards(config),
                                          zrepl.client_listing_cache(config, job, self.identity))
        index = len(self.servers)
        self.servers.append(server)
        self.errors.append(None)

        def serve() -> None:
            try:
                zrepl.serve_connection(server, handlers, identity=self.identity)
            except BaseException as e:
                self.errors[index] = e
            finally:
                server.close()
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        self.threads.append(t)
        return client

    def join(self) -> None:
        for t in self.threads:
            t.join(WAIT)
            assert not t.is_alive(), "a server did not end"


def steps_config(tmp_path: Path, steps: int) -> Path:
    from support import last_n, push_job, sink_job, stdinserver, write_config
    return write_config(tmp_path, push_job(filesystems={"src/data<": True}, connect=SSH,
                                           keep_sender=[last_n(30)], keep_receiver=[last_n(30)],
                                           replication={"concurrency": {"steps": steps}}),
                        sink_job(root_fs="dst/sink", serve=stdinserver("client1")))


@pytest.fixture
def three_filesystems(fake_zfs):
    w = fake_zfs.world
    w.tree("src", "data\n" + "\n".join(f"data/fs{i} @s0" for i in range(3)))
    w.tree("dst", "sink")
    return w


def test_push_over_ssh_runs_its_steps_on_lanes_of_one_connection(fake_zfs, three_filesystems, tmp_path,
                                                                   monkeypatch):
    from support import run
    cfg = steps_config(tmp_path, steps=3)
    ssh = InProcessSsh(cfg, fake_zfs)
    monkeypatch.setattr(zrepl, "ssh_connect", ssh)
    result = run("--config", cfg, "run", "push", zfs=fake_zfs)
    assert result.code == 0, result
    ssh.join()
    assert len(ssh.servers) == 1 and ssh.errors == [None]  # one connection, one server: one lock
    server = ssh.servers[0]
    assert server.lanes == 3
    mux = server._mux
    assert mux is not None and mux._used == {0, 1, 2}
    assert all(c.stats.frames_received.get("REQUEST", 0) > 0 for c in mux._conns)  # every lane served
    for i in range(3):
        assert three_filesystems.snapshots(f"{STEPS_ROOT}/src/data/fs{i}") == ["s0"]
    assert "one at a time" not in result.stderr and "serves no lanes" not in result.stderr


def test_push_over_ssh_to_an_older_server_runs_one_step_at_a_time_with_a_warning(
        fake_zfs, three_filesystems, tmp_path, monkeypatch):
    from support import run
    cfg = steps_config(tmp_path, steps=3)
    ssh = InProcessSsh(cfg, fake_zfs, old_server=True)
    monkeypatch.setattr(zrepl, "ssh_connect", ssh)
    result = run("--config", cfg, "run", "push", zfs=fake_zfs)
    assert result.code == 0, result
    ssh.join()
    assert len(ssh.servers) == 1 and ssh.servers[0].lanes == 1 and ssh.servers[0]._mux is None
    assert "serves no lanes" in result.stderr
    for i in range(3):
        assert three_filesystems.snapshots(f"{STEPS_ROOT}/src/data/fs{i}") == ["s0"]


def test_a_cut_stream_in_one_of_three_parallel_ssh_steps_resumes_on_the_next_run(
        fake_zfs, three_filesystems, tmp_path, monkeypatch):
    from support import fs_status, run
    cfg = steps_config(tmp_path, steps=3)
    world = three_filesystems
    for i in range(3):
        world.write(f"src/data/fs{i}", 1 << 20)
        world.snapshot(f"src/data/fs{i}@s1")
    fake_zfs.cut("send", 300_000, match="src/data/fs1@s1", stderr="ssh: connection reset\n")
    fake_zfs.fail("send", match="send -v -P -t", stderr="ssh: connection reset\n")
    ssh = InProcessSsh(cfg, fake_zfs)
    monkeypatch.setattr(zrepl, "ssh_connect", ssh)
    result = run("--config", cfg, "run", "push", zfs=fake_zfs)
    assert result.code == 1, result
    ssh.join()
    token = world.resume_token(f"{STEPS_ROOT}/src/data/fs1")
    assert token and "the sending side failed" in fs_status(cfg, "push", "src/data/fs1")["error"]
    for i in (0, 2):  # the other steps' results are intact
        assert world.snapshots(f"{STEPS_ROOT}/src/data/fs{i}") == ["s1"]
    assert len(ssh.servers) == 1 and ssh.servers[0].lanes == 3
    fake_zfs.clear()
    fake_zfs.calls.clear()
    result = run("--config", cfg, "run", "push", zfs=fake_zfs)
    assert result.code == 0, result
    ssh.join()
    assert ["zfs", "send", "-v", "-P", "-t", token] in fake_zfs.calls
    assert world.snapshots(f"{STEPS_ROOT}/src/data/fs1") == ["s1"]
    assert world.resume_token(f"{STEPS_ROOT}/src/data/fs1") is None
    assert world.guid(f"{STEPS_ROOT}/src/data/fs1@s1") == world.guid("src/data/fs1@s1")


def test_a_lane_redials_the_connection_it_rides_on_once_that_broke():
    """ssh dies under three lanes: once the connection knows, a lane's next request dials ONE new
    connection and opens its lane there, and the connection's own requests use it too."""
    servers: list[Server] = []

    def dial() -> zrepl.Connection:
        client, server = pipe_pair()
        servers.append(Server(server, HANDLERS))
        client.lanes_wanted = 3
        client.handshake_client("c")
        return client

    main = zrepl.RedialingConnection(dial)
    lanes = [zrepl.RedialingConnection(main.open_lane) for _ in range(2)]
    assert [c.request("echo", {"n": i})["echo"] for i, c in enumerate([main, *lanes])] == [{"n": 0}, {"n": 1}, {"n": 2}]
    first = servers[0].conn
    cut_transport(first)
    servers[0].thread.join(WAIT)
    old_mux = main.conn._mux
    old_mux._thread.join(WAIT)  # the client's side saw the end
    assert isinstance(old_mux.error, zrepl.ConnectionLost) and not main.conn.usable
    assert [lane.request("echo", {"again": 1})["echo"] for lane in lanes] == [{"again": 1}] * 2
    assert main.request("echo", {"main": 1})["echo"] == {"main": 1}
    assert main.dials == 2 and len(servers) == 2 and servers[1].conn.lanes == 3
    for lane in lanes:
        lane.close()
    main.close()
    servers[1].join()
    assert servers[1].error is None


def test_a_client_hanging_up_while_the_server_writes_is_a_clean_end():
    """The client stops reading, closes lane 1 (the server answers with its own close, into a
    pipe nobody reads) and hangs up: serving ends without error, as with one lane."""
    c = RawClient()
    c.ctl(op="open", lane=1)
    os.close(c.s2c_r)
    c.s2c_r = os.open(os.devnull, os.O_RDONLY)  # for close()
    c.ctl(op="close", lane=1)
    os.close(c.c2s_w)
    c.c2s_w = os.open(os.devnull, os.O_WRONLY)
    c.st.join()
    assert c.st.error is None
    c.close()


def test_pull_over_ssh_runs_its_steps_on_lanes_of_one_connection(fake_zfs, tmp_path, monkeypatch):
    from support import last_n, pull_job, run, source_job, stdinserver, write_config
    w = fake_zfs.world
    w.tree("src", "data\n" + "\n".join(f"data/fs{i} @s0" for i in range(3)))
    w.tree("dst", "pulled")
    cfg = write_config(tmp_path, pull_job(root_fs="dst/pulled", connect=SSH, keep_sender=[last_n(30)],
                                          keep_receiver=[last_n(30)], replication={"concurrency": {"steps": 3}}),
                       source_job(filesystems={"src/data<": True}, serve=stdinserver("client1")))
    ssh = InProcessSsh(cfg, fake_zfs)
    monkeypatch.setattr(zrepl, "ssh_connect", ssh)
    result = run("--config", cfg, "run", "pull", zfs=fake_zfs)
    assert result.code == 0, result
    ssh.join()
    assert len(ssh.servers) == 1 and ssh.errors == [None] and ssh.servers[0].lanes == 3
    mux = ssh.servers[0]._mux
    assert mux is not None and all(c.stats.frames_received.get("REQUEST", 0) > 0 for c in mux._conns)
    for i in range(3):
        assert w.snapshots(f"dst/pulled/src/data/fs{i}") == ["s0"]
        assert w.guid(f"dst/pulled/src/data/fs{i}@s0") == w.guid(f"src/data/fs{i}@s0")


def test_each_lane_gets_handlers_of_its_own():
    """A paged listing's pages (and an endpoint's run state) belong to one lane: two lanes paging
    at once never see each other's pages."""
    made: list[dict] = []

    def make() -> dict:
        state: dict = {}

        def start(body: dict, ctx: zrepl.RequestContext) -> dict:
            state["pages"] = body["pages"]
            return {}

        def page(body: dict, ctx: zrepl.RequestContext) -> dict:
            return {"page": state["pages"][body["i"]]}
        made.append(state)
        return {"start": start, "page": page}

    client, server = pipe_pair()
    st = Server(server, zrepl.session_handlers(make))
    client.lanes_wanted = 2
    client.handshake_client("c")
    lane1 = client.open_lane()
    client.request("start", {"pages": ["a0", "a1"]})
    lane1.request("start", {"pages": ["b0", "b1"]})
    assert [client.request("page", {"i": i})["page"] for i in range(2)] == ["a0", "a1"]
    assert [lane1.request("page", {"i": i})["page"] for i in range(2)] == ["b0", "b1"]
    assert len(made) == 2
    lane1.close()
    client.close()
    st.join()
    server.close()


@pytest.mark.parametrize("lanes", [True, 0, -3, "4", 1.5, 1 << 40, [2]])
def test_a_hello_asking_for_invalid_lanes_is_refused(lanes):
    c2s_r, c2s_w = os.pipe()
    s2c_r, s2c_w = os.pipe()
    server = zrepl.Connection(rfd=c2s_r, wfd=s2c_w, name="server end", timeout=WAIT, heartbeat_interval=0)
    st = Server(server, HANDLERS)
    hello = json.dumps({"protocol": zrepl.PROTOCOL_NAME, "version": zrepl.PROTOCOL_VERSION, "lanes": lanes}).encode()
    os.write(c2s_w, zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_HELLO, len(hello)) + hello)
    st.join()
    assert isinstance(st.error, zrepl.ProtocolError) and "invalid lanes" in str(st.error)
    head = os.read(s2c_r, zrepl.FRAME_HEADER.size)
    assert zrepl.FRAME_HEADER.unpack(head)[1] == zrepl.FRAME_ERROR
    for fd in (c2s_w, s2c_r):
        os.close(fd)
    server.close()
