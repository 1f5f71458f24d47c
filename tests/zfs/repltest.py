"""Helpers for the replication tests on real OpenZFS (test_replication*_zfs.py), on top of
support.py (config builders, observation: `snapshots(ZFS, fs)`, `status(cfg)`, ...) and zfstest.py
(the real zfs, the shim): the usual push/sink pair, zrepl's abstraction names, and zrepl.py runs
as subprocesses through the shim.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from support import FAST, Job, holds, push_job, sink_job
from zfstest import ZFS, ZfsShim, get, guid, list_all, zrepl_argv, zrepl_env


def push_sink(src: str, dst: str, *, filesystems: dict[str, bool] | None = None,
              recv: dict[str, Any] | None = None, **push_keys: Any) -> tuple[Job, Job]:
    """The common pair: job `push` (default: SRC/data and below) into sink `sink` at DST/sink."""
    return (push_job("push", filesystems=filesystems or {f"{src}/data<": True}, **push_keys),
            sink_job("sink", root_fs=f"{dst}/sink", recv=recv))


# ---- zrepl's names, computed independently of zrepl.py ------------------------------------------

def cursor(snapshot: str, job: str) -> str:
    """zrepl's replication cursor bookmark name for a snapshot (by its GUID)."""
    return f"zrepl_CURSOR_G_{guid(snapshot):016x}_J_{job}"


def tentative(snapshot: str, job: str) -> str:
    return f"zrepl_CURSORTENTATIVE__G_{guid(snapshot):016x}_J_{job}"


# ---- observation beyond support.py ---------------------------------------------------------------

def same_guids(a: str, b: str) -> bool:
    """Both datasets have the same snapshots with the same GUIDs (the received data is the sent data)."""
    def by_name(fs: str) -> dict[str, int]:
        info = ZFS.list_one(fs)
        return {v.name: v.guid for v in info.snapshots()} if info else {}
    return by_name(a) == by_name(b)


def fill(dataset: str, nbytes: int, name: str = "big.bin") -> None:
    """Write nbytes of incompressible data into a mounted filesystem."""
    with open(Path(get(dataset, "mountpoint")) / name, "wb") as f:
        f.write(os.urandom(nbytes))


def state(*roots: str) -> list[tuple]:
    """Everything a run could change below roots: datasets, snapshots, bookmarks, holds, properties."""
    out: list[tuple] = []
    for root in roots:
        for row in list_all(root):
            extra: tuple = ()
            if row.type == "snapshot":
                extra = tuple(sorted(holds(ZFS, row.name)))
            elif row.type == "filesystem":
                extra = (get(row.name, "zrepl:placeholder"), get(row.name, "receive_resume_token"))
            out.append((row.name, row.type, row.guid, row.createtxg, extra))
    return sorted(out)


# ---- zrepl.py runs -------------------------------------------------------------------------------

def _command(shim: ZfsShim | None, args: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """argv and env for one zrepl.py run (through the shim when given)."""
    env = {**(shim.env if shim else os.environ), **FAST}
    return zrepl_argv(*args), zrepl_env(env)


def run(shim: ZfsShim | None, cfg: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run zrepl.py with the config; never raises on its exit code."""
    argv, env = _command(shim, ("--config", str(cfg), *args))
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def start(shim: ZfsShim, cfg: Path, *args: str) -> subprocess.Popen:
    """Run zrepl.py in the background (to act while a shim delay holds it at a chosen point)."""
    argv, env = _command(shim, ("--config", str(cfg), *args))
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_call(shim: ZfsShim, verb: str, action: str, timeout: float = 120) -> None:
    """Block until the shim logged a spawn of `zfs VERB` that a rule with `action` caught."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.action == action for c in shim.calls(verb)):
            return
        time.sleep(0.2)
    raise AssertionError(f"zfs {verb} ({action}) was never spawned")

