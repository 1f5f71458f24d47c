"""Config mutation fuzz (issue 14): whatever a config file holds, `configcheck` exits 0, or 2 with a
key path (or a TOML line); never an internal error, never a traceback.

Seeded and bounded: a few hundred mutations of zrepl.example.toml per run, in-process through
`zrepl.main`, in a few seconds. The counts are printed (run with -s to see them)."""

import collections
import os
import datetime as dt
import random
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import zrepl  # noqa: E402

SEED = 20261201
MUTATIONS = int(os.environ.get("ZREPL_FUZZ_MUTATIONS", "400"))
BASE = (ROOT / "zrepl.example.toml").read_text()

# Values that broke configcheck before (issue 14 items 5 and 6) and their relatives.
HOSTILE_VALUES = [
    str(2 ** 1024), str(2 ** 1100), "-" + str(2 ** 1024), '"' + "9" * 320 + '"', '"' + "9" * 320 + ' MiB"',
    '"' + "9" * 400 + 's"', '"1e400"', "1e308", "inf", "nan", "-0", "0", "-1", "1", "true", "false",
    '""', '" "', '"x\\n"', '"x\\u0000y"', '"job\\n"', '"%Y"', '"%Y%m%d_%H%M"', '"%Y%m%d_%H%M%S\\u0000%f"',
    '"a{4294967296}"', '"a{1,4294967296}"', '"' + "(" * 600 + ")" * 600 + '"', '"[[:digit:]]"',
    '"[[:alpha:]]+"', '"\\\\pN"', '"(?U)a+"', '"a++"', '"(?>a)"', '"(a)\\\\1"', '"\\\\Z"', '"\\\\C"',
    '"' + "x" * 100_000 + '"', '"@daily"', '"@reboot"', '"0 0 * * * *"', '"61 * * * *"', '"* * *"',
    '"99999999999999999999w"', '"100000000000d"', '"1 Mb"', '"23 bit"', '"1 bit"', '"-1 B"', '"10 mb"',
    "[]", "{}", "[1, 2]", '["a", 1]', "{ a = 1 }", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27",
    "[" * 600 + "]" * 600, "{ a = " * 300 + "1" + " }" * 300,
    '"tank/x\\n"', '"/"', '"tank//x"', '"tank/with space"', '"with space"', '"a\\\\b"',
]
EXTRA_LINES = [
    "bogus = 1", "keep_sender = []", "keep = []", "logging = []", "[jobs]", "[global.monitoring]",
    "warn_no_success_after = \"1h\"", "monitoring = [{ type = \"prometheus\", listen = \":9811\" }]",
    "x = " + "[" * 600 + "]" * 600, "include = [\"a.yml\"]", "jobs:", "- name: x",
]
_ASSIGNMENT = re.compile(r"^(\s*)([A-Za-z0-9_\"<>/.\- ]+?)\s*=\s*(.+)$")


def mutate(text: str, rng: random.Random) -> tuple[str, str]:
    """One mutation of `text` and the name of its kind."""
    lines = text.splitlines()
    assignments = [i for i, line in enumerate(lines) if _ASSIGNMENT.match(line) and not line.lstrip().startswith("#")]
    kind = rng.choice(("value", "value", "value", "delete", "duplicate", "insert", "retype-table"))
    if kind == "value":
        i = rng.choice(assignments)
        m = _ASSIGNMENT.match(lines[i])
        assert m is not None
        lines[i] = f"{m.group(1)}{m.group(2)} = {rng.choice(HOSTILE_VALUES)}"
    elif kind == "delete":
        del lines[rng.randrange(len(lines))]
    elif kind == "duplicate":
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif kind == "insert":
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(EXTRA_LINES))
    else:  # an array of tables written as a table, or the other way round
        headers = [i for i, line in enumerate(lines) if line.startswith("[")]
        i = rng.choice(headers)
        lines[i] = lines[i][1:-1] if lines[i].startswith("[[") else "[" + lines[i] + "]"
    return "\n".join(lines) + "\n", kind


# A config error names the file, then a key path (jobs[3].snapshotting.cron) or a line (file:12).
_KEY_PATH_OR_LINE = re.compile(r"config error: \S+?(:\d+: |: [A-Za-z_][\w-]*(\[\d+\])*(\.\S+?)?: )")


def run_configcheck(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = zrepl.main(["--config", str(path), "configcheck"])
    return code, capsys.readouterr().err


def unusable(path: Path) -> str | None:
    """Why an accepted config cannot work at run time (None when nothing obvious is wrong)."""
    config = zrepl.load_config(str(path))
    now = 1_800_000_000.0
    for job in config.jobs:
        if any(ord(ch) < 32 for ch in job.name):
            return f"job name {job.name!r}"
        s = job.snapshotting
        if s.type != "manual":
            first = zrepl.snapshot_name(s.prefix, s.timestamp_format, now, s.timestamp_location)
            if first == zrepl.snapshot_name(s.prefix, s.timestamp_format, now + 1, s.timestamp_location):
                return f"timestamp format {s.timestamp_format!r} repeats within a minute"
        for seconds in (s.interval, job.interval or 0):
            try:
                dt.datetime.fromtimestamp(now + seconds, dt.UTC)
            except (OverflowError, ValueError, OSError) as exc:
                return f"interval {seconds}: {exc}"
    return None


def classify(code: int, err: str, path: Path) -> str:
    if "Traceback" in err or "internal error" in err:
        return "internal error"
    if code == 0:
        return "accepted but unusable" if unusable(path) else "ok"
    if code == 2 and _KEY_PATH_OR_LINE.search(err.splitlines()[0] if err else ""):
        return "error with key path"
    return f"exit {code} without key path"


def test_config_mutations_never_end_in_an_internal_error(tmp_path, capsys):
    rng = random.Random(SEED)
    outcomes: collections.Counter[str] = collections.Counter()
    bad: list[tuple[str, str, str]] = []
    path = tmp_path / "zrepl.toml"
    for _ in range(MUTATIONS):
        text, kind = mutate(BASE, rng)
        path.write_text(text)
        code, err = run_configcheck(path, capsys)
        outcome = classify(code, err, path)
        outcomes[outcome] += 1
        if outcome not in ("ok", "error with key path"):
            bad.append((kind, outcome, err[:300]))
    with capsys.disabled():
        print(f"\nconfig fuzz (seed {SEED}): {MUTATIONS} mutations: "
              + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())))
    assert not bad, "\n".join(f"{kind}: {outcome}: {err}" for kind, outcome, err in bad[:10])
