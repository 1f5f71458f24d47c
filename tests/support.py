"""Test support shared by host tests, guest tests (tests/zfs) and bench/: config builders, the
tree grammar, observation helpers and in-process runs of zrepl.py.

Pure Python on top of zrepl.py: nothing here needs ZFS, so host tests, the guest and bench scripts
all import it (`import support`; tests/ is on sys.path through tests/conftest.py, bench/benchlib.py
puts it there for the scripts).

Configs:
    cfg = write_config(tmp_path,
                       push_job(filesystems={"src/data<": True}, keep_sender=[not_replicated(), last_n(1)]),
                       sink_job(root_fs="dst/sink"),
                       global_={"monitoring": {"warn_no_success_after": "2h"}})
A job is a dict of zrepl's keys (the builders fill in the usual defaults; any other key goes in as
a keyword argument: `send={"encrypted": True}`, `replication={"timeout": "5s"}`), or TOML text for
the rare job the builders cannot express. Values become TOML (nested dicts as inline tables).

Observation: `snapshots(zfs, fs)`, `bookmarks(zfs, fs)`, `holds(zfs, snapshot)` read a FakeZfs's world
without recording a command, or ask a real `zrepl.Zfs()`; `status(cfg)` is the status document.
In-process runs: `run("--config", cfg, "run", "push", zfs=fake)` -> Result(code, stdout, stderr).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zrepl

# ---- TOML -----------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """A Python value as a TOML value: dicts become inline tables (JSON string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def toml_table(header: str, table: Mapping[str, Any]) -> str:
    lines = [header] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


# ---- config builders ------------------------------------------------------------------------------

Job = dict[str, Any]
MANUAL: dict[str, Any] = {"type": "manual"}


def write_config(directory: Path, *jobs: Job | str, global_: Mapping[str, Any] | None = None,
                 name: str = "zrepl.toml") -> Path:
    """Write DIRECTORY/zrepl.toml with the jobs; status file and runtime dir live in DIRECTORY
    unless global_ says otherwise. Returns the config's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"status_file": str(directory / "status.json"), "runtime_dir": str(directory / "run"),
                **(global_ or {})}
    parts = [toml_table("[global]", settings)]
    parts += [job if isinstance(job, str) else toml_table("[[jobs]]", job) for job in jobs]
    path = directory / name
    path.write_text("\n".join(parts))
    return path


def _job(name: str, type_: str, keys: Mapping[str, Any]) -> Job:
    return {"name": name, "type": type_, **{k: v for k, v in keys.items() if v is not None}}


def _filesystems(value: Mapping[str, bool] | str) -> Mapping[str, bool]:
    return {value: True} if isinstance(value, str) else value


def _pruning(**rules: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {k: list(v) for k, v in rules.items() if v is not None}


def snap_job(name: str = "snap", *, filesystems: Mapping[str, bool] | str, snapshotting: Mapping[str, Any] = MANUAL,
             keep: Sequence[Mapping[str, Any]] = (), **keys: Any) -> Job:
    return _job(name, "snap", {"filesystems": _filesystems(filesystems), "snapshotting": snapshotting,
                               "pruning": _pruning(keep=keep), **keys})


def push_job(name: str = "push", *, filesystems: Mapping[str, bool] | str, listener: str = "sink",
             client_identity: str = "client1", connect: Mapping[str, Any] | None = None,
             snapshotting: Mapping[str, Any] = MANUAL, keep_sender: Sequence[Mapping[str, Any]] = (),
             keep_receiver: Sequence[Mapping[str, Any]] = (), initial_replication: str | None = None,
             **keys: Any) -> Job:
    """A push job over the local transport to `listener` (or `connect`)."""
    return _job(name, "push", {
        "filesystems": _filesystems(filesystems),
        "connect": connect or local_connect(listener, client_identity),
        "snapshotting": snapshotting,
        "conflict_resolution": {"initial_replication": initial_replication} if initial_replication else None,
        "pruning": _pruning(keep_sender=keep_sender, keep_receiver=keep_receiver), **keys})


def sink_job(name: str = "sink", *, root_fs: str, listener: str = "sink", serve: Mapping[str, Any] | None = None,
             **keys: Any) -> Job:
    return _job(name, "sink", {"root_fs": root_fs, "serve": serve or local_serve(listener), **keys})


def pull_job(name: str = "pull", *, root_fs: str, listener: str = "source", client_identity: str = "client1",
             connect: Mapping[str, Any] | None = None, interval: str = "manual",
             keep_sender: Sequence[Mapping[str, Any]] = (), keep_receiver: Sequence[Mapping[str, Any]] = (),
             initial_replication: str | None = None, **keys: Any) -> Job:
    """A pull job over the local transport from `listener` (or `connect`)."""
    return _job(name, "pull", {
        "root_fs": root_fs, "interval": interval,
        "connect": connect or local_connect(listener, client_identity),
        "conflict_resolution": {"initial_replication": initial_replication} if initial_replication else None,
        "pruning": _pruning(keep_sender=keep_sender, keep_receiver=keep_receiver), **keys})


def source_job(name: str = "source", *, filesystems: Mapping[str, bool] | str, listener: str = "source",
               serve: Mapping[str, Any] | None = None, snapshotting: Mapping[str, Any] = MANUAL,
               **keys: Any) -> Job:
    return _job(name, "source", {"filesystems": _filesystems(filesystems), "serve": serve or local_serve(listener),
                                 "snapshotting": snapshotting, **keys})


# One periodic snap job as TOML text, for config tests that edit it with str.replace.
SNAP_JOB_TOML = """
[[jobs]]
name = "snapjob"
type = "snap"
filesystems = { "tank<" = true }
[jobs.snapshotting]
type = "periodic"
prefix = "zrepl_"
interval = "10m"
[jobs.pruning]
keep = [{ type = "last_n", count = 5 }]
"""


def snap_config(directory: Path | str, jobs: Mapping[str, str], *, interval: str = "1h",
                global_: Mapping[str, Any] | None = None) -> Path:
    """A config of periodic snap jobs (job name -> filesystem, with its children), no pruning rules."""
    return write_config(Path(directory), *(snap_job(name, filesystems={f"{fs}<": True}, snapshotting=periodic(interval))
                                           for name, fs in jobs.items()), global_=global_)


def local_connect(listener: str, client_identity: str) -> dict[str, Any]:
    return {"type": "local", "listener_name": listener, "client_identity": client_identity}


def local_serve(listener: str) -> dict[str, Any]:
    return {"type": "local", "listener_name": listener}


def stdinserver(*client_identities: str) -> dict[str, Any]:
    return {"type": "stdinserver", "client_identities": list(client_identities)}


def periodic(interval: str = "1h", prefix: str = "zrepl_", **keys: Any) -> dict[str, Any]:
    return {"type": "periodic", "prefix": prefix, "interval": interval, **keys}


def last_n(count: int, regex: str | None = None) -> dict[str, Any]:
    return {"type": "last_n", "count": count, **({"regex": regex} if regex is not None else {})}


def grid(spec: str, regex: str) -> dict[str, Any]:
    return {"type": "grid", "grid": spec, "regex": regex}  # zrepl requires the regex for grid


def regex(pattern: str, negate: bool = False) -> dict[str, Any]:
    return {"type": "regex", "regex": pattern, **({"negate": True} if negate else {})}


def not_replicated() -> dict[str, Any]:
    return {"type": "not_replicated"}


# ---- the tree grammar (FakeZfs worlds and zfstest.build_tree on real ZFS) ------------------------

_TOKEN_SPLIT = re.compile(r"\s+(?=-@|@|#)")
_PROPS = re.compile(r"\{([^}]*)\}\s*$")


@dataclass(frozen=True)
class TreeLine:
    """One parsed line of a tree spec: dataset path, creation properties, ordered operations.

    ops are ("snap", name), ("bookmark", name, source snapshot or "" = latest on this line)
    and ("destroy", snapshot name), in text order.
    """

    path: str
    props: tuple[tuple[str, str], ...]
    ops: tuple[tuple[str, ...], ...]


def parse_tree_spec(spec: str) -> list[TreeLine]:
    """Parse a tree spec (raises ValueError on malformed lines). One line per dataset:

        PATH [{prop=value, ...}] [@snap ...] [#bookmark ...] [#bookmark=snap ...] [-@snap ...]

    PATH is relative to the pool ('.' = the pool's root dataset) and may contain spaces; tokens
    run left to right, which is creation order (createtxg follows the text, not the names)."""
    lines = []
    for raw_line in spec.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        parts = _TOKEN_SPLIT.split(line)
        head, tokens = parts[0].strip(), [t.strip() for t in parts[1:]]
        props: list[tuple[str, str]] = []
        match = _PROPS.search(head)
        if match:
            for item in filter(None, (p.strip() for p in match.group(1).split(","))):
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"property must be key=value, got {item!r} in {raw_line!r}")
                props.append((key.strip(), value.strip()))
            head = head[: match.start()].strip()
        if head.startswith(("@", "#", "-@")) or "{" in head or "}" in head:
            raise ValueError(f"tree line must start with a dataset path: {raw_line!r}")
        ops: list[tuple[str, ...]] = []
        have_snap = False
        for token in tokens:
            if token.startswith("-@") and token[2:].strip():
                ops.append(("destroy", token[2:].strip()))
            elif token.startswith("@") and token[1:].strip():
                ops.append(("snap", token[1:].strip()))
                have_snap = True
            elif token.startswith("#") and token[1:].strip():
                name, _, source = token[1:].partition("=")
                if not source.strip() and not have_snap:
                    raise ValueError(f"bookmark {token!r} has no snapshot before it: {raw_line!r}")
                ops.append(("bookmark", name.strip(), source.strip() or ""))
            else:
                raise ValueError(f"bad token {token!r} in {raw_line!r}")
        lines.append(TreeLine(head.strip("/"), tuple(props), tuple(ops)))
    return lines


def tree_dataset(pool: str, path: str) -> str:
    """The full name of a tree line's PATH."""
    path = path.strip().strip("/")
    return f"{pool}/{path}" if path and path != "." else pool


# ---- observation ----------------------------------------------------------------------------------

def _listing(zfs: zrepl.Zfs, fs: str) -> zrepl.DatasetInfo:
    info = zfs.list_one(fs)
    if info is None:
        raise AssertionError(f"{fs} does not exist")
    return info


def snapshots(zfs: zrepl.Zfs, fs: str) -> list[str]:
    """Short snapshot names of one dataset, oldest (createtxg) first. A FakeZfs answers from its
    world without recording a command."""
    world = getattr(zfs, "world", None)
    if world is not None:
        return world.snapshots(fs)
    return [v.name for v in _listing(zfs, fs).snapshots()]


def bookmarks(zfs: zrepl.Zfs, fs: str) -> list[str]:
    """Short bookmark names of one dataset, sorted by name."""
    world = getattr(zfs, "world", None)
    if world is not None:
        return world.bookmarks(fs)
    return sorted(v.name for v in _listing(zfs, fs).bookmarks())


def holds(zfs: zrepl.Zfs, snapshot: str) -> set[str]:
    """Hold tags on one snapshot."""
    world = getattr(zfs, "world", None)
    if world is not None:
        return world.holds(snapshot)
    return set(zfs.holds([snapshot]).get(snapshot, []))


def status(config: Path | str) -> dict[str, Any]:
    """The status document of the config's status_file."""
    path = zrepl.load_config(str(config)).global_.status_file
    return json.loads(Path(path).read_text())


def job_status(config: Path | str, job: str) -> dict[str, Any]:
    return status(config)["jobs"][job]


def fs_status(config: Path | str, job: str, fs: str) -> dict[str, Any]:
    """One filesystem's replication report in a job's status."""
    return job_status(config, job)["replication"]["filesystems"][fs]


# ---- zfs commands a run issued (FakeZfs.calls, or ZfsShim.calls() in the guest) -------------------

CHANGING_VERBS = frozenset({"snapshot", "destroy", "hold", "release", "bookmark", "create", "recv", "receive",
                            "set", "inherit", "rename", "rollback", "promote"})


def _verb_args(call: Sequence[str] | Any) -> list[str]:
    """A call's arguments from the verb on: an argv (with or without "zfs") or a ShimCall."""
    argv = list(getattr(call, "argv", call))
    return argv[1:] if argv and argv[0] == "zfs" else argv


def real_sends(calls: Iterable[Any]) -> list[list[str]]:
    """The `zfs send` argv that moved data (no estimates, no token decoding), without "zfs"."""
    return [a for c in calls if (a := _verb_args(c)) and a[0] == "send" and "-n" not in a]


def changes(calls: Iterable[Any]) -> list[list[str]]:
    """The commands that change something (snapshots, holds, bookmarks, receives, ...), without "zfs"."""
    return [a for c in calls if (a := _verb_args(c)) and a[0] in CHANGING_VERBS]


# ---- in-process runs ------------------------------------------------------------------------------

@dataclass
class Result:
    """What one in-process `zrepl.py` command did."""

    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


# Retries inside one run wait ZREPL_RETRY_DELAY * attempt seconds; the default 2 s only costs time.
FAST = {"ZREPL_RETRY_DELAY": "0"}


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(*argv: str | Path, zfs: zrepl.Zfs | None = None, env: Mapping[str, str] | None = None) -> Result:
    """`zrepl.py ARGV` in this process through zrepl.main (zfs: a FakeZfs, or None for the real
    one), with stdout, stderr (the log included) and the exit code captured. The `zrepl` logger's
    set-up is restored afterwards, so runs do not leak handlers into each other."""
    logger = zrepl.log
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers.clear()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _environ({**FAST, **(env or {})}):
            try:
                code = zrepl.main([str(a) for a in argv], zfs=zfs)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    return Result(code, out.getvalue(), err.getvalue())


# ---- campaigns --------------------------------------------------------------------------------------

CAMPAIGN_SEED = 20261201


def campaign_seed() -> int:
    """The seed of a randomized campaign, printed so a run can be repeated: ZREPL_CAMPAIGN_SEED=N
    repeats one, =random draws a fresh one; by default a fixed seed, so CI tries the same cases
    every time (a campaign finds bugs when run on purpose, not as a red CI by chance)."""
    wanted = os.environ.get("ZREPL_CAMPAIGN_SEED", "")
    value = random.SystemRandom().randrange(1 << 32) if wanted == "random" else int(wanted or CAMPAIGN_SEED)
    print(f"ZREPL_CAMPAIGN_SEED={value}")
    return value


# ---- promtool (the exposition text of section 15) ------------------------------------------------

# promtool lints zrepl's own counter names (no `_total`): kept as zrepl exports them, because
# dashboards query them by these names. Any other finding fails the test.
ZREPL_NAMES_PROMTOOL_DISLIKES = {
    ("zrepl_replication_bytes_replicated", 'counter metrics should have "_total" suffix'),
    ("zrepl_daemon_log_entries", 'counter metrics should have "_total" suffix'),
    ("zrepl_control_request_begin", 'counter metrics should have "_total" suffix'),
    ("zrepl_zfs_list_unmatched_user_specified_dataset_count",
     'non-histogram and non-summary metrics should not have "_count" suffix'),
}


def promtool() -> str | None:
    """The real promtool: $ZREPL_TEST_PROMTOOL (in the guest: the host's binary, which
    tests/vm/run-in-guest shares with it), else the one in PATH (Debian's prometheus package)."""
    named = os.environ.get("ZREPL_TEST_PROMTOOL")
    if named and os.access(named, os.X_OK):
        return named
    return shutil.which("promtool")


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the text: no parse error, no lint finding beyond the
    zrepl names above. Skips only when ZREPL_TEST_REQUIRE_PROMTOOL is unset (tests/run-all sets it
    for the host and the guest suite)."""
    import pytest  # here: bench scripts import this module without pytest

    binary = promtool()
    if binary is None:
        if os.environ.get("ZREPL_TEST_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is missing (apt-get install prometheus; the guest gets the host's through "
                        "tests/vm/run-in-guest) and ZREPL_TEST_REQUIRE_PROMTOOL requires it")
        pytest.skip("promtool not installed (Debian: apt-get install --no-install-recommends prometheus; "
                    "the guest uses the host's)")
    proc = subprocess.run([binary, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode in (0, 3), f"promtool rejected the text (exit {proc.returncode}): {output}\n{text}"
    findings = {tuple(line.split(" ", 1)) for line in output.splitlines() if line.strip()}
    assert findings <= ZREPL_NAMES_PROMTOOL_DISLIKES, f"promtool findings: {findings - ZREPL_NAMES_PROMTOOL_DISLIKES}"
