"""Campaign (issue 14), host part: seeded random frames from hostile stdinserver clients against
`zrepl.py stdinserver client1` of a sink, with the fake zfs of test_stdinserver.py behind it. The
server answers with frames only (ERROR among them) or closes, never a traceback or an internal
error, and runs no zfs command that leaves client1's subtree. Prints trials, recovered, problems
and the seed (ZREPL_CAMPAIGN_SEED repeats a run). The same generator runs on real ZFS in
tests/zfs/test_campaign_hostile_client_zfs.py."""
from __future__ import annotations

import os
import random
import subprocess
import sys

from hostile_wire import SINK_KINDS, frames_or_problem, hello, random_garbage, read_all
from test_stdinserver import REPO, WORLD, FakeZfsOnPath, assert_confined, in_client1, write_config


def test_random_frames_get_frames_back_never_a_traceback(tmp_path):
    seed = int(os.environ.get("ZREPL_CAMPAIGN_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"ZREPL_CAMPAIGN_SEED={seed}")
    rng = random.Random(seed)
    fake = FakeZfsOnPath(tmp_path / "fakezfs", WORLD)
    cfg = write_config(tmp_path)
    trials, recovered, problems = 0, 0, []
    for trials in range(1, 16):  # each a fresh server process (~1 s here)
        garbage = random_garbage(rng, SINK_KINDS)
        proc = subprocess.Popen([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "stdinserver",
                                 "client1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=fake.env)
        try:
            proc.stdin.write(hello("client1") + garbage)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass  # the server closed first: allowed
        out = read_all(proc, 30)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
        found = [p for p in (frames_or_problem(out), "a traceback" if "Traceback" in err else None,
                             "an internal error" if "internal error" in err.lower() else None,
                             f"exit {rc}" if rc not in (0, 1) else None) if p]
        recovered += not found
        problems += [f"trial {trials} ({garbage[:60]!r}): {p}: {err.strip()[-300:]}" for p in found]
    print(f"campaign random frames (host): trials={trials} recovered={recovered} problems={len(problems)}")
    assert problems == [], problems
    assert_confined(fake, in_client1, read_also={"tank/sink"})
