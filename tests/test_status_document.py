"""The status document: its dataclasses and their validating from_json (issue 10 item 4), a seeded
fuzz of corrupted documents that must never break `status` or a run (issue 14 item 3), and what
`status` says for Nagios (issue 13 items 4 and 5)."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import zrepl
import support
from fakezfs import FakeZfs

REPO = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0
iso = zrepl.iso_time
MON = zrepl.StatusThresholds()


def push_entry() -> dict:
    """A push job's entry as the writers make it (reports, pruning, hooks, batches)."""
    report = zrepl.FilesystemReport(sender_fs="tank/data", receiver_fs="backup/sink/h/tank/data",
                                    state=zrepl.FilesystemState.DONE, steps_total=1, steps_done=1,
                                    bytes_expected=4096, bytes_replicated=4096, last_replicated="tank/data@zrepl_2",
                                    last_success=iso(NOW - 60))
    pruned = zrepl.PruneResult("tank/data", destroyed=["old"], kept={"tank/data@zrepl_2": ["last_n(count=1)"]},
                               held={"zrepl_1": ["keepme"]}, foreign_destroyed=["old"])
    hook = zrepl.HookResult("command /x", "pre", ["tank/data"], True, None, 0.1, "out\n")
    batch = zrepl.SnapshotBatchResult("tank", "zrepl_2", ["tank/data"], {}, [hook], {})
    return {"type": "push", "state": "idle", "boot_id": "x",
            "last_run": {"start": iso(NOW - 70), "end": iso(NOW - 60), "result": "ok", "error": None,
                         "failures": {}, "dry_run": False},
            "last_success": iso(NOW - 60), "next_snapshot_due": iso(NOW + 500),
            "snapshots": [batch.to_json()], "hooks": [hook.to_json()],
            "filesystems": {"tank/data": {"last_snapshot": "tank/data@zrepl_2", "last_snapshot_time": iso(NOW - 70),
                                          "snapshot_error": None, "pruning": pruned.to_json()}},
            "pruning_sender": zrepl.prune_summary([pruned]), "pruning_receiver": zrepl.prune_summary([]),
            "replication": {"started": iso(NOW - 69), "cancelled": None,
                            "filesystems": {"tank/data": report.to_json()}}}


def sink_entry() -> dict:
    connection = {"start": iso(NOW - 70), "end": iso(NOW - 60), "result": "ok", "error": None, "pid": 4242,
                  "requests": 9, "transfers": 1, "bytes": 4096, "destroyed": 0, "failed_requests": 0}
    transfer = {"time": iso(NOW - 61), "received": "tank/data@zrepl_2", "from": "zrepl_1", "resumed": False,
                "bytes": 4096, "seconds": 0.5}
    return {"type": "sink", "clients": {"h": {"last_connection": connection, "last_success": iso(NOW - 60),
                                              "transfers": [transfer], "last_transfer": transfer,
                                              "errors": [{"time": iso(NOW - 900), "request": "x", "error": "y"}]}}}


def test_the_dataclasses_model_every_key_the_writers_write():
    for entry in (push_entry(), sink_entry()):
        parsed, problems = zrepl.JobStatus.from_json(entry)
        assert problems == []
        # what the writers wrote comes back (None and empty values mean "absent" in the JSON form)
        assert _without_none(parsed.to_json()) == _without_none(entry)


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None and v not in ({}, [], "")}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@pytest.mark.parametrize("bad,path", [
    ({"filesystems": {"tank/a": ["a"]}}, "filesystems.tank/a"),
    ({"hooks": [-1]}, "hooks[0]"),
    ({"pid": 10 ** 30}, "pid"),
    ({"last_run": {"failures": {"tank/a": 5}}}, "last_run.failures.tank/a"),
    ({"replication": {"filesystems": {"tank/a": {"sender_fs": "tank/a", "state": "exploded"}}}},
     "replication.filesystems.tank/a.state"),
])
def test_from_json_keeps_the_well_formed_parts_and_names_the_rest(bad, path):
    entry = {**push_entry(), **bad}
    parsed, problems = zrepl.JobStatus.from_json(entry)
    assert any(p.startswith(path) for p in problems), problems
    assert parsed.last_success == entry["last_success"]  # the rest is kept
    assert zrepl.JobStatus.from_json(parsed.to_json())[1] == []  # and rewritten clean


# ---- the fuzz: corrupted documents never break status or a run ------------------------------------

