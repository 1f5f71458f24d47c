"""`bash tests/demo` (tests/demo.py) on real OpenZFS: it plays its whole story, and the lines a
newcomer is meant to see are there, so the README's demo cannot rot."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "demo.py"
REPLICA = "backup/sink/laptop/tank/home/alice"


def test_demo_plays_the_first_day_and_the_recovery(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    commands = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    for expected in ("zrepl.py configcheck", "zrepl.py test filesystems --job home --all",
                     "zrepl.py run --log-level info", "zrepl.py status", "zrepl.py status -v",
                     "zrepl.py run --dry-run -v home", f"zfs snapshot {REPLICA}@by-hand", "zrepl.py run"):
        assert expected in commands, (expected, commands)
    first = out.split("$ zrepl.py run --log-level info")[1].split("$ ")[0]
    assert "full send" in first, first
    assert f"{REPLICA}@zrepl_" in out and "tank/home/alice#zrepl_CURSOR_G_" in out  # replica and cursor
    assert "zrepl_last_received_J_backuppool" in out.split("$ zfs holds ")[1].split("$ ")[0]
    dry = out.split("$ zrepl.py run --dry-run -v home")[1].split("\n# ")[0]
    assert "job home (push), dry run:" in dry, dry
    assert f"would destroy {REPLICA}@zrepl_" in dry and f"keep {REPLICA}@zrepl_" in dry, dry
    assert "keep tank/home/alice@zrepl_" in dry and "not_replicated" in dry, dry
    diverged = out.split(f"$ zfs snapshot {REPLICA}@by-hand")[1]
    advice = diverged.split("$ zrepl.py status -v")[1].split("$ ")[0]
    assert "diverged" in advice and f"zfs rollback -r {REPLICA}@zrepl_" in advice, advice
    assert "(exit code 1)" in diverged.split("# follow the recovery advice")[0]
    recovery = diverged.split("# follow the recovery advice")[1]
    assert f"$ zfs rollback -r {REPLICA}@zrepl_" in recovery, recovery
    assert "(exit code" not in recovery and "# demo done in" in recovery, recovery
