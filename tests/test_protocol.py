"""Protocol tests (section 7): framing, handshake, garbage, streams over both transports,
heartbeats/timeouts, cancel, bandwidth limits and dead peers.

Host tests without ZFS: `cat`, `head`, `sha256sum` and python one-liners stand in for `zfs send` and
`zfs recv` byte streams; a python script serving on its stdin/stdout stands in for ssh+stdinserver.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import zrepl

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# ---- helpers ------------------------------------------------------------------------------------

def raw_frame(ftype: int, payload: bytes = b"") -> bytes:
    return zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, ftype, len(payload)) + payload


def json_frame(ftype: int, body: dict) -> bytes:
    import json
    return raw_frame(ftype, json.dumps(body).encode())


def read_raw_frame(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """Read one frame from a raw socket; None at EOF."""
    sock.settimeout(timeout)
    head = b""
    while len(head) < zrepl.FRAME_HEADER.size:
        try:
            chunk = sock.recv(zrepl.FRAME_HEADER.size - len(head))
        except ConnectionResetError:  # the peer hung up with our garbage unread
            return None
        if not chunk:
            return None
        head += chunk
    magic, ftype, length = zrepl.FRAME_HEADER.unpack(head)
    assert magic == zrepl.FRAME_MAGIC
    payload = b""
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        assert chunk, "truncated frame from the server"
        payload += chunk
    return ftype, payload


def read_until(sock: socket.socket, wanted: int) -> bytes:
    """Skip heartbeats until a frame of the wanted type; returns its payload."""
    while True:
        got = read_raw_frame(sock)
        assert got is not None, "EOF before the expected frame"
        if got[0] == wanted:
            return got[1]
        assert got[0] == zrepl.FRAME_HEARTBEAT, f"unexpected frame type {got[0]}"


def raw_hello(version: int = zrepl.PROTOCOL_VERSION, identity: str = "raw") -> bytes:
    return json_frame(zrepl.FRAME_HELLO, {"protocol": zrepl.PROTOCOL_NAME, "version": version,
                                          "software": "test", "identity": identity, "accept_fds": False})


def echo(body: dict, ctx: zrepl.RequestContext) -> dict:
    return {"echo": body, "identity": ctx.identity}


def fail(body: dict, ctx: zrepl.RequestContext) -> dict:
    raise zrepl.ZreplError("dataset tank/x does not exist")


def buggy(body: dict, ctx: zrepl.RequestContext) -> dict:
    return {"x": 1 // 0}


def sha256_consumer(body: dict, ctx: zrepl.RequestContext) -> dict:
    """Stands in for `zfs recv`: a subprocess reads the stream from its stdin."""
    assert ctx.stream is not None
    fd = ctx.stream.open_fd()
    proc = subprocess.Popen(["sha256sum"], stdin=fd, stdout=subprocess.PIPE)
    os.close(fd)
    out = proc.communicate()[0]
    n = ctx.stream.finish()
    return {"sha256": out.split()[0].decode(), "bytes": n}


def reject_stream(body: dict, ctx: zrepl.RequestContext) -> dict:
    raise zrepl.ZreplError("destination has been modified since the most recent snapshot")


def short_consumer(body: dict, ctx: zrepl.RequestContext) -> dict:
    """A consumer that exits after 1000 bytes, like a failing `zfs recv`."""
    assert ctx.stream is not None
    fd = ctx.stream.open_fd()
    proc = subprocess.run(["head", "-c", "1000"], stdin=fd, stdout=subprocess.PIPE)
    os.close(fd)
    try:
        ctx.stream.finish()
    except zrepl.StreamError as e:
        raise zrepl.ZreplError(f"receive failed after {len(proc.stdout)} bytes: {e}") from None
    return {"unexpected": "success"}


def file_producer(body: dict, ctx: zrepl.RequestContext) -> zrepl.Reply:
    """Stands in for `zfs send`: stream a file through `cat` (or fail / never end)."""
    if body.get("infinite"):
        argv = ["cat", "/dev/zero"]
    elif body.get("fail"):
        argv = [sys.executable, "-c", "import os; os.write(1, b'x' * 5000); raise SystemExit(3)"]
    else:
        argv = ["cat", body["path"]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return zrepl.Reply({"started": True}, zrepl.OutgoingStream.from_process(proc, "producer"))


HANDLERS = {"echo": echo, "fail": fail, "buggy": buggy, "receive": sha256_consumer,
            "reject": reject_stream, "short": short_consumer, "send": file_producer}


class ServerThread:
    """serve_connection in a thread, remembering how it ended."""

    def __init__(self, conn: zrepl.Connection, handlers: dict = HANDLERS, identity: str | None = None):
        self.conn = conn
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(handlers, identity), daemon=True)
        self.thread.start()

    def _run(self, handlers: dict, identity: str | None) -> None:
        try:
            zrepl.serve_connection(self.conn, handlers, identity=identity)
        except BaseException as e:
            self.error = e

    def join(self, timeout: float = 10) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server thread did not end"


@pytest.fixture
def local():
    client, server = zrepl.local_pair(timeout=5, heartbeat_interval=0.2)
    st = ServerThread(server)
    client.handshake_client("client1")
    yield client, server, st
    client.close()
    st.join()
    server.close()


@pytest.fixture(scope="module")
def payload_64m(tmp_path_factory) -> tuple[Path, str]:
    """64 MiB of pseudo-random bytes (hash-sensitive to loss, reordering and duplication)."""
    path = tmp_path_factory.mktemp("data") / "stream.bin"
    h = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * (MiB // 32)
    with open(path, "wb") as f:
        for i in range(64):
            chunk = bytes([i]) + block[1:]
            f.write(chunk)
            h.update(chunk)
    return path, h.hexdigest()


SERVER_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {testdir!r})
    import zrepl
    import test_protocol as t

    def echo(body, ctx):
        print("stray print to stdout must not corrupt the protocol")
        return {{"echo": body, "identity": ctx.identity}}

    def crash(body, ctx):
        fd = ctx.stream.open_fd()
        os.read(fd, 1 << 20)
        sys.stderr.write("simulated crash in the middle of a stream\\n")
        sys.stderr.flush()
        os._exit(3)

    handlers = dict(t.HANDLERS, echo=echo, crash=crash)
    try:
        conn = zrepl.Connection.from_stdio(timeout=float(sys.argv[2]), heartbeat_interval=float(sys.argv[3]))
        zrepl.serve_connection(conn, handlers, identity=sys.argv[1])
    except zrepl.ZreplError as e:
        sys.stderr.write(f"stdinserver: {{e}}\\n")
        sys.exit(1)
""")


