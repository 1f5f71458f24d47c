"""Host tests of the protocol's layers (section 7) through their public APIs: the frame channel's
codec and waits, the one copy loop (splice and read/write, token bucket on a fake clock), the
bounds on what we decode and send (nesting depth, frame size) and which errors are temporary.

No timing: clocks are fake, and the only real waits are for events the test itself causes
(generous joins).
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

import zrepl  # noqa: E402
from test_protocol import FakeClock  # noqa: E402

KiB = 1 << 10
DEEP = b"[" * 100_000 + b"]" * 100_000  # far past the decoder's recursion limit


def raw_frame(ftype: int, payload: bytes = b"") -> bytes:
    return zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, ftype, len(payload)) + payload


def read_raw(sock: socket.socket) -> tuple[int, bytes]:
    """One frame from a raw (blocking) socket."""
    sock.settimeout(10)
    head = b""
    while len(head) < zrepl.FRAME_HEADER.size:
        head += sock.recv(zrepl.FRAME_HEADER.size - len(head))
    magic, ftype, length = zrepl.FRAME_HEADER.unpack(head)
    assert magic == zrepl.FRAME_MAGIC
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return ftype, payload


def read_raw_skipping_heartbeats(sock: socket.socket) -> tuple[int, bytes]:
    while True:
        ftype, payload = read_raw(sock)
        if ftype != zrepl.FRAME_HEARTBEAT:
            return ftype, payload


@pytest.fixture
def channel_pair():
    """A FrameChannel and the raw socket of its peer."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = zrepl.FrameChannel(sock=ours, name="peer", timeout=10, heartbeat_interval=0)
    yield ch, theirs
    ch.close()
    theirs.close()


# ---- the frame codec ----------------------------------------------------------------------------

def test_channel_reads_control_frames_and_leaves_data_payloads_to_the_caller(channel_pair):
    ch, raw = channel_pair
    raw.sendall(raw_frame(zrepl.FRAME_HEARTBEAT) + raw_frame(zrepl.FRAME_REQUEST, b'{"id": 7, "kind": "x"}')
                + raw_frame(zrepl.FRAME_DATA, b"payload") + raw_frame(zrepl.FRAME_HEARTBEAT)
                + raw_frame(zrepl.FRAME_DATA, b"dropped") + raw_frame(zrepl.FRAME_END, b"{}"))
    frame = ch.read_frame()  # the heartbeat before it is skipped
    assert (frame.name, frame.body) == ("REQUEST", {"id": 7, "kind": "x"})
    data = ch.read_frame()
    assert (data.name, data.body, data.length) == ("DATA", None, 7)
    got = b""
    while len(got) < data.length:
        ch.wait_readable()
        got += ch.read_some(data.length - len(got)) or b""
    assert got == b"payload"
    assert ch.read_frame(skip_heartbeats=False).name == "HEARTBEAT"
    ch.skip(ch.read_frame().length)
    assert ch.read_frame().name == "END"
    assert ch.stats.frames_received == {"HEARTBEAT": 2, "REQUEST": 1, "DATA": 2, "END": 1}
    raw.shutdown(socket.SHUT_WR)
    assert ch.read_frame_or_eof() is None  # a clean end between frames
    with pytest.raises(zrepl.ConnectionLost) as ei:
        ch.read_frame()
    assert ei.value.temporary is True


def test_channel_writes_frames_with_their_fds(channel_pair):
    ch, raw = channel_pair
    ch.send_frame(zrepl.FRAME_RESPONSE, {"id": 1, "body": {"a": [1, 2]}})
    assert read_raw(raw) == (zrepl.FRAME_RESPONSE, b'{"id":1,"body":{"a":[1,2]}}')
    r, w = os.pipe()
    ch.send_frame(zrepl.FRAME_FDPASS, {}, fds=[r])
    msg, fds, _, _ = socket.recv_fds(raw, 64, 1)
    assert msg == raw_frame(zrepl.FRAME_FDPASS, b"{}") and len(fds) == 1
    os.write(w, b"through the passed fd")
    assert os.read(fds[0], 100) == b"through the passed fd"
    for fd in (r, w, *fds):
        os.close(fd)
    ch.send_data_frame(3, lambda n: ch.write_all(b"x" * n))  # a caller moving the payload itself
    assert read_raw(raw) == (zrepl.FRAME_DATA, b"xxx")
    assert ch.stats.frames_sent == {"RESPONSE": 1, "FDPASS": 1, "DATA": 1} and ch.stats.fds_sent == 1


