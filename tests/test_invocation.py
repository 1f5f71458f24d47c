"""The invocation README.md recommends for cron and systemd: `python3 -P -m zrepl` with zrepl.py's
directory on PYTHONPATH runs from cached bytecode (bench/startup.py measures it) and behaves like
`python3 zrepl.py`; -P keeps a zrepl.py in the working directory from being run instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, pycache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # a private cache directory: the test must not depend on (or leave) the checkout's __pycache__
    env.update(PYTHONPATH=str(REPO), PYTHONPYCACHEPREFIX=str(pycache))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_module_invocation_matches_the_script_and_writes_bytecode(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    as_module = _run([sys.executable, "-P", "-m", "zrepl", "version"], tmp_path, cache)
    as_script = _run([sys.executable, str(REPO / "zrepl.py"), "version"], tmp_path, cache)
    assert as_module.returncode == 0, as_module.stderr
    assert as_module.stdout == as_script.stdout
    assert as_module.stdout.startswith("zrepl.py ")
    assert list(cache.rglob("zrepl.*.pyc")), "the module run cached no bytecode"


def test_dash_p_ignores_a_zrepl_py_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "zrepl.py").write_text('print("impostor")\n')
    proc = _run([sys.executable, "-P", "-m", "zrepl", "version"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "impostor" not in proc.stdout
    assert proc.stdout.startswith("zrepl.py ")
    # without -P the working directory comes first: the reason the README says -P
    unsafe = _run([sys.executable, "-m", "zrepl", "version"], tmp_path, tmp_path / "cache")
    assert unsafe.stdout == "impostor\n"


def test_usage_errors_exit_2_as_a_module(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-P", "-m", "zrepl", "no-such-command"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
