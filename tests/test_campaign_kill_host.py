"""Campaign (issue 14 item 2), host part: a push, and a pull, dies at EVERY zfs command after the
stream of an incremental step (the completion on both sides, then pruning), once before the command and once
after it, through the ZFS double; then one clean run, then the invariants read from the double's
world (never from zrepl.py's report). "Dies" means: from that command on, no zfs command has an
effect (each raises an exception nothing in zrepl.py expects, as if the process were gone).
The real-ZFS version (kill -9 through the PATH shim) is tests/zfs/test_campaign_kill_zfs.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import zrepl
from fakezfs import FakeZfs, World
from support import Job, last_n, not_replicated, pull_job, push_job, run, sink_job, source_job, write_config

SRC = "src/data"
KEEP: dict[str, Any] = {"keep_sender": [not_replicated(), last_n(1)], "keep_receiver": [last_n(1)]}


class Mode:
    """The job run, where the replica lands, and who names the abstractions: the cursor is the
    sending job's, the last-received hold the receiving job's."""

    def __init__(self, job: str, jobs: tuple[Job, ...], target: str, sending_job: str, receiving_job: str):
        self.job, self.jobs, self.target = job, jobs, target
        self.sending_job, self.receiving_job = sending_job, receiving_job


MODES = {
    "push": Mode("push", (push_job(filesystems={SRC: True}, **KEEP), sink_job(root_fs="dst/sink")),
                 "dst/sink/client1/src/data", sending_job="push", receiving_job="sink"),
    "pull": Mode("pull", (source_job(filesystems={SRC: True}), pull_job(root_fs="dst/sink", **KEEP)),
                 "dst/sink/src/data", sending_job="source", receiving_job="pull"),
}


class Killed(BaseException):
    """The process is gone: nothing after this point reaches ZFS."""


class DyingZfs(FakeZfs):
    """The double that dies at its `at`-th command (0-based), before it or right after it ran."""

    def __init__(self, world: World, at: int, after: bool):
        super().__init__(world)
        self.at, self.after, self.count, self.dead = at, after, 0, False

    def _gate(self, call: Any) -> Any:
        if self.dead:
            raise Killed()
        index, self.count = self.count, self.count + 1
        if index == self.at and not self.after:
            self.dead = True
            raise Killed()
        result = call()
        if index == self.at:
            self.dead = True
            if hasattr(result, "wait"):
                result.wait()
            raise Killed()
        return result

    def run(self, argv: Sequence[str], **kwargs: Any) -> Any:
        return self._gate(lambda: super(DyingZfs, self).run(argv, **kwargs))

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> Any:
        return self._gate(lambda: super(DyingZfs, self).spawn(argv, **kwargs))


def problems(w: World, mode: Mode) -> list[str]:
    target = mode.target
    newest = w.snapshots(SRC)[-1]
    found = []
    if w.snapshots(target)[-1:] != [newest] or w.guid(f"{target}@{newest}") != w.guid(f"{SRC}@{newest}"):
        found.append(f"receiver has {w.snapshots(target)}, not {newest} with its guid")
    if w.snapshots(SRC) != [newest] or w.snapshots(target) != [newest]:  # last_n 1: nothing blocks pruning
        found.append(f"pruning left sender {w.snapshots(SRC)}, receiver {w.snapshots(target)}")
    if w.bookmarks(SRC) != [zrepl.cursor_bookmark_name(w.guid(f"{SRC}@{newest}"), mode.sending_job)]:
        found.append(f"sender bookmarks {w.bookmarks(SRC)}")
    for snap in w.snapshots(SRC):
        if w.holds(f"{SRC}@{snap}"):
            found.append(f"sender {snap} holds {w.holds(f'{SRC}@{snap}')}")
    for snap in w.snapshots(target):
        want = {zrepl.last_received_hold_tag(mode.receiving_job)} if snap == newest else set()
        if w.holds(f"{target}@{snap}") != want:
            found.append(f"receiver {snap} holds {w.holds(f'{target}@{snap}')}")
    if w.resume_token(target):
        found.append("a partial receive is left")
    return found


# the death unwinds the serving job's thread too: that thread's unhandled exception is the point
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_run_dying_at_each_completion_command_heals_in_one_clean_run(tmp_path: Path, capsys, mode: str):
    m = MODES[mode]
    w = World()
    w.tree("src", "data @s0")
    w.tree("dst", "sink")
    cfg = write_config(tmp_path, *m.jobs)
    assert run("--config", cfg, "run", m.job, zfs=FakeZfs(w)).code == 0
    taken = 1

    def new_snapshot() -> None:
        nonlocal taken
        w.write(SRC)
        w.snapshot(f"{SRC}@s{taken}")
        taken += 1

    new_snapshot()
    reference = FakeZfs(w)
    assert run("--config", cfg, "run", m.job, zfs=reference).code == 0
    first = max(i for i, argv in enumerate(reference.calls) if argv[1] in ("recv", "receive")) + 1
    points = [(i, after) for i in range(first, len(reference.calls)) for after in (False, True)]
    trials, recovered, found_all = 0, 0, []
    for at, after in points:
        trials += 1
        new_snapshot()
        dying = DyingZfs(w, at, after)
        run("--config", cfg, "run", m.job, zfs=dying)
        where = f"dead {'after' if after else 'at'} {' '.join(reference.calls[at][1:3])} (command {at})"
        if not dying.dead:
            found_all.append(f"{where}: not reached")
            continue
        clean = run("--config", cfg, "run", m.job, zfs=FakeZfs(w))
        found = problems(w, m) + ([f"clean run exited {clean.code}: {clean.stderr[-300:]}"] if clean.code else [])
        recovered += not found
        found_all += [f"{where}: {p}" for p in found]
    with capsys.disabled():
        print(f"\ncampaign kill at each completion command of a {mode} (host): trials={trials} recovered={recovered} "
              f"problems={len(found_all)}")
    assert found_all == [] and trials == len(points) >= 8
