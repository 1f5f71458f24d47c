"""Helpers for tests against real OpenZFS (used by tests/zfs/conftest.py; import freely).

Everything here drives the real `zfs`/`zpool` binaries with argv lists. The fixtures in
conftest.py wrap these classes; tests may also call the functions directly:

    from zfstest import zfs, list_all, send_recv

Overview:
- `run`, `zfs`, `zpool`: run a command, raise `CommandFailed` (with stderr) on failure.
- `ZFS`: a `zrepl.Zfs` on the real binaries, for support.snapshots(ZFS, fs), bookmarks, holds.
- `list_all(root)`: `zfs list -Hp -o name,type,guid,createtxg -t all -r root` as `ZfsRow`s.
- `send_recv(send_args, recv_args)`: `zfs send ... | zfs recv ...` without a shell.
- `PoolFactory`: throwaway pools on sparse file vdevs (unique names, destroyed afterwards).
- `build_tree(pool, spec)`: declare datasets, snapshots and bookmarks compactly (grammar below).
- `ZfsShim`: a PATH shim in front of the real zfs for fault injection and spawn counting.
- `run_zrepl(...)`: run `python3 /src/zrepl.py ...` as a subprocess.
- `SshServer`, `PostgresServer`, `MariadbServer`: throwaway servers on loopback / unix sockets.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

import zrepl
from support import parse_tree_spec, tree_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
ZREPL_PY = REPO_ROOT / "zrepl.py"
# Resolved once, before any test changes PATH: the shim execs exactly this binary.
REAL_ZFS = shutil.which("zfs") or "/usr/sbin/zfs"
REAL_ZPOOL = shutil.which("zpool") or "/usr/sbin/zpool"
# The real zfs through zrepl's own ZFS layer, for support.snapshots(ZFS, fs) and friends.
ZFS = zrepl.Zfs(zfs_bin=REAL_ZFS, zpool_bin=REAL_ZPOOL)
# Guest /tmp is a tmpfs: sparse vdev files there cost RAM only for what is written, and are fast.
WORK_ROOT = Path(os.environ.get("ZREPL_TEST_WORKDIR", "/tmp"))
# Freshly initialised database directories baked into the guest image by tests/vm/build-image.
POSTGRES_TEMPLATE = Path("/var/lib/zrepl-test/postgres")
MARIADB_TEMPLATE = Path("/var/lib/zrepl-test/mariadb")


class CommandFailed(AssertionError):
    """A helper command exited non-zero; the message carries argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv, self.returncode, self.stdout, self.stderr = list(argv), returncode, stdout, stderr
        super().__init__(f"{' '.join(map(str, argv))!s} exited {returncode}: {stderr.strip()}")


def run(argv: Sequence[str], *, input: str | bytes | None = None, check: bool = True,
        timeout: float = 300, env: Mapping[str, str] | None = None, text: bool = True,
        user: str | None = None) -> subprocess.CompletedProcess:
    """Run argv (no shell), capture output; raise CommandFailed when check and it fails."""
    proc = subprocess.run(
        [str(a) for a in argv], input=input, capture_output=True, timeout=timeout,
        env=dict(env) if env is not None else None, text=text, user=user,
    )
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        out = proc.stdout if text else proc.stdout.decode(errors="replace")
        raise CommandFailed(argv, proc.returncode, out, err)
    return proc


def zfs(*args: str, check: bool = True, input: str | None = None) -> str:
    """Run the real zfs with args; return stdout (raises CommandFailed on failure if check)."""
    return run([REAL_ZFS, *args], check=check, input=input).stdout


def zpool(*args: str, check: bool = True) -> str:
    """Run the real zpool with args; return stdout."""
    return run([REAL_ZPOOL, *args], check=check).stdout


@dataclass(frozen=True)
class ZfsRow:
    """One line of `zfs list -Hp -o name,type,guid,createtxg -t all`."""

    name: str
    type: str
    guid: int
    createtxg: int


