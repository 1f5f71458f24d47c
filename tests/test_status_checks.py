"""Per-filesystem checks of `zrepl.py status` (issue 11 item 6): snapshot and received freshness like
sanoid's --monitor-snapshots, the guard against a replication failing unnoticed (zrepl #808) with
replication.pause_snapshotting_after, and the `--json` verdict. Ages are days and hours against the
real clock (no test waits), or a `now` passed to the pure functions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import periodic, pull_job, push_job, run, sink_job, source_job, status, write_config

SRC = "src/data"
DAY = 86400


@pytest.fixture
def world(fake_zfs: FakeZfs):
    w = fake_zfs.world
    w.tree("src", "data @a @b\nother @x")
    w.tree("dst", "sink")
    return w


def age_snapshots(fake: FakeZfs, fs: str, seconds: float) -> None:
    """Every snapshot of fs as if taken `seconds` earlier than now. Then waits for the next second:
    snapshot names have a resolution of one second, and the next run must not reuse this one's."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    for name in fake.world.snapshots(fs):
        fake.tamper.creation(name if "@" in name else f"{fs}@{name}", time.time() - seconds)


def config(tmp_path: Path, status_keys: dict | None = None, **push_keys) -> Path:
    push_keys.setdefault("filesystems", {"src<": True})
    return write_config(tmp_path, push_job(**push_keys), sink_job(root_fs="dst/sink"),
                        global_={"status": status_keys} if status_keys else None)


def status_of(cfg: Path, *extra: str):
    return run("--config", cfg, "status", *extra)


# ---- freshness ------------------------------------------------------------------------------------

def test_freshness_levels_follow_the_newest_snapshot_and_a_missing_one_is_critical():
    now = 1_000_000.0
    found = zrepl.freshness({"ok": now - 10, "warn": now - 200, "crit": now - 2000, "none": None}, now,
                            warn=100, crit=1000, check="snapshot_age")
    assert [(f.filesystem, zrepl.NAGIOS_NAMES[f.level], f.age) for f in found] == [
        ("crit", "CRITICAL", 2000), ("none", "CRITICAL", None), ("warn", "WARNING", 200)]
    assert zrepl.freshness({"a": None}, now, warn=0, crit=0, check="x") == []  # both off


def test_old_snapshots_on_both_sides_make_status_critical_naming_the_filesystems(fake_zfs, world, tmp_path):
    age_snapshots(fake_zfs, SRC, 3 * DAY)
    age_snapshots(fake_zfs, "src/other", 3 * 3600)
    cfg = config(tmp_path, {"warn_snapshot_older_than": "2h", "crit_snapshot_older_than": "1d",
                            "warn_received_older_than": "2h", "crit_received_older_than": "2d"})
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    result = status_of(cfg)
    assert result.code == zrepl.NAGIOS_CRITICAL, result
    line = result.stdout.splitlines()[1]
    assert "newest snapshot too old: src/data (3d" in line and "src/other (3h" in line
    assert "newest received snapshot too old: src/data (3d" in line
    # the push job's own run was fine: without the checks it is OK
    plain = run("--config", config(tmp_path / "plain"), "run", "push", zfs=fake_zfs)
    assert plain.code == 0 and status_of(tmp_path / "plain" / "zrepl.toml").code == zrepl.NAGIOS_OK


def test_fresh_snapshots_pass_and_the_checks_are_off_by_default(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, {"warn_snapshot_older_than": "2h", "crit_snapshot_older_than": "1d"})
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    assert status_of(cfg).code == zrepl.NAGIOS_OK
    age_snapshots(fake_zfs, SRC, 30 * DAY)
    cfg = config(tmp_path / "default")
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    assert status_of(cfg).code == zrepl.NAGIOS_OK


def test_a_pull_job_checks_what_it_received(fake_zfs, world, tmp_path):
    age_snapshots(fake_zfs, SRC, 2 * DAY)
    cfg = write_config(tmp_path, pull_job(root_fs="dst/sink"), source_job(filesystems={"src/data": True}),
                       global_={"status": {"warn_received_older_than": "1d"}})
    assert run("--config", cfg, "run", "pull", zfs=fake_zfs).code == 0
    result = status_of(cfg)
    assert result.code == zrepl.NAGIOS_WARNING, result
    assert "newest received snapshot too old: src/data (2d" in result.stdout


def test_status_json_carries_the_verdict_and_the_failing_filesystems(fake_zfs, world, tmp_path):
    age_snapshots(fake_zfs, SRC, 3 * DAY)
    cfg = config(tmp_path, {"crit_snapshot_older_than": "1d"}, filesystems={SRC: True})
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    result = status_of(cfg, "--json")
    assert result.code == zrepl.NAGIOS_CRITICAL
    doc = json.loads(result.stdout)
    assert doc["jobs"]["push"]["last_run"]["result"] == "ok"  # still the whole document
    check = doc["check"]
    assert check["level"] == "CRITICAL" and check["exit_code"] == 2 and check["summary"].startswith("CRITICAL")
    [finding] = check["jobs"]["push"]["filesystems"]
    assert finding["check"] == "snapshot_age" and finding["filesystem"] == SRC and finding["level"] == "CRITICAL"
    assert 3 * DAY - 600 < finding["age_seconds"] < 3 * DAY + 600
    assert check["jobs"]["sink"]["filesystems"] == []


