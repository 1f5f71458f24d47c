"""The first day of a new admin (issue 13), on real OpenZFS: README's own configs and commands,
taken from README.md itself so the two cannot drift apart.

The Quick start's snap job and the Replication section's push/sink pair go into one config (the
pools renamed to throwaway ones); the commands are README's: the `zfs create` line for the sink's
root_fs, `run --dry-run`, `run`, `status`. Asserted: the admin's own snapshot survives on both
sides, the first replication succeeds, a long push does not delay the snap job's snapshot, and
`status` reads right before and after the first run."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

from support import snapshots, status
from zfstest import ZFS, REPO_ROOT, exists, zfs, zrepl_argv, zrepl_env

README = (REPO_ROOT / "README.md").read_text()


def _section(title: str) -> str:
    """The text of README's `## title` section (up to the next `## ` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _section(section), re.S | re.M)


def _commands(section: str) -> list[list[str]]:
    """README's `zrepl.py ...` and `zfs ...` command lines of a section's sh blocks, as argv."""
    out = []
    for block in _blocks(section, "sh"):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in ("zrepl.py", "zfs"):
                out.append(argv)
    return out


def _renamed(text: str, src: str, dst: str) -> str:
    """README's pools (tank, backup) as this test's throwaway pools."""
    text = re.sub(r'(?<=["\s])tank/', f"{src}/", text)
    return re.sub(r'(?<=["\s])backup/', f"{dst}/", text)


def _argv(argv: list[str], src: str, dst: str) -> list[str]:
    return [_renamed(" " + a, src, dst)[1:] for a in argv]


def _config(tmp_path: Path, src: str, dst: str) -> Path:
    # the replication jobs first: a runner that takes jobs one after another would make the
    # Quick start's snap job wait for the whole push
    replication, = _blocks("Replication", "toml")
    quick_start, = _blocks("Quick start", "toml")
    text = (f'[global]\nstatus_file = "{tmp_path}/status.json"\nruntime_dir = "{tmp_path}/run"\n\n'
            + _renamed(replication, src, dst) + "\n" + _renamed(quick_start, src, dst))
    cfg = tmp_path / "zrepl.toml"
    cfg.write_text(text)
    return cfg


def _zrepl(cfg: Path, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert argv[0] == "zrepl.py"
    return subprocess.run([*zrepl_argv("--config", cfg), *argv[1:]], capture_output=True, text=True, timeout=900,
                          env=zrepl_env(env))


def _zrepl_snapshot(fs: str) -> None:
    """A snapshot named as the push job's own would be, taken now (the next due one, early)."""
    zfs("snapshot", f"{fs}@zrepl_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}_000")


def test_first_day_follows_the_readme(make_pool, zfs_tree, zfs_shim, tmp_path):
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data\ndata/db\nhome")
    cfg = _config(tmp_path, src, dst)
    quick = _commands("Quick start")
    dry_run = next(a for a in quick if a[1:3] == ["run", "--dry-run"])
    status_cmd = next(a for a in quick if a[1:] == ["status"])

    # before the first run: not run yet, and that does not page anyone (OK until the thresholds)
    before = _zrepl(cfg, status_cmd)
    assert before.returncode == 0, before.stdout + before.stderr
    assert before.stdout.startswith("OK: 3 job(s), all ok") and "has not run yet" in before.stdout

    # README's line for the sink's root_fs, then its dry run
    create = next(a for a in _commands("Replication") if a[:2] == ["zfs", "create"])
    zfs(*_argv(create, src, dst)[1:])
    assert exists(f"{dst}/sink")
    dry = _zrepl(cfg, dry_run)
    assert dry.returncode == 0 and "would snapshot @zrepl_" in dry.stdout and f"{src}/home" in dry.stdout, dry

    # the first `run` as the systemd unit starts it; the push's first send is held 100 s: the
    # snap job must have its snapshot while the push has received nothing yet
    exec_start = re.search(r"^ExecStart=\S*zrepl\.py (.*)$", _section("Quick start"), re.M)
    assert exec_start
    held = 100
    zfs_shim.delay("send", held, times=1)
    run = subprocess.Popen([*zrepl_argv("--config", cfg), *shlex.split(exec_start.group(1))], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=zrepl_env(zfs_shim.env))
    try:
        deadline = time.monotonic() + held
        while not snapshots(ZFS, f"{src}/home") and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
        assert snapshots(ZFS, f"{src}/home"), "the snap job had no snapshot while the push was held"
        assert zfs_shim.count("recv") == 0, "the snap job waited for the push"
        out, err = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, out + err

    # the first replication worked: README's receiver path
    received = f"{dst}/sink/thishost/{src}/data"
    assert snapshots(ZFS, received) and snapshots(ZFS, f"{received}/db")
    doc = status(cfg)["jobs"]
    assert doc["backup"]["last_run"]["result"] == "ok" and doc["home"]["last_run"]["result"] == "ok"
    fs_report = doc["backup"]["replication"]["filesystems"][f"{src}/data"]
    assert fs_report["state"] == "done" and fs_report["bytes_replicated"] > 0

    # the admin's own snapshot, then the job's next one: -I carries it over; three runs later it
    # is still on both sides
    zfs("snapshot", f"{src}/data/db@before-upgrade")
    for _ in range(3):
        time.sleep(1.1)  # distinct names for the early snapshots
        _zrepl_snapshot(f"{src}/data/db")
        result = _zrepl(cfg, ["zrepl.py", "run"])
        assert result.returncode == 0, result.stdout + result.stderr
    assert "before-upgrade" in snapshots(ZFS, f"{src}/data/db")
    assert "before-upgrade" in snapshots(ZFS, f"{received}/db")

    # status after the runs: OK, the sink's line names the local pushes it served
    after = _zrepl(cfg, status_cmd)
    assert after.returncode == 0, after.stdout
    assert after.stdout.startswith("OK: 3 job(s), all ok |")
    assert "client thishost (local push job backup): last push" in after.stdout
    verbose = _zrepl(cfg, [*status_cmd, "-v"])
    assert verbose.returncode == 0 and "destroyed snapshots this job did not make" not in verbose.stdout
