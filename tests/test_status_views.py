"""What people see of a run: progress in the status document while a push replicates, the
progress line of an interactive `run`, `status --watch` (issue 13 item 4, issue 11 item 5), and the
command line's help and usage errors (issue 13 items 5 and 7)."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import fs_status, job_status, last_n, push_job, run, sink_job, snap_config, write_config

REPO = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0
MiB = 2 ** 20


@pytest.fixture
def pushing(fake_zfs: FakeZfs, tmp_path):
    fake_zfs.world.tree("src", "data @a @b\ndata/child @x")
    fake_zfs.world.tree("dst", "sink")
    return fake_zfs, write_config(tmp_path, push_job(filesystems={"src/data<": True}), sink_job(root_fs="dst/sink"))


def test_the_document_carries_real_progress_while_and_after_replicating(pushing, monkeypatch):
    fake, cfg = pushing
    published: list[dict] = []
    original = zrepl.StatusStore.publish

    def record(store, job, doc):
        original(store, job, doc)
        published.append(json.loads(json.dumps(store.read()["jobs"][job])))
    monkeypatch.setattr(zrepl.StatusStore, "publish", record)

    def progress() -> list[str]:
        return [d["activity"]["progress"] for d in list(published)
                if d.get("state") == "running" and d.get("activity", {}).get("step") == "replicating"]

    # The child's send waits until the document shows the parent done: step events are throttled,
    # the status ticker (every 2 s) publishes what they skipped while the step runs.
    hung = fake.hang("send", match="src/data/child@", times=1)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(run("--config", cfg, "run", "push", zfs=fake)))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not any(p.startswith("1/2 filesystems done, ") for p in progress()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        hung.release()
        runner.join(60)
    assert results and results[0].code == 0, results
    assert "0/2 filesystems done, 0 B moved" in progress()
    assert any(p.startswith("1/2 filesystems done, ") and not p.endswith(" 0 B moved") for p in progress()), progress()
    for fs in ("src/data", "src/data/child"):
        report = fs_status(cfg, "push", fs)
        sent = [c for c in fake.calls_of("send") if "-n" not in c and c[-1].startswith(fs + "@")]
        assert report["state"] == "done" and report["bytes_replicated"] > 0 and sent
        assert report["bytes_replicated"] == report["bytes_expected"]  # the estimate was right: no guess
    assert job_status(cfg, "push")["state"] == "idle"


def _running_push(big_done: int = 250 * MiB) -> dict:
    running = zrepl.FilesystemReport("tank/big", state=zrepl.FilesystemState.STEPPING,
                                     step="full send of tank/big@a", steps_total=1,
                                     bytes_expected=1000 * MiB, bytes_replicated=big_done,
                                     step_started=zrepl.iso_time(NOW - 10))
    done = zrepl.FilesystemReport("tank/done", state=zrepl.FilesystemState.DONE, steps_total=1, steps_done=1,
                                  bytes_replicated=MiB, last_replicated="tank/done@a")
    return {"type": "push", "state": "running", "pid": os.getpid(), "boot_id": zrepl.BOOT_ID,
            "activity": {"step": "replicating", "since": zrepl.iso_time(NOW - 10)},
            "last_run": {"start": zrepl.iso_time(NOW - 10), "result": "running"},
            "last_success": zrepl.iso_time(NOW - 600),
            "replication": {"filesystems": {"tank/big": running.to_json(), "tank/done": done.to_json(),
                                            "tank/small": zrepl.FilesystemReport("tank/small").to_json()}}}


def test_an_interactive_run_shows_one_updating_line_with_bytes_rate_and_eta(monkeypatch):
    monkeypatch.setattr(zrepl, "utcnow", lambda: NOW)
    clock = [100.0]
    stream = io.StringIO()
    shown: list[tuple[str, dict]] = []
    display = zrepl.TerminalProgress(stream, clock=lambda: clock[0], interval=0.5)
    publish = display.wrap(lambda job, doc: shown.append((job, doc)))
    for seconds, moved in ((0.0, 100), (0.1, 150), (1.0, 250)):  # the second comes too soon to be drawn
        clock[0] += seconds
        publish("backup", _running_push(moved * MiB))
    assert len(shown) == 3  # every publish still reaches the status file
    frames = stream.getvalue().split("\r\x1b[K")[1:]
    assert len(frames) == 2
    assert frames[-1] == ("backup: tank/big full send of tank/big@a: 250.0 MiB of 1000.0 MiB (25%), 25.0 MiB/s, "
                          "ETA 30s")
    with display:
        pass
    assert stream.getvalue().endswith("\r\x1b[K")  # the line is cleared before the summary


def test_a_run_under_cron_shows_no_progress(tmp_path, capsys):
    cfg = snap_config(tmp_path, {"a": "tank/a"})
    result = run("--config", cfg, "run", zfs=FakeZfs.with_filesystems("tank/a"))  # stderr is no terminal
    assert result.code == 0 and result.stderr == "" and result.stdout == ""


def _watch_args(status_file: str) -> argparse.Namespace:
    args = zrepl.build_parser().parse_args(["status", "--status-file", status_file, "--watch", "5"])
    args.zfs = None
    return args


def test_status_watch_redraws_jobs_problems_first_and_running_filesystems(tmp_path, monkeypatch):
    monkeypatch.setattr(zrepl, "utcnow", lambda: NOW)
    monkeypatch.setenv("COLUMNS", "160")
    failed = {"type": "snap", "state": "idle", "last_success": zrepl.iso_time(NOW - 600),
              "last_run": {"start": zrepl.iso_time(NOW - 70), "end": zrepl.iso_time(NOW - 60), "result": "failed",
                           "failures": {"tank/x": "out of space"}}}
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"version": 1, "jobs": {"backup": _running_push(), "zsnap": failed}}))
    stream, sleeps = io.StringIO(), []
    level = zrepl.watch_status(_watch_args(str(path)), stream, sleep=sleeps.append, rounds=2)
    assert level == zrepl.NAGIOS_WARNING and sleeps == [5.0, 5.0]
    frames = stream.getvalue().split(zrepl.WATCH_CLEAR)[1:]
    assert len(frames) == 2
    lines = frames[-1].splitlines()
    assert lines[0] == "WARNING: 2 job(s), 1 need attention"
    assert lines[1].split()[:2] == ["WARNING", "zsnap"] and lines[2].split()[:2] == ["OK", "backup"]
    big = next(ln for ln in lines if ln.split()[:1] == ["tank/big"])
    assert "[#####...............]  25% 250.0 MiB of 1000.0 MiB" in big and "25.0 MiB/s" in big and "30s" in big
    assert next(ln for ln in lines if ln.split()[:1] == ["tank/small"]).split() == ["tank/small", "waiting"]
    assert not any(ln.split()[:1] == ["tank/done"] for ln in lines)  # finished ones make room
    assert lines[-1].startswith("(every 5s, ") and lines[-1].endswith("Ctrl-C to quit)")


def test_status_watch_cuts_lines_to_the_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(zrepl, "utcnow", lambda: NOW)
    health = zrepl.evaluate_job("backup", "push", _running_push(), NOW, zrepl.StatusThresholds())
    lines = zrepl.watch_lines([health], {"backup": "push"}, width=40)
    assert all(len(ln) <= 40 for ln in lines) and any(ln.endswith("~") for ln in lines)


def test_status_watch_without_a_terminal_is_the_plain_summary(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"version": 1, "jobs": {"backup": _running_push()}}))
    result = run("status", "--status-file", path, "--watch")  # stdout is a StringIO: no terminal
    assert result.code == 0 and zrepl.WATCH_CLEAR not in result.stdout
    assert result.stdout.startswith("OK: 1 job(s), all ok | ") and result.stdout.count("\n") == 2


@pytest.mark.parametrize("argv", [["status", "--watch", "0"], ["status", "--watch", "x"], ["status", "--warn", "x"],
                                  ["status", "--warn", "1h", "--crit", "30m"], ["status", "--watch", "--json"],
                                  ["status", "--bogus"], ["status", "--status-file", ""]])
def test_usage_errors_of_status_are_unknown(tmp_path, argv):
    (tmp_path / "s.json").write_text('{"version": 1, "jobs": {}}')
    if "--status-file" not in argv:
        argv = [*argv, "--status-file", str(tmp_path / "s.json")]
    result = run(*argv)
    assert result.code == zrepl.NAGIOS_UNKNOWN, result
    assert "Traceback" not in result.stdout + result.stderr


def test_contradictory_thresholds_are_refused_with_the_reason(tmp_path):
    (tmp_path / "s.json").write_text('{"version": 1, "jobs": {}}')
    result = run("status", "--status-file", tmp_path / "s.json", "--warn", "1h", "--crit", "30m")
    assert result.code == 3 and "--crit must not be shorter than --warn" in result.stdout + result.stderr


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    root = zrepl.build_parser()
    return [("zrepl.py", root)] + [(p.prog, p) for p in zrepl._all_subparsers(root)]


@pytest.mark.parametrize("prog,parser", _parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_help_has_exit_codes_an_example_and_help_per_argument(prog, parser):
    text = parser.format_help()
    assert "exit code" in text and "example" in text, text
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            assert action.help, f"{prog}: {action.option_strings or action.dest} has no help text"


def test_version_and_run_help_state_what_they_do(capsys):
    with pytest.raises(SystemExit) as exit_:
        zrepl.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"zrepl.py {zrepl.__version__}"
    assert run("version").stdout.strip() == f"zrepl.py {zrepl.__version__}"
    run_help = next(p for prog, p in _parsers() if prog.endswith(" run")).format_help()
    assert "default: every job but sinks" in " ".join(run_help.split())
    abstractions = next(p for prog, p in _parsers() if prog.endswith(" zfs-abstractions")).format_help()
    for action in ("list ", "release-stale ", "release-all "):
        assert f"\n  {action}" in abstractions


@pytest.mark.parametrize("minutes,level", [(5, zrepl.NAGIOS_OK), (3 * 60, zrepl.NAGIOS_WARNING),
                                           (7 * 60, zrepl.NAGIOS_CRITICAL)])
def test_a_first_run_in_progress_does_not_page_until_the_thresholds(minutes, level):
    entry = _running_push() | {"last_success": None,
                               "last_run": {"start": zrepl.iso_time(NOW - 60 * minutes), "result": "running"}}
    health = zrepl.evaluate_job("backup", "push", entry, NOW, zrepl.StatusThresholds())
    assert health.level == level, health.line
    assert ("first run, no success yet" in health.line) == (level != zrepl.NAGIOS_OK)


def test_the_pruner_counts_its_filesystems_into_the_progress(tmp_path, monkeypatch):
    fake = FakeZfs()
    fake.world.tree("tank", "a @zrepl_1 @zrepl_2\nb @zrepl_1 @zrepl_2\nc @zrepl_1 @zrepl_2")
    cfg = write_config(tmp_path, {"name": "s", "type": "snap", "filesystems": {"tank<": True},
                                  "snapshotting": {"type": "manual"}, "pruning": {"keep": [last_n(1)]}})
    monkeypatch.setattr(zrepl.JobRunner, "PRUNE_PUBLISH_INTERVAL", 0.0)
    seen: list[tuple[str, str]] = []
    original = zrepl.StatusStore.publish

    def record(store, job, doc):
        original(store, job, doc)
        activity = doc.get("activity") or {}
        seen.append((activity.get("step", ""), activity.get("progress", "")))
    monkeypatch.setattr(zrepl.StatusStore, "publish", record)
    assert run("--config", cfg, "run", zfs=fake).code == 0
    pruning = [progress for step, progress in seen if step == "pruning"]
    assert pruning == ["4 filesystems", "1/4 filesystems", "2/4 filesystems", "3/4 filesystems", "4/4 filesystems"]
    health = zrepl.evaluate_job("s", "snap", {"type": "snap", "state": "running", "pid": os.getpid(),
                                              "activity": {"step": "pruning", "progress": "3/4 filesystems"}},
                                NOW, zrepl.StatusThresholds())
    assert "running: pruning 3/4 filesystems" in zrepl.watch_lines([health], {"s": "snap"}, 200)[1]


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def _pane_shows(target: str, pattern: str, wait: float = 120.0) -> str:
    deadline = time.monotonic() + wait  # ends as soon as it shows; the margin is for a loaded machine
    while True:
        text = _tmux("capture-pane", "-p", "-J", "-t", target)
        if re.search(pattern, text, re.M) or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_status_watch_in_a_real_terminal(tmp_path):
    """The view in tmux (a real terminal) from a recorded running push; Ctrl-C ends it with the level.
    The same during a real transfer: tests/zfs/test_terminal_zfs.py."""
    path = tmp_path / "status.json"
    entry = _running_push()
    entry["replication"]["filesystems"]["tank/big"]["step_started"] = zrepl.iso_time(time.time() - 10)
    path.write_text(json.dumps({"version": 1, "jobs": {"backup": entry}}))
    session = f"zrepltest{os.getpid()}"
    _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "20")
    try:
        command = (f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} -m zrepl status "
                   f"--status-file {shlex.quote(str(path))} --watch 1; echo WATCH-EXIT=$?")
        _tmux("send-keys", "-t", session, command, "Enter")
        view = _pane_shows(session, r"^\s+tank/big\s+stepping\s")
        assert re.search(r"^OK: 1 job\(s\), all ok$", view, re.M), view
        assert re.search(r"^\s+tank/big\s+stepping\s+1/1 full send of tank/big@a\s+\[#####\.{15}\]\s+25% "
                         r"250\.0 MiB of 1000\.0 MiB\s+[\d.]+ MiB/s\s+\S+$", view, re.M), view
        assert re.search(r"^\s+tank/small\s+waiting$", view, re.M) and "Ctrl-C to quit" in view
        _tmux("send-keys", "-t", session, "C-c")
        after = _pane_shows(session, r"^WATCH-EXIT=\d+$")
        assert re.search(r"^WATCH-EXIT=0$", after, re.M) and "Traceback" not in after, after
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=60)


def test_the_terminal_line_shows_a_step_with_its_count():
    doc = {"state": "running", "activity": {"step": "pruning receiver", "progress": "12/40 filesystems"}}
    assert zrepl.progress_line("backup", doc, NOW) == "backup: pruning receiver 12/40 filesystems"
    assert zrepl.progress_line("backup", {"state": "running", "activity": {"step": "listing"}}, NOW) == \
        "backup: listing"
    assert zrepl.progress_line("backup", {"state": "idle"}, NOW) == ""


@pytest.mark.parametrize("minutes,level,since", [(5, zrepl.NAGIOS_OK, "5m ago"),
                                                 (3 * 60, zrepl.NAGIOS_WARNING, "3h ago; no successful push for 3h")])
def test_a_sink_during_the_first_local_push_waits_like_the_push(minutes, level, since):
    spec = zrepl.ConfiguredJob(type="sink", passive=True, local_clients={"thishost": "backup"})
    first = _running_push() | {"last_success": None,
                               "last_run": {"start": zrepl.iso_time(NOW - 60 * minutes), "result": "running"}}
    health = zrepl.evaluate_job("backuppool", "sink", None, NOW, zrepl.StatusThresholds(), runs=False, spec=spec,
                                others={"backup": first})
    assert health.level == level, health.clients
    assert health.clients == [f"client thishost (local push job backup): pushing since {since}"]
