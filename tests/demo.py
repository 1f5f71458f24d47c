"""A first day with zrepl.py on two throwaway file-vdev pools: the in-guest half of `bash tests/demo`.

Prints each command as `$ command`, then its output (stdout and stderr, as a terminal shows
them). Needs root and OpenZFS: it runs in the test guest (tests/vm/run-in-guest), where
tests/zfs/test_demo_zfs.py runs it too and checks its key lines, so the demo cannot rot.

The story: a snap job for scratch space and a push job to a backup pool on the same host; the
first run (full send), later runs (incremental, pruning), `status` and `status -v`, a dry run of
pruning (what a retention change would destroy, and which rule keeps each snapshot), then someone
snapshots the backup copy, the receiver has diverged, and the recovery advice from `status -v`
is followed. Exits non-zero when a command's exit code is not the one the story expects. Pools
`tank` and `backup` must not exist; they are destroyed at the end.

    python3 tests/demo.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POOLS = ("tank", "backup")
# The demo's day is a few minutes long: snapshots every 60 s (a real config says 15m or 1h), and
# "later" waits only until the next snapshot is due. `status` calls a snapshot overdue one interval
# after it was due, so each `status` follows a run that snapshotted: 60 s is 4x the slowest run
# under emulation (the first, with full sends, takes 15 s there) plus the status call.
INTERVAL_S = 60

CONFIG = """\
[global]
status_file = "{work}/status.json"
runtime_dir = "{work}/run"

[[jobs]]
name = "scratch"
type = "snap"
filesystems = {{ "tank/scratch<" = true }}
snapshotting = {{ type = "periodic", prefix = "snap_", interval = "{interval}s" }}
pruning = {{ keep = [{{ type = "last_n", count = 2, regex = "^snap_" }}] }}

[[jobs]]
name = "home"
type = "push"
filesystems = {{ "tank/home<" = true }}
connect = {{ type = "local", listener_name = "backuppool", client_identity = "laptop" }}
snapshotting = {{ type = "periodic", prefix = "zrepl_", interval = "{interval}s" }}
[jobs.pruning]
keep_sender = [{{ type = "not_replicated" }}, {{ type = "last_n", count = 2, regex = "^zrepl_" }}]
keep_receiver = [{{ type = "last_n", count = 3, regex = "^zrepl_" }}]

[[jobs]]
name = "backuppool"
type = "sink"
root_fs = "backup/sink"
serve = {{ type = "local", listener_name = "backuppool" }}
"""
# The retention change the demo tries with a dry run.
RECEIVER_KEEPS_3 = 'keep_receiver = [{ type = "last_n", count = 3,'
RECEIVER_KEEPS_1 = 'keep_receiver = [{ type = "last_n", count = 1,'


class StoryBroken(Exception):
    """A command's exit code was not the one the story expects."""


class Shell:
    """Runs and prints commands; `zrepl.py` means this checkout's zrepl.py with the demo config."""

    def __init__(self, work: Path):
        self.env = {**os.environ, "ZREPL_CONFIG": str(work / "zrepl.toml"),
                    "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}

    def __call__(self, command: str, expect: int | None = 0, show: bool = True) -> str:
        """Run COMMAND; expect: the exit code the story needs (None: any)."""
        argv = shlex.split(command)
        if argv[0] == "zrepl.py":  # from its cached bytecode: a script is compiled on every start
            argv = [sys.executable, "-m", "zrepl", *argv[1:]]
        if show:
            print(f"$ {command}", flush=True)
        # shown: stderr interleaved as a terminal shows it; not shown: stdout alone, for parsing
        proc = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.STDOUT if show else subprocess.PIPE)
        if show and proc.stdout:
            print(proc.stdout, end="" if proc.stdout.endswith("\n") else "\n", flush=True)
        if expect is not None and proc.returncode != expect:
            raise StoryBroken(f"`{command}` exited {proc.returncode}, the story expects {expect}:\n{proc.stdout}")
        if show and expect:
            print(f"(exit code {proc.returncode})")
        return proc.stdout


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def later(sh: Shell) -> None:
    """Wait until every job's next snapshot is due (status says when), so the next run takes one."""
    doc = json.loads(sh("zrepl.py status --json", expect=None, show=False))
    due = [parse_iso(j["next_snapshot_due"]) for j in doc["jobs"].values() if j.get("next_snapshot_due")]
    wait = max(due, default=time.time()) - time.time() + 1  # +1: creation times are whole seconds
    if wait > 0:
        sh(f"sleep {wait:.0f}")