@pytest.fixture
def stdio_server(tmp_path):
    """Factory: a Connection to a python stdinserver stand-in via ssh_connect."""
    script = tmp_path / "fake_stdinserver.py"
    script.write_text(SERVER_SCRIPT.format(repo=str(REPO), testdir=str(Path(__file__).parent)))
    conns = []

    def make(identity: str = "backup-client", timeout: float = 10, heartbeat: float = 0.2,
             server_timeout: float = 10) -> zrepl.Connection:
        conn = zrepl.ssh_connect([sys.executable, str(script), identity, str(server_timeout), str(heartbeat)],
                                 name="fake-ssh", timeout=timeout, heartbeat_interval=heartbeat)
        conns.append(conn)
        return conn

    yield make
    for c in conns:
        proc = c.channel.process.proc
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        c.close()


def stream_file(path: Path) -> zrepl.OutgoingStream:
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    return zrepl.OutgoingStream.from_process(proc, "cat")


def sha256_into(result: dict):
    """A stream_out callback that feeds the stream to a `sha256sum` subprocess."""
    def consume(body: dict, stream: zrepl.IncomingStream) -> None:
        fd = stream.open_fd()
        proc = subprocess.Popen(["sha256sum"], stdin=fd, stdout=subprocess.PIPE)
        os.close(fd)
        result["sha256"] = proc.communicate()[0].split()[0].decode()
        result["body"] = body
    return consume


# ---- request / response -------------------------------------------------------------------------

def test_round_trip_and_errors_keep_the_connection(local):
    client, server, _ = local
    assert client.request("echo", {"a": [1, "x"]}) == {"echo": {"a": [1, "x"]}, "identity": "client1"}
    with pytest.raises(zrepl.RemoteError) as ei:
        client.request("fail", {})
    assert ei.value.kind == "fail" and "tank/x does not exist" in str(ei.value)
    assert ei.value.remote_type == "ZreplError"
    with pytest.raises(zrepl.RemoteError, match="internal error.*ZeroDivisionError"):
        client.request("buggy", {})
    assert client.request("echo", {"n": 2})["echo"] == {"n": 2}


