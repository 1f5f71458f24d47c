"""Metrics on real OpenZFS: the textfile a push run writes carries what ZFS says (snapshot creation
times, stream sizes, zfs command runtimes), and the freshness checks judge the real creation times.
promtool checks the text when the guest has it (the host suite always checks it: test_metrics.py)."""
from __future__ import annotations

import re
import shutil
import subprocess

from repltest import push_sink
from support import status, write_config
from zfstest import get, zfs


def metric(text: str, name: str, labels: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(m[1]) if m else None


def test_a_push_run_writes_the_textfile_with_real_creation_times_and_bytes(make_pool, zfs_tree, run_zrepl, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a")
    zfs_tree(dst, "sink")
    textfile = tmp_path / "zrepl.prom"
    cfg = write_config(tmp_path, *push_sink(src, dst, filesystems={f"{src}/data": True}),
                       global_={"monitoring": [{"type": "textfile", "path": str(textfile)}],
                                "status": {"crit_snapshot_older_than": "1d", "crit_received_older_than": "1d"}})
    proc = run_zrepl("--config", cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    text = textfile.read_text()
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
        assert check.returncode in (0, 3), check.stdout + check.stderr
    fs = f'zrepl_job="push",filesystem="{src}/data"'
    created = float(get(f"{src}/data@a", "creation"))
    assert metric(text, "zrepl_replication_last_replicated_timestamp_seconds", fs) == created
    assert metric(text, "zrepl_snapshot_newest_timestamp_seconds", fs) == created
    assert metric(text, "zrepl_replication_lag_seconds", fs) == 0
    report = status(cfg)["jobs"]["push"]["replication"]["filesystems"][f"{src}/data"]
    assert metric(text, "zrepl_replication_bytes_replicated", fs) == report["bytes_total"] > 0
    assert metric(text, "zrepl_zfscmd_runtime_count", 'jobid="push",zfsbinary="zfs",zfsverb="list"') >= 1
    assert run_zrepl("--config", cfg, "status").returncode == 0  # fresh on both sides
    zfs("snapshot", f"{src}/data@b")
    ok = run_zrepl("--config", cfg, "status", "--json")
    assert ok.returncode == 0, ok.stdout  # @b is new; the receiver's @a is minutes old, not a day