def list_all(root: str, *, recursive: bool = True) -> list[ZfsRow]:
    """Every filesystem, volume, snapshot and bookmark at/under root, in zfs's order."""
    args = ["list", "-Hp", "-o", "name,type,guid,createtxg", "-t", "all"]
    if recursive:
        args.append("-r")
    rows = []
    for line in zfs(*args, root).splitlines():
        name, kind, guid, txg = line.split("\t")
        rows.append(ZfsRow(name, kind, int(guid), int(txg)))
    return rows


def get(name: str, prop: str) -> str:
    """`zfs get -Hp -o value PROP NAME` (parsable value)."""
    return zfs("get", "-Hp", "-o", "value", prop, name).rstrip("\n")


def guid(name: str) -> int:
    """The guid of a dataset, snapshot or bookmark."""
    return int(get(name, "guid"))


def release_holds(name: str) -> None:
    """Release every hold on a snapshot, or on all snapshots at and below a dataset, so that
    `zfs destroy -r` can remove what zrepl received (it holds its last received snapshot)."""
    if "@" in name:
        snaps = [name]
    else:
        snaps = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", name).splitlines()
    for snap in snaps:
        for line in zfs("holds", "-H", snap).splitlines():
            zfs("release", line.split("\t")[1], snap)


def exists(name: str) -> bool:
    """True if the dataset/snapshot/bookmark exists."""
    return run([REAL_ZFS, "list", "-H", "-o", "name", "-t", "all", name], check=False).returncode == 0


@dataclass
class SendRecvResult:
    """Outcome of one `zfs send | zfs recv` pipeline; stderr texts decoded."""

    send_rc: int
    recv_rc: int
    send_stderr: str
    recv_stderr: str

    @property
    def ok(self) -> bool:
        return self.send_rc == 0 and self.recv_rc == 0


def send_recv(send_args: Sequence[str], recv_args: Sequence[str], *,
              send_argv0: str | None = None, recv_argv0: str | None = None,
              env: Mapping[str, str] | None = None, timeout: float = 300,
              check: bool = True) -> SendRecvResult:
    """Pipe `zfs send SEND_ARGS` into `zfs recv RECV_ARGS` (no shell).

    send_argv0/recv_argv0 replace the zfs binary for that side (e.g. a ZfsShim's `zfs` path, or
    an ssh argv prefix is not supported here: use subprocess directly for that).
    With check=True a failing side raises CommandFailed.
    """
    send_cmd = [send_argv0 or REAL_ZFS, "send", *send_args]
    recv_cmd = [recv_argv0 or REAL_ZFS, "recv", *recv_args]
    run_env = dict(env) if env is not None else None
    with tempfile.TemporaryFile() as send_err, tempfile.TemporaryFile() as recv_err:
        sender = subprocess.Popen(send_cmd, stdout=subprocess.PIPE, stderr=send_err, env=run_env)
        receiver = subprocess.Popen(recv_cmd, stdin=sender.stdout, stderr=recv_err, env=run_env)
        assert sender.stdout is not None
        sender.stdout.close()  # the receiver holds the pipe; a receiver exit must end the sender
        try:
            recv_rc = receiver.wait(timeout=timeout)
            send_rc = sender.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            sender.kill()
            receiver.kill()
            raise
        send_err.seek(0)
        recv_err.seek(0)
        result = SendRecvResult(send_rc, recv_rc, send_err.read().decode(errors="replace"),
                                recv_err.read().decode(errors="replace"))
    if check and not result.ok:
        failed = send_cmd if send_rc else recv_cmd
        raise CommandFailed(failed, send_rc or recv_rc, "",
                            f"send: {result.send_stderr.strip()} | recv: {result.recv_stderr.strip()}")
    return result


# ------------------------------------------------------------------------------------------------
# Pools
# ------------------------------------------------------------------------------------------------