def test_stdio_round_trip_uses_forced_identity_and_survives_stray_prints(stdio_server):
    conn = stdio_server(identity="forced-id")
    hello = conn.handshake_client("claimed-id")
    assert hello["version"] == zrepl.PROTOCOL_VERSION and hello["accept_fds"] is False
    for i in range(3):
        assert conn.request("echo", {"i": i}) == {"echo": {"i": i}, "identity": "forced-id"}


# ---- handshake ----------------------------------------------------------------------------------

def test_version_mismatch_is_refused_with_a_clear_message():
    client, server = zrepl.local_pair(timeout=5)
    st = ServerThread(server)
    client._hello = lambda identity: {"protocol": zrepl.PROTOCOL_NAME, "version": 99,
                                      "software": "9.9", "identity": identity, "accept_fds": True}
    with pytest.raises(zrepl.ProtocolError) as ei:
        client.handshake_client("c")
    msg = str(ei.value)
    assert "handshake refused" in msg and "version mismatch" in msg and "99" in msg
    assert f"version {zrepl.PROTOCOL_VERSION}" in msg
    st.join()
    assert isinstance(st.error, zrepl.ProtocolError) and "version mismatch" in str(st.error)
    with pytest.raises(zrepl.ProtocolError):
        client.request("echo", {})
    client.close()
    server.close()


def test_client_reports_a_server_printing_garbage(tmp_path):
    # a shell rc file printing a banner is the classic ssh forced-command failure
    conn = zrepl.ssh_connect(["sh", "-c", "echo 'Welcome to backup host'; exec sleep 5"], timeout=5)
    try:
        with pytest.raises(zrepl.ProtocolError) as ei:
            conn.handshake_client("c")
        assert "bad frame magic" in str(ei.value) and "Welcome" in str(ei.value)
    finally:
        conn.close()
    assert conn.channel.process.proc.poll() is not None


# ---- garbage ------------------------------------------------------------------------------------

