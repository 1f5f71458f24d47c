"""Campaign (issue 14), host: CLI misuse. Seeded command lines made from every subcommand's own
words with tokens dropped, repeated, swapped for hostile values or followed by stray options and
arguments, each run in-process through `zrepl.main` with `--debug` (so an internal error escapes
as an exception instead of a line): never an exception or a traceback, the exit code is one the
README names (0, 1, 2, or a Nagios level for status), and a failure always says why.

Prints trials, the exit codes seen and problems (run with -s). The daemon and `status --watch`
stay out: they run until stopped."""
from __future__ import annotations

import collections
import random
from pathlib import Path

from fakezfs import FakeZfs
from support import campaign_seed, run, sink_job, snap_job, write_config

TRIALS = 300
HOSTILE = ["", " ", "-", "--", "-n", "--bogus", "-v", "=", "x" * 5000, "é\u202e", "../../etc/passwd", "/",
           "1e400", "-1", "0", "nan", "9" * 400, "1h", "-1h", "tank/a\n", "tank/a", "tank/a@s", "tank/a#b",
           "tank//a", "@", "#", "snap", "sink", "nobody", "snap:client1", "%s%n", "$(id)", "wakeup", "list"]


def command_lines(status_file: Path) -> list[list[str]]:
    """Well-formed command lines of every subcommand but the daemon (the seeds of the mutations)."""
    return [
        ["run"], ["run", "snap"], ["run", "--dry-run", "-v", "snap"], ["run", "sink"],
        ["status"], ["status", "-v"], ["status", "--json"], ["status", "--warn", "1h", "--crit", "2h"],
        ["status", "--status-file", str(status_file)],
        ["wakeup", "snap"], ["signal", "wakeup", "snap"], ["signal", "reset", "snap"],
        ["stdinserver", "client1"],
        ["configcheck"], ["configcheck", "-q"],
        ["test", "filesystems", "--job", "snap", "--input", "tank/a"],
        ["test", "filesystems", "--job", "snap", "--all"],
        ["test", "placeholder", "--all"], ["test", "placeholder", "--dataset", "tank/a"],
        ["test", "decoderesumetoken", "--token", "1-abc-def-0123"],
        ["zfs-abstractions", "list", "--json"], ["zfs-abstractions", "release-stale", "--dry-run"],
        ["zfs-abstractions", "release-all", "--job", "snap", "--fs", "tank/a"],
        ["version"],
    ]


def mutate(argv: list[str], rng: random.Random) -> list[str]:
    argv = list(argv)
    for _ in range(rng.randint(1, 3)):
        # mostly after the subcommand: a mangled subcommand only ever meets the top-level parser
        where = rng.randrange(0 if rng.random() < 0.2 or not argv else 1, len(argv) + 1)
        kind = rng.randrange(5)
        if kind == 0 and argv:
            del argv[min(where, len(argv) - 1)]
        elif kind == 1 and argv:
            argv.insert(where, argv[min(where, len(argv) - 1)])
        elif kind == 2 and argv:
            argv[min(where, len(argv) - 1)] = rng.choice(HOSTILE)
        elif kind == 3:
            argv.insert(where, rng.choice(["--config", "--log-level", "--json", "--dry-run", "--job", "--fs",
                                           "--token", "--input", "--all", "--warn", "--status-file", "-q"]))
        else:
            argv.insert(where, rng.choice(HOSTILE))
    return [a for a in argv if a != "--watch"]


def test_cli_misuse_never_ends_in_an_internal_error(tmp_path, capsys):
    rng = random.Random(campaign_seed())
    cfg = write_config(tmp_path, snap_job("snap", filesystems={"tank/a<": True}), sink_job("sink", root_fs="tank/sink"),
                       global_={"control": {"sockpath": str(tmp_path / "control")}})  # never a real daemon's
    seeds = command_lines(tmp_path / "status.json")
    codes: collections.Counter[int] = collections.Counter()
    problems: list[str] = []
    for _ in range(TRIALS):
        argv = ["--debug", "--config", str(cfg), *mutate(rng.choice(seeds), rng)]
        try:
            result = run(*argv, zfs=FakeZfs.with_filesystems("tank/a", "tank/sink"))
        except Exception as exc:  # --debug lets an internal error through
            problems.append(f"{argv[3:]}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        codes[result.code] += 1
        said = (result.stdout + result.stderr).strip()
        if "Traceback" in said or "internal error" in said:
            problems.append(f"{argv[3:]}: {said[-300:]}")
        elif result.code not in (0, 1, 2, 3) or (result.code == 3 and "status" not in argv):
            problems.append(f"{argv[3:]}: exit {result.code}")
        elif result.code != 0 and not said:
            problems.append(f"{argv[3:]}: exit {result.code} without a word")
    with capsys.disabled():
        print(f"\ncampaign CLI misuse: trials={TRIALS} exit codes {dict(sorted(codes.items()))} "
              f"problems={len(problems)}")
        for p in problems[:20]:
            print(f"  problem: {p}")
    assert problems == []
    assert codes[2] > 0 and codes[0] > 0  # the mutations reach both the parser's refusals and real work
