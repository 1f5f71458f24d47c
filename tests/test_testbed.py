"""Host tests of the test bed: zfs tests skip with guidance on the host, the CI guard trips when no
real-ZFS test passed, and the tree-spec grammar (support.py; FakeZfs worlds and zfstest.build_tree)
parses as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import TreeLine, parse_tree_spec, tree_dataset

REPO = Path(__file__).resolve().parents[1]


def _pytest_on_host(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ZREPL_TEST_GUEST", "PYTEST_ADDOPTS")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_zfs_tests_skip_outside_the_guest_with_how_to_run_them():
    result = _pytest_on_host("-rs", "-q", "tests/zfs/test_smoke_zfs.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "needs real OpenZFS: run tests/vm/run-in-guest" in result.stdout
    assert " passed" not in result.stdout
    assert "skipped" in result.stdout


def test_zfs_tests_carry_the_zfs_marker():
    result = _pytest_on_host("-q", "--collect-only", "-m", "not zfs", "tests/zfs/test_smoke_zfs.py")
    # Everything under tests/zfs is marked, so deselecting the marker leaves nothing.
    assert result.returncode == 5, result.stdout + result.stderr


def test_require_zfs_fails_a_session_without_real_zfs_passes():
    result = _pytest_on_host("-q", "tests/zfs/test_smoke_zfs.py", ZREPL_TEST_REQUIRE_ZFS="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "real-ZFS tests passed: 0" in result.stdout


def test_parse_tree_spec_keeps_text_order_spaces_and_properties():
    lines = parse_tree_spec("""
        a/b c @snap 2 @snap 1 #bm 1 #old=snap 2 -@snap 2
        . @root
        enc {encryption=on, compression=lz4}
    """)
    assert lines[0] == TreeLine(
        "a/b c", (), (("snap", "snap 2"), ("snap", "snap 1"), ("bookmark", "bm 1", ""),
                      ("bookmark", "old", "snap 2"), ("destroy", "snap 2")))
    assert lines[1] == TreeLine(".", (), (("snap", "root"),))
    assert lines[2].props == (("encryption", "on"), ("compression", "lz4"))


@pytest.mark.parametrize("spec", ["fs #bm", "@snap", "fs {noequals}", "fs @"])
def test_parse_tree_spec_rejects_malformed_lines(spec):
    with pytest.raises(ValueError):
        parse_tree_spec(spec)


def test_tree_paths_map_to_full_names():
    assert tree_dataset("p", "") == "p" and tree_dataset("p", ".") == "p" and tree_dataset("p", "a b/c") == "p/a b/c"