HOSTILE = [["a"], -1, float("nan"), float("inf"), 1e30, 10 ** 30, None, {}, [], "", "x" * 100_000, True,
           "2026-13-45T99:99:99Z", {"a": {"b": {"c": []}}}, 2 ** 31, -(2 ** 63), "running"]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _mutate(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _paths(doc) if p])
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
    return doc


def _document(jobs: dict) -> dict:
    return {"version": 1, "updated": iso(NOW), "jobs": jobs}


def _write(path: Path, doc_or_text) -> None:
    path.write_text(doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text))


def test_status_fuzz_never_an_internal_error(tmp_path, capsys):
    """300 seeded variants (counts printed): every one ends in a Nagios level, none in an internal
    error or a traceback."""
    rng = random.Random(20261201)
    base = _document({"push": push_entry(), "sink": sink_entry(), "snap": push_entry() | {"type": "snap"}})
    path = tmp_path / "status.json"
    levels: dict[int, int] = {}
    variants = [_mutate(base, rng) for _ in range(280)]
    variants += ["{", "[]", "null", '{"jobs": []}', "\x00\xff", '{"jobs": {"push": NaN}}',
                 "[" * 100_000 + "]" * 100_000,
                 json.dumps(_document({"push": {"hooks": [[[[[]]]]] * 50_000}})),
                 '{"version": 1, "jobs": {"push": ' + "[" * 50_000 + "]" * 50_000 + "}}"]
    variants += [_document({"push": _mutate(push_entry(), rng)}) for _ in range(11)]
    for i, variant in enumerate(variants):
        _write(path, variant)
        for argv in (["status", "--status-file", str(path)], ["status", "-v", "--status-file", str(path)]):
            code = zrepl.main(argv)
            out, err = capsys.readouterr()
            assert code in (0, 1, 2, 3), (i, variant)
            assert "internal error" not in out + err and "Traceback" not in out + err, (i, out, err)
            assert out.split(":")[0] in zrepl.NAGIOS_NAMES.values(), out
            levels[code] = levels.get(code, 0) + 1
    print(f"status fuzz: {len(variants)} variants, levels {dict(sorted(levels.items()))}")
    assert levels.get(3, 0) > 0  # unreadable ones are UNKNOWN


def test_a_broken_previous_document_never_breaks_a_run(tmp_path, capsys):
    """A run rewrites its own entry from the well-formed parts (120 seeded variants)."""
    rng = random.Random(7)
    path = tmp_path / "status" / "status.json"
    cfg = str(support.snap_config(tmp_path, {"snap": "tank/a"}, global_={"status_file": str(path)}))
    path.parent.mkdir()
    good = push_entry() | {"type": "snap"}
    variants = [_document({"snap": _mutate(good, rng)}) for _ in range(118)]
    variants += ["[" * 200_000, json.dumps({"jobs": {"snap": {"filesystems": {"tank/a": ["a"]}}}})]
    for i, variant in enumerate(variants):
        _write(path, variant)
        code = zrepl.main(["--config", cfg, "run"], zfs=FakeZfs.with_filesystems("tank/a"))
        out, err = capsys.readouterr()
        assert code == 0, (i, err)
        assert "internal error" not in err and "Traceback" not in err
        entry = json.loads(path.read_text())["jobs"]["snap"]
        assert zrepl.JobStatus.from_json(entry)[1] == [], (i, entry)
        assert entry["last_run"]["result"] == "ok"
    print(f"run fuzz: {len(variants)} broken previous documents, every run ok")


# ---- what status says -----------------------------------------------------------------------------

def _health(entry, jtype="snap", **kw):
    return zrepl.evaluate_job("j", jtype, entry, NOW, MON, **kw)


def test_an_overdue_snapshot_is_a_warning_even_after_an_ok_run():
    spec = zrepl.ConfiguredJob(type="snap", snapshot_interval=900)
    entry = push_entry() | {"type": "snap", "next_snapshot_due": iso(NOW - 901)}
    health = _health(entry, spec=spec)
    assert health.level == zrepl.NAGIOS_WARNING and "snapshot overdue by 15m" in health.line
    assert _health(entry | {"next_snapshot_due": iso(NOW - 899)}, spec=spec).level == zrepl.NAGIOS_OK


@pytest.mark.parametrize("age,level", [(60, 0), (3 * 3600, 1), (7 * 3600, 2)])
def test_a_job_that_has_not_run_yet(age, level):
    health = _health(None, since=NOW - age)
    assert health.level == level and "has not run yet" in health.line
    if level:
        assert "is the timer or cron job enabled?" in health.line


