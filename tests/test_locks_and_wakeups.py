"""Job locks and wakeup requests: one run per job at a time, and a wakeup during a run causes
exactly one more pass (no wakeup is lost)."""
import os

import pytest

import zrepl


def test_job_lock_is_exclusive(tmp_path):
    a, b = zrepl.JobLock(str(tmp_path / "rt"), "j"), zrepl.JobLock(str(tmp_path / "rt"), "j")
    assert a.try_acquire()
    assert not b.try_acquire()
    assert b.holder_pid() == os.getpid()
    assert oct(os.stat(tmp_path / "rt").st_mode & 0o777) == "0o700"
    assert oct(os.stat(a.path).st_mode & 0o777) == "0o600"
    a.release()
    assert b.try_acquire()
    b.release()


class CountingRunner(zrepl.JobRunner):
    """A JobRunner whose pass only counts, to test the lock/wakeup protocol without ZFS."""

    def __init__(self, config, job, during_pass=None):
        super().__init__(config, job, zfs=None)
        self.passes = 0
        self.during_pass = during_pass

    def run_pass(self):
        self.passes += 1
        if self.during_pass and self.passes == 1:
            self.during_pass()
        return zrepl.PassResult()


def _config(tmp_path):
    text = f"""
[global]
runtime_dir = "{tmp_path}/rt"
status_file = "{tmp_path}/status/status.json"
[[jobs]]
name = "j"
type = "snap"
filesystems = {{ "tank<" = true }}
snapshotting = {{ type = "manual" }}
pruning = {{ keep = [] }}
"""
    cfg = zrepl.parse_config(text)
    return cfg, cfg.job("j")


def test_wakeup_during_run_causes_exactly_one_more_pass(tmp_path):
    cfg, job = _config(tmp_path)
    rt = cfg.global_.runtime_dir

    def waker():
        # What `zrepl.py wakeup j` does while the run holds the lock: post, then fail to lock.
        zrepl.WakeupRequest(rt, "j").post()
        assert zrepl.JobRunner(cfg, job, zfs=None).run() is None

    runner = CountingRunner(cfg, job, during_pass=waker)
    assert runner.run() == 0
    assert runner.passes == 2
    assert not zrepl.WakeupRequest(rt, "j").pending()


def test_busy_run_returns_none(tmp_path):
    cfg, job = _config(tmp_path)
    lock = zrepl.JobLock(cfg.global_.runtime_dir, "j")
    assert lock.try_acquire()
    runner = CountingRunner(cfg, job)
    assert runner.run() is None and runner.passes == 0
    lock.release()


# ---- lock name spaces and the runtime dir (issue 8 items 5 and 13) ----

def test_job_client_and_status_locks_live_in_disjoint_name_spaces(tmp_path):
    rt = str(tmp_path / "rt")
    paths = {zrepl.JobLock(rt, "status").path, zrepl.JobLock(rt, "a.client.b").path,
             zrepl.JobLock.for_client(rt, "a", "b").path, os.path.join(rt, "status.lock"),
             zrepl.WakeupRequest(rt, "a.client.b").path}
    assert len(paths) == 5
    status_job = zrepl.JobLock(rt, "status")
    assert status_job.try_acquire()  # a job named "status" no longer takes the status writer's lock
    store = zrepl.StatusStore(str(tmp_path / "status.json"), rt)
    store.publish("status", {"type": "snap", "state": "idle"})
    assert store.read()["jobs"]["status"]["state"] == "idle"
    status_job.release()


def test_an_unusable_runtime_dir_is_a_setup_error_naming_the_path(tmp_path):
    plain_file = tmp_path / "file"
    plain_file.write_text("")
    with pytest.raises(zrepl.SetupError, match="is not a directory"):
        zrepl.JobLock(str(plain_file), "j").try_acquire()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(zrepl.SetupError, match="chmod 700"):
        zrepl.JobLock(str(shared), "j").try_acquire()
    rt = tmp_path / "rt"
    (rt / "jobs").mkdir(parents=True, mode=0o700)
    (rt / "jobs" / "j.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(zrepl.SetupError, match="is a symlink"):
        zrepl.JobLock(str(rt), "j").try_acquire()
    assert not (tmp_path / "victim").exists()
    (rt / "jobs" / "k.lock").mkdir()
    with pytest.raises(zrepl.SetupError, match="is a directory"):
        zrepl.JobLock(str(rt), "k").try_acquire()
