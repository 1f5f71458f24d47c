"""Helpers for the guest tests of `zrepl.py daemon` (test_daemon_zfs.py, test_metrics_zfs.py): the
daemon as a background process with its log in a file, condition waits that fail with the log's
tail (and at once when the daemon died), and the live status over the control socket.
Waits have 10x margins: the guest runs under software emulation and is shared."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from zfstest import ZfsShim, zfs, zrepl_argv, zrepl_env

import zrepl

WAIT = 300.0  # seconds


class DaemonProcess:
    """`zrepl.py daemon` in the background, its log in a file."""

    def __init__(self, shim: ZfsShim, cfg: Path, log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(zrepl_argv("--config", str(cfg), "--log-level", "info", "daemon"),
                                         env=zrepl_env(shim.env), stdout=out, stderr=out)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the daemon did not stop after {sig}:\n{self.text()[-3000:]}") from None


def wait_until(predicate: Callable[[], object], what: str, daemon: DaemonProcess, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({daemon.proc.returncode}) waiting for {what}:\n"
                                 f"{daemon.text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{daemon.text()[-3000:]}")
        time.sleep(0.5)


def live(sockpath: str) -> dict | None:
    """GET /status, or None while the daemon does not answer (not started yet)."""
    try:
        code, doc = zrepl.control_request(sockpath, "GET", "/status", timeout=30)
    except zrepl.ZreplError:
        return None
    return doc if code == 200 else None


def live_job(sockpath: str, job: str) -> dict:
    """One job's entry in GET /status ({} while there is none)."""
    return ((live(sockpath) or {}).get("jobs") or {}).get(job) or {}


def daemon_state(sockpath: str, job: str) -> str | None:
    return (live_job(sockpath, job).get("daemon") or {}).get("state")


def token(fs: str) -> str:
    """The receiver's resume token of fs ('' when there is none)."""
    value = zfs("get", "-Hpo", "value", "receive_resume_token", fs, check=False).strip()
    return "" if value in ("", "-") else value


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (the config takes no port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
