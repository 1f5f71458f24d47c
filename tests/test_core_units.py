"""Host unit tests for the ZFS listing parser, error classification, locks, wakeups and status."""
import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zrepl  # noqa: E402

LISTING = "\n".join([
    "tank\tfilesystem\t111\t1\t1700000000\t-\t-\toff\t-\t-",
    "tank/with space\tfilesystem\t222\t5\t1700000100\t-\t-\toff\t-\t-",
    "tank/with space@b\tsnapshot\t333\t9\t1700000200\t0\t-\toff\t-\t-",
    "tank/with space@a\tsnapshot\t444\t12\t1700000300\t2\t-\toff\t-\t-",
    "tank/with space#zrepl_CURSOR_G_00000000000001bd_J_push\tbookmark\t445\t12\t1700000300\t-\t-\t-\t-\t-",
    "tank/vol\tvolume\t555\t20\t1700000400\t-\t1-abc-def\taes-256-gcm\ttank/vol\tavailable",
])


def test_parse_zfs_list_orders_by_createtxg_and_keeps_props():
    ds = zrepl.parse_zfs_list(LISTING)
    assert set(ds) == {"tank", "tank/with space", "tank/vol"}
    fs = ds["tank/with space"]
    assert [v.name for v in fs.snapshots()] == ["b", "a"]  # createtxg order, not name order
    assert fs.snapshots()[1].userrefs == 2
    assert fs.bookmarks()[0].full_name == "tank/with space#zrepl_CURSOR_G_00000000000001bd_J_push"
    vol = ds["tank/vol"]
    assert vol.type == "volume" and vol.props["receive_resume_token"] == "1-abc-def"
    assert "encryptionroot" not in ds["tank"].props  # "-" means unset
    # no user property is listed: a value with a TAB or NEWLINE cannot shift or forge rows
    assert not any(":" in p for p in zrepl.LIST_PROPERTIES)


def test_parse_zfs_list_skips_rows_zfs_cannot_print():
    forged = LISTING + "\ntank/with space@fake\tsnapshot\tnot-a-number\t99\t1700000900\t0\t-\toff\t-\t-"
    ds = zrepl.parse_zfs_list(forged)
    assert [v.name for v in ds["tank/with space"].snapshots()] == ["b", "a"]