GARBAGE = {
    "bad magic": b"GARBAGE!" * 4,
    "unknown frame type": zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, 77, 0),
    "oversized header": zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_REQUEST,
                                                zrepl.MAX_HEADER_SIZE + 1) + b"{",
    "invalid json": raw_frame(zrepl.FRAME_REQUEST, b'{"id": 1, "kind": '),
    "header not an object": raw_frame(zrepl.FRAME_REQUEST, b'[1, 2, 3]'),
    "unknown request type": json_frame(zrepl.FRAME_REQUEST, {"id": 1, "kind": "rm -rf", "body": {}}),
    "malformed request": json_frame(zrepl.FRAME_REQUEST, {"id": "1", "kind": "echo", "body": []}),
    "data outside a stream": raw_frame(zrepl.FRAME_DATA, b"xyz"),
    "heartbeat with payload": raw_frame(zrepl.FRAME_HEARTBEAT, b"{}"),
    "fd frame without fd": json_frame(zrepl.FRAME_FDPASS, {}),
    # the decoder's recursion limit must end in a clean ERROR, not an internal error (issue 14.7)
    "json nested 100000 deep": raw_frame(zrepl.FRAME_REQUEST, b'{"id": 1, "kind": "echo", "body": {"a": '
                                         + b"[" * 100_000 + b"]" * 100_000 + b"}}"),
    "json nested 33 deep": raw_frame(zrepl.FRAME_REQUEST, b'{"id": 1, "kind": "echo", "body": '
                                     + b'{"a": ' * 32 + b"1" + b"}" * 32 + b"}"),
}
GARBAGE_MESSAGES = {
    "bad magic": "bad frame magic", "unknown frame type": "unknown frame type 77",
    "oversized header": "oversized REQUEST frame", "invalid json": "invalid JSON",
    "header not an object": "not a JSON object", "unknown request type": "unknown request type 'rm -rf'",
    "malformed request": "malformed REQUEST", "data outside a stream": "expected a REQUEST frame, got DATA",
    "heartbeat with payload": "HEARTBEAT frame with", "fd frame without fd": "without a file descriptor",
    "json nested 100000 deep": "JSON nested deeper than 32 levels",
    "json nested 33 deep": "JSON nested deeper than 32 levels",
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_after_handshake_gets_an_error_frame_and_only_that_client_is_dropped(case):
    server = zrepl.ProtocolServer(HANDLERS)
    good_client, good_server = zrepl.local_pair(timeout=5, heartbeat_interval=0.2)
    raw, bad_server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bad_conn = zrepl.Connection(sock=bad_server, name="hostile", timeout=5)
    server.serve(good_server)
    t = server.serve(bad_conn)
    good_client.handshake_client("good")
    assert good_client.request("echo", {"before": 1})["echo"] == {"before": 1}

    raw.sendall(raw_hello())
    assert read_until(raw, zrepl.FRAME_HELLO)
    raw.sendall(GARBAGE[case])
    import json
    err = json.loads(read_until(raw, zrepl.FRAME_ERROR))
    assert err["fatal"] is True and GARBAGE_MESSAGES[case] in err["error"]
    t.join(5)
    assert not t.is_alive()
    while (got := read_raw_frame(raw)) is not None:  # then the server hangs up
        assert got[0] == zrepl.FRAME_HEARTBEAT
    [(name, error)] = server.failures
    assert name == "hostile" and isinstance(error, zrepl.ProtocolError)
    assert GARBAGE_MESSAGES[case] in str(error)

    assert good_client.request("echo", {"after": 2})["echo"] == {"after": 2}
    assert server.active == 1
    good_client.close()
    server.stop()
    raw.close()


@pytest.mark.parametrize("case", ["bad magic", "request before hello", "invalid json"])
def test_garbage_instead_of_hello(case):
    raw, srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = zrepl.Connection(sock=srv, name="hostile", timeout=5)
    st = ServerThread(conn)
    data = {"bad magic": b"SSH-2.0-OpenSSH_9.6\r\n",
            "request before hello": json_frame(zrepl.FRAME_REQUEST, {"id": 1, "kind": "echo", "body": {}}),
            "invalid json": raw_frame(zrepl.FRAME_HELLO, b"\xff\xfe")}[case]
    raw.sendall(data)
    got = read_raw_frame(raw)
    assert got is not None and got[0] == zrepl.FRAME_ERROR
    st.join()
    assert isinstance(st.error, zrepl.ProtocolError)
    conn.close()
    raw.close()


def test_truncated_frame_ends_the_connection_as_lost():
    raw, srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = zrepl.Connection(sock=srv, name="hostile", timeout=5)
    st = ServerThread(conn)
    raw.sendall(raw_hello())
    read_until(raw, zrepl.FRAME_HELLO)
    raw.sendall(zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, zrepl.FRAME_REQUEST, 100) + b'{"id": 1')
    raw.shutdown(socket.SHUT_WR)
    st.join()
    assert isinstance(st.error, zrepl.ConnectionLost)
    assert isinstance(st.error, zrepl.ProtocolError) and st.error.temporary
    assert "truncated" in str(st.error)
    conn.close()
    raw.close()


def test_clean_disconnect_between_requests_ends_serving_without_error(local):
    client, server, st = local
    client.request("echo", {})
    client.close()
    st.join()
    assert st.error is None


# ---- streams ------------------------------------------------------------------------------------

def test_64mib_over_local_transport_is_fd_passed(local, payload_64m):
    client, server, _ = local
    path, digest = payload_64m
    assert client.request("receive", {}, stream_in=stream_file(path))["sha256"] == digest
    assert client.stats.fds_sent == 1 and server.stats.fds_received == 1
    assert "DATA" not in client.stats.frames_sent and client.stats.stream_bytes_sent == 0
    # and the other direction (pull)
    result: dict = {}
    body = client.request("send", {"path": str(path)}, stream_out=sha256_into(result))
    assert body == {"started": True} and result["sha256"] == digest
    assert server.stats.fds_sent == 1 and "DATA" not in server.stats.frames_sent


def test_64mib_over_local_transport_copying_when_fd_passing_is_off(local, payload_64m):
    client, server, _ = local
    path, digest = payload_64m
    client.fd_passing = False
    moved = []
    body = client.request("receive", {}, stream_in=stream_file(path), progress=moved.append)
    assert body == {"sha256": digest, "bytes": 64 * MiB}
    assert client.stats.frames_sent["DATA"] > 0 and client.stats.fds_sent == 0
    assert sum(moved) == 64 * MiB


