"""A new admin's first day, on the host (issue 13): the shipped configs keep snapshots they did not
make, dry runs that scale, the status of foreign snapshots, and the small things. The same day on
real ZFS, from README's own text: tests/zfs/test_first_day_zfs.py."""

from __future__ import annotations

import glob
import re
import subprocess
from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import job_status, last_n, periodic, push_job, regex, run, sink_job, snap_config, snapshots, write_config

REPO = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000
HOUR = 3600


def _readme_configs(tmp_path: Path) -> list[Path]:
    blocks = re.findall(r"^```toml\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    paths = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme-{i}.toml"
        path.write_text(block)
        paths.append(path)
    return paths


def _shipped_jobs(tmp_path: Path) -> list[tuple[str, zrepl.JobConfig]]:
    out = []
    for path in [REPO / "zrepl.example.toml", *_readme_configs(tmp_path)]:
        out += [(f"{path.name}: {job.name}", job) for job in zrepl.load_config(str(path)).jobs]
    return out


def _rule_lists(job: zrepl.JobConfig) -> list[tuple[str, list]]:
    return {"snap": [("keep", job.keep)], "push": [("keep_sender", job.keep_sender),
                                                   ("keep_receiver", job.keep_receiver)],
            "pull": [("keep_sender", job.keep_sender), ("keep_receiver", job.keep_receiver)]}.get(job.type, [])


def _history(fs: str, prefix: str) -> list[zrepl.Version]:
    """Two months of hourly snapshots of the job, with the admin's own ones oldest and newest."""
    names = ["before-upgrade"] + [f"{prefix}{i:05d}" for i in range(60 * 24)] + ["manual-newest"]
    start = NOW - len(names) * HOUR
    return [zrepl.Version(fs, name, "snapshot", guid=i + 1, createtxg=i + 1, creation=start + i * HOUR)
            for i, name in enumerate(names)]


def test_every_shipped_config_keeps_the_snapshots_it_did_not_make(tmp_path):
    jobs = _shipped_jobs(tmp_path)
    assert len(jobs) >= 8  # the example's six and README's
    checked = 0
    for label, job in jobs:
        prefix = job.snapshotting.prefix or "zrepl_"
        for side, rules in _rule_lists(job):
            history = _history("tank/data", prefix)
            newest = history[-2]
            ctx = zrepl.PruneContext(cursor_guid=newest.guid, cursor_createtxg=newest.createtxg, now=NOW)
            decision = zrepl.decide_prune(history, rules, ctx)
            for foreign in ("tank/data@before-upgrade", "tank/data@manual-newest"):
                reasons = decision.keep.get(foreign, [])
                assert reasons, f"{label} {side} destroys {foreign}"
                assert not all(r.startswith("last_n") for r in reasons), f"{label} {side}: {foreign} only by last_n"
            checked += 1
    assert checked >= 8


def test_the_example_says_to_remove_jobs_and_never_snapshots_a_whole_pool_unpruned(tmp_path):
    text = (REPO / "zrepl.example.toml").read_text()
    assert "Remove the jobs you do not need" in text
    config = zrepl.load_config(str(REPO / "zrepl.example.toml"))
    assert config.global_.status_file == zrepl.GlobalConfig.status_file  # outside the 0700 runtime dir
    pruned_by_puller = any(j.type == "pull" and j.keep_sender for j in config.jobs)
    for job in config.jobs:
        if job.type == "snap" or job.type == "push":
            assert job.keep or job.keep_sender, f"{job.name} snapshots and never prunes"
        if job.type == "source":
            assert pruned_by_puller


def test_readme_cron_line_sets_path():
    readme = (REPO / "README.md").read_text()
    cron = readme[readme.index("/etc/cron.d/zrepl"):]
    assert re.search(r"^PATH=\S*/usr/sbin\S*\n\* \* \* \* \* root /usr/local/bin/zrepl.py run", cron, re.M)


@pytest.fixture
def with_foreign(tmp_path):
    fake = FakeZfs()
    fake.world.tree("src", "data @zrepl_1 @before-upgrade @zrepl_2 @zrepl_3")
    fake.world.tree("dst", "sink")
    return fake


def test_a_dry_run_summarizes_per_filesystem_then_reasons_with_v(with_foreign, tmp_path):
    cfg = write_config(tmp_path, push_job(filesystems={"src/data": True}, snapshotting=periodic(),
                                          keep_sender=[last_n(2)]), sink_job(root_fs="dst/sink"))
    plain = run("--config", cfg, "run", "--dry-run", "push", zfs=with_foreign)
    assert plain.code == 0, plain
    summary = next(ln for ln in plain.stdout.splitlines() if ln.strip().startswith("src/data:"))
    assert summary.strip() == "src/data: keep 2 (last_n 2), destroy 2 (1 foreign: not made by this job)"
    assert plain.stdout.count("would destroy") == 1  # one line: src/data@zrepl_1, @before-upgrade (foreign)
    assert "would destroy src/data@zrepl_1, @before-upgrade (foreign)" in plain.stdout
    assert "(-v: the rule that keeps each snapshot)" in plain.stdout
    verbose = run("--config", cfg, "run", "--dry-run", "-v", "push", zfs=with_foreign)
    assert "keep src/data@zrepl_3: last_n(count=2)" in verbose.stdout
    assert "would destroy src/data@before-upgrade (foreign: not made by this job)" in verbose.stdout
    assert snapshots(with_foreign, "src/data") == ["zrepl_1", "before-upgrade", "zrepl_2", "zrepl_3"]


def test_a_dry_run_of_many_victims_stays_short(tmp_path):
    fake = FakeZfs()
    fake.world.tree("tank", "a " + " ".join(f"@zrepl_{i:04d}" for i in range(300)))
    cfg = write_config(tmp_path, {"name": "a", "type": "snap", "filesystems": {"tank/a": True},
                                  "snapshotting": {"type": "manual"}, "pruning": {"keep": [last_n(5)]}})
    result = run("--config", cfg, "run", "--dry-run", zfs=fake)
    assert result.code == 0 and len(result.stdout.splitlines()) < 10, result.stdout
    assert "and 285 more (-v lists them)" in result.stdout


def test_a_dry_run_marks_foreign_snapshots_kept_only_by_last_n(with_foreign, tmp_path):
    cfg = write_config(tmp_path, push_job(filesystems={"src/data": True}, snapshotting=periodic(),
                                          keep_sender=[last_n(4)]), sink_job(root_fs="dst/sink"))
    result = run("--config", cfg, "run", "--dry-run", "-v", "push", zfs=with_foreign)
    assert ", 1 foreign kept only by last_n" in result.stdout
    assert "keep src/data@before-upgrade: last_n(count=4) (foreign: not made by this job, kept only by last_n)" \
        in result.stdout


def test_destroying_a_foreign_snapshot_is_a_warning_and_in_status_v(with_foreign, tmp_path):
    cfg = write_config(tmp_path, push_job(filesystems={"src/data": True}, snapshotting=periodic(),
                                          keep_sender=[regex("^zrepl_", negate=True), last_n(1, "^zrepl_")],
                                          keep_receiver=[last_n(1)], initial_replication="all"),
                       sink_job(root_fs="dst/sink"))
    result = run("--config", cfg, "run", "push", zfs=with_foreign)
    assert result.code == 0, result
    assert "WARNING" in result.stderr and "did not make" in result.stderr and "before-upgrade" in result.stderr
    assert job_status(cfg, "push")["pruning_receiver"]["foreign_destroyed"] == [
        "dst/sink/client1/src/data@before-upgrade"]
    status = run("--config", cfg, "status", "-v")
    assert "destroyed snapshots this job did not make (pruning_receiver): dst/sink/client1/src/data@before-upgrade" \
        in status.stdout


def test_configcheck_says_what_it_checked_unless_quiet(tmp_path):
    cfg = snap_config(tmp_path, {"home": "tank/home", "db": "tank/db"})
    assert run("--config", cfg, "configcheck").stdout == f"config OK: {cfg}: 2 job(s): home (snap), db (snap)\n"
    assert run("--config", cfg, "configcheck", "-q").stdout == ""


def test_zfs_abstractions_list_says_none_and_placeholder_lists_placeholders_only(tmp_path):
    cfg = snap_config(tmp_path, {"home": "tank/home"})
    fake = FakeZfs.with_filesystems("tank/home", "backup/sink/host/tank")
    fake.world.set("backup/sink/host", "zrepl:placeholder", "on")
    listed = run("--config", cfg, "zfs-abstractions", "list", zfs=fake)
    assert listed.code == 0 and listed.stdout.strip() == "none", listed
    placeholders = run("--config", cfg, "test", "placeholder", zfs=fake)
    assert placeholders.code == 0, placeholders
    assert "backup/sink/host" in placeholders.stdout and "tank/home" not in placeholders.stdout


def test_a_missing_root_fs_error_gives_the_create_line(tmp_path):
    fake = FakeZfs()
    fake.world.tree("src", "data @zrepl_1")
    fake.world.create("dst")
    cfg = write_config(tmp_path, push_job(filesystems={"src/data": True}), sink_job(root_fs="dst/sink"))
    result = run("--config", cfg, "run", "push", zfs=fake)
    assert result.code == 1
    assert "zfs create -p -o mountpoint=none dst/sink" in result.stderr + str(job_status(cfg, "push"))


def test_a_receiver_written_to_gets_the_rollback_command_and_no_retries(tmp_path):
    fake = FakeZfs()
    fake.world.tree("src", "data @zrepl_1")
    fake.world.tree("dst", "sink")
    cfg = write_config(tmp_path, push_job(filesystems={"src/data": True}), sink_job(root_fs="dst/sink"))
    assert run("--config", cfg, "run", "push", zfs=fake).code == 0
    fake.world.snapshot("src/data@zrepl_2")
    fake.world.write("dst/sink/client1/src/data")  # someone set a mountpoint and changed a file
    before = len(fake.calls_of("recv"))
    result = run("--config", cfg, "run", "push", zfs=fake)
    assert result.code == 1
    assert len(fake.calls_of("recv")) - before == 1  # permanent: not retried
    report = job_status(cfg, "push")["replication"]["filesystems"]["src/data"]
    assert "zfs rollback" in report["error"] and "modified" in report["error"]


OLD_PYTHONS = sorted({*glob.glob("/root/.pyenv/versions/3.[89].*/bin/python3"),
                      *glob.glob("/root/.pyenv/versions/3.10.*/bin/python3")})


@pytest.mark.skipif(not OLD_PYTHONS, reason="no Python older than 3.11 on this machine")
@pytest.mark.parametrize("python", OLD_PYTHONS)
def test_an_old_python_gets_one_line_not_a_traceback(python):
    proc = subprocess.run([python, str(REPO / "zrepl.py"), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert re.fullmatch(r"zrepl\.py needs Python 3\.11\+ \(found 3\.\d+\)\n", proc.stderr), proc.stderr
