"""Hostile wire input for stdinserver campaigns (host: tests/test_campaign_hostile_frames.py; the
guest version, not yet run in the guest, is tests/zfs/test_campaign_hostile_client_zfs.py in commit
3d99bba): frames built with zrepl.py's own framing, seeded random garbage, and a check that what
the server wrote back is frames and nothing else."""
from __future__ import annotations

import json
import os
import random
import selectors
import subprocess
import time
from typing import Any

import zrepl

# every request kind a sink serves (zrepl.receiver_handlers)
SINK_KINDS = ["endpoint.info", "receiver.list", "receiver.placeholders", "receiver.prepare", "receiver.receive",
              "receiver.clear_token", "receiver.hold_last_received", "receiver.release_stale", "receiver.holds",
              "receiver.destroy"]


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return zrepl.FRAME_HEADER.pack(zrepl.FRAME_MAGIC, ftype, len(payload)) + payload


def hello(identity: str) -> bytes:
    return frame(zrepl.FRAME_HELLO, json.dumps({"protocol": zrepl.PROTOCOL_NAME, "version": zrepl.PROTOCOL_VERSION,
                                                "identity": identity, "accept_fds": False}).encode())


def random_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 4 else 6)
    if pick == 0:
        return rng.choice([None, True, False, 0, -1, 2 ** 64, 10 ** 30, 1.5, float("nan"), float("inf")])
    if pick == 1:
        return rng.choice(["", "..", "/", "tank", "a" * 300, "x\ny", "x\tz", "@s", "#b", "../client2", "\x00"])
    if pick in (2, 3, 4, 5):
        return rng.choice(["s1", "prod/fs", "../../other", "client2/x", "fs@s", 7, [], {}])
    if pick in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_object(rng, depth)


def random_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = ["fs", "to", "names", "snapshot", "guid", "from", "received", "offset", "filesystems", "id", "kind", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_garbage(rng: random.Random, kinds: list[str]) -> bytes:
    """One to three hostile frames (or raw bytes)."""
    out = b""
    for _ in range(rng.randint(1, 3)):
        pick = rng.randrange(7)
        if pick == 0:
            out += os.urandom(rng.randrange(1, 64))
        elif pick == 1:
            out += frame(rng.randrange(256), os.urandom(rng.randrange(0, 40)))
        elif pick == 2:
            deep = rng.choice([1000, 100_000])
            nested = b"[" * deep + b"]" * deep
            out += frame(zrepl.FRAME_REQUEST, b'{"id":1,"kind":"receiver.list","body":' + nested + b"}")
        elif pick == 3:
            out += frame(zrepl.FRAME_DATA, os.urandom(rng.randrange(1, 100)))
        else:
            request_id = rng.randrange(1, 100) if rng.random() < 0.8 else random_json(rng)
            payload = random_object(rng) if rng.random() < 0.8 else random_json(rng)
            body = {"id": request_id, "kind": rng.choice(kinds + ["zfs.destroy", ""]), "body": payload}
            if rng.random() < 0.2:
                body["stream"] = rng.choice(["inline", "fd", "x"])
            out += frame(zrepl.FRAME_REQUEST, json.dumps(body).encode())
    return out


def read_all(proc: subprocess.Popen, timeout: float) -> bytes:
    data, fd = b"", proc.stdout.fileno()  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


def frames_or_problem(data: bytes) -> str | None:
    while data:
        if len(data) < zrepl.FRAME_HEADER.size:
            return f"a truncated frame header {data!r}"
        magic, ftype, length = zrepl.FRAME_HEADER.unpack(data[:zrepl.FRAME_HEADER.size])
        if magic != zrepl.FRAME_MAGIC or ftype not in zrepl.FRAME_NAMES:
            return f"not a frame: {data[:40]!r}"
        data = data[zrepl.FRAME_HEADER.size + length:]
    return None


def garbage_trial(proc: subprocess.Popen, rng: random.Random, identity: str = "client1",
                  timeout: float = 60) -> list[str]:
    """Send a HELLO and random garbage to a fresh `stdinserver` process; what went wrong (a reply
    that is not frames, a traceback, an internal error, an exit code other than 0 or 1)."""
    garbage = random_garbage(rng, SINK_KINDS)
    try:
        proc.stdin.write(hello(identity) + garbage)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass  # the server closed first: allowed
    out = read_all(proc, timeout)
    rc = proc.wait(timeout=timeout)
    err = proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
    found = [p for p in (frames_or_problem(out), "a traceback" if "Traceback" in err else None,
                         "an internal error" if "internal error" in err.lower() else None,
                         f"exit {rc}" if rc not in (0, 1) else None) if p]
    return [f"{garbage[:60]!r}: {p}: {err.strip()[-300:]}" for p in found]