class ScriptedZfs(zrepl.Zfs):
    """Answers `zfs get` with canned output per argv; records the calls."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.calls = answers, []

    def run(self, argv, *, check=True, timeout=None, input=None):
        import subprocess
        self.calls.append(list(argv))
        out = self.answers[tuple(argv[7:])]
        return subprocess.CompletedProcess(argv, 0, out, b"")



def test_local_placeholders_counts_only_a_locally_set_on():
    zfs = ScriptedZfs({("r/a", "r/b", "r/c"): b"r/a\tlocal\ton\nr/b\tinherited from r/a\ton\nr/c\tlocal\toff\n"})
    assert zfs.local_placeholders(["r/a", "r/b", "r/c"]) == {"r/a"}
    assert len(zfs.calls) == 1


def test_local_placeholders_distrusts_a_forged_line_and_asks_each_dataset():
    # r/evil's value contains a NEWLINE and forges a line claiming r/victim is a placeholder
    forged = b"r/evil\tlocal\tx\nr/victim\tlocal\ton\nr/victim\t-\t-\n"
    zfs = ScriptedZfs({("r/evil", "r/victim"): forged,
                       ("r/evil",): b"x\nr/victim\tlocal\ton\tlocal\n", ("r/victim",): b"-\t-\n"})
    assert zfs.local_placeholders(["r/evil", "r/victim"]) == set()
    assert [c[-1] for c in zfs.calls[1:]] == ["r/evil", "r/victim"]  # one by one after the forgery


def test_parse_zfs_list_rejects_wrong_column_count():
    with pytest.raises(ValueError):
        zrepl.parse_zfs_list("tank\tfilesystem\n")


@pytest.mark.parametrize("stderr,kind", [
    ("cannot open 'tank/x': dataset does not exist", "not-exist"),
    ("cannot destroy snapshot tank/x@a: dataset is busy", "busy"),
    ("cannot destroy snapshot tank/x@a: it's being held. Run 'zfs holds -r tank/x@a' to see holders.", "busy"),
    ("cannot create snapshot 'tank/x@a': out of space", "no-space"),
    ("cannot create 'tank/x': permission denied", "permission"),
    ("cannot create snapshot 'tank/x@a': dataset already exists", "exists"),
    ("something else entirely", "other"),
])
def test_classify_zfs_error(stderr, kind):
    assert zrepl.classify_zfs_error(stderr) == kind
    err = zrepl.ZfsError(["zfs", "destroy", "tank/x@a"], 1, stderr)
    assert err.kind == kind and "zfs destroy tank/x@a" in str(err) and stderr in str(err)


def test_list_roots_cover_filter_with_one_root_per_pool():
    f = zrepl.DatasetFilter({"tank/a<": True, "tank/b/c": True, "tank/a/x<": False, "zroot/home<": True})
    assert zrepl.list_roots_for_filter(f) == ["tank", "zroot"]
    assert zrepl.list_roots_for_filter(zrepl.DatasetFilter({"<": True, "tank/x<": False})) == []


def test_argv_builders_are_lists_with_exact_names():
    assert zrepl.destroy_snapshots_argv("tank/with space", ["a", "b c"]) == ["zfs", "destroy", "tank/with space@a,b c"]
    assert zrepl.snapshot_argv(["p/a@s", "p/b@s"]) == ["zfs", "snapshot", "p/a@s", "p/b@s"]
    assert zrepl.zfs_list_argv(["tank"])[:4] == ["zfs", "list", "-H", "-p"]


def test_zfs_layer_validates_names_before_spawning():
    z = zrepl.Zfs(zfs_bin="/nonexistent/zfs")
    with pytest.raises(ValueError):
        z.destroy_snapshots("tank/../etc", ["a"])
    with pytest.raises(ValueError):
        z.destroy_snapshots("tank/x", ["a,b"])  # a comma would smuggle a second snapshot into the batch
    assert z.counters.total == 0


def test_ring_buffer_keeps_tail():
    rb = zrepl.RingBuffer(10)
    rb.write(b"0123456789")
    rb.write(b"abc")
    # Exactly `capacity` bytes, like zrepl's hook log; the cut shows as "(...)" in place of the first bytes.
    assert rb.getvalue() == b"(...)89abc" and rb.text() == "(...)89abc"
    assert rb.dropped == 3


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


def test_status_store_atomic_and_merges_jobs(tmp_path):
    store = zrepl.StatusStore(str(tmp_path / "s" / "status.json"), str(tmp_path / "rt"))
    threads = [threading.Thread(target=store.publish, args=(f"job{i}", {"type": "snap", "n": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = json.loads((tmp_path / "s" / "status.json").read_text())
    assert sorted(doc["jobs"]) == [f"job{i}" for i in range(8)]
    assert not [p for p in os.listdir(tmp_path / "s") if p.startswith(".status.")]


def test_status_store_unreadable_is_error(tmp_path):
    path = tmp_path / "status.json"
    path.write_text("{not json")
    with pytest.raises(zrepl.ZreplError):
        zrepl.StatusStore(str(path), str(tmp_path / "rt")).read()


MON = zrepl.MonitoringConfig(warn_no_success_after=7200, crit_no_success_after=6 * 3600)
NOW = 1_800_000_000.0
NOW_ISO = zrepl.iso_time(NOW)


def _doc(result="ok", success_age=60.0, **extra):
    doc = {"type": "snap", "state": "idle",
           "last_run": {"start": zrepl.iso_time(NOW - 70), "end": zrepl.iso_time(NOW - 60), "result": result,
                        "failures": {"tank/x": "boom"} if result == "failed" else {}},
           "last_success": zrepl.iso_time(NOW - success_age) if success_age is not None else None}
    doc.update(extra)
    return doc


@pytest.mark.parametrize("doc,level", [
    (_doc(), 0),
    (_doc(success_age=3 * 3600), 1),
    (_doc(success_age=7 * 3600), 2),
    (_doc(result="failed"), 1),
    (_doc(result="failed", success_age=None), 2),
    (None, 1),
    (_doc(state="running", pid=2 ** 22 + 12345, activity={"step": "pruning"}), 1),
])
def test_evaluate_job_levels(doc, level):
    health = zrepl.evaluate_job("j", "snap", doc, NOW, MON)
    assert health.level == level, health.line


def test_source_with_manual_snapshotting_is_judged_by_its_clients():
    # it never runs: "no successful run ever" must not turn monitoring yellow
    assert zrepl.evaluate_status({"jobs": {}}, [("src", "source")], NOW, MON, passive=["src"])[0].level == 0
    connection = {"start": NOW_ISO, "end": NOW_ISO, "result": "ok"}
    ok = {"clients": {"backup": {"last_connection": connection, "last_success": NOW_ISO}}}
    health = zrepl.evaluate_status({"jobs": {"src": ok}}, [("src", "source")], NOW, MON, passive=["src"])[0]
    assert health.level == 0 and any("backup" in c for c in health.clients), health
    # a source that takes snapshots has runs of its own, and one that never ran is a problem
    assert zrepl.evaluate_status({"jobs": {}}, [("src", "source")], NOW, MON)[0].level == 1


def test_render_status_problems_first():
    health = zrepl.evaluate_status({"jobs": {"a": _doc(), "b": _doc(result="failed")}}, [("a", "snap"), ("b", "snap")],
                                   NOW, MON)
    text, worst = zrepl.render_status(health, {"a": "snap", "b": "snap"}, verbose=True)
    lines = text.splitlines()
    assert worst == 1 and lines[0].startswith("WARNING")
    assert lines[1].split()[:2] == ["WARNING", "b"]
    assert "tank/x: boom" in text


def test_mysql_dsn_translation_keeps_password_off_argv():
    argv, env = zrepl.mysql_client_argv("root:s3cret@unix(/run/mysqld/mysqld.sock)/")
    assert "--socket=/run/mysqld/mysqld.sock" in argv and env == {"MYSQL_PWD": "s3cret"}
    assert not any("s3cret" in a for a in argv)
    argv, env = zrepl.mysql_client_argv("backup@tcp(db.example:3307)/mydb")
    assert "--host=db.example" in argv and "--port=3307" in argv and argv[-1] == "mydb"
    with pytest.raises(ValueError):
        zrepl.mysql_client_argv("garbage")


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


def test_a_run_holding_its_job_far_too_long_is_critical():
    # a stalled peer (heartbeats only) must not keep a job "running" and green for ever (issue 8 item 12)
    doc = {"state": "running", "pid": os.getpid(), "activity": {"step": "pruning receiver"},
           "last_run": {"start": zrepl.iso_time(NOW - 7 * 3600), "end": None, "result": "running"},
           "last_success": zrepl.iso_time(NOW - 3600)}
    health = zrepl.evaluate_job("j", "push", doc, NOW, MON)
    assert health.level == zrepl.NAGIOS_CRITICAL and "still holds the job" in health.line
    doc["last_run"]["start"] = zrepl.iso_time(NOW - 60)
    assert zrepl.evaluate_job("j", "push", doc, NOW, MON).level == zrepl.NAGIOS_OK
