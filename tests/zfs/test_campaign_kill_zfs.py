"""Campaign (issue 14): kill -9 of a push on real OpenZFS, then one clean run, then invariants read
from ZFS itself (guids, holds, bookmarks, file checksums), never from zrepl.py's own report.

- at EVERY mutating `zfs` command after the stream of an incremental step (the step's completion
  on both sides, then pruning), once before it runs and, for the last one, once after: a kill
  before a read-only command leaves what a kill after the previous mutating one leaves, so these
  are all the states a kill during the completion can leave;
- at random moments of a push, and of a pull (the source job serving it over the local transport,
  in the same process group, so the kill takes both sides as a crash of the host does; seeded:
  ZREPL_CAMPAIGN_SEED, printed).

Each campaign prints `trials`, `recovered` and `problems`; about 3 minutes each in the guest (TCG),
6 under a loaded host.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from repltest import _command, cursor, fill, push_sink, run
from support import (Job, bookmarks, campaign_seed, holds, last_n, not_replicated, pull_job, snapshots, source_job,
                     write_config)
from zfstest import ZFS, ZfsShim, get, guid, zfs

MUTATING = ("hold", "release", "bookmark", "destroy", "snapshot", "rename", "set", "inherit")


def seed() -> int:
    return campaign_seed()


@dataclass(frozen=True)
class Mode:
    """What differs between a push and a pull of SRC/data: the job run, where the replica lands and
    the names of the abstractions (the cursor is named by the sending job, the last-received hold
    by the receiving one)."""
    job: str
    sending_job: str
    receiving_job: str
    replica_root: str  # below DST

    def jobs(self, src: str, dst: str) -> tuple[Job, ...]:
        keep = {"keep_sender": [not_replicated(), last_n(1)], "keep_receiver": [last_n(1)]}
        if self.job == "push":
            return push_sink(src, dst, **keep)
        return (source_job(self.sending_job, filesystems={f"{src}/data<": True}),
                pull_job(self.job, root_fs=f"{dst}/{self.replica_root}", listener=self.sending_job, **keep))


PUSH = Mode("push", sending_job="push", receiving_job="sink", replica_root="sink/client1")
PULL = Mode("pull", sending_job="source", receiving_job="pull", replica_root="pulled")


class Pair:
    """SRC/data replicated into DST (pushed into a sink or pulled from a source); both sides keep
    one snapshot (plus what the rules must keep), so a blocked pruning shows as a second snapshot."""

    def __init__(self, src: str, dst: str, cfg: Path, mode: Mode):
        self.src, self.dst, self.cfg, self.mode = src, dst, cfg, mode
        self.sfs, self.target = f"{src}/data", f"{dst}/{mode.replica_root}/{src}/data"
        self.last_received = f"zrepl_last_received_J_{mode.receiving_job}"
        self.taken = 0

    def new_snapshot(self) -> str:
        self.taken += 1
        name = f"s{self.taken:03d}"
        fill(self.sfs, 256 << 10, name=f"{name}.bin")
        zfs("snapshot", f"{self.sfs}@{name}")
        return name

    def problems(self) -> list[str]:
        """Everything that is wrong after a clean run, read from ZFS."""
        newest = snapshots(ZFS, self.sfs)[-1]
        found = []
        src_snaps, dst_snaps = snapshots(ZFS, self.sfs), snapshots(ZFS, self.target)
        if dst_snaps[-1:] != [newest]:
            found.append(f"receiver's newest is {dst_snaps[-1:]}, not {newest}")
        for name in set(src_snaps) & set(dst_snaps):
            if guid(f"{self.sfs}@{name}") != guid(f"{self.target}@{name}"):
                found.append(f"{name}: guids differ")
        if src_snaps != [newest] or dst_snaps != [newest]:  # last_n 1 on both sides: nothing blocks it
            found.append(f"pruning left sender {src_snaps}, receiver {dst_snaps}")
        if bookmarks(ZFS, self.sfs) != [cursor(f"{self.sfs}@{newest}", self.mode.sending_job)]:
            found.append(f"sender bookmarks {bookmarks(ZFS, self.sfs)}")
        for snap in src_snaps:
            if {t for t in holds(ZFS, f"{self.sfs}@{snap}") if t.startswith("zrepl_")}:
                found.append(f"sender {snap} holds {holds(ZFS, f'{self.sfs}@{snap}')}")
        for snap in dst_snaps:
            want = {self.last_received} if snap == newest else set()
            if holds(ZFS, f"{self.target}@{snap}") != want:
                found.append(f"receiver {snap} holds {holds(ZFS, f'{self.target}@{snap}')}")
        if get(self.target, "receive_resume_token") != "-":
            found.append("a partial receive is left on the receiver")
        return found

    def base_problems(self) -> list[str]:
        """Right after a kill: the receiver's newest snapshot is still on the sender, as a snapshot
        or a bookmark (the incremental base is kept, so no full send or conflict is needed)."""
        received = snapshots(ZFS, self.target)
        if not received:
            return ["the receiver has no snapshot"]
        base = guid(f"{self.target}@{received[-1]}")
        info = ZFS.list_one(self.sfs)
        if info is None or base not in {v.guid for v in info.versions}:
            return [f"the base {received[-1]} is gone from the sender"]
        return []

    def heal(self, killed_stderr: str = "") -> list[str]:
        """The base check, one clean run, then everything that is still wrong."""
        found = self.base_problems()
        clean = run(None, self.cfg, "run", self.mode.job)
        found += self.problems()
        if clean.returncode != 0:
            found.insert(0, f"clean run exited {clean.returncode}: {clean.stderr.strip()[-300:]}")
        if "Traceback" in clean.stderr + killed_stderr:
            found.append("a traceback")
        return found

    def data_problems(self) -> list[str]:
        """The newest snapshot's files on both sides, byte for byte (once per campaign: a clone and
        a mount per side cost seconds under emulation; the guids above compare every trial)."""
        newest = snapshots(ZFS, self.sfs)[-1]
        if self.checksums(self.sfs, newest) != self.checksums(self.target, newest):
            return [f"{newest}: file checksums differ"]
        return []

    def checksums(self, fs: str, snap: str) -> dict[str, str]:
        """sha256 of every file in fs@snap, read from a temporary clone (replicas are not mounted)."""
        clone = f"{fs.split('/')[0]}/verify"
        mnt = Path(f"/tmp/zrepl-campaign-{os.getpid()}-{clone.replace('/', '-')}")
        zfs("clone", "-o", f"mountpoint={mnt}", "-o", "readonly=on", f"{fs}@{snap}", clone)
        try:
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(mnt.iterdir()) if p.is_file()}
        finally:
            zfs("destroy", clone)


def prepared(make_pool, zfs_tree, tmp_path: Path, mode: Mode = PUSH) -> Pair:
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data")
    zfs_tree(dst, mode.replica_root.split("/")[0])
    pair = Pair(src, dst, write_config(tmp_path, *mode.jobs(src, dst)), mode)
    pair.new_snapshot()
    first = run(None, pair.cfg, "run", mode.job)
    assert first.returncode == 0, first.stderr
    return pair


def report(name: str, trials: int, recovered: int, problems: list[str]) -> None:
    print(f"campaign {name}: trials={trials} recovered={recovered} problems={len(problems)}")
    for p in problems:
        print(f"  problem: {p}")


def test_kill_at_every_zfs_command_of_a_push_steps_completion(make_pool, zfs_tree, zfs_shim: ZfsShim, tmp_path):
    pair = prepared(make_pool, zfs_tree, tmp_path)
    # the reference: one incremental step, every zfs command logged
    pair.new_snapshot()
    zfs_shim.reset_log()
    ref = run(zfs_shim, pair.cfg, "run", "push")
    assert ref.returncode == 0, ref.stderr
    calls = zfs_shim.calls()
    after_stream = max(i for i, c in enumerate(calls) if c.verb == "recv") + 1
    seen: dict[str, int] = {}
    points: list[tuple[str, int, bool, str]] = []  # verb, how many of that verb pass first, after?, argv
    for i, call in enumerate(calls):
        nth = seen.get(call.verb, 0)
        seen[call.verb] = nth + 1
        if i >= after_stream and call.verb in MUTATING:
            points.append((call.verb, nth, False, " ".join(call.argv)))
    assert points, [c.argv for c in calls]
    points.append((*points[-1][:2], True, points[-1][3]))
    trials, recovered, problems = 0, 0, []
    started = time.monotonic()
    for verb, skip, after, argv in points:
        trials += 1
        where = f"kill {'after' if after else 'before'} zfs {argv}"
        pair.new_snapshot()
        zfs_shim.clear()
        zfs_shim.kill(verb, skip=skip, after=after)
        killed = run(zfs_shim, pair.cfg, "run", "push")
        zfs_shim.clear()
        if killed.returncode != -signal.SIGKILL:
            problems.append(f"{where}: not reached (exit {killed.returncode}: {killed.stderr.strip()[-300:]})")
            continue
        found = pair.heal(killed.stderr)
        recovered += not found
        problems += [f"{where}: {p}" for p in found]
    problems += pair.data_problems()
    print(f"{len(points)} kill points in {time.monotonic() - started:.0f} s")
    report("kill at each completion command", trials, recovered, problems)
    assert problems == [] and recovered == trials == len(points)


def test_kill_at_random_moments_of_a_push(make_pool, zfs_tree, tmp_path):
    kill_at_random_moments(prepared(make_pool, zfs_tree, tmp_path, PUSH), "kill at random moments")


def test_kill_at_random_moments_of_a_pull(make_pool, zfs_tree, tmp_path):
    kill_at_random_moments(prepared(make_pool, zfs_tree, tmp_path, PULL), "kill at random moments of a pull")


def kill_at_random_moments(pair: Pair, name: str, rounds: int = 3) -> None:
    """Each round: new snapshots and a stream that takes a while, one run killed (with its zfs
    children) at a seeded moment within 1.5 times a measured run, then pair.heal()."""
    rng = random.Random(seed())
    pair.new_snapshot()
    started = time.monotonic()
    assert run(None, pair.cfg, "run", pair.mode.job).returncode == 0
    duration = time.monotonic() - started
    trials, recovered, problems, finished_first = 0, 0, [], 0
    for _ in range(rounds):
        trials += 1
        for _ in range(rng.randint(1, 2)):
            pair.new_snapshot()
        fill(pair.sfs, 2 << 20, name=f"big{trials}.bin")  # a stream that takes a while
        pair.new_snapshot()
        at = rng.uniform(0.1, duration * 1.5)
        proc = start_in_own_group(pair.cfg, pair.mode.job)
        time.sleep(at)
        with contextlib.suppress(ProcessLookupError):  # zrepl.py and its zfs send/recv, as systemd kills a unit
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=120)
        finished_first += proc.returncode != -signal.SIGKILL  # the kill found it done: heal() then tries a clean state
        found = pair.heal()
        recovered += not found
        problems += [f"kill at {at:.1f}s: {p}" for p in found]
    problems += pair.data_problems()
    print(f"one run took {duration:.1f} s; {finished_first} of {trials} runs ended before their kill")
    report(name, trials, recovered, problems)
    assert problems == [] and recovered == trials


def start_in_own_group(cfg: Path, job: str) -> subprocess.Popen:
    """A run in its own process group, so one killpg reaches zrepl.py and its zfs children."""
    argv, env = _command(None, ("--config", str(cfg), "run", job))
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
