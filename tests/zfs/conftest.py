"""Fixtures for tests against real OpenZFS (tests/zfs/, run in the guest by tests/vm/run-in-guest).

Every test in this directory is marked `zfs` by tests/conftest.py and skips outside the guest.
Helpers behind these fixtures live in zfstest.py (importable: `from zfstest import zfs, list_all`).

Fixtures:
- `pool` -> str: a fresh pool on a 256 MiB sparse file vdev, unique name (`ztp<hex>`), root
  dataset mounted under /tmp/zrepl-test-mnt/<name>; destroyed after the test.
- `make_pool(hint="p", size="256M", pool_properties=None, fs_properties=None)` -> str: factory
  for more pools (e.g. sender `make_pool("src")` and receiver `make_pool("dst")`); all destroyed.
- `zfs_tree(pool, spec, data=True)` -> zfstest.Tree: declare datasets/snapshots/bookmarks in a
  compact text form (see zfstest.build_tree for the grammar):
      zfs_tree(pool, '''
          fs1/child with space @snap-b @snap-a #bm
          fs2 {encryption=on} @1 #one -@1 @2
      ''')
  Tokens run left to right, so @snap-b is created before @snap-a: "latest" is by createtxg.
- `zfs_shim` -> zfstest.ZfsShim: a `zfs` shim directory for PATH with fault injection
  (fail / hang / delay / cut a verb's stdout after N bytes) and spawn counting per verb;
  `zfs_shim.run_zrepl(*args)` runs zrepl.py with the shim first in PATH; `zfs_shim.env` for
  other subprocesses. Rules and log are per test.
- `run_zrepl(*args, env=None, timeout=300, input=None)`: run `python3 /src/zrepl.py ...` without
  a shim; returns a CompletedProcess (text), never raises on its exit code.
- `sshd_localhost` -> zfstest.SshServer: sshd on 127.0.0.1:<free port>, throwaway host and client
  keys; fields host/port/user/identity_file/known_hosts, `ssh_argv(*cmd)`, `option_list()` for
  ssh -o values, `authorize(command=...)` for a key with a forced command.
- `sockdir` -> str: a fresh directory under /tmp short enough for unix socket paths (107 bytes;
  tmp_path can be longer), e.g. for the daemon's global.control.sockpath.
- `postgres_server` -> zfstest.PostgresServer (socket_dir, port, user, dbname, dsn, psql_argv).
- `mariadb_server` -> zfstest.MariadbServer (socket, user, dsn, mysql_argv).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable, Iterator

import pytest

import zfstest
from zfstest import PoolFactory, Tree, ZfsShim


@pytest.fixture
def make_pool() -> Iterator[Callable[..., str]]:
    """Factory: make_pool(hint="p", size="256M", pool_properties=None, fs_properties=None) -> name.

    Every pool it made is destroyed (zpool destroy -f) after the test, with its vdev file.
    """
    factory = PoolFactory()
    yield factory.create
    factory.destroy_all()


@pytest.fixture
def pool(make_pool: Callable[..., str]) -> str:
    """Name of a fresh, empty pool on a sparse file vdev; destroyed after the test."""
    return make_pool("p")


@pytest.fixture
def zfs_tree() -> Callable[..., Tree]:
    """zfs_tree(pool, spec, data=True) -> Tree: create datasets/snapshots/bookmarks from a spec."""
    return zfstest.build_tree


@pytest.fixture
def zfs_shim(tmp_path: Path) -> ZfsShim:
    """A fresh ZfsShim (no rules, empty log) in a per-test directory."""
    return ZfsShim(tmp_path / "zfs-shim")


@pytest.fixture
def run_zrepl() -> Callable[..., object]:
    """run_zrepl(*args, env=None, timeout=300, input=None) -> subprocess.CompletedProcess."""
    return zfstest.run_zrepl


@pytest.fixture
def sshd_localhost() -> Iterator[zfstest.SshServer]:
    """A running sshd on 127.0.0.1 (root login with the returned identity_file); stopped after."""
    directory = Path(tempfile.mkdtemp(prefix="zrepl-sshd-", dir="/tmp"))
    server = zfstest.SshServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A fresh short directory for unix sockets (removed after the test)."""
    with tempfile.TemporaryDirectory(prefix="zd", dir="/tmp") as d:
        yield d


@pytest.fixture
def postgres_server() -> Iterator[zfstest.PostgresServer]:
    """A running throwaway PostgreSQL (user postgres, unix socket only); stopped and deleted after."""
    server = zfstest.PostgresServer(Path(tempfile.mkdtemp(prefix="zrepl-pg-", dir="/tmp")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def mariadb_server() -> Iterator[zfstest.MariadbServer]:
    """A running throwaway MariaDB (root via unix socket, no TCP); stopped and deleted after."""
    server = zfstest.MariadbServer(Path(tempfile.mkdtemp(prefix="zrepl-mariadb-", dir="/tmp")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
