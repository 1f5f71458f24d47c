"""snap jobs on real OpenZFS: atomic snapshots, due-ness, batched pruning, hooks, status, locks."""
from __future__ import annotations

import json
import subprocess
import threading
import time

from support import last_n, periodic, regex, snap_job, snapshots, status, write_config
from zfstest import ZFS, exists, list_all, run, zfs, zrepl_argv, zrepl_env

PERIODIC = periodic("1h")


def test_one_snapshot_command_per_pool_same_name_same_txg(make_pool, zfs_tree, zfs_shim, tmp_path):
    a, b = make_pool("a"), make_pool("b")
    zfs_tree(a, "x\nx/child one\ny")
    zfs_tree(b, "z")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{a}<": True, f"{b}/z": True}, snapshotting=PERIODIC))
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 0, proc.stderr
    assert zfs_shim.count("snapshot") == 2  # one per pool, not one per filesystem
    rows = [r for r in list_all(a) + list_all(b) if r.type == "snapshot"]
    names = {r.name.split("@")[1] for r in rows}
    assert len(names) == 1 and next(iter(names)).startswith("zrepl_")
    assert {r.name.split("@")[0] for r in rows} == {a, f"{a}/x", f"{a}/x/child one", f"{a}/y", f"{b}/z"}
    txgs_a = {r.createtxg for r in rows if r.name.startswith(a + "/") or r.name.startswith(a + "@")}
    assert len(txgs_a) == 1  # atomic: one transaction group for the whole pool


def test_listing_spawns_do_not_grow_with_datasets(pool, zfs_tree, zfs_shim, tmp_path):
    zfs_tree(pool, "\n".join(f"fs{i}" for i in range(12)))
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}<": True}, snapshotting=PERIODIC, keep=[last_n(1)]))
    assert zfs_shim.run_zrepl("--config", cfg, "run").returncode == 0
    first = {v: zfs_shim.count(v) for v in ("list", "snapshot", "destroy")}
    zfs_shim.reset_log()
    assert zfs_shim.run_zrepl("--config", cfg, "run").returncode == 0  # not due: nothing to do
    # first run: listing, one snapshot command, re-listing so pruning sees the new snapshots
    assert first == {"list": 2, "snapshot": 1, "destroy": 0}
    assert zfs_shim.count() == 1 and zfs_shim.count("list") == 1


def test_due_ness_never_twice_and_catch_up_once(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "fs")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True},
                                          snapshotting=periodic("30s", prefix="auto_",
                                                                timestamp_format="unix-seconds")))
    # Each pair of runs must fit in one interval: 30 s is 10x a run under emulation.
    assert run_zrepl("--config", cfg, "run").returncode == 0
    assert run_zrepl("--config", cfg, "run").returncode == 0
    assert len(snapshots(ZFS, f"{pool}/fs")) == 1  # second run: not due yet
    time.sleep(65)  # two intervals missed
    assert run_zrepl("--config", cfg, "run").returncode == 0
    assert run_zrepl("--config", cfg, "run").returncode == 0
    assert len(snapshots(ZFS, f"{pool}/fs")) == 2  # caught up once, not three times
    doc = status(cfg)["jobs"]["s"]
    assert doc["next_snapshot_due"] is not None
    assert doc["filesystems"][f"{pool}/fs"]["last_snapshot"] == f"{pool}/fs@{snapshots(ZFS, pool + '/fs')[-1]}"


def test_other_prefixes_do_not_count_for_due_ness(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "fs @manual-now")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True}, snapshotting=PERIODIC))
    assert run_zrepl("--config", cfg, "run").returncode == 0
    assert len(snapshots(ZFS, f"{pool}/fs")) == 2


def test_batched_pruning_skips_held_snapshot_and_reports_tag(pool, zfs_tree, zfs_shim, tmp_path):
    # created in reverse name order: createtxg, not names, decides what "newest" means
    zfs_tree(pool, "fs @zrepl_f @zrepl_e @zrepl_d @zrepl_c @zrepl_b @zrepl_a @other")
    zfs("hold", "keepme", f"{pool}/fs@zrepl_d")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True},
                                          keep=[last_n(2, regex="^zrepl_"), regex("^zrepl_", negate=True)]))
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, f"{pool}/fs") == ["zrepl_d", "zrepl_b", "zrepl_a", "other"]
    assert zfs_shim.count("destroy") == 1  # one batch for the dataset
    doc = status(cfg)["jobs"]["s"]
    assert doc["pruning"]["held"] == {f"{pool}/fs@zrepl_d": ["keepme"]}
    assert sorted(doc["pruning"]["destroyed"]) == sorted(f"{pool}/fs@zrepl_{x}" for x in "fec")
    zfs("release", "keepme", f"{pool}/fs@zrepl_d")