class PoolFactory:
    """Creates throwaway pools on sparse file vdevs; `destroy_all()` removes them and their files.

    Names are `zt<hint><8 hex>` (unique across parallel guests and tests); the root dataset is
    mounted at /tmp/zrepl-test-mnt/<name>; cachefile=none so nothing outlives the guest.
    """

    def __init__(self, workdir: Path | None = None):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zrepl-vdev-", dir=WORK_ROOT))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pools: list[str] = []
        self._files: dict[str, Path] = {}

    def create(self, hint: str = "p", *, size: str = "256M",
               pool_properties: Mapping[str, str] | None = None,
               fs_properties: Mapping[str, str] | None = None) -> str:
        """Create a pool, return its name. hint: letters/digits put into the name."""
        if not re.fullmatch(r"[A-Za-z0-9]*", hint):
            raise ValueError(f"pool hint must be letters/digits, got {hint!r}")
        name = f"zt{hint}{secrets.token_hex(4)}"
        vdev = self.workdir / f"{name}.vdev"
        run(["truncate", "-s", size, str(vdev)])
        argv = [REAL_ZPOOL, "create", "-o", "cachefile=none", "-m", f"/tmp/zrepl-test-mnt/{name}"]
        for key, value in (pool_properties or {}).items():
            argv += ["-o", f"{key}={value}"]
        for key, value in (fs_properties or {}).items():
            argv += ["-O", f"{key}={value}"]
        try:
            run([*argv, name, str(vdev)])
        except Exception:
            vdev.unlink(missing_ok=True)
            raise
        self.pools.append(name)
        self._files[name] = vdev
        return name

    def destroy(self, name: str) -> None:
        """Destroy one pool (retrying briefly while busy) and delete its vdev file."""
        last: CommandFailed | None = None
        for _ in range(20):
            proc = run([REAL_ZPOOL, "destroy", "-f", name], check=False)
            if proc.returncode == 0 or "no such pool" in proc.stderr:
                last = None
                break
            last = CommandFailed(["zpool", "destroy", "-f", name], proc.returncode, proc.stdout, proc.stderr)
            time.sleep(0.25)
        self._files.pop(name, Path("/nonexistent")).unlink(missing_ok=True)
        if name in self.pools:
            self.pools.remove(name)
        if last is not None:
            raise last

    def destroy_all(self) -> None:
        """Destroy every pool this factory made (newest first); raise the first failure at the end."""
        errors = []
        for name in reversed(list(self.pools)):
            try:
                self.destroy(name)
            except CommandFailed as exc:
                errors.append(exc)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------------------------
# Declarative trees
# ------------------------------------------------------------------------------------------------

PASSPHRASE = "zrepl-test-passphrase"
@dataclass
class Tree:
    """What `build_tree` created: full names in creation order, plus lookups."""

    pool: str
    datasets: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    bookmarks: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    key_file: Path | None = None

    def fs(self, rel: str = "") -> str:
        """Full dataset name for a path relative to the pool ('' is the pool's root dataset)."""
        return tree_dataset(self.pool, rel)