def test_64mib_over_pipes_both_directions(stdio_server, payload_64m):
    path, digest = payload_64m
    conn = stdio_server()
    conn.handshake_client("c")
    moved = []
    body = conn.request("receive", {}, stream_in=stream_file(path), progress=moved.append)
    assert body == {"sha256": digest, "bytes": 64 * MiB}
    assert sum(moved) == 64 * MiB and conn.stats.stream_bytes_sent == 64 * MiB
    assert conn.stats.frames_sent["DATA"] >= 64 and conn.stats.fds_sent == 0
    assert conn.stats.spliced_bytes == 64 * MiB  # pipe -> pipe: the bytes never entered Python
    result: dict = {}
    conn.request("send", {"path": str(path)}, stream_out=sha256_into(result))
    assert result["sha256"] == digest and conn.stats.stream_bytes_received == 64 * MiB


@pytest.mark.parametrize("fd_passing", [False, True])
def test_copy_to_a_regular_file(local, payload_64m, tmp_path, fd_passing):
    client, _, _ = local
    client.fd_passing = fd_passing  # copying: socket -> regular file, splice refuses, read/write takes over
    path, digest = payload_64m
    out = tmp_path / "copy.bin"

    def consume(body, stream):
        with open(out, "wb") as f:
            assert stream.copy_to(f.fileno()) == 64 * MiB

    client.request("send", {"path": str(path)}, stream_out=consume)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def client_over(transport, local, stdio_server):
    """A connected client over pipes (stdinserver-like) or a local socket with or without fd passing."""
    if transport == "pipes":
        client = stdio_server()
        client.handshake_client("c")
        return client
    client = local[0]
    client.fd_passing = transport == "local-fd"
    return client


@pytest.mark.parametrize("transport", ["local-fd", "local-copy", "pipes"])
def test_producer_failure_reaches_the_receiver(transport, local, stdio_server):
    client = client_over(transport, local, stdio_server)
    proc = subprocess.Popen([sys.executable, "-c", "import os; os.write(1, b'y' * 3000); raise SystemExit(2)"],
                            stdout=subprocess.PIPE)
    with pytest.raises(zrepl.RemoteError) as ei:
        client.request("receive", {}, stream_in=zrepl.OutgoingStream.from_process(proc, "zfs send"))
    assert "zfs send exited with status 2" in str(ei.value) and ei.value.kind == "receive"
    # pull direction: the server's producer fails
    with pytest.raises(zrepl.StreamError, match="producer exited with status 3"):
        client.request("send", {"fail": True}, stream_out=sha256_into({}))
    assert client.request("echo", {"still": "usable"})["echo"] == {"still": "usable"}


@pytest.mark.parametrize("transport", ["local-fd", "local-copy", "pipes"])
def test_early_rejection_stops_an_endless_stream(transport, local, stdio_server):
    client = client_over(transport, local, stdio_server)
    endless = subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE)
    with pytest.raises(zrepl.RemoteError, match="modified since"):
        client.request("reject", {}, stream_in=zrepl.OutgoingStream.from_process(endless, "cat"))
    assert endless.wait(timeout=10) != 0  # it got EPIPE once nobody read the stream any more
    # the next stream arrives whole: nothing of the aborted one (late ABORT, DATA) leaks into it
    data = os.urandom(3 * MiB + 17)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writer = threading.Thread(target=lambda: (proc.stdin.write(data), proc.stdin.close()))
    writer.start()
    body = client.request("receive", {}, stream_in=zrepl.OutgoingStream.from_process(proc, "python"))
    writer.join()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(zrepl.RemoteError, match="receive failed after 1000 bytes"):
        endless = subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE)
        client.request("short", {}, stream_in=zrepl.OutgoingStream.from_process(endless, "cat"))
    endless.wait(timeout=10)
    assert client.request("echo", {"x": 1})["echo"] == {"x": 1}


