"""Shared pytest setup for zrepl.py's tests.

Two kinds of tests live here:
- host tests, `tests/test_*.py`: pure logic, run anywhere with `python3 -m pytest tests`;
- real-ZFS tests, everything under `tests/zfs/`: marked `zfs` automatically. They run only inside
  the throwaway guest (tests/vm/run-in-guest sets ZREPL_TEST_GUEST=1 and the guest has a loaded
  zfs module); elsewhere they skip with a reason that says how to run them.

With ZREPL_TEST_REQUIRE_ZFS=1 (set by tests/run-all for the guest run) a session in which no
`zfs` test passed exits non-zero, so a silently skipped guest suite fails CI.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ZFS_TESTS_DIR = REPO_ROOT / "tests" / "zfs"

# `import zrepl` in every test file works without installing anything.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def real_zfs_unavailable_reason() -> str | None:
    """None when real-ZFS tests may run here, else why not (with how to run them)."""
    how = "run tests/vm/run-in-guest python3 -m pytest tests/zfs/... (see README, Testing)"
    if os.environ.get("ZREPL_TEST_GUEST") != "1":
        # Never create pools on a developer's machine by accident, even one with ZFS.
        return f"needs real OpenZFS: {how}"
    if shutil.which("zfs") is None or not os.path.exists("/dev/zfs"):
        return f"needs real OpenZFS but the guest has no usable zfs (/dev/zfs missing): {how}"
    return None


def _is_zfs_test(item: pytest.Item) -> bool:
    try:
        Path(str(item.path)).resolve().relative_to(ZFS_TESTS_DIR)
    except ValueError:
        return False
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "zfs: needs real OpenZFS; runs only in the test guest (tests/vm/run-in-guest)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = real_zfs_unavailable_reason()
    for item in items:
        if _is_zfs_test(item):
            item.add_marker(pytest.mark.zfs)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


_zfs_passed = {"count": 0}  # passed `zfs` tests in this session


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and "zfs" in report.keywords:
        _zfs_passed["count"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("ZREPL_TEST_REQUIRE_ZFS") != "1":
        return
    passed = _zfs_passed["count"]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"real-ZFS tests passed: {passed}"
    if passed == 0:
        message += " (ZREPL_TEST_REQUIRE_ZFS=1 demands at least one: failing the session)"
        if session.exitstatus == 0 or session.exitstatus == 5:
            session.exitstatus = 1
    if reporter is not None:
        reporter.write_line(message)
    else:
        print(message)


@pytest.fixture
def fake_zfs():
    """A FakeZfs (tests/fakezfs.py) with an empty world; fails the test if the double met a bug of
    its own inside a spawned command."""
    from fakezfs import FakeZfs

    fake = FakeZfs()
    yield fake
    assert fake.errors == [], f"the ZFS double failed: {fake.errors}"