def build_tree(pool: str, spec: str, *, data: bool = True, key_file: Path | None = None) -> Tree:
    """Create datasets, snapshots and bookmarks from a compact spec; return a Tree.

    One line per dataset (support.parse_tree_spec, also what FakeZfs worlds are built from),
    processed top to bottom, tokens left to right (that is creation order, so createtxg follows
    the text, not the names):

        PATH [{prop=value, ...}] [@snap ...] [#bookmark ...] [#bookmark=snap ...] [-@snap ...]

    - PATH is relative to the pool ('.' = the pool's root dataset) and may contain spaces;
      parents are created (`zfs create -p`); an existing dataset is reused.
    - {...} sets creation properties; `volsize=64M` makes a volume; `encryption=on` without
      `keylocation` uses keyformat=passphrase, pbkdf2iters=100000 and a key file
      (Tree.key_file, passphrase PASSPHRASE).
    - `@name` snapshots the dataset (names may contain spaces); with data=True a small file
      `<name>.dat` is written first on mounted filesystems, so each snapshot carries new data.
    - `#name` bookmarks the most recent snapshot created on this line; `#name=snap` a named one.
    - `-@name` destroys that snapshot (e.g. after bookmarking it).

    Example:
        build_tree(pool, '''
            src
            src/child with space @snap-b @snap-a #bm-a
            src/enc {encryption=on} @1 #one -@1 @2
        ''')
    creates @snap-b before @snap-a, so the newest by createtxg is @snap-a although "snap-b"
    sorts last by name.
    """
    tree = Tree(pool=pool)
    for spec_line in parse_tree_spec(spec):
        name = tree.fs(spec_line.path)
        props = dict(spec_line.props)
        if props.get("encryption", "off") != "off" and "keylocation" not in props:
            if key_file is None:
                key_file = Path(tempfile.mkdtemp(prefix="zrepl-key-", dir=WORK_ROOT)) / "passphrase"
                key_file.write_text(PASSPHRASE)
            props.setdefault("keyformat", "passphrase")
            # The minimum iteration count: key derivation is slow under emulation.
            props.setdefault("pbkdf2iters", "100000")
            props["keylocation"] = f"file://{key_file}"
            tree.key_file = key_file
        if name != pool and not exists(name):
            argv = ["create", "-p"]
            volsize = props.pop("volsize", None)
            for key, value in props.items():
                argv += ["-o", f"{key}={value}"]
            if volsize:
                argv += ["-V", volsize]
            zfs(*argv, name)
            tree.datasets.append(name)
        elif props:
            raise ValueError(f"{name} exists already; properties only apply at creation")
        last_snap = ""
        for op in spec_line.ops:
            if op[0] == "destroy":
                zfs("destroy", f"{name}@{op[1]}")
                tree.destroyed.append(f"{name}@{op[1]}")
            elif op[0] == "snap":
                if data:
                    _write_marker(name, op[1])
                zfs("snapshot", f"{name}@{op[1]}")
                tree.snapshots.append(f"{name}@{op[1]}")
                last_snap = op[1]
            else:
                source = op[2] or last_snap
                zfs("bookmark", f"{name}@{source}", f"{name}#{op[1]}")
                tree.bookmarks.append(f"{name}#{op[1]}")
    return tree


def _write_marker(dataset: str, snap: str) -> None:
    """Write a small distinct file into a mounted filesystem so the next snapshot differs."""
    if get(dataset, "type") != "filesystem" or get(dataset, "mounted") != "yes":
        return
    mountpoint = Path(get(dataset, "mountpoint"))
    (mountpoint / f"{snap}.dat").write_bytes(os.urandom(4096) + snap.encode())


# ------------------------------------------------------------------------------------------------
# Fault injection: a PATH shim in front of the real zfs
# ------------------------------------------------------------------------------------------------

# The shim is two scripts. `zfs` (dash: the cheapest shell to start) handles the common case
# itself: no rule names the verb (the `verbs` file lists those that have one), so it logs the call
# and execs the real zfs, without starting Python (about 0.7 s per spawn under emulation). A verb
# with a rule, or arguments the log line would have to escape (quotes, backslashes, anything but
# printable ASCII), go to `shim.py`, which applies the first matching rule. The fast path cannot
# read the clock without a spawn of its own: its calls are logged with time null.
_SHIM_FRONT = r'''#!/bin/sh
d=@DIR@
verb=${1-}
[ "$verb" = receive ] && verb=recv
ruled=
read -r ruled < "$d/verbs" || :
case " $ruled " in *" $verb "*) exec /usr/bin/python3 -S "$d/shim.py" "$@" ;; esac
case "$verb $*" in *[![:print:]]* | *'"'* | *'\'* | ' '*) exec /usr/bin/python3 -S "$d/shim.py" "$@" ;; esac
args=
for a do args="$args, \"$a\""; done
printf '{"verb": "%s", "argv": [%s], "pid": %s, "time": null, "action": "pass"}\n' "$verb" "${args#, }" "$$" \
    >> "$d/calls.jsonl"
exec @REAL@ "$@"
'''