def test_channel_refuses_to_send_an_oversized_control_frame_and_stays_usable(channel_pair):
    ch, raw = channel_pair
    ch.kind = "receiver.list"
    with pytest.raises(zrepl.FrameTooLarge) as ei:
        ch.send_frame(zrepl.FRAME_RESPONSE, {"blob": "x" * zrepl.MAX_HEADER_SIZE})
    err = ei.value
    assert err.temporary is False and err.frame == "RESPONSE" and err.limit == zrepl.MAX_HEADER_SIZE
    assert err.size == zrepl.MAX_HEADER_SIZE + len('{"blob":""}')
    assert f"RESPONSE frame of {err.size} bytes for request 'receiver.list'" in str(err)
    assert f"at most {zrepl.MAX_HEADER_SIZE} bytes" in str(err)
    raw.setblocking(False)
    with pytest.raises(BlockingIOError):
        raw.recv(1)  # nothing was sent
    assert ch.usable
    ch.send_frame(zrepl.FRAME_RESPONSE, {"small": 1})
    raw.setblocking(True)
    assert read_raw(raw) == (zrepl.FRAME_RESPONSE, b'{"small":1}')


def test_an_oversized_control_frame_received_is_a_permanent_clear_protocol_error(channel_pair):
    ch, raw = channel_pair
    size = zrepl.MAX_HEADER_SIZE + 1
    raw.sendall(zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_RESPONSE, size))
    ch.kind = "receiver.list"
    with pytest.raises(zrepl.ProtocolError) as ei:
        ch.read_frame()
    err = ei.value
    assert not isinstance(err, zrepl.ConnectionLost) and err.temporary is False
    assert err.kind == "receiver.list"
    assert f"oversized RESPONSE frame: {size} bytes" in str(err) and str(zrepl.MAX_HEADER_SIZE) in str(err)
    ftype, payload = read_raw(raw)  # the peer is told
    assert ftype == zrepl.FRAME_ERROR and json.loads(payload)["fatal"] is True
    assert not ch.usable


@pytest.mark.parametrize("depth, ok", [(zrepl.MAX_JSON_DEPTH, True), (zrepl.MAX_JSON_DEPTH + 1, False)])
def test_nesting_is_bounded_at_max_json_depth(channel_pair, depth, ok):
    ch, raw = channel_pair
    body = b'{"a": ' * (depth - 1) + b"[]" + b"}" * (depth - 1)  # depth levels, counting the list
    raw.sendall(raw_frame(zrepl.FRAME_RESPONSE, body))
    if ok:
        assert ch.read_frame().body is not None
        return
    with pytest.raises(zrepl.ProtocolError, match="nested deeper than 32 levels"):
        ch.read_frame()


def test_decoding_bounds():
    assert zrepl.decode_control(b'{"a": [1, {"b": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}') == \
        {"a": [1, {"b": "[" * 40}]}  # brackets inside strings are no nesting
    for payload, reason in [(b'{"a": ' + DEEP + b"}", "nested deeper"), (b"[1]", "not a JSON object"),
                            (b"\xff", "invalid JSON"), (b'{"a": 1', "invalid JSON")]:
        with pytest.raises(ValueError, match=reason):
            zrepl.decode_control(payload)
    with pytest.raises(ValueError, match="nested too deeply"):
        nested: list = []
        for _ in range(100_000):
            nested = [nested]
        zrepl.encode_control(zrepl.FRAME_REQUEST, {"a": nested})


# ---- waiting and cancel -------------------------------------------------------------------------

def test_one_selector_follows_the_fd_sets_of_successive_waits(channel_pair):
    ch, raw = channel_pair
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        assert ch.wait([r], [], 10) == ({r}, set())
        assert ch.wait([], [w], 10) == (set(), {w})  # r is still readable but no longer asked for
        raw.sendall(b"y")
        assert ch.wait([r, ch.rfd], [w], 10) == ({r, ch.rfd}, {w})
        os.read(r, 1)
        assert ch.wait([r], [], 0) == (set(), set())  # a timeout
    finally:
        os.close(r)
        os.close(w)


