"""The ZFS double (tests/fakezfs.py) against real OpenZFS: one scenario of the commands zrepl.py
runs (listings, snapshots, holds, bookmarks, batch destroys, estimates, full/incremental/cut/
resumed streams, refusals, raw sends of encrypted data), replayed on a real pool and on a fake
world with the same names. Exit codes and outputs must match once what legitimately differs is
masked: guids, txgs, times and sizes (the double's streams are not zfs streams), token bytes,
and the progress lines zfs prints once a second."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from collections.abc import Callable
from typing import Any

import zrepl
from fakezfs import FakeZfs
from zfstest import REAL_ZFS, get, zfs

LIST = ["list", "-H", "-p", "-r", "-t", "filesystem,volume,snapshot,bookmark", "-o", ",".join(zrepl.LIST_PROPERTIES)]
KEY = Path("/tmp/zrepl-fidelity.key")


def normalize(text: str) -> str:
    text = re.sub(r"\b1-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+\b", "TOKEN", text)
    text = re.sub(r"0x[0-9a-f]+", "HEX", text)
    text = re.sub(r"\b\d+(\.\d+)?[BKMGTPE]\b", "SIZE", text)
    text = re.sub(r"^\d\d:\d\d:\d\d\t.*\n", "", text, flags=re.M)  # progress: once a second
    lines = []
    for line in text.split("\n"):
        fields = ["N" if f.isdigit() else f for f in line.split("\t")]
        if len(fields) == 3 and "@" in fields[0] and re.fullmatch(r"[A-Z][a-z]{2} .* \d{4}", fields[2]):
            fields[2] = "DATE"  # `zfs holds` timestamps
        lines.append("\t".join(fields))
    return "\n".join(lines)


class Side:
    """One of the two worlds, driven through the same steps."""

    def __init__(self, name: str, spawn: Callable[..., Any], write: Callable[[str, int], None]):
        self.name, self.spawn, self.write = name, spawn, write
        self.log: list[str] = []

    def zfs(self, *args: str, any_order: bool = False) -> None:
        """One command; any_order: its stderr lines come in an order zfs does not fix."""
        proc = self.spawn(["zfs", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=120)
        errors = normalize(err.decode())
        if any_order:
            errors = "\n".join(sorted(errors.splitlines()))
        self.log.append(f"$ zfs {normalize(' '.join(args))}\nrc {proc.returncode}\n{normalize(out.decode())}"
                        f"--\n{errors}")

    def pipe(self, send: list[str], recv: list[str], cut: int | None = None) -> None:
        sender = self.spawn(["zfs", "send", *send], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        if cut is None:
            receiver = self.spawn(["zfs", "recv", *recv], stdin=sender.stdout.fileno(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
            sender.stdout.close()
            _, recv_err = receiver.communicate(timeout=120)
        else:  # the connection breaks after `cut` bytes
            data = sender.stdout.read(cut)
            sender.kill()
            sender.stdout.close()
            receiver = self.spawn(["zfs", "recv", *recv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
            _, recv_err = receiver.communicate(data, timeout=120)
        _, send_err = sender.communicate(timeout=120)
        send_rc = sender.returncode
        if receiver.returncode != 0 and send_rc == -13:
            send_rc = 0  # a small stream may or may not fit the pipe before the receiver leaves
        if cut is not None:
            send_rc = "killed"
        self.log.append(f"$ zfs send {normalize(' '.join(send))} | zfs recv {' '.join(recv)}\nsend rc {send_rc}\n"
                        f"{normalize(send_err.decode())}--\nrecv rc {receiver.returncode}\n"
                        f"{normalize(recv_err.decode())}")

    def token(self, fs: str) -> str:
        proc = self.spawn(["zfs", "get", "-H", "-p", "-o", "value", "receive_resume_token", fs],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
        return out.decode().strip()


def scenario(s: Side, p: str) -> None:
    s.zfs("create", f"{p}/a")
    s.zfs("create", "-o", "zrepl:placeholder=on", f"{p}/a/b")
    s.zfs("create", f"{p}/a/b/c")
    s.zfs("create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", f"{p}/x/y")
    s.zfs("create", f"{p}/a")
    s.write(f"{p}/a", 64 << 10)
    s.zfs("snapshot", f"{p}/a@s1", f"{p}/a/b@s1")
    s.zfs("snapshot", f"{p}/a@s1")
    s.zfs("snapshot", f"{p}/a@s1", f"{p}/a/b@s2")
    s.zfs("snapshot", f"{p}/nope@s1")
    s.write(f"{p}/a", 64 << 10)
    s.zfs("snapshot", f"{p}/a@s2")
    s.zfs("snapshot", f"{p}/a@s3")
    s.zfs("bookmark", f"{p}/a@s1", f"{p}/a#bm1")
    s.zfs("bookmark", f"{p}/a@s1", f"{p}/a#bm1")
    s.zfs(*LIST, f"{p}/a")
    s.zfs(*LIST[:3], "-d", "1", *LIST[4:], f"{p}/a")
    s.zfs(*LIST, f"{p}/a/b", f"{p}/nope")
    s.zfs("get", "-H", "-p", "-o", "value", "zrepl:placeholder", f"{p}/a/b/c")
    s.zfs("get", "-H", "-p", "zrepl:placeholder", f"{p}/a/b/c")
    s.zfs("get", "-H", "-p", "-o", "name,property,value,source", "zrepl:placeholder", f"{p}/a/b@s1")
    s.zfs("get", "-H", "-p", "-o", "value", "encryption", f"{p}/nope")
    s.zfs("hold", "t1", f"{p}/a@s1", f"{p}/a@s2")
    s.zfs("hold", "t1", f"{p}/a@s1", f"{p}/a@s3")
    s.zfs("hold", "t2", f"{p}/a#bm1")
    s.zfs("holds", "-H", f"{p}/a@s1", f"{p}/a@s2", f"{p}/a@s3", f"{p}/a@nope")
    s.zfs("destroy", f"{p}/a@s2,s3", any_order=True)  # both held: zfs names them in varying order
    s.zfs("destroy", "-nv", f"{p}/a@s2,s3")
    s.zfs("release", "t9", f"{p}/a@s1")
    s.zfs("release", "t1", f"{p}/a@s1", f"{p}/a@s2", f"{p}/a@s3")
    s.zfs("holds", "-H", f"{p}/a@s1", f"{p}/a@s2")
    s.zfs("destroy", f"{p}/a@nope,nope2")
    s.zfs("destroy", f"{p}/a#nope")
    s.zfs("send", "-n", "-v", "-P", f"{p}/a@s1")
    s.zfs("send", "-n", "-v", "-P", "-i", f"{p}/a@s1", f"{p}/a@s3")
    s.zfs("send", "-n", "-v", "-P", "-I", f"{p}/a@s1", f"{p}/a@s3")
    s.zfs("send", "-n", "-v", "-P", "-i", f"{p}/a#bm1", f"{p}/a@s3")
    s.zfs("send", "-n", "-v", "-P", "-i", f"{p}/a@s3", f"{p}/a@s1")
    s.zfs("send", "-n", "-v", "-P", f"{p}/a@nope")
    s.zfs("create", f"{p}/dst")
    s.pipe(["-v", "-P", f"{p}/a@s1"], ["-u", "-s", "-o", "zrepl:placeholder=off", f"{p}/dst/a"])
    s.pipe([f"{p}/a@s2"], ["-u", "-s", f"{p}/dst/a"])
    s.pipe([f"{p}/a@s2"], ["-u", "-s", "-F", f"{p}/dst/a"])
    s.pipe([f"{p}/a@s1"], ["-u", "-s", f"{p}/dst/q/r"])
    s.pipe(["-v", "-P", "-I", f"{p}/a@s1", f"{p}/a@s3"], ["-u", "-s", f"{p}/dst/a"])
    s.pipe(["-i", f"{p}/a@s1", f"{p}/a@s2"], ["-u", "-s", f"{p}/dst/a"])  # already there: ignored
    s.write(f"{p}/a", 64 << 10)
    s.zfs("snapshot", f"{p}/a@s4")
    s.pipe(["-i", f"{p}/a@s2", f"{p}/a@s4"], ["-u", "-s", f"{p}/dst/nothere"])
    s.write(f"{p}/dst/a", 4096)
    s.pipe(["-i", f"{p}/a@s3", f"{p}/a@s4"], ["-u", "-s", f"{p}/dst/a"])
    s.zfs("snapshot", f"{p}/dst/a@newer")
    s.pipe(["-i", f"{p}/a@s3", f"{p}/a@s4"], ["-u", "-s", "-F", f"{p}/dst/a"])
    s.zfs(*LIST, f"{p}/dst/a")
    s.write(f"{p}/a", 4 << 20)
    s.zfs("snapshot", f"{p}/a@big")
    s.pipe(["-i", f"{p}/a@s4", f"{p}/a@big"], ["-u", "-s", f"{p}/dst/a"], cut=1 << 20)
    s.zfs(*LIST, f"{p}/dst/a")
    token = s.token(f"{p}/dst/a")
    s.zfs("send", "-n", "-v", "-t", token)
    s.pipe(["-i", f"{p}/a@s4", f"{p}/a@big"], ["-u", "-s", f"{p}/dst/a"])
    s.pipe(["-v", "-P", "-t", token], ["-u", "-s", f"{p}/dst/a"])
    s.zfs(*LIST, f"{p}/dst/a")
    s.zfs("recv", "-A", f"{p}/dst/a")
    s.pipe([f"{p}/a@big"], ["-u", "-s", f"{p}/dst/new"], cut=1 << 20)
    s.zfs(*LIST, f"{p}/dst/new")
    s.zfs("recv", "-A", f"{p}/dst/new")
    s.zfs(*LIST, f"{p}/dst")
    s.pipe([f"{p}/a@big"], ["-u", f"{p}/dst/nos"], cut=1 << 20)
    s.zfs("create", "-o", "encryption=on", "-o", "keyformat=passphrase", "-o", "pbkdf2iters=100000",
          "-o", f"keylocation=file://{KEY}", f"{p}/enc")
    s.zfs("create", f"{p}/enc/child")
    s.zfs("snapshot", f"{p}/enc@e1")
    s.zfs("send", "-n", "-v", "-P", "-p", f"{p}/enc@e1")
    s.pipe(["-w", f"{p}/enc@e1"], ["-u", "-s", f"{p}/dst/enc"])
    s.zfs("create", "-o", "zrepl:placeholder=on", f"{p}/ph")
    s.pipe(["-w", f"{p}/enc@e1"], ["-u", "-s", "-F", f"{p}/ph"])
    s.pipe([f"{p}/a@s1"], ["-u", "-s", "-F", "-o", "zrepl:placeholder=off", f"{p}/ph"])
    s.zfs(*LIST, f"{p}/enc", f"{p}/dst/enc", f"{p}/ph")
    s.zfs("send", "-n", "-v", "-t", "1-abc-def")
    s.zfs("send", "-n", "-v", "-t", "garbage")


def write_real(fs: str, nbytes: int) -> None:
    if get(fs, "mounted") != "yes":
        zfs("mount", fs)
    with open(Path(get(fs, "mountpoint")) / f"data-{os.urandom(4).hex()}", "wb") as f:
        f.write(os.urandom(nbytes))


def test_the_double_answers_like_openzfs(pool):
    KEY.write_text("zrepl-fidelity-passphrase")
    real = Side("zfs", lambda argv, **kw: subprocess.Popen([REAL_ZFS, *argv[1:]], **kw), write_real)
    fake = FakeZfs()
    fake.world.create(pool)
    double = Side("fakezfs", fake.spawn, fake.world.write)
    scenario(real, pool)
    scenario(double, pool)
    assert fake.errors == []
    mismatches = [f"--- zfs:\n{a}\n--- fakezfs:\n{b}" for a, b in zip(real.log, double.log, strict=True) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(real.log)} steps differ:\n\n" + "\n\n".join(mismatches)
