"""A full send starts only once the receiver is set up (placeholders made, target checked): while
`zfs send` waits on a full pipe, every zfs command the receiver runs counts against the stream."""
from __future__ import annotations

from pathlib import Path

from support import push_job, sink_job, write_config
from zfstest import guid


def config(tmp_path: Path, src: str, dst: str) -> Path:
    return write_config(tmp_path, push_job(filesystems={f"{src}/data<": True}, client_identity="c"),
                        sink_job(root_fs=f"{dst}/sink"))


def test_receiver_setup_happens_before_zfs_send_starts(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a\ndata/child @b")
    zfs_tree(dst, "sink")
    proc = zfs_shim.run_zrepl("--config", config(tmp_path, src, dst), "run", "push")
    assert proc.returncode == 0, proc.stderr
    target = f"{dst}/sink/c/{src}/data"
    assert guid(f"{target}@a") == guid(f"{src}/data@a")
    assert guid(f"{target}/child@b") == guid(f"{src}/data/child@b")

    calls = zfs_shim.calls()
    sends = [i for i, c in enumerate(calls) if c.verb == "send" and "-n" not in c.argv]
    assert len(sends) == 2
    # the placeholders c and c/<pool>, before the first stream; data, received by the first step,
    # is no missing parent for the child's step
    assert [c.argv[-1] for c in calls if c.verb == "create"] == [f"{dst}/sink/c", f"{dst}/sink/c/{src}"]
    assert all(c.verb != "create" for c in calls[sends[0]:])
    for i in sends:
        # send and receive are adjacent: nothing runs while the sender waits for its receiver (the
        # two start at the same moment, so the shim may log either one first)
        neighbours = [calls[j].verb for j in (i - 1, i + 1) if 0 <= j < len(calls)]
        assert "recv" in neighbours, [c.argv[:3] for c in calls[max(i - 2, 0):i + 3]]