def test_failed_batch_is_bisected(pool, zfs_tree, zfs_shim, tmp_path):
    zfs_tree(pool, "fs @s1 @s2 @s3 @s4 @keep")
    zfs_shim.fail("destroy", stderr="cannot destroy snapshots: dataset is busy\n", times=1)
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True}, keep=[regex("^keep$")]))
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 0, proc.stderr
    assert snapshots(ZFS, f"{pool}/fs") == ["keep"]
    assert zfs_shim.count("destroy") == 3  # the failed batch, then its two halves


def test_undestroyable_snapshot_fails_the_run_but_not_the_others(pool, zfs_tree, zfs_shim, tmp_path):
    zfs_tree(pool, "a @s1 @s2\nb @s1 @s2")
    zfs_shim.fail("destroy", stderr="cannot destroy: permission denied\n", match=f"{pool}/a@")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}<": True}, keep=[last_n(1)]))
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 1
    assert snapshots(ZFS, f"{pool}/b") == ["s2"]
    assert snapshots(ZFS, f"{pool}/a") == ["s1", "s2"]
    doc = status(cfg)["jobs"]["s"]
    assert doc["last_run"]["result"] == "failed"
    assert f"{pool}/a@s1" in doc["pruning"]["errors"]
    st = zfs_shim.run_zrepl("--config", cfg, "status", "-v")
    assert st.returncode == 2 and st.stdout.startswith("CRITICAL")  # failed and never succeeded


def test_dry_run_changes_nothing_and_explains(pool, zfs_tree, zfs_shim, tmp_path):
    zfs_tree(pool, "fs @zrepl_1 @zrepl_2 @zrepl_3")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True},
                                          snapshotting=periodic("1h", prefix="auto_"),
                                          keep=[last_n(1, regex="^zrepl_"), regex("^auto_")]))
    before = list_all(pool)
    proc = zfs_shim.run_zrepl("--config", cfg, "run", "--dry-run", "-v", "s")  # -v: the rule keeping each
    assert proc.returncode == 0, proc.stderr
    assert list_all(pool) == before
    assert zfs_shim.count("snapshot") == 0 and zfs_shim.count("destroy") == 0
    out = proc.stdout
    assert "would snapshot @auto_" in out
    assert f"would destroy {pool}/fs@zrepl_1" in out and f"would destroy {pool}/fs@zrepl_2" in out
    assert f"keep {pool}/fs@zrepl_3: last_n(count=1" in out
    assert f"keep {pool}/fs@auto_" in out and "regex(regex='^auto_'" in out
    assert not (tmp_path / "status.json").exists()


