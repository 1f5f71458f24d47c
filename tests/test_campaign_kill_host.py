"""Campaign (issue 14 item 2), host part: a push dies at EVERY zfs command after the stream of an
incremental step (the completion on both sides, then pruning), once before the command and once
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
from support import last_n, not_replicated, push_job, run, sink_job, write_config

SRC, TARGET = "src/data", "dst/sink/client1/src/data"


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


def problems(w: World) -> list[str]:
    newest = w.snapshots(SRC)[-1]
    found = []
    if w.snapshots(TARGET)[-1:] != [newest] or w.guid(f"{TARGET}@{newest}") != w.guid(f"{SRC}@{newest}"):
        found.append(f"receiver has {w.snapshots(TARGET)}, not {newest} with its guid")
    if w.snapshots(SRC) != [newest] or w.snapshots(TARGET) != [newest]:  # last_n 1: nothing blocks pruning
        found.append(f"pruning left sender {w.snapshots(SRC)}, receiver {w.snapshots(TARGET)}")
    if w.bookmarks(SRC) != [zrepl.cursor_bookmark_name(w.guid(f"{SRC}@{newest}"), "push")]:
        found.append(f"sender bookmarks {w.bookmarks(SRC)}")
    for snap in w.snapshots(SRC):
        if w.holds(f"{SRC}@{snap}"):
            found.append(f"sender {snap} holds {w.holds(f'{SRC}@{snap}')}")
    for snap in w.snapshots(TARGET):
        want = {zrepl.last_received_hold_tag("sink")} if snap == newest else set()
        if w.holds(f"{TARGET}@{snap}") != want:
            found.append(f"receiver {snap} holds {w.holds(f'{TARGET}@{snap}')}")
    if w.resume_token(TARGET):
        found.append("a partial receive is left")
    return found


# the death unwinds the sink's thread too: that thread's unhandled exception is the point
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_push_dying_at_each_completion_command_heals_in_one_clean_run(tmp_path: Path, capsys):
    w = World()
    w.tree("src", "data @s0")
    w.tree("dst", "sink")
    cfg = write_config(tmp_path, push_job(filesystems={SRC: True}, keep_sender=[not_replicated(), last_n(1)],
                                          keep_receiver=[last_n(1)]), sink_job(root_fs="dst/sink"))
    assert run("--config", cfg, "run", "push", zfs=FakeZfs(w)).code == 0
    taken = 1

    def new_snapshot() -> None:
        nonlocal taken
        w.write(SRC)
        w.snapshot(f"{SRC}@s{taken}")
        taken += 1

    new_snapshot()
    reference = FakeZfs(w)
    assert run("--config", cfg, "run", "push", zfs=reference).code == 0
    first = max(i for i, argv in enumerate(reference.calls) if argv[1] in ("recv", "receive")) + 1
    points = [(i, after) for i in range(first, len(reference.calls)) for after in (False, True)]
    trials, recovered, found_all = 0, 0, []
    for at, after in points:
        trials += 1
        new_snapshot()
        dying = DyingZfs(w, at, after)
        run("--config", cfg, "run", "push", zfs=dying)
        where = f"dead {'after' if after else 'at'} {' '.join(reference.calls[at][1:3])} (command {at})"
        if not dying.dead:
            found_all.append(f"{where}: not reached")
            continue
        clean = run("--config", cfg, "run", "push", zfs=FakeZfs(w))
        found = problems(w) + ([f"clean run exited {clean.code}: {clean.stderr[-300:]}"] if clean.code else [])
        recovered += not found
        found_all += [f"{where}: {p}" for p in found]
    with capsys.disabled():
        print(f"\ncampaign kill at each completion command (host): trials={trials} recovered={recovered} "
              f"problems={len(found_all)}")
    assert found_all == [] and trials == len(points) >= 8