@pytest.mark.parametrize("fd_passing", [True, False])
def test_failing_stream_out_callback_aborts_the_servers_stream(local, fd_passing):
    client, _, _ = local
    client.fd_passing = fd_passing

    def consume(body, stream):
        fd = stream.open_fd()
        assert len(os.read(fd, 4096)) > 0
        os.close(fd)
        raise RuntimeError("local zfs recv failed")

    with pytest.raises(RuntimeError, match="local zfs recv failed"):
        client.request("send", {"infinite": True}, stream_out=consume)
    assert client.request("echo", {"x": 2})["echo"] == {"x": 2}


# ---- liveness -----------------------------------------------------------------------------------

def silent_raw_server() -> tuple[zrepl.Connection, socket.socket]:
    """A peer that completes the handshake and then never says anything again."""
    client_sock, raw = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = zrepl.Connection(sock=client_sock, name="silent", timeout=0.5, heartbeat_interval=0.1)

    def answer_hello() -> None:
        read_until(raw, zrepl.FRAME_HELLO)
        raw.sendall(json_frame(zrepl.FRAME_HELLO, {"protocol": zrepl.PROTOCOL_NAME,
                                                   "version": zrepl.PROTOCOL_VERSION, "accept_fds": False}))
    t = threading.Thread(target=answer_hello)
    t.start()
    client.handshake_client("c")
    t.join()
    return client, raw


def test_peer_that_stops_responding_times_out():
    client, raw = silent_raw_server()
    start = time.monotonic()
    with pytest.raises(zrepl.PeerTimeout) as ei:
        client.request("echo", {})
    assert time.monotonic() - start < 5
    assert ei.value.temporary and "not even a heartbeat" in str(ei.value)
    client.close()
    raw.close()


def test_server_drops_a_client_that_went_silent():
    raw, srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = zrepl.Connection(sock=srv, name="client", timeout=0.5, heartbeat_interval=0.1)
    st = ServerThread(conn)
    raw.sendall(raw_hello())
    st.join(timeout=5)
    assert isinstance(st.error, zrepl.PeerTimeout)
    conn.close()
    raw.close()


def test_heartbeats_keep_a_slow_handler_alive():
    # heartbeats 20x as often as the timeout, so a loaded host's scheduling delays do not matter
    client, server = zrepl.local_pair(timeout=1.0, heartbeat_interval=0.05)

    def slow(body, ctx):
        time.sleep(3.0)  # three timeouts long; only heartbeats show the server is alive
        return {"done": True}

    st = ServerThread(server, {"slow": slow})
    client.handshake_client("c")
    time.sleep(2.0)  # idle client: its heartbeats keep the server from dropping it
    assert client.request("slow", {}) == {"done": True}
    assert server.stats.frames_sent.get("HEARTBEAT", 0) >= 3
    client.close()
    st.join()
    assert st.error is None


def test_request_timeout_bounds_the_wait_for_an_answer(local):
    client, server, _ = local
    gate = threading.Event()
    server_handlers = {"hang": lambda body, ctx: gate.wait(5) and {}}
    c2, s2 = zrepl.local_pair(timeout=5, heartbeat_interval=0.1)
    st = ServerThread(s2, server_handlers)
    c2.handshake_client("c")
    with pytest.raises(zrepl.PeerTimeout, match="request timeout"):
        c2.request("hang", {}, timeout=0.3)
    gate.set()
    c2.close()
    st.join()


def test_stopped_peer_process_mid_stream_is_detected(stdio_server):
    conn = stdio_server(timeout=30, heartbeat=0.2)
    conn.handshake_client("c")  # a generous timeout: the peer's interpreter may start slowly
    conn.channel.timeout = 1  # then a stopped peer must be noticed within about a second
    endless = subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE)
    timer = threading.Timer(0.5, os.kill, (conn.channel.process.proc.pid, signal.SIGSTOP))
    timer.start()
    start = time.monotonic()
    with pytest.raises(zrepl.PeerTimeout):
        conn.request("receive", {}, stream_in=zrepl.OutgoingStream.from_process(endless, "cat"))
    assert time.monotonic() - start < 15
    endless.kill()
    endless.wait()


def test_killed_peer_mid_stream_is_a_temporary_connection_loss(stdio_server):
    conn = stdio_server()
    conn.handshake_client("c")
    endless = subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE)
    with pytest.raises(zrepl.ConnectionLost) as ei:
        conn.request("crash", {}, stream_in=zrepl.OutgoingStream.from_process(endless, "cat"))
    err = ei.value
    assert err.temporary is True and err.kind == "crash" and err.peer == "fake-ssh"
    assert "exited with status 3" in str(err) and "simulated crash" in str(err)
    endless.wait(timeout=10)
    with pytest.raises(zrepl.ProtocolError, match="unusable"):
        conn.request("echo", {})