_SHIM_SOURCE = r'''#!/usr/bin/python3 -S
# zfs shim for zrepl.py tests (the slow path of the `zfs` front): applies the first matching rule
# from rules.json, logs every spawn to calls.jsonl, otherwise execs the real zfs unchanged.
import fcntl, json, os, sys, time
REAL = @REAL@
DIR = @DIR@
argv = sys.argv[1:]
verb = argv[0] if argv else ""
verb = {"receive": "recv"}.get(verb, verb)
joined = " ".join(argv)
rule = None
with open(os.path.join(DIR, "lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(os.path.join(DIR, "rules.json")) as f:
        rules = json.load(f)
    state_path = os.path.join(DIR, "state.json")
    try:
        with open(state_path) as f:
            used = json.load(f)
    except FileNotFoundError:
        used = {}
    for r in rules:
        if r["verb"] != verb or (r.get("match") and r["match"] not in joined):
            continue
        count = used.get(r["id"], 0)
        used[r["id"]] = count + 1
        count -= r.get("skip") or 0  # the first `skip` matching spawns pass
        if count < 0 or (r.get("times") is not None and count >= r["times"]):
            continue
        rule = r
        break
    with open(state_path, "w") as f:
        json.dump(used, f)
    entry = {"verb": verb, "argv": argv, "pid": os.getpid(), "time": time.time(),
             "action": rule["action"] if rule else "pass"}
    with open(os.path.join(DIR, "calls.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")

def finish(r):
    if r.get("stderr"):
        os.write(2, r["stderr"].encode())
    os._exit(r.get("exit_code", 1))

if rule is None:
    os.execv(REAL, [REAL] + argv)
action = rule["action"]
if action == "fail":
    finish(rule)
elif action == "hang":
    time.sleep(rule.get("seconds", 3600))
    finish(rule)
elif action == "delay":
    time.sleep(rule.get("seconds", 1))
    os.execv(REAL, [REAL] + argv)
elif action == "kill":
    # SIGKILL the process that spawned this zfs (zrepl.py), before or after the real command ran
    import signal, subprocess
    if rule.get("after"):
        rc = subprocess.run([REAL] + argv).returncode
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(rc)
    os.kill(os.getppid(), signal.SIGKILL)
    finish(rule)
elif action == "cut":
    import subprocess
    child = subprocess.Popen([REAL] + argv, stdout=subprocess.PIPE)
    left = rule["nbytes"]
    while left > 0:
        chunk = os.read(child.stdout.fileno(), min(65536, left))
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(1, view):]
        left -= len(chunk)
    if left > 0:  # the stream was shorter than the cut: it went through whole
        child.stdout.close()
        os._exit(child.wait())
    child.kill()
    child.wait()
    os.close(1)
    finish(rule)
os._exit(99)
'''


@dataclass
class ShimCall:
    """One logged spawn of the shimmed zfs."""

    verb: str
    argv: list[str]
    pid: int
    time: float | None  # None: passed straight through (the fast path has no clock)
    action: str