def test_cancel_wakes_a_blocked_wait_and_a_second_waiter_meanwhile(channel_pair):
    ch, _ = channel_pair
    outcome: list[BaseException] = []
    started = threading.Event()

    def blocked() -> None:
        started.set()
        try:
            ch.wait([ch.rfd], [], None)  # nothing ever arrives
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    started.wait(10)
    r, w = os.pipe()
    try:  # another thread's wait works meanwhile (it gets a selector of its own)
        assert ch.wait([], [w], 10) == (set(), {w})
    finally:
        os.close(r)
        os.close(w)
    ch.cancel("watchdog: no progress")
    t.join(10)
    assert not t.is_alive()
    [err] = outcome
    assert isinstance(err, zrepl.Cancelled) and "no progress" in str(err) and err.temporary is False
    with pytest.raises(zrepl.Cancelled):
        ch.read_frame()
    with pytest.raises(zrepl.Cancelled):
        ch.check_usable()


# ---- the copy loop ------------------------------------------------------------------------------

class PipeSource:
    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)

    def read(self, n: int) -> bytes | None:
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None

    def wait(self) -> None:
        raise AssertionError("the source had everything ready")

    def ended(self) -> zrepl.ZreplError:
        return zrepl.ZreplError("the source ended early")


class PipeSink:
    def __init__(self, fd: int):
        self.fd, self.open = fd, True
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        try:
            assert os.write(self.fd, data) == len(data)
        except BrokenPipeError:
            self.open = False

    def wait(self) -> None:
        raise AssertionError("the sink had room for everything")

    def gone(self, err: OSError) -> None:
        assert isinstance(err, BrokenPipeError)
        self.open = False


def pipe(size: int = 1 << 20) -> tuple[int, int]:
    r, w = os.pipe()
    zrepl._proto_grow_pipe(w, size)
    return r, w


@pytest.fixture
def pipes():
    """(source read end, its write end, sink read end, its write end); all closed afterwards."""
    fds = (*pipe(), *pipe())
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize("splice", [True, False])
def test_copy_loop_under_a_token_bucket_on_a_fake_clock(pipes, splice):
    src_r, src_w, dst_r, dst_w = pipes
    data = os.urandom(768 * KiB)
    os.write(src_w, data)
    clock = FakeClock()
    bucket = zrepl.TokenBucket(rate=1 << 20, capacity=256 * KiB, clock=clock)
    counted: list[tuple[int, bool]] = []
    sink = PipeSink(dst_w)

    def pause(seconds: float) -> None:
        clock.now += seconds

    copier = zrepl.StreamCopier(PipeSource(src_r), sink, count=lambda n, spliced: counted.append((n, spliced)),
                                on_splice_error=sink.gone, limit=bucket, pause=pause)
    copier.use_splice = splice
    assert copier.move(len(data), limited=True) == 0
    got = b""
    while len(got) < len(data):
        got += os.read(dst_r, len(data))
    assert got == data
    # the full bucket goes at once, then every grant waits for the 128 KiB granule at 1 MiB/s
    assert counted == [(256 * KiB, splice)] + [(128 * KiB, splice)] * 4
    assert clock.now - 1000.0 == pytest.approx(0.5)
    assert bucket.tokens == pytest.approx(0, abs=1)


@pytest.mark.parametrize("splice", [True, False])
def test_copy_loop_source_ending_early_and_sink_going_away(pipes, splice):
    src_r, src_w, dst_r, dst_w = pipes
    counted: list[int] = []
    sink = PipeSink(dst_w)
    copier = zrepl.StreamCopier(PipeSource(src_r), sink, count=lambda n, spliced: counted.append(n),
                                on_splice_error=sink.gone)
    copier.use_splice = splice
    os.write(src_w, b"0123456789")
    os.close(src_w)
    with pytest.raises(zrepl.ZreplError, match="ended early"):
        copier.move(100)  # the ten bytes move, then the source's end is an error
    assert counted == [10] and os.read(dst_r, 100) == b"0123456789"

    src_r2, src_w2 = pipe()
    try:
        os.write(src_w2, b"x" * 1000)
        os.close(dst_r)  # the consumer went away
        copier = zrepl.StreamCopier(PipeSource(src_r2), sink, count=lambda n, spliced: counted.append(n),
                                    on_splice_error=sink.gone)
        copier.use_splice = splice
        left = copier.move(1000)
        assert not sink.open
        assert left == (1000 if splice else 0)  # a failed splice took nothing; a read took it all
    finally:
        os.close(src_r2)
        os.close(src_w2)


# ---- the session's bounds -----------------------------------------------------------------------

def serve_in_thread(server: zrepl.Connection, handlers: dict) -> threading.Thread:
    t = threading.Thread(target=lambda: zrepl.serve_connection(server, handlers), daemon=True)
    t.start()
    return t


