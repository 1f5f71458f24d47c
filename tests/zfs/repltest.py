"""Helpers for the replication tests on real OpenZFS (test_replication*_zfs.py).

Config builders write push/sink/pull/source jobs over the local transport; observation helpers
read what ZFS holds (snapshots, GUIDs, holds, bookmarks) and the status file.
"""
from __future__ import annotations

import json
import os
import py_compile
import subprocess
import time
from pathlib import Path

import zfstest
from zfstest import ZfsShim, get, guid, list_all, zfs

# Retries inside one run wait ZREPL_RETRY_DELAY * attempt seconds; the default 2 s only costs time.
FAST = {"ZREPL_RETRY_DELAY": "0.1"}


# ---- config builders ---------------------------------------------------------------------------

def write_config(tmp_path: Path, jobs: str) -> Path:
    path = tmp_path / "zrepl.toml"
    path.write_text(f'[global]\nstatus_file = "{tmp_path}/status/status.json"\n'
                    f'runtime_dir = "{tmp_path}/run"\n\n{jobs}')
    return path


def push_job(name: str, filesystems: str, *, listener: str = "sink", identity: str = "client1",
             keep_sender: str = "[]", keep_receiver: str = "[]", initial: str = "most_recent",
             snapshotting: str = 'type = "manual"', send: str = "{}", replication: str = "") -> str:
    """A push job; `replication` is the body of its [jobs.replication] table."""
    text = f'''
[[jobs]]
name = "{name}"
type = "push"
filesystems = {filesystems}
connect = {{ type = "local", listener_name = "{listener}", client_identity = "{identity}" }}
send = {send}
conflict_resolution = {{ initial_replication = "{initial}" }}
[jobs.snapshotting]
{snapshotting}
[jobs.pruning]
keep_sender = {keep_sender}
keep_receiver = {keep_receiver}
'''
    if replication:
        text += f"[jobs.replication]\n{replication}\n"
    return text


def sink_job(name: str, root_fs: str, *, listener: str = "sink", recv: str = "") -> str:
    """A sink job; `recv` is extra TOML for its [jobs.recv...] tables."""
    return f'''
[[jobs]]
name = "{name}"
type = "sink"
root_fs = "{root_fs}"
serve = {{ type = "local", listener_name = "{listener}" }}
{recv}
'''


def push_sink(src: str, dst: str, *, filesystems: str | None = None, keep_sender: str = "[]",
              keep_receiver: str = "[]", initial: str = "most_recent", snapshotting: str = 'type = "manual"',
              send: str = "{}", recv: str = "", replication: str = "") -> str:
    """The common pair: job `push` (default: SRC/data and below) into sink `sink` at DST/sink."""
    filesystems = filesystems or f'{{ "{src}/data<" = true }}'
    return (push_job("push", filesystems, keep_sender=keep_sender, keep_receiver=keep_receiver, initial=initial,
                     snapshotting=snapshotting, send=send, replication=replication)
            + sink_job("sink", f"{dst}/sink", recv=recv))


# ---- observation helpers -----------------------------------------------------------------------

def _versions(dataset: str, kind: str) -> list[tuple[str, int, int]]:
    """(short name, guid, createtxg) of one dataset's snapshots or bookmarks, one spawn."""
    out = zfs("list", "-Hp", "-d", "1", "-t", kind, "-o", "name,guid,createtxg", dataset)
    sep = "@" if kind == "snapshot" else "#"
    rows = [line.split("\t") for line in out.splitlines() if line]
    return [(n.split(sep, 1)[1], int(g), int(t)) for n, g, t in rows if n.startswith(dataset + sep)]


def snapshots(dataset: str) -> list[str]:
    """Short snapshot names in createtxg order."""
    return [n for n, _, _ in sorted(_versions(dataset, "snapshot"), key=lambda v: v[2])]


def bookmarks(dataset: str) -> list[str]:
    return sorted(n for n, _, _ in _versions(dataset, "bookmark"))


def holds(snapshot: str) -> set[str]:
    """Hold tags on one snapshot."""
    return {line.split("\t")[1] for line in zfs("holds", "-H", snapshot).splitlines() if line.strip()}


def cursor(snapshot: str, job: str) -> str:
    """zrepl's replication cursor bookmark name for a snapshot (by its GUID)."""
    return f"zrepl_CURSOR_G_{guid(snapshot):016x}_J_{job}"


def tentative(snapshot: str, job: str) -> str:
    return f"zrepl_CURSORTENTATIVE__G_{guid(snapshot):016x}_J_{job}"


def status(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "status" / "status.json").read_text())


def fs_status(tmp_path: Path, job: str, fs: str) -> dict:
    return status(tmp_path)["jobs"][job]["replication"]["filesystems"][fs]


def same_guids(a: str, b: str) -> bool:
    """Both datasets have the same snapshots with the same GUIDs (the received data is the sent data)."""
    return ({n: g for n, g, _ in _versions(a, "snapshot")} == {n: g for n, g, _ in _versions(b, "snapshot")})


def fill(dataset: str, nbytes: int, name: str = "big.bin") -> None:
    """Write nbytes of incompressible data into a mounted filesystem."""
    with open(Path(get(dataset, "mountpoint")) / name, "wb") as f:
        f.write(os.urandom(nbytes))


def real_sends(shim: ZfsShim) -> list[list[str]]:
    """argv of every `zfs send` that moved data (not estimates or token decoding)."""
    return [c.argv for c in shim.calls("send") if "-n" not in c.argv]


def _command(shim: ZfsShim | None, args: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """argv and env for one zrepl.py run (through the shim when given: ~0.4 s per zfs spawn)."""
    env = {**(shim.env if shim else os.environ), **FAST}
    if hasattr(zfstest, "zrepl_argv"):  # `python3 -m zrepl`: bytecode cached across runs
        return zfstest.zrepl_argv(*args), zfstest.zrepl_env(env)
    # Older test bed: a script is recompiled on every start (seconds in the guest); compile once.
    compiled = Path(f"/tmp/zrepl-test-{zfstest.ZREPL_PY.stat().st_mtime_ns}.pyc")
    if not compiled.exists():
        tmp = compiled.with_suffix(f".{os.getpid()}.tmp")
        py_compile.compile(str(zfstest.ZREPL_PY), cfile=str(tmp), doraise=True)
        tmp.replace(compiled)
    return ["python3", str(compiled), *args], env


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


def state(*roots: str) -> list[tuple]:
    """Everything a run could change below roots: datasets, snapshots, bookmarks, holds, properties."""
    out: list[tuple] = []
    for root in roots:
        for row in list_all(root):
            extra: tuple = ()
            if row.type == "snapshot":
                extra = tuple(sorted(holds(row.name)))
            elif row.type == "filesystem":
                extra = (get(row.name, "zrepl:placeholder"), get(row.name, "receive_resume_token"))
            out.append((row.name, row.type, row.guid, row.createtxg, extra))
    return sorted(out)
