"""Parallel steps over ssh+stdinserver on real OpenZFS: replication.concurrency.steps = 3 runs its
steps on three lanes of ONE ssh connection (LaneMux), served by one stdinserver process; a stream
cut in one step leaves the others' results intact and is resumed by the next run.

ssh setup as in test_ssh_zfs.py (sshd on localhost, a forced command). No assertion depends on the
guest's speed: shim delays make one-at-a-time steps observable (they would start DELAY apart).
"""
from __future__ import annotations

from repltest import fill, same_guids
from support import fs_status, holds, push_job, real_sends, sink_job, snapshots, status, stdinserver, write_config
from test_ssh_zfs import forced, installed_zrepl, ssh_connect  # noqa: F401 (installed_zrepl: autouse fixture)
from zfstest import ZFS, get

STEP_HOLD = "zrepl_STEP_J_push"
DELAY = 30.0  # b's and c's sends each wait this long: one after the other they start DELAY apart (10x the
# few seconds a lane takes to start, listings included, on a slow guest)


def test_three_steps_on_lanes_of_one_ssh_connection_and_a_cut_one_resumes(make_pool, zfs_tree, sshd_localhost,
                                                                         zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "a\nb\nc")
    fill(f"{src}/a", 4 << 20)
    fill(f"{src}/b", 1 << 20)
    fill(f"{src}/c", 1 << 20)
    zfs_tree(src, "a @1\nb @1\nc @1")
    zfs_tree(dst, "sink")
    base = f"{dst}/sink/client1/{src}"
    server_cfg = write_config(tmp_path / "server", sink_job("sink", root_fs=f"{dst}/sink",
                                                            serve=stdinserver("client1")))
    key = sshd_localhost.authorize(command=forced(server_cfg, "client1"))
    client_cfg = write_config(tmp_path / "client", push_job(
        filesystems={f"{src}/{n}": True for n in "abc"}, connect=ssh_connect(sshd_localhost, key),
        replication={"concurrency": {"steps": 3}}))
    zfs_shim.cut("send", nbytes=1 << 20, times=1, match=f"send -v -P {src}/a@")
    zfs_shim.fail("send", match="send -v -P -t", stderr="ssh: connection reset by peer\n")
    zfs_shim.delay("send", DELAY, times=1, match=f"send -v -P {src}/b@")
    zfs_shim.delay("send", DELAY, times=1, match=f"send -v -P {src}/c@")
    proc = zfs_shim.run_zrepl("--config", client_cfg, "run", "push", extra_env={"ZREPL_RETRY_DELAY": "0.5"})
    assert proc.returncode == 1, proc.stderr
    assert "one at a time" not in proc.stderr and "serves no lanes" not in proc.stderr
    [b_send] = [c for c in zfs_shim.calls("send") if f"{src}/b@1" in c.argv]
    [c_send] = [c for c in zfs_shim.calls("send") if f"{src}/c@1" in c.argv]
    assert b_send.time is not None and c_send.time is not None
    assert abs(c_send.time - b_send.time) < DELAY  # b and c were sent at once, on two lanes
    assert get(f"{base}/a", "receive_resume_token") != "-" and snapshots(ZFS, f"{base}/a") == []
    assert holds(ZFS, f"{src}/a@1") == {STEP_HOLD}  # resumability: the cut step keeps its hold
    for n in "bc":
        assert snapshots(ZFS, f"{base}/{n}") == ["1"] and same_guids(f"{base}/{n}", f"{src}/{n}")
        assert fs_status(client_cfg, "push", f"{src}/{n}")["state"] == "done"
    assert "connection reset" in fs_status(client_cfg, "push", f"{src}/a")["error"]
    # one connection, one stdinserver process: b's and c's receives were recorded on it
    client = status(server_cfg)["jobs"]["sink"]["clients"]["client1"]
    assert {f"{src}/b@1", f"{src}/c@1"} <= {t["received"] for t in client["transfers"]}

    zfs_shim.clear()
    zfs_shim.reset_log()
    proc = zfs_shim.run_zrepl("--config", client_cfg, "run", "push")
    assert proc.returncode == 0, proc.stderr
    sends = real_sends(zfs_shim.calls())
    assert len(sends) == 1 and sends[0][:4] == ["send", "-v", "-P", "-t"]  # a resumed; b and c had nothing to do
    for n in "abc":
        target = f"{base}/{n}"
        assert snapshots(ZFS, target) == ["1"] and same_guids(target, f"{src}/{n}"), n
        assert get(target, "receive_resume_token") == "-", n
        assert holds(ZFS, f"{src}/{n}@1") == set(), n
