"""Pull from a local source, host-tested through the ZFS double and the local transport: the
source's sender is served in-process, the pull job receives below its root_fs and prunes both
sides. Asserts the argv zrepl.py runs and the world it leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

import zrepl
from fakezfs import FakeZfs
from support import (changes, fs_status, job_status, last_n, not_replicated, pull_job, real_sends, run, source_job,
                     write_config)

SRC, TARGET = "prod/data", "backup/pulled/prod/data"


@pytest.fixture
def world(fake_zfs: FakeZfs):
    w = fake_zfs.world
    w.tree("prod", "data @a @b\ndata/child @x")
    w.tree("backup", "pulled")
    return w


def config(tmp_path: Path, **pull_keys) -> Path:
    return write_config(tmp_path, source_job(filesystems={"prod/data<": True}),
                        pull_job(root_fs="backup/pulled", **pull_keys))


def pull(fake: FakeZfs, cfg: Path, *extra: str):
    return run("--config", cfg, "run", *extra, "pull", zfs=fake)


def test_initial_pull_receives_below_root_fs_with_the_sources_cursor_and_the_pulls_hold(fake_zfs, world, tmp_path):
    result = pull(fake_zfs, config(tmp_path))
    assert result.code == 0, result
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "prod/data@b"], ["send", "-v", "-P",
                                                                                 "prod/data/child@x"]]
    assert world.snapshots(TARGET) == ["b"] and world.guid(f"{TARGET}@b") == world.guid("prod/data@b")
    assert world.property("backup/pulled/prod", "zrepl:placeholder") == ("on", "local")
    # the sending job's abstractions carry the SOURCE job's name, the receiving side's the pull's
    assert world.bookmarks(SRC) == [zrepl.cursor_bookmark_name(world.guid("prod/data@b"), "source")]
    assert world.holds(f"{TARGET}@b") == {"zrepl_last_received_J_pull"}
    assert world.holds("prod/data@b") == set()
    assert fs_status(tmp_path / "zrepl.toml", "pull", SRC)["state"] == "done"


def test_incremental_pull_sends_new_snapshots_in_one_I_stream(fake_zfs, world, tmp_path):
    cfg = config(tmp_path)
    assert pull(fake_zfs, cfg).code == 0
    world.tree("prod", "data @c @d")
    fake_zfs.calls.clear()
    assert pull(fake_zfs, cfg).code == 0
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "-I", "prod/data@b", "prod/data@d"]]
    assert world.snapshots(TARGET) == ["b", "c", "d"]
    assert world.bookmarks(SRC) == [zrepl.cursor_bookmark_name(world.guid("prod/data@d"), "source")]


def test_a_cut_pull_stream_resumes_from_the_token_on_the_next_run(fake_zfs, world, tmp_path):
    cfg = config(tmp_path)
    assert pull(fake_zfs, cfg).code == 0
    world.write(SRC, 1 << 20)
    world.snapshot("prod/data@c")
    fake_zfs.cut("send", 200_000, match="send -v -P -i")
    fake_zfs.fail("send", match="send -v -P -t")
    assert pull(fake_zfs, cfg).code == 1
    token = world.resume_token(TARGET)
    assert token
    fake_zfs.clear()
    fake_zfs.calls.clear()
    result = pull(fake_zfs, cfg)
    assert result.code == 0, result
    assert real_sends(fake_zfs.calls) == [["send", "-v", "-P", "-t", token]]
    assert world.snapshots(TARGET) == ["b", "c"] and world.resume_token(TARGET) is None


def test_a_pull_never_receives_over_a_dataset_with_data(fake_zfs, world, tmp_path):
    world.tree("backup", "pulled/prod/data")
    world.write(TARGET)
    result = pull(fake_zfs, config(tmp_path))
    assert result.code == 1
    assert [c for c in changes(fake_zfs.calls) if c[0] == "recv" and c[-1] == TARGET] == []
    assert fs_status(tmp_path / "zrepl.toml", "pull", SRC)["state"] == "planning-error"


def test_a_pull_that_replicated_prunes_the_source_through_the_connection(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(1)], keep_receiver=[last_n(1)],
                 initial_replication="all")
    result = pull(fake_zfs, cfg)
    assert result.code == 0, result
    assert world.snapshots(SRC) == ["b"] and world.snapshots(TARGET) == ["b"]
    assert ["destroy", "prod/data@a"] in changes(fake_zfs.calls)
    assert ["destroy", f"{TARGET}@a"] in changes(fake_zfs.calls)
    doc = job_status(cfg, "pull")
    assert doc["pruning_sender"]["destroyed"] == ["prod/data@a"]
    assert doc["pruning_receiver"]["destroyed"] == [f"{TARGET}@a"]
    assert world.bookmarks(SRC) == [zrepl.cursor_bookmark_name(world.guid("prod/data@b"), "source")]


def test_a_pull_with_nothing_to_do_lists_each_side_once(fake_zfs, world, tmp_path):
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(5)], keep_receiver=[last_n(5)])
    assert pull(fake_zfs, cfg).code == 0
    fake_zfs.calls.clear()
    assert pull(fake_zfs, cfg).code == 0
    assert [c[1] for c in fake_zfs.calls] == ["list", "list"]


def test_a_pull_with_nothing_to_replicate_still_prunes_the_source(fake_zfs, world, tmp_path):
    assert pull(fake_zfs, config(tmp_path, keep_sender=[not_replicated(), last_n(3)])).code == 0
    world.tree("prod", "data @c")
    assert pull(fake_zfs, config(tmp_path, keep_sender=[not_replicated(), last_n(3)])).code == 0
    assert world.snapshots(SRC) == ["a", "b", "c"]
    # nothing new to replicate; the keep rules now keep less: the source must be pruned
    cfg = config(tmp_path, keep_sender=[not_replicated(), last_n(1)])
    fake_zfs.calls.clear()
    result = pull(fake_zfs, cfg)
    assert result.code == 0, result
    assert real_sends(fake_zfs.calls) == []
    assert world.snapshots(SRC) == ["c"]
    assert job_status(cfg, "pull")["pruning_sender"]["destroyed"] == ["prod/data@a", "prod/data@b"]