def first_day(sh: Shell, work: Path) -> None:
    say("two pools on files: tank (the data) and backup (a second disk, say)")
    sh(f"truncate -s 256M {work}/tank.img {work}/backup.img")
    sh(f"zpool create -o cachefile=none -m {work}/mnt tank {work}/tank.img")
    sh(f"zpool create -o cachefile=none -m none backup {work}/backup.img")
    sh("zfs create -p tank/home/alice")
    sh("zfs create tank/scratch")
    (work / "mnt" / "home" / "alice" / "notes.txt").write_text("monday\n")
    sh("zfs create -p -o mountpoint=none backup/sink")

    say("the config: snapshots of tank/scratch, and tank/home pushed to the backup pool")
    (work / "zrepl.toml").write_text(CONFIG.format(work=work, interval=INTERVAL_S))
    sh(f"cat {work}/zrepl.toml")
    sh("zrepl.py configcheck")
    sh("zrepl.py test filesystems --job home --all")

    say("the first run: snapshots, a full send of each filesystem, cursor bookmarks and holds")
    sh("zrepl.py run --log-level info")
    sh("zfs list -t all -o name -r tank/home backup/sink")
    received = sh("zfs list -H -t snapshot -o name -r backup/sink", show=False).split()
    sh(shlex.join(["zfs", "holds", *received]))
    sh("zrepl.py status")

    say("later runs (cron runs `zrepl.py run` every minute): incremental sends, pruning")
    for _ in range(2):
        later(sh)
        sh("zrepl.py run")
    sh("zfs list -t snapshot -o name -r tank backup/sink")
    sh("zrepl.py status -v")

    say("keep fewer copies on the backup? ask a dry run what that would destroy, before a run does")
    config = work / "zrepl.toml"
    config.write_text(config.read_text().replace(RECEIVER_KEEPS_3, RECEIVER_KEEPS_1))
    sh(f"grep ^keep_receiver {config}")
    sh("zrepl.py run --dry-run -v home")

def diverged_day(sh: Shell) -> None:
    replica = "backup/sink/laptop/tank/home/alice"
    say("someone takes a snapshot of the backup copy: the receiver has diverged")
    sh(f"zfs snapshot {replica}@by-hand")
    sh("zrepl.py run", expect=1)
    sh("zrepl.py status", expect=1)
    sh("zrepl.py status -v", expect=1)

    say("follow the recovery advice from `status -v`, then run again")
    doc = json.loads(sh("zrepl.py status --json", expect=1, show=False))
    report = doc["jobs"]["home"]["replication"]["filesystems"]["tank/home/alice"]
    for command in report["error_details"]["recovery_commands"]:
        sh(command)
    later(sh)
    sh("zrepl.py run")
    sh("zrepl.py status")


def cleanup(work: Path) -> None:
    for pool in POOLS:
        subprocess.run(["zpool", "destroy", "-f", pool], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where pools, config and status live (default: a temp dir)")
    args = parser.parse_args(argv)
    taken = [p for p in POOLS if subprocess.run(["zpool", "list", p], capture_output=True).returncode == 0]
    if taken:
        print(f"demo: pool(s) {', '.join(taken)} exist; the demo makes its own and destroys them", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="zrepl-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sh = Shell(work)
    try:
        first_day(sh, work)
        diverged_day(sh)
    except StoryBroken as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup(work)
    print(f"\n# demo done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