def test_no_jobs_is_not_ok(tmp_path, capsys):
    cfg = tmp_path / "zrepl.toml"
    cfg.write_text(f'[global]\nstatus_file = "{tmp_path}/s.json"\nruntime_dir = "{tmp_path}/run"\n')
    assert zrepl.main(["--config", str(cfg), "status"]) == 3
    assert capsys.readouterr().out.startswith("UNKNOWN: no jobs configured")


def test_a_sink_on_the_local_transport_shows_the_pushes_it_served():
    spec = zrepl.ConfiguredJob(type="sink", passive=True, local_clients={"thishost": "backup"})
    health = zrepl.evaluate_job("backuppool", "sink", None, NOW, MON, runs=False, spec=spec,
                                others={"backup": push_entry()})
    assert health.level == zrepl.NAGIOS_OK
    assert health.clients == ["client thishost (local push job backup): last push 1m ago ok"]
    stale = push_entry() | {"last_success": iso(NOW - 7 * 3600)}
    assert zrepl.evaluate_job("backuppool", "sink", None, NOW, MON, runs=False, spec=spec,
                              others={"backup": stale}).level == zrepl.NAGIOS_CRITICAL


def test_status_v_shows_running_filesystems_as_a_table():
    running = zrepl.FilesystemReport("tank/big", state=zrepl.FilesystemState.STEPPING, step="full send of tank/big@a",
                                     steps_total=1, bytes_expected=1000 * 2 ** 20, bytes_replicated=250 * 2 ** 20,
                                     step_started=iso(NOW - 10))
    waiting = zrepl.FilesystemReport("tank/small")
    entry = push_entry() | {"state": "running", "pid": os.getpid(), "boot_id": zrepl.BOOT_ID,
                            "activity": {"step": "replicating", "progress": "", "since": iso(NOW - 10)},
                            "replication": {"filesystems": {"tank/big": running.to_json(),
                                                            "tank/small": waiting.to_json()}}}
    health = _health(entry, jtype="push")
    text, level = zrepl.render_status([health], {"j": "push"}, verbose=True)
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["filesystem", "state"])
    big, small = lines[header + 1], lines[header + 2]
    assert big.split()[:2] == ["tank/big", "stepping"] and "[#####...............]  25%" in big
    assert "25.0 MiB/s" in big and "30s" in big  # rate and ETA
    assert small.split() == ["tank/small", "waiting"]
    assert all(len(ln) < 200 for ln in lines)


def test_perfdata_on_the_status_line():
    health = [_health(push_entry())]
    text, _ = zrepl.render_status(health, {"j": "snap"}, verbose=False, monitoring=MON)
    assert text.splitlines()[0] == "OK: 1 job(s), all ok | jobs=1 problems=0 'j age'=60s;7200;21600;0;"


def test_a_run_from_before_a_reboot_is_not_running(monkeypatch):
    entry = push_entry() | {"state": "running", "pid": os.getpid(), "boot_id": "another boot",
                            "activity": {"step": "replicating"}}
    monkeypatch.setattr(zrepl, "BOOT_ID", "this boot")
    health = _health(entry)
    assert health.level == zrepl.NAGIOS_WARNING and "died" in health.line


def test_a_monitoring_user_needs_no_config(tmp_path):
    """The status file is world-readable and `status --status-file` reads no config: the 0600
    config with its secrets stays closed to the monitoring user."""
    # the config stays in pytest's 0700 tmp_path; the status file goes where everyone may look
    public = Path(tempfile.mkdtemp(prefix="zrepl-status-test."))
    os.chmod(public, 0o755)
    status_file = public / "status" / "status.json"
    cfg = str(support.snap_config(tmp_path, {"home": "tank/home"}, global_={"status_file": str(status_file)}))
    os.chmod(cfg, 0o600)
    try:
        assert zrepl.main(["--config", cfg, "run"], zfs=FakeZfs.with_filesystems("tank/home")) == 0
        assert status_file.stat().st_mode & 0o777 == 0o644
        assert status_file.parent.stat().st_mode & 0o777 == 0o755
        env = {k: v for k, v in os.environ.items() if k != "ZREPL_CONFIG"}
        argv = [sys.executable, str(REPO / "zrepl.py"), "status", "--status-file", str(status_file)]
        if os.geteuid() == 0:  # as nobody, who can read neither the config nor the runtime dir
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
            assert subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", cfg],
                                  capture_output=True, timeout=60).returncode != 0
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=public)
    finally:
        shutil.rmtree(public)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: 1 job(s), all ok |") and "home" in proc.stdout