def test_concurrent_runs_one_works_other_reports_busy(pool, zfs_tree, zfs_shim, tmp_path):
    zfs_tree(pool, "fs")
    zfs_shim.delay("snapshot", 15)
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True}, snapshotting=PERIODIC))
    first = subprocess.Popen(zrepl_argv("--config", cfg, "run", "s"), env=zrepl_env(zfs_shim.env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while zfs_shim.count("snapshot") == 0 and time.time() < deadline:
        time.sleep(0.1)
    second = zfs_shim.run_zrepl("--config", cfg, "--log-level", "info", "run", "s")  # busy is INFO (cron)
    assert second.returncode == 0 and "busy" in second.stderr, second
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert len(snapshots(ZFS, f"{pool}/fs")) == 1


def test_wakeup_runs_now_or_makes_the_running_job_pass_again(pool, zfs_tree, zfs_shim, tmp_path):
    zfs_tree(pool, "fs")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True}))
    idle = zfs_shim.run_zrepl("--config", cfg, "wakeup", "s")
    assert idle.returncode == 0 and zfs_shim.count("list") == 1  # ran in the foreground
    zfs_shim.reset_log()
    zfs_shim.delay("list", 15, times=1)
    first = subprocess.Popen(zrepl_argv("--config", cfg, "run", "s"), env=zrepl_env(zfs_shim.env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while zfs_shim.count("list") == 0 and time.time() < deadline:
        time.sleep(0.1)
    busy = zfs_shim.run_zrepl("--config", cfg, "wakeup", "s")
    assert busy.returncode == 0 and "once more" in busy.stdout
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert zfs_shim.count("list") == 2  # the running job did one more pass


def test_command_hooks_stack_model(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "good\nbad")
    trace = tmp_path / "trace"
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\necho \"first $ZREPL_HOOKTYPE $ZREPL_FS $ZREPL_SNAPNAME dry=$ZREPL_DRYRUN "
                      f"t=$ZREPL_TIMEOUT\" >> {trace}\necho hello-from-hook\n")
    failing = tmp_path / "fail.sh"
    failing.write_text(f"#!/bin/sh\necho \"fail $ZREPL_HOOKTYPE $ZREPL_FS\" >> {trace}\n"
                       f"[ \"$ZREPL_FS\" = \"{pool}/bad\" ] && {{ echo nope >&2; exit 3; }}\nexit 0\n")
    third = tmp_path / "third.sh"
    third.write_text(f"#!/bin/sh\necho \"third $ZREPL_HOOKTYPE $ZREPL_FS\" >> {trace}\n")
    for p in (script, failing, third):
        p.chmod(0o755)
    hooks = [{"type": "command", "path": str(script), "timeout": "20s"},
             {"type": "command", "path": str(failing), "err_is_fatal": True},
             {"type": "command", "path": str(third)}]
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}<": True, pool: False},
                                          snapshotting=periodic("1h", prefix="h_", hooks=hooks)))
    proc = run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 1  # bad was not snapshotted
    assert len(snapshots(ZFS, f"{pool}/good")) == 1 and snapshots(ZFS, f"{pool}/bad") == []
    lines = trace.read_text().splitlines()
    snap = snapshots(ZFS, f"{pool}/good")[0]
    assert f"first pre_snapshot {pool}/good {snap} dry= t=20" in lines

    def sequence(fs):
        return [tuple(ln.split()[:2]) for ln in lines if ln.split()[2] == fs]

    # bad: first pre, failing pre, then NO third pre, NO snapshot, and only the first hook's post
    assert sequence(f"{pool}/bad") == [("first", "pre_snapshot"), ("fail", "pre_snapshot"),
                                       ("first", "post_snapshot")]
    # good: pres in config order, posts in reverse
    assert sequence(f"{pool}/good") == [("first", "pre_snapshot"), ("fail", "pre_snapshot"),
                                        ("third", "pre_snapshot"), ("third", "post_snapshot"),
                                        ("fail", "post_snapshot"), ("first", "post_snapshot")]
    doc = status(cfg)["jobs"]["s"]
    assert any("hello-from-hook" in h["output"] for h in doc["hooks"])
    assert any(not h["ok"] and "nope" in h["output"] for h in doc["hooks"])
    assert "err_is_fatal" in doc["filesystems"][f"{pool}/bad"]["snapshot_error"]


def test_command_hook_timeout_kills(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "fs")
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\n[ \"$ZREPL_HOOKTYPE\" = pre_snapshot ] && sleep 60\nexit 0\n")
    script.chmod(0o755)
    hooks = [{"type": "command", "path": str(script), "timeout": "1s"}]
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True},
                                          snapshotting=periodic("1h", hooks=hooks)))
    started = time.time()
    proc = run_zrepl("--config", cfg, "run", "s")
    assert time.time() - started < 30
    # err_is_fatal defaults to false: the snapshot is still taken, but the run is not OK (the hook
    # is what makes the snapshot consistent)
    assert proc.returncode == 1 and "pre-snapshot hook" in proc.stderr, proc.stderr
    assert len(snapshots(ZFS, f"{pool}/fs")) == 1
    hook = status(cfg)["jobs"]["s"]["hooks"][0]
    assert not hook["ok"] and "timed out" in hook["error"]


def test_postgres_checkpoint_hook(pool, zfs_tree, run_zrepl, postgres_server, tmp_path):
    zfs_tree(pool, "pg")
    count_sql = "SELECT checkpoints_req FROM pg_stat_bgwriter"
    before = int(run(postgres_server.psql_argv(count_sql)).stdout.strip())
    hooks = [{"type": "postgres-checkpoint", "dsn": postgres_server.dsn, "filesystems": {f"{pool}/pg": True},
              "err_is_fatal": True}]
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/pg": True},
                                          snapshotting=periodic("1h", hooks=hooks)))
    proc = run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 0, proc.stderr
    after = int(run(postgres_server.psql_argv(count_sql)).stdout.strip())
    assert after == before + 1
    assert len(snapshots(ZFS, f"{pool}/pg")) == 1


