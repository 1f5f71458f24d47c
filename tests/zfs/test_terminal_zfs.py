"""What an admin sees on a real terminal (tmux: send-keys, capture-pane) during a real transfer:
the progress line of an interactive `run` (issue 13 item 4) and `status --watch` (issue 11 item 5).
The push is slowed by its own send.bandwidth_limit, so the transfer lasts long enough to look at."""

from __future__ import annotations

import re
import shlex
import subprocess
import time

from support import periodic, push_job, sink_job, snapshots, write_config
from zfstest import ZFS, run, zfs, zrepl_argv, zrepl_env

WAIT = 600  # seconds: the slow guest gets a wide margin; the loops end as soon as the text shows


def _tmux(*args: str) -> str:
    return run(["tmux", *args]).stdout


def _pane(target: str) -> str:
    return _tmux("capture-pane", "-p", "-J", "-t", target)


def _wait_for(target: str, pattern: str) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = _pane(target)
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} never showed in {target}:\n{_pane(target)}")


def _shell_line(cfg, *args: str) -> str:
    env = zrepl_env()
    return f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {shlex.join(zrepl_argv('--config', str(cfg), *args))}"


def test_an_interactive_run_and_status_watch_show_the_transfer(make_pool, zfs_tree, tmp_path):
    src, dst = make_pool("src", size="512M"), make_pool("dst", size="512M")
    zfs_tree(src, "data")
    zfs("create", "-p", "-o", "mountpoint=none", f"{dst}/sink")
    mountpoint = zfs("get", "-Hpo", "value", "mountpoint", f"{src}/data").strip()
    run(["dd", "if=/dev/urandom", f"of={mountpoint}/blob", "bs=1M", "count=24", "status=none"])
    cfg = write_config(tmp_path, push_job(filesystems={f"{src}/data": True}, snapshotting=periodic("1h"),
                                          send={"bandwidth_limit": {"max": "1 MiB", "bucket_capacity": "128 KiB"}}),
                       sink_job(root_fs=f"{dst}/sink"))
    session = f"zrepl{tmp_path.name[-8:]}".replace(".", "")
    _tmux("new-session", "-d", "-s", session, "-x", "180", "-y", "30")
    try:
        _tmux("new-window", "-t", session, "-n", "watch")
        _tmux("send-keys", "-t", f"{session}:0", _shell_line(cfg, "run") + "; echo RUN-EXIT=$?", "Enter")
        # the updating line: the filesystem, bytes of the expected total, rate, ETA
        line = _wait_for(f"{session}:0", r"push: \S+/data full send of \S+: [\d.]+ \w?i?B of [\d.]+ MiB \(\d+%\)"
                                         r", [\d.]+ \w?i?B/s, ETA \S+")
        assert "Traceback" not in line
        watch = _shell_line(cfg, "status", "--watch", "1") + "; echo WATCH-EXIT=$?"
        _tmux("send-keys", "-t", f"{session}:watch", watch, "Enter")
        view = _wait_for(f"{session}:watch", r"^\s+\S+/data\s+stepping\s.*\[[#.]{20}\]\s+\d+%")
        assert re.search(r"^OK: 2 job\(s\)", view, re.M) and "Ctrl-C to quit" in view
        done = _wait_for(f"{session}:0", r"^RUN-EXIT=\d+")
        assert "RUN-EXIT=0" in done and re.search(r"^push: ok \(", done, re.M), done
        assert snapshots(ZFS, f"{dst}/sink/client1/{src}/data")
        _tmux("send-keys", "-t", f"{session}:watch", "C-c")
        assert "Traceback" not in _wait_for(f"{session}:watch", r"^WATCH-EXIT=0")  # Ctrl-C ends the view
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=60)