def test_ssh_authentication_failure_is_not_temporary():
    script = "import sys; sys.stderr.write('user@host: Permission denied (publickey).\\n'); sys.exit(255)"
    conn = zrepl.ssh_connect([sys.executable, "-c", script], name="ssh user@host", timeout=5)
    with pytest.raises(zrepl.ConnectionLost) as ei:
        conn.handshake_client("c")
    assert ei.value.temporary is False
    assert "Permission denied" in str(ei.value) and "status 255" in str(ei.value)
    conn.close()


def test_missing_ssh_binary_is_a_clear_error():
    with pytest.raises(zrepl.ProtocolError, match="cannot start /nonexistent/ssh"):
        zrepl.ssh_connect(["/nonexistent/ssh", "host"])


# ---- cancel -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fd_passing", [True, False])
def test_cancel_aborts_a_stalled_stream_promptly(local, fd_passing):
    client, _, _ = local
    client.fd_passing = fd_passing
    r, w = os.pipe()  # a producer that never writes and never ends

    def finish() -> None:
        os.read(r2, 1)  # a producer that never exits (fd passing waits for it)
        return None

    r2, w2 = os.pipe()
    os.write(w, b"some bytes before the stall")
    threading.Timer(0.3, client.cancel, ("watchdog: no progress",)).start()
    start = time.monotonic()
    with pytest.raises(zrepl.Cancelled, match="no progress"):
        client.request("receive", {}, stream_in=zrepl.OutgoingStream(r, finish))
    assert time.monotonic() - start < 3
    with pytest.raises(zrepl.Cancelled):
        client.request("echo", {})
    for fd in (w, w2, r2):
        os.close(fd)


def test_cancel_aborts_waiting_for_an_answer_and_a_pump():
    client, server = zrepl.local_pair(timeout=30, heartbeat_interval=0.1)
    client.fd_passing = False
    st = ServerThread(server, {"send": file_producer})
    client.handshake_client("c")
    got = []

    def stalled_consumer(body, stream):
        fd = stream.open_fd()  # the pump fills the pipe, then waits for a reader that never comes
        got.append(fd)
        time.sleep(0.5)
        client.cancel("reset")
        stream.finish()

    start = time.monotonic()
    with pytest.raises(zrepl.Cancelled):
        client.request("send", {"infinite": True}, stream_out=stalled_consumer)
    assert time.monotonic() - start < 5
    os.close(got[0])
    client.close()
    st.join()


def test_server_stop_cancels_idle_connections():
    server = zrepl.ProtocolServer(HANDLERS)
    client, srv = zrepl.local_pair(timeout=30, heartbeat_interval=0.1)
    t = server.serve(srv)
    client.handshake_client("c")
    start = time.monotonic()
    server.stop()
    assert not t.is_alive() and time.monotonic() - start < 3
    assert isinstance(server.failures[0][1], zrepl.Cancelled)
    client.close()


# ---- bandwidth limit ----------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_math_with_an_injected_clock():
    clock = FakeClock()
    bucket = zrepl.TokenBucket(rate=1000, capacity=500, clock=clock)
    assert bucket.take(300) == (300, 0.0)  # starts full: a burst up to capacity passes
    assert bucket.take(300) == (0, pytest.approx(0.1))  # 200 left, 100 more needed at 1000/s
    assert bucket.take(300, minimum=150) == (200, 0.0)  # partial grant once the minimum is there
    clock.now += 0.25
    assert bucket.take(1000) == (0, pytest.approx(0.25))  # a wish above capacity waits for a full bucket
    assert bucket.take(1000, minimum=100) == (250, 0.0)
    clock.now += 100
    assert bucket.tokens == 500  # refill is capped at the capacity
    bucket.give_back(10_000)
    assert bucket.tokens == 500
    assert bucket.take(500) == (500, 0.0)
    bucket.give_back(120)
    assert bucket.tokens == 120
    with pytest.raises(ValueError):
        zrepl.TokenBucket(0, 10)
    with pytest.raises(ValueError):
        zrepl.TokenBucket(10, 0)