def test_an_answer_too_large_for_one_frame_is_a_permanent_remote_error_and_the_connection_survives():
    r, w = os.pipe()

    def big(body: dict, ctx: zrepl.RequestContext) -> zrepl.Reply:
        return zrepl.Reply({"blob": "x" * zrepl.MAX_HEADER_SIZE}, zrepl.OutgoingStream(r))

    client, server = zrepl.local_pair(timeout=10, heartbeat_interval=0)
    t = serve_in_thread(server, {"big": big, "echo": lambda body, ctx: body})
    try:
        client.handshake_client("c")
        with pytest.raises(zrepl.RemoteError) as ei:
            client.request("big", {}, stream_out=lambda body, stream: None)
        err = ei.value
        assert err.temporary is False and err.remote_type == "FrameTooLarge"
        assert "refusing to send a RESPONSE frame of" in str(err) and "request 'big'" in str(err)
        assert client.request("echo", {"n": 1}) == {"n": 1}
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")  # the answer's stream was closed, not leaked
    finally:
        os.close(w)
        client.close()
        t.join(10)
        server.close()


def test_a_client_answered_with_json_nested_100000_deep_fails_cleanly_and_tells_the_server():
    ours, raw = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = zrepl.Connection(sock=ours, name="hostile server", timeout=10, heartbeat_interval=0)
    got: dict = {}

    def hostile_server() -> None:
        read_raw_skipping_heartbeats(raw)  # HELLO
        raw.sendall(raw_frame(zrepl.FRAME_HELLO, json.dumps(
            {"protocol": zrepl.PROTOCOL_NAME, "version": zrepl.PROTOCOL_VERSION}).encode()))
        read_raw_skipping_heartbeats(raw)  # REQUEST
        raw.sendall(raw_frame(zrepl.FRAME_RESPONSE, b'{"id": 1, "body": {"a": ' + DEEP + b"}}"))
        got["answer"] = read_raw_skipping_heartbeats(raw)

    t = threading.Thread(target=hostile_server)
    t.start()
    try:
        client.handshake_client("c")
        with pytest.raises(zrepl.ProtocolError) as ei:
            client.request("list", {})
        assert type(ei.value) is zrepl.ProtocolError and ei.value.temporary is False
        assert "RESPONSE frame: JSON nested deeper than 32 levels" in str(ei.value)
        t.join(10)
        ftype, payload = got["answer"]
        assert ftype == zrepl.FRAME_ERROR and json.loads(payload)["fatal"] is True
        with pytest.raises(zrepl.ProtocolError, match="unusable"):
            client.request("list", {})
    finally:
        client.close()
        raw.close()


# ---- which errors are temporary -----------------------------------------------------------------

def test_protocol_errors_say_whether_a_retry_may_help():
    assert zrepl.ProtocolError("garbage").temporary is False
    assert zrepl.ProtocolError("refused for now", temporary=True).temporary is True
    assert zrepl.ConnectionLost("reset").temporary is True
    assert zrepl.ConnectionLost("Permission denied", temporary=False).temporary is False
    assert zrepl.PeerTimeout("silent").temporary is True
    assert zrepl.Cancelled("stop").temporary is False
    assert zrepl.RemoteError("busy", temporary=True).temporary is True
    assert zrepl.RemoteError("refused").temporary is False
    assert zrepl.FrameTooLarge("RESPONSE", 2 << 20).temporary is False
    # the attribute is declared once, on the base
    for cls in (zrepl.ProtocolError, zrepl.Cancelled, zrepl.RemoteError, zrepl.StreamError, zrepl.FrameTooLarge):
        assert "temporary" not in vars(cls)


@pytest.mark.parametrize("end, temporary", [({"status": "error", "error": "zfs send died", "bytes": None}, True),
                                            ({"status": "aborted", "error": "stopped", "bytes": None}, False)])
def test_stream_errors_from_the_senders_end(channel_pair, end, temporary):
    ch, raw = channel_pair
    stream = zrepl.IncomingStream(ch, "data", kind="sender.send", rid=1)
    raw.sendall(raw_frame(zrepl.FRAME_DATA, b"abc") + raw_frame(zrepl.FRAME_END, json.dumps(end).encode()))
    r, w = os.pipe()
    try:
        with pytest.raises(zrepl.StreamError) as ei:
            stream.copy_to(w)
        assert ei.value.temporary is temporary and ei.value.kind == "sender.send"
        assert os.read(r, 10) == b"abc"
    finally:
        os.close(r)
        os.close(w)