def test_postgres_checkpoint_failure_is_fatal_when_asked(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "pg")
    hooks = [{"type": "postgres-checkpoint", "dsn": "host=/nonexistent dbname=postgres", "timeout": "10s",
              "filesystems": {f"{pool}/pg": True}, "err_is_fatal": True}]
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/pg": True},
                                          snapshotting=periodic("1h", hooks=hooks)))
    proc = run_zrepl("--config", cfg, "run", "s")
    assert proc.returncode == 1
    assert snapshots(ZFS, f"{pool}/pg") == []


def test_mysql_lock_held_while_snapshot_is_taken(pool, zfs_tree, zfs_shim, mariadb_server, tmp_path):
    run(mariadb_server.mysql_argv("CREATE DATABASE t; CREATE TABLE t.x (v INT) ENGINE=InnoDB;"))
    zfs_tree(pool, "db")
    zfs_shim.delay("snapshot", 4)
    hooks = [{"type": "mysql-lock-tables", "dsn": mariadb_server.dsn, "filesystems": {f"{pool}/db": True},
              "err_is_fatal": True}]
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/db": True},
                                          snapshotting=periodic("1h", hooks=hooks)))
    job = subprocess.Popen(zrepl_argv("--config", cfg, "run", "s"), env=zrepl_env(zfs_shim.env),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while zfs_shim.count("snapshot") == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert zfs_shim.count("snapshot") == 1
    snapshot_started = zfs_shim.calls("snapshot")[0].time
    done: dict[str, float] = {}

    def writer():
        run(mariadb_server.mysql_argv("INSERT INTO t.x VALUES (1)"), timeout=60)
        done["at"] = time.time()

    t = threading.Thread(target=writer)
    t.start()
    out, err = job.communicate(timeout=120)
    job_ended = time.time()
    t.join(timeout=60)
    assert job.returncode == 0, err
    assert "at" in done
    # the write was blocked by the lock for the whole (4 s) snapshot, and went through after UNLOCK
    assert done["at"] - snapshot_started >= 3.5
    assert done["at"] <= job_ended + 1
    assert run(mariadb_server.mysql_argv("SELECT COUNT(*) FROM t.x")).stdout.split()[-1] == "1"
    assert len(snapshots(ZFS, f"{pool}/db")) == 1
    hooks_doc = status(cfg)["jobs"]["s"]["hooks"]
    assert [(h["edge"], h["ok"]) for h in hooks_doc] == [("pre", True), ("post", True)]


def test_status_command_reports_ok_and_json(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "fs")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/fs": True}, snapshotting=PERIODIC))
    never = run_zrepl("--config", cfg, "status")  # a fresh install pages nobody (README: status levels)
    assert never.returncode == 0 and "has not run yet" in never.stdout, never.stdout
    assert run_zrepl("--config", cfg, "run").returncode == 0
    st = run_zrepl("--config", cfg, "status", "-v")
    assert st.returncode == 0 and st.stdout.startswith("OK")
    assert f"{pool}/fs: last snapshot {pool}/fs@zrepl_" in st.stdout
    raw = json.loads(run_zrepl("--config", cfg, "status", "--json").stdout)
    assert raw["jobs"]["s"]["last_run"]["result"] == "ok"
    assert exists(raw["jobs"]["s"]["filesystems"][f"{pool}/fs"]["last_snapshot"])


def test_test_filesystems_all_lists_real_datasets(pool, zfs_tree, run_zrepl, tmp_path):
    zfs_tree(pool, "foo\nfoo/bar\nfoobar")
    cfg = write_config(tmp_path, snap_job("s", filesystems={f"{pool}/foo<": True}))
    proc = run_zrepl("--config", cfg, "test", "filesystems", "--job", "s", "--all")
    assert proc.returncode == 0, proc.stderr
    verdicts = dict((ln.split("\t")[1], ln.split("\t")[0]) for ln in proc.stdout.splitlines())
    assert verdicts[f"{pool}/foo"] == "ACCEPT" and verdicts[f"{pool}/foo/bar"] == "ACCEPT"
    assert verdicts[f"{pool}/foobar"] == "REJECT" and verdicts[pool] == "REJECT"
