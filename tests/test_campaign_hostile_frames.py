"""Campaign (issue 14), host part: seeded random frames from hostile stdinserver clients against
`zrepl.py stdinserver client1` of a sink, with the fake zfs of test_stdinserver.py behind it. The
server answers with frames only (ERROR among them) or closes, never a traceback or an internal
error, and runs no zfs command that leaves client1's subtree. Prints trials, recovered, problems
and the seed (ZREPL_CAMPAIGN_SEED repeats a run). The real-ZFS version (crafted requests
outside the subtree with a before/after listing, hostile stream properties) waits in commit 3d99bba."""
from __future__ import annotations

import random
import subprocess
import sys

from hostile_wire import garbage_trial
from support import campaign_seed
from test_stdinserver import REPO, WORLD, FakeZfsOnPath, assert_confined, in_client1, write_config


def test_random_frames_get_frames_back_never_a_traceback(tmp_path):
    rng = random.Random(campaign_seed())
    fake = FakeZfsOnPath(tmp_path / "fakezfs", WORLD)
    cfg = write_config(tmp_path)
    trials, recovered, problems = 0, 0, []
    for trials in range(1, 16):  # each a fresh server process (~1 s here)
        proc = subprocess.Popen([sys.executable, str(REPO / "zrepl.py"), "--config", str(cfg), "stdinserver",
                                 "client1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=fake.env)
        found = garbage_trial(proc, rng, timeout=30)
        recovered += not found
        problems += [f"trial {trials} {p}" for p in found]
    print(f"campaign random frames (host): trials={trials} recovered={recovered} problems={len(problems)}")
    assert problems == [], problems
    assert_confined(fake, in_client1, read_also={"tank/sink"})
