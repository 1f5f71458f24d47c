"""Tests of the test bed itself in the guest: pools, declared trees, the zfs PATH shim."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from zfstest import REAL_ZFS, REAL_ZPOOL, PoolFactory, exists, get, list_all, run, zfs


def test_pool_factory_creates_unique_pools_and_destroys_them():
    factory = PoolFactory()
    first, second = factory.create("a"), factory.create("a")
    assert first != second
    assert run([REAL_ZPOOL, "list", "-H", "-o", "name", first]).stdout.strip() == first
    assert get(first, "mountpoint") == f"/tmp/zrepl-test-mnt/{first}"

    factory.destroy_all()

    for name in (first, second):
        assert run([REAL_ZPOOL, "list", name], check=False).returncode != 0
    assert not factory.workdir.exists()


def test_zfs_tree_creates_in_text_order_with_bookmarks_destroys_and_volumes(pool, zfs_tree):
    tree = zfs_tree(pool, """
        a/b c @z @y #bm-y #bm-z=z -@z
        vol {volsize=16M}
        enc {encryption=on} @1
    """)

    fs = f"{pool}/a/b c"
    rows = {row.name: row for row in list_all(pool)}
    assert tree.datasets == [f"{pool}/a/b c", f"{pool}/vol", f"{pool}/enc"]
    assert f"{pool}/a" in rows  # parent created on the way
    assert tree.snapshots == [f"{fs}@z", f"{fs}@y", f"{pool}/enc@1"]
    assert tree.destroyed == [f"{fs}@z"] and not exists(f"{fs}@z")
    assert rows[f"{fs}#bm-y"].guid == rows[f"{fs}@y"].guid
    # @z was created first, so its bookmark is older than @y although "z" sorts after "y".
    assert rows[f"{fs}#bm-z"].createtxg < rows[f"{fs}@y"].createtxg
    assert rows[f"{pool}/vol"].type == "volume"
    assert get(f"{pool}/enc", "encryptionroot") == f"{pool}/enc"
    assert tree.key_file is not None and tree.key_file.exists()


def test_shim_fails_one_verb_with_given_stderr_and_counts_spawns(pool, zfs_shim):
    zfs_shim.fail("destroy", stderr="cannot destroy: dataset is busy\n", exit_code=7)
    shim = str(zfs_shim.zfs_path)

    listed = run([shim, "list", "-H", "-o", "name", pool])
    failed = run([shim, "destroy", pool], check=False)
    run([shim, "list", pool])

    assert listed.stdout.strip() == pool  # other verbs reach the real zfs
    assert (failed.returncode, failed.stderr) == (7, "cannot destroy: dataset is busy\n")
    assert exists(pool)
    assert zfs_shim.count("list") == 2
    assert zfs_shim.count("destroy") == 1
    assert zfs_shim.calls("destroy")[0].argv == ["destroy", pool]
    assert zfs_shim.calls("destroy")[0].action == "fail"


def test_shim_rule_with_times_applies_only_to_first_spawns(pool, zfs_shim):
    zfs_shim.fail("get", stderr="boom\n", times=1, match=pool)
    shim = str(zfs_shim.zfs_path)

    first = run([shim, "get", "-H", "-o", "value", "type", pool], check=False)
    second = run([shim, "get", "-H", "-o", "value", "type", pool], check=False)

    assert (first.returncode, first.stderr) == (1, "boom\n")
    assert (second.returncode, second.stdout.strip()) == (0, "filesystem")


def test_shim_hang_blocks_until_killed(zfs_shim):
    zfs_shim.hang("list", seconds=60)
    proc = subprocess.Popen([str(zfs_shim.zfs_path), "list"], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while zfs_shim.count("list") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # python startup is slow under emulation
        assert zfs_shim.calls("list")[0].action == "hang"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
    finally:
        proc.kill()
        proc.wait()


def test_shim_cut_truncates_send_stream(pool, zfs_tree, zfs_shim):
    tree = zfs_tree(pool, "fs @s")
    full = run([REAL_ZFS, "send", tree.snapshots[0]], text=False).stdout
    zfs_shim.cut("send", nbytes=1000, exit_code=3)

    cut = run([str(zfs_shim.zfs_path), "send", tree.snapshots[0]], text=False, check=False)

    assert cut.returncode == 3
    assert len(full) > 1000 and cut.stdout == full[:1000]


def test_shim_env_puts_the_shim_first_in_path(zfs_shim):
    found = run(["sh", "-c", "command -v zfs"], env=zfs_shim.env).stdout.strip()
    assert found == str(zfs_shim.zfs_path)


def test_real_zfs_matches_the_requested_openzfs_version():
    wanted = os.environ.get("ZREPL_TEST_ZFS", "2.3")
    userland, kmod = zfs("version").split()[:2]
    # Both the tools and the loaded kernel module must be the requested series.
    assert userland.startswith(f"zfs-{wanted}."), userland
    assert kmod.startswith(f"zfs-kmod-{wanted}."), kmod