def test_the_thresholds_travel_in_the_document_for_status_file_without_config(fake_zfs, world, tmp_path):
    age_snapshots(fake_zfs, SRC, 3 * DAY)
    cfg = config(tmp_path, {"warn_snapshot_older_than": "1d"}, filesystems={SRC: True})
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    assert status(cfg)["configured"]["warn_snapshot_older_than"] == DAY
    result = run("status", "--status-file", tmp_path / "status.json")
    assert result.code == zrepl.NAGIOS_WARNING and "newest snapshot too old: src/data" in result.stdout


# ---- replication failing too long ----------------------------------------------------------------

def failing_entry(last_success_ago: float | None, now: float) -> dict:
    rep = {"sender_fs": SRC, "state": "step-error", "error": "cannot receive", "error_count": 9}
    if last_success_ago is not None:
        rep["last_success"] = zrepl.iso_time(now - last_success_ago)
    return {"type": "push", "state": "idle", "last_success": zrepl.iso_time(now - 60),
            "last_run": {"start": zrepl.iso_time(now - 60), "end": zrepl.iso_time(now - 50), "result": "ok"},
            "replication": {"filesystems": {SRC: rep, "src/fine": {"sender_fs": "src/fine", "state": "done",
                                                                  "last_success": zrepl.iso_time(now - 60)}}}}


def test_a_filesystem_failing_longer_than_the_limit_is_critical_and_named():
    now = 2_000_000_000.0
    limits = zrepl.StatusThresholds(crit_replication_failing_after=DAY)
    health = zrepl.evaluate_job("push", "push", failing_entry(2 * DAY, now), now, limits)
    assert health.level == zrepl.NAGIOS_CRITICAL
    assert "replication failing too long: src/data (2d)" in health.line and "src/fine" not in health.line
    short = zrepl.evaluate_job("push", "push", failing_entry(3600, now), now, limits)
    assert "replication failing too long" not in short.line
    # never succeeded: counted from when the job was configured
    never = zrepl.evaluate_job("push", "push", failing_entry(None, now), now, limits, since=now - 3 * DAY)
    assert "replication failing too long: src/data (3d)" in never.line


def test_the_failing_limit_defaults_to_crit_no_success_after():
    now = 2_000_000_000.0
    limits = zrepl.StatusThresholds(crit_no_success_after=7 * 3600)
    assert "failing too long: src/data (8h)" in zrepl.evaluate_job("push", "push", failing_entry(8 * 3600, now),
                                                                   now, limits).line
    assert "failing too long" not in zrepl.evaluate_job("push", "push", failing_entry(6 * 3600, now), now,
                                                        limits).line


def _backdate_success(cfg: Path, fs: str, seconds: float) -> None:
    path = Path(status(cfg)["configured"] and cfg.parent / "status.json")
    doc = json.loads(path.read_text())
    doc["jobs"]["push"]["replication"]["filesystems"][fs]["last_success"] = zrepl.iso_time(time.time() - seconds)
    path.write_text(json.dumps(doc))


def test_pause_snapshotting_after_stops_snapshots_of_a_failing_filesystem_until_it_replicates(fake_zfs, world,
                                                                                             tmp_path):
    cfg = config(tmp_path, filesystems={"src<": True}, snapshotting=periodic("1h"),
                 replication={"pause_snapshotting_after": "1d"})
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    counts = {fs: len(world.snapshots(fs)) for fs in (SRC, "src/other")}
    fake_zfs.fail("recv", "cannot receive: injected\n", match=SRC)
    for fs in counts:
        age_snapshots(fake_zfs, fs, 2 * 3600)  # the next snapshot is due
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 1
    _backdate_success(cfg, SRC, 2 * DAY)  # as if it had been failing for two days
    for fs in counts:
        age_snapshots(fake_zfs, fs, 2 * 3600)
    paused = run("--config", cfg, "run", "push", zfs=fake_zfs)
    assert paused.code == 1
    assert "snapshotting paused: replication has failed for 2d" in paused.stderr
    assert len(world.snapshots(SRC)) == counts[SRC] + 1  # the second run's snapshot, none in the third
    assert len(world.snapshots("src/other")) == counts["src/other"] + 2  # its replication works
    entry = status(cfg)["jobs"]["push"]["filesystems"][SRC]
    assert entry["snapshot_error"].startswith("snapshotting paused")
    fake_zfs.clear()
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0  # replicates (still paused in this pass)
    for fs in counts:
        age_snapshots(fake_zfs, fs, 2 * 3600)
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    assert len(world.snapshots(SRC)) == counts[SRC] + 2  # snapshotting again
    assert status(cfg)["jobs"]["push"]["filesystems"][SRC].get("snapshot_error") is None