class ZfsShim:
    """A directory holding a `zfs` shim script that precedes the real zfs in PATH.

    Rules (first match wins; `times=N` applies a rule to the first N matching spawns only,
    `match` requires a substring of the space-joined args, verbs `recv`/`receive` are the same):
        shim.fail("destroy", stderr="cannot destroy 'p/fs@s': dataset is busy\\n", exit_code=1)
        shim.hang("send", seconds=3600)           # never produces output; kill it yourself
        shim.delay("list", seconds=2)             # then runs the real zfs
        shim.cut("send", nbytes=200_000)          # stdout cut after N bytes, then exit 1
        shim.kill("release", skip=1, after=True)  # SIGKILL zrepl.py at its 2nd `zfs release`
        shim.clear()                              # remove all rules (the log stays)
    Observation: shim.calls("send") -> [ShimCall], shim.count("send") -> int, shim.reset_log().
    Use: shim.env (os.environ with PATH prefixed) for subprocesses, shim.zfs_path to call it
    directly, shim.run_zrepl(*args) to run zrepl.py through it.
    """

    def __init__(self, directory: Path, real_zfs: str = REAL_ZFS):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.real_zfs = real_zfs
        self._rules: list[dict] = []
        self._next_id = 0
        (self.dir / "shim.py").write_text(_SHIM_SOURCE.replace("@REAL@", repr(real_zfs))
                                          .replace("@DIR@", repr(str(self.dir))))
        self.zfs_path = self.dir / "zfs"
        self.zfs_path.write_text(_SHIM_FRONT.replace("@REAL@", shlex.quote(real_zfs))
                                 .replace("@DIR@", shlex.quote(str(self.dir))))
        self.zfs_path.chmod(0o755)
        self._save()
        (self.dir / "calls.jsonl").touch()

    # -- configuration --
    def _add(self, verb: str, action: str, *, times: int | None, match: str | None, **extra) -> None:
        verb = {"receive": "recv"}.get(verb, verb)
        self._rules.append({"id": str(self._next_id), "verb": verb, "action": action,
                            "times": times, "match": match, **extra})
        self._next_id += 1
        self._save()

    def _save(self) -> None:
        # rules first, then the verbs the fast path leaves to them: a spawn that reads the new
        # verbs always finds its rule
        for name, text in (("rules.json", json.dumps(self._rules)),
                           ("verbs", " ".join(sorted({r["verb"] for r in self._rules})) + "\n")):
            tmp = self.dir / f"{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.dir / name)

    def fail(self, verb: str, stderr: str = "shim: injected failure\n", exit_code: int = 1, *,
             times: int | None = None, match: str | None = None) -> None:
        """Make `zfs VERB` print stderr and exit with exit_code without running the real zfs."""
        self._add(verb, "fail", times=times, match=match, stderr=stderr, exit_code=exit_code)

    def hang(self, verb: str, seconds: float = 3600, *, times: int | None = None,
             match: str | None = None, stderr: str = "shim: hang ended\n", exit_code: int = 1) -> None:
        """Make `zfs VERB` sleep for seconds (no output), then fail with stderr/exit_code."""
        self._add(verb, "hang", times=times, match=match, seconds=seconds, stderr=stderr,
                  exit_code=exit_code)

    def delay(self, verb: str, seconds: float, *, times: int | None = None, match: str | None = None) -> None:
        """Sleep before running the real `zfs VERB`."""
        self._add(verb, "delay", times=times, match=match, seconds=seconds)

    def cut(self, verb: str = "send", nbytes: int = 65536, *, stderr: str = "shim: stream cut\n",
            exit_code: int = 1, times: int | None = None, match: str | None = None) -> None:
        """Pass the first nbytes of the real command's stdout, then kill it and exit exit_code."""
        self._add(verb, "cut", times=times, match=match, nbytes=nbytes, stderr=stderr,
                  exit_code=exit_code)

    def kill(self, verb: str, *, after: bool = False, skip: int = 0, times: int | None = 1,
             match: str | None = None) -> None:
        """SIGKILL the zfs caller (zrepl.py) at `zfs VERB`: before it runs (it never does), or with
        after=True once the real command finished. skip=N lets the first N matching spawns pass,
        so a test can aim at the N+1th `zfs VERB` of a run."""
        self._add(verb, "kill", times=times, match=match, skip=skip, after=after,
                  stderr="shim: killed the caller\n", exit_code=137)

    def clear(self) -> None:
        """Remove every rule and the per-rule counters; later spawns pass through."""
        self._rules.clear()
        self._save()
        (self.dir / "state.json").unlink(missing_ok=True)

    # -- observation --
    def calls(self, verb: str | None = None) -> list[ShimCall]:
        """Every logged spawn (optionally only one verb), oldest first."""
        verb = {"receive": "recv"}.get(verb, verb) if verb else None
        out = []
        for line in (self.dir / "calls.jsonl").read_text().splitlines():
            call = ShimCall(**json.loads(line))
            if verb is None or call.verb == verb:
                out.append(call)
        return out

    def count(self, verb: str | None = None) -> int:
        """How many times `zfs VERB` (or any zfs) was spawned through the shim."""
        return len(self.calls(verb))

    def reset_log(self) -> None:
        """Forget logged spawns (rules stay)."""
        (self.dir / "calls.jsonl").write_text("")

    # -- use --
    @property
    def env(self) -> dict[str, str]:
        """os.environ with the shim directory first in PATH."""
        env = dict(os.environ)
        env["PATH"] = f"{self.dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def run_zrepl(self, *args: str, timeout: float = 300, input: str | None = None,
                  extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `python3 zrepl.py ARGS` with the shim in PATH (see run_zrepl)."""
        env = self.env
        env.update(extra_env or {})
        return run_zrepl(*args, env=env, timeout=timeout, input=input)


def zrepl_argv(*args: str) -> list[str]:
    """argv that runs zrepl.py with ARGS.

    `python3 -m zrepl` (with the checkout on PYTHONPATH, see zrepl_env) instead of
    `python3 zrepl.py`: a script run directly is compiled on every start, a module comes from its
    cached bytecode. In the TCG guest that is ~1 s instead of ~9 s per invocation.
    """
    return ["python3", "-m", "zrepl", *map(str, args)]


def zrepl_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """env (default os.environ) with the checkout first on PYTHONPATH, for zrepl_argv."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), out.get("PYTHONPATH", "")) if p)
    return out