def test_token_bucket_long_run_average_equals_the_rate():
    clock = FakeClock()
    bucket = zrepl.TokenBucket(rate=10 * MiB, capacity=256 << 10, clock=clock)
    sent = 0
    while clock.now < 1010.0:  # simulate a sender that always wants more
        granted, delay = bucket.take(zrepl.STREAM_CHUNK, minimum=64 << 10)
        sent += granted
        clock.now += delay if not granted else 0.001
    assert 100 * MiB - (1 << 20) <= sent <= 100 * MiB + (256 << 10) + (1 << 20)


@pytest.mark.parametrize("side", ["send", "recv"])
def test_bandwidth_limit_forces_copying_and_limits_throughput(side, payload_64m):
    client, server = zrepl.local_pair(timeout=10, heartbeat_interval=0.2)
    bucket = zrepl.TokenBucket(rate=8 * MiB, capacity=256 << 10)
    if side == "send":
        client.send_limit = bucket
    else:
        server.recv_limit = bucket  # announced in the server's HELLO: "no fds for me"
    st = ServerThread(server)
    client.handshake_client("c")
    data = payload_64m[0].read_bytes()[: 4 * MiB]
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writer = threading.Thread(target=lambda: (proc.stdin.write(data), proc.stdin.close()))
    writer.start()
    start = time.monotonic()
    body = client.request("receive", {}, stream_in=zrepl.OutgoingStream.from_process(proc, "python"))
    elapsed = time.monotonic() - start
    writer.join()
    assert body == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": 4 * MiB}
    assert client.stats.fds_sent == 0 and client.stats.frames_sent["DATA"] > 0
    # 4 MiB at 8 MiB/s with a 256 KiB burst cannot take less than (4 MiB - 256 KiB) / 8 MiB/s
    assert elapsed >= 0.45
    assert elapsed < 20
    client.close()
    st.join()


# ---- misc ---------------------------------------------------------------------------------------

def test_requests_from_two_threads_are_serialised(local):
    client, _, _ = local
    results: list = []

    def worker(n: int) -> None:
        for i in range(20):
            results.append(client.request("echo", {"n": n, "i": i})["echo"] == {"n": n, "i": i})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 60


def test_oversized_request_is_refused_locally_and_connection_survives(local):
    client, _, _ = local
    with pytest.raises(zrepl.ZreplError, match="refusing to send"):
        client.request("echo", {"blob": "x" * (zrepl.MAX_HEADER_SIZE + 10)})
    assert client.request("echo", {"small": 1})["echo"] == {"small": 1}


def test_stream_pacer_waits_for_a_batch_only_when_the_rate_says_it_is_worth_it():
    slept: list[float] = []
    r, w = os.pipe()
    try:
        zrepl._proto_grow_pipe(w, 1 << 20)
        pacer = zrepl._StreamPacer.for_pipe(w, reading=False, sleep=slept.append)
        assert pacer is not None
        assert pacer.batch == (1 << 20) // 4
        pacer.pause(0, 1 << 20)
        assert slept == []  # no rate known yet: never wait blind
        pacer.rate = 16 << 20  # 16 MiB/s, as ssh under emulation
        pacer.pause(64 << 10, 1 << 20)  # a quarter MiB is 12 ms away: capped
        assert slept == [zrepl.MAX_PACE_DELAY]
        pacer.pause(pacer.batch, 1 << 20)  # a batch is ready: move it now
        pacer.pause(10, 20)  # the frame wants only what is there
        pacer.rate = 2 << 30  # 2 GiB/s: the batch is 0.1 ms away, not worth a sleep
        pacer.pause(0, 1 << 20)
        assert slept == [zrepl.MAX_PACE_DELAY]
        pacer.rate = 16 << 20
        os.write(w, b"x" * pacer.size)  # the pipe we write to is full
        pacer.pace(1 << 20, first=True)  # a frame's first splice goes at once
        assert slept == [zrepl.MAX_PACE_DELAY]
        pacer.pace(1 << 20, first=False)  # after one that filled the pipe, waiting pays off
        assert slept == [zrepl.MAX_PACE_DELAY] * 2
    finally:
        os.close(r)
        os.close(w)