def test_without_the_option_a_failing_filesystem_keeps_getting_snapshots(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, filesystems={SRC: True}, snapshotting=periodic("1h"))
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    before = len(world.snapshots(SRC))
    fake_zfs.fail("recv", "cannot receive: injected\n")
    age_snapshots(fake_zfs, SRC, 2 * 3600)
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 1
    _backdate_success(cfg, SRC, 30 * DAY)
    age_snapshots(fake_zfs, SRC, 2 * 3600)
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 1
    assert len(world.snapshots(SRC)) == before + 2
    result = status_of(cfg)
    assert result.code == zrepl.NAGIOS_CRITICAL and "replication failing too long: src/data (30d" in result.stdout


# ---- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    ({"warn_snapshot_older_than": "2d", "crit_snapshot_older_than": "1d"},
     "global.status.crit_snapshot_older_than: must not be shorter than warn_snapshot_older_than"),
    ({"warn_received_older_than": "2d", "crit_received_older_than": "1h"},
     "global.status.crit_received_older_than: must not be shorter than warn_received_older_than"),
    ({"crit_replication_failing_after": "soon"}, "global.status.crit_replication_failing_after"),
    ({"warn_snapshot_age": "1h"}, "global.status.warn_snapshot_age: unknown key"),
])
def test_bad_status_keys_name_their_path(tmp_path, keys, message):
    result = run("--config", config(tmp_path, keys), "configcheck")
    assert result.code == 2 and message in result.stderr, result


def test_pause_snapshotting_after_is_a_push_key(tmp_path):
    cfg = write_config(tmp_path, pull_job(root_fs="dst/sink", replication={"pause_snapshotting_after": "1d"}),
                       source_job(filesystems={SRC: True}))
    result = run("--config", cfg, "configcheck")
    assert result.code == 2 and "jobs[0].replication.pause_snapshotting_after: unknown key" in result.stderr
    bad = run("--config", config(tmp_path / "p", replication={"pause_snapshotting_after": "x"}), "configcheck")
    assert bad.code == 2 and "jobs[0].replication.pause_snapshotting_after" in bad.stderr


# ---- the sink's side -------------------------------------------------------------------------------

def test_a_sink_records_each_clients_newest_received_snapshot_and_checks_its_age():
    from types import SimpleNamespace

    job = zrepl.JobConfig(name="sink", type="sink")
    entries: dict = {}
    clock = iter([1000.0, 1000.0, 1100.0, 1200.0, 1300.0])
    recorder = zrepl.ClientRecorder(job, "client1", lambda name, mutate: mutate(entries.setdefault(name, {})),
                                    clock=lambda: next(clock))
    receive = recorder.wrap({"receiver.receive": lambda body, ctx: {}})["receiver.receive"]
    ctx = SimpleNamespace(stream=None)
    receive({"fs": "prod/db", "to": "s1"}, ctx)
    receive({"fs": "prod/www", "to": "s1"}, ctx)
    receive({"fs": "prod/db", "to": "s2"}, ctx)
    received = entries["sink"]["clients"]["client1"]["received"]
    assert received == {"prod/db": {"snapshot": "prod/db@s2", "time": zrepl.iso_time(1200.0)},
                        "prod/www": {"snapshot": "prod/www@s1", "time": zrepl.iso_time(1100.0)}}
    entries["sink"]["clients"]["client1"]["last_success"] = zrepl.iso_time(1200.0)
    limits = zrepl.StatusThresholds(warn_received_older_than=2 * DAY, crit_received_older_than=3 * DAY)
    health = zrepl.evaluate_job("sink", "sink", entries["sink"], 1150.0 + 3 * DAY, limits)
    assert "newest received snapshot too old: client1 prod/www (3d" in health.line
    assert "prod/db (2d" in health.line and health.level == zrepl.NAGIOS_CRITICAL
    text = zrepl.render_metrics(zrepl.StatusDocument(jobs=entries), zrepl.ProcessMetrics())
    assert 'zrepl_client_last_received_timestamp_seconds{zrepl_job="sink",client="client1",' \
           'filesystem="prod/db"} 1200' in text


# ---- the filter ------------------------------------------------------------------------------------

def test_a_filter_pattern_that_selected_nothing_makes_status_a_warning_naming_it(fake_zfs, world, tmp_path):
    """A renamed or mistyped dataset is silently no longer backed up while the rest replicates:
    the run succeeds (exit 0, the rest is done) but status must not say OK."""
    cfg = config(tmp_path, filesystems={"src/data": True, "src/renamed<": True})
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    result = status_of(cfg)
    assert result.code == zrepl.NAGIOS_WARNING, result
    assert "the filesystems filter's 'src/renamed<' selected no dataset" in result.stdout
    world.tree("src", "renamed @r")  # once it matches again, OK
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    assert status_of(cfg).code == zrepl.NAGIOS_OK