def run_zrepl(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300,
              input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run zrepl.py ARGS (see zrepl_argv) as a subprocess; never raises on exit code.

    Returns the CompletedProcess (text stdout/stderr). In the guest the checkout is /src.
    """
    return subprocess.run(zrepl_argv(*args), capture_output=True, text=True, timeout=timeout, input=input,
                          env=zrepl_env(env), cwd=cwd)


# ------------------------------------------------------------------------------------------------
# Servers: sshd on loopback, PostgreSQL, MariaDB
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    detail = ""
    if log is not None and log.exists():
        detail = "\n" + log.read_text(errors="replace")[-3000:]
    raise TimeoutError(f"{what} not ready after {timeout}s{detail}")


def _keygen(path: Path, comment: str) -> str:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class SshServer:
    """sshd listening on 127.0.0.1:port with a throwaway host key and client key.

    `identity_file` may log in as `user` (root) without restrictions; `authorize(command=...)`
    makes another key whose logins run only that forced command. `known_hosts` pins the host key,
    so clients use StrictHostKeyChecking=yes.
    """

    directory: Path
    port: int = 0
    host: str = "127.0.0.1"
    user: str = "root"
    identity_file: Path = Path()
    known_hosts: Path = Path()
    process: subprocess.Popen | None = None

    def start(self) -> SshServer:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        host_pub = _keygen(d / "host_ed25519", "zrepl-test-host")
        client_pub = _keygen(d / "id_ed25519", "zrepl-test-client")
        self.identity_file = d / "id_ed25519"
        (d / "authorized_keys").write_text(client_pub + "\n")
        for _attempt in range(3):
            self.port = free_port()
            self.known_hosts = d / "known_hosts"
            self.known_hosts.write_text(f"[{self.host}]:{self.port} {' '.join(host_pub.split()[:2])}\n")
            (d / "sshd_config").write_text(
                f"Port {self.port}\nListenAddress {self.host}\nHostKey {d}/host_ed25519\n"
                f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
                "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
            )
            log = d / "sshd.log"
            self.process = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                stdout=open(log, "ab"), stderr=subprocess.STDOUT,
            )
            try:
                _wait_for(self._accepts, 15, "sshd", log)
                return self
            except TimeoutError:
                self.stop()
        raise RuntimeError(f"sshd did not start; log:\n{(d / 'sshd.log').read_text(errors='replace')}")

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def option_list(self) -> list[str]:
        """`-o` values (without the -o) a client needs: known_hosts pinning, batch mode, no agent."""
        return [f"UserKnownHostsFile={self.known_hosts}", "GlobalKnownHostsFile=/dev/null",
                "StrictHostKeyChecking=yes", "BatchMode=yes", "IdentitiesOnly=yes",
                "ConnectTimeout=10"]

    def ssh_argv(self, *remote_command: str, identity_file: Path | None = None) -> list[str]:
        """A complete `ssh ... root@127.0.0.1 [COMMAND...]` argv."""
        argv = ["ssh", "-p", str(self.port), "-i", str(identity_file or self.identity_file)]
        for opt in self.option_list():
            argv += ["-o", opt]
        return [*argv, f"{self.user}@{self.host}", *remote_command]

    def authorize(self, command: str | None = None, options: str = "restrict") -> Path:
        """Make a new client key, allow it (with a forced command if given); return its path."""
        key = self.directory / f"id_extra_{secrets.token_hex(3)}"
        pub = _keygen(key, "zrepl-test-extra")
        prefix = options
        if command is not None:
            escaped = command.replace("\\", "\\\\").replace('"', '\\"')
            prefix = f'command="{escaped}"' + (f",{options}" if options else "")
        with open(self.directory / "authorized_keys", "a") as f:
            f.write(f"{prefix + ' ' if prefix else ''}{pub}\n")
        return key


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster run as the `postgres` user, reachable only by unix socket.

    Connect with `psql_argv(sql)` or the libpq `dsn` (host=<socket dir> port=5432 user=postgres
    dbname=postgres; trust authentication). `stop()` shuts it down and deletes everything.
    """

    directory: Path
    socket_dir: Path = Path()
    port: int = 5432
    user: str = "postgres"
    dbname: str = "postgres"

    @property
    def bindir(self) -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        return found[-1].parent

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={self.dbname}"

    def start(self) -> PostgresServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        _chown_tree(self.directory, "postgres")
        self.socket_dir = self.directory / "socket"
        self.socket_dir.mkdir()
        _chown_tree(self.socket_dir, "postgres")
        as_pg = {"user": "postgres"}
        if (POSTGRES_TEMPLATE / "PG_VERSION").exists():
            # initdb takes ~15 s under emulation; the image carries a fresh cluster to copy.
            run(["cp", "-a", POSTGRES_TEMPLATE, self.data_dir])
        else:
            run([self.bindir / "initdb", "-D", self.data_dir, "-A", "trust", "-U", self.user,
                 "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"], **as_pg, timeout=300)
        options = f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=off"
        run([self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self.directory / "server.log",
             "-o", options, "-w", "-t", "120", "start"], **as_pg, timeout=180)
        return self

    def psql_argv(self, sql: str) -> list[str]:
        """psql argv that runs sql and prints bare values (-At)."""
        return ["psql", "-X", "-At", "-h", str(self.socket_dir), "-p", str(self.port), "-U",
                self.user, "-d", self.dbname, "-c", sql]

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            run([self.bindir / "pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "stop"],
                user="postgres", check=False, timeout=120)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class MariadbServer:
    """A throwaway MariaDB server (mariadbd as user mysql) on a unix socket, no networking.

    Connect as root (unix_socket auth, so only OS root) with `mysql_argv(sql)`; `dsn` is the
    Go-MySQL form zrepl uses: root@unix(<socket>)/ . `stop()` shuts down and deletes everything.
    """

    directory: Path
    socket: Path = Path()
    user: str = "root"
    process: subprocess.Popen | None = None

    @property
    def dsn(self) -> str:
        return f"{self.user}@unix({self.socket})/"

    def start(self) -> MariadbServer:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        _chown_tree(d, "mysql")
        self.socket = d / "mysqld.sock"
        datadir = d / "data"
        if (MARIADB_TEMPLATE / "mysql").is_dir():
            # mariadb-install-db takes ~10 s under emulation; the image carries a fresh datadir.
            run(["cp", "-a", MARIADB_TEMPLATE, datadir])
        else:
            run(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                 "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=300)
        log = d / "error.log"
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
             f"--socket={self.socket}", "--skip-networking", f"--pid-file={d}/mysqld.pid",
             f"--log-error={log}", "--innodb-buffer-pool-size=32M", "--skip-log-bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                tail = log.read_text(errors='replace')[-3000:]
                raise RuntimeError(f"mariadbd exited {self.process.returncode}:\n{tail}")
            return run(["mariadb-admin", "--no-defaults", "-S", str(self.socket), "-u", self.user,
                        "ping"], check=False).returncode == 0

        _wait_for(ready, 120, "mariadbd", log)
        return self

    def mysql_argv(self, sql: str) -> list[str]:
        """mariadb client argv that runs sql and prints bare values (-N -B)."""
        return ["mariadb", "--no-defaults", "-S", str(self.socket), "-u", self.user, "-N", "-B",
                "-e", sql]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            run(["mariadb-admin", "--no-defaults", "-S", str(self.socket), "-u", self.user,
                 "shutdown"], check=False, timeout=60)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)
