"""The status store (atomic writes, merged jobs) and its evaluation into Nagios levels and text."""
import json
import os
import threading

import pytest

import zrepl


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


def test_a_run_holding_its_job_far_too_long_is_critical():
    # a stalled peer (heartbeats only) must not keep a job "running" and green for ever (issue 8 item 12)
    doc = {"state": "running", "pid": os.getpid(), "activity": {"step": "pruning receiver"},
           "last_run": {"start": zrepl.iso_time(NOW - 7 * 3600), "end": None, "result": "running"},
           "last_success": zrepl.iso_time(NOW - 3600)}
    health = zrepl.evaluate_job("j", "push", doc, NOW, MON)
    assert health.level == zrepl.NAGIOS_CRITICAL and "still holds the job" in health.line
    doc["last_run"]["start"] = zrepl.iso_time(NOW - 60)
    assert zrepl.evaluate_job("j", "push", doc, NOW, MON).level == zrepl.NAGIOS_OK
