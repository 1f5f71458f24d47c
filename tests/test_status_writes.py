"""What a running job's status costs (issue 12: users with thousands of filesystems): the file is
rewritten a bounded number of times per run, not once or twice per filesystem, and each write is
cheap. Before, every step's start and end rewrote every filesystem's report through the pure-Python
JSON encoder: an initial push of 300 filesystems through the ZFS double took 30 CPU seconds, nearly
all of it status."""

from __future__ import annotations

import json
import time

import zrepl
from support import last_n, not_replicated, push_job, run, sink_job, write_config


def test_throttle_skips_calls_within_the_gap_and_lets_forced_ones_through():
    now = [100.0]
    throttle = zrepl.Throttle(min_gap=1.0, share=0.1, clock=lambda: now[0])
    calls: list[float] = []

    def fn() -> None:
        calls.append(now[0])
    assert throttle.call(fn)  # the first call always runs
    now[0] += 0.5
    assert not throttle.call(fn)  # within min_gap
    assert throttle.call(fn, force=True)  # forced: runs whatever the gap
    now[0] += 1.0
    assert throttle.call(fn)

    def slow() -> None:  # takes 2 s: the next may run only 20 s later (share 0.1)
        now[0] += 2.0
    now[0] += 1.0
    assert throttle.call(slow)  # 102.5 -> 104.5
    now[0] += 19.0
    assert not throttle.call(fn)
    now[0] += 1.0
    assert throttle.call(fn)
    assert calls == [100.0, 100.5, 101.5, 124.5]


def test_the_status_text_is_the_document_with_one_line_per_job():
    doc = {"version": 3, "updated": "2026-12-02T07:00:00Z",
           "jobs": {"push": {"state": "running", "replication": {"filesystems": {"a/b": {"bytes": 5}}}},
                    "sink": {"clients": {"c1": {"last_connection": {"result": "ok"}}}}},
           "configured": {"jobs": {"push": {"type": "push"}}}}
    text = zrepl.status_text(doc)
    assert json.loads(text) == doc and text.endswith("}\n")
    lines = text.splitlines()
    assert [ln.split(":")[0].strip() for ln in lines if ln.startswith('  "')] == ['"push"', '"sink"']
    assert json.loads(zrepl.status_text({"version": 3, "jobs": {}})) == {"version": 3, "jobs": {}}


def test_a_filesystem_report_serialises_as_asdict_did_with_its_own_copy_of_the_details():
    rep = zrepl.FilesystemReport(sender_fs="src/a", state=zrepl.FilesystemState.STEP_ERROR,
                                 error_details={"command": ["zfs", "recv"], "nested": {"k": [1, 2]}})
    import dataclasses
    assert rep.to_json() == dataclasses.asdict(rep)
    doc = rep.to_json()
    rep.error_details["nested"]["k"].append(3)
    assert doc["error_details"]["nested"]["k"] == [1, 2]


def test_an_initial_push_of_many_filesystems_writes_the_status_a_bounded_number_of_times(fake_zfs, tmp_path,
                                                                                           monkeypatch):
    n = 120
    fake_zfs.world.tree("src", "data")
    fake_zfs.world.tree("dst", "sink")
    fake_zfs.world.tree("src", "\n".join(f"data/fs{i:03d} @s" for i in range(n)))
    writes: list[float] = []
    original = zrepl.StatusStore._update

    def counting(store, *args, **kwargs):
        writes.append(time.monotonic())
        return original(store, *args, **kwargs)
    monkeypatch.setattr(zrepl.StatusStore, "_update", counting)
    cfg = write_config(tmp_path, push_job(filesystems={"src/data<": True}, keep_sender=[not_replicated(), last_n(3)],
                                          keep_receiver=[last_n(3)]), sink_job(root_fs="dst/sink"))
    start = time.monotonic()
    assert run("--config", cfg, "run", "push", zfs=fake_zfs).code == 0
    wall = time.monotonic() - start
    assert all(fake_zfs.world.snapshots(f"dst/sink/client1/src/data/fs{i:03d}") == ["s"] for i in range(n))
    # One per step's start and end was 2 x 120 and more. Now: the run's own activity changes, and
    # during replication at most one a second plus the 2 s ticker's (a slow machine runs longer).
    assert len(writes) <= 20 + 2 * wall, (len(writes), wall)
    doc = json.loads((tmp_path / "status.json").read_text())["jobs"]["push"]
    reports = doc["replication"]["filesystems"]
    assert len(reports) == n + 1 and all(r["state"] == "done" for r in reports.values())  # the last one is complete
