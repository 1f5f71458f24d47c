"""Resume tokens on real OpenZFS (issue 8 item 1): our own decoder reads real tokens exactly as
`zfs send -nvt` does, tokens we encode are ones zfs accepts, and a forged token sent over the real
protocol to a source of an encrypted dataset is refused before any `zfs send` runs."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
from zfstest import REAL_ZFS, get, guid, zfs, zrepl_argv, zrepl_env

import zrepl


def nvt_fields(token: str) -> dict[str, str]:
    """What `zfs send -nvt TOKEN` prints (top-level `key = value` lines of its nvlist dump)."""
    proc = subprocess.run([REAL_ZFS, "send", "-n", "-v", "-t", token], capture_output=True, text=True)
    fields = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("\t") and not line.startswith("\t\t"):
            key, sep, value = line.strip().partition(" = ")
            fields[key] = value if sep else "(boolean)"
    return fields


def interrupted_token(source: str, target: str, *, send_flags: tuple[str, ...] = (), from_: str | None = None,
                      nbytes: int = 200_000) -> str:
    """Cut a `zfs send | zfs recv -s` after nbytes; return the receiver's resume token."""
    argv = [REAL_ZFS, "send", *send_flags] + (["-i", from_] if from_ else []) + [source]
    send = subprocess.Popen(argv, stdout=subprocess.PIPE)
    recv = subprocess.Popen([REAL_ZFS, "recv", "-s", "-u", target], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert send.stdout is not None and recv.stdin is not None
    recv.stdin.write(send.stdout.read(nbytes))
    recv.stdin.close()
    send.kill()
    send.wait()
    recv.wait()
    token = get(target, "receive_resume_token")
    assert token not in ("", "-"), f"no resume token on {target}"
    return token


def big_file(dataset: str, name: str, mib: int = 4) -> None:
    with open(f"{get(dataset, 'mountpoint')}/{name}", "wb") as f:
        f.write(b"\xa5" * (mib << 20))


def test_real_tokens_decode_exactly_as_zfs_reads_them(make_pool, zfs_tree):
    src, dst = make_pool("src"), make_pool("dst")
    tree = zfs_tree(src, "plain\nenc {encryption=on}")
    for fs in ("plain", "enc"):
        zfs("set", "compression=off", f"{src}/{fs}")
        big_file(f"{src}/{fs}", "a")
        zfs("snapshot", f"{src}/{fs}@a")
        big_file(f"{src}/{fs}", "b")
        zfs("snapshot", f"{src}/{fs}@b")
    assert tree.key_file is not None
    cases = {
        "full": interrupted_token(f"{src}/plain@a", f"{dst}/full"),
        "raw": interrupted_token(f"{src}/enc@a", f"{dst}/raw", send_flags=("-w",)),
    }
    subprocess.run(f"{REAL_ZFS} send {src}/plain@a | {REAL_ZFS} recv -u {dst}/incr", shell=True, check=True)
    cases["incremental"] = interrupted_token(f"{src}/plain@b", f"{dst}/incr", from_=f"{src}/plain@a")
    for what, tok in cases.items():
        ours, theirs = zrepl.decode_resume_token(tok), nvt_fields(tok)
        assert ours.toname == theirs["toname"], what
        assert ours.toguid == int(theirs["toguid"], 0), what
        assert ours.fromguid == (int(theirs["fromguid"], 0) if "fromguid" in theirs else None), what
        assert ours.bytes == int(theirs["bytes"], 0), what
        assert ours.raw == ("rawok" in theirs), what
    assert zrepl.decode_resume_token(cases["raw"]).raw
    assert zrepl.decode_resume_token(cases["incremental"]).fromguid == guid(f"{src}/plain@a")


def test_tokens_we_encode_are_tokens_zfs_reads(pool, zfs_tree):
    zfs_tree(pool, "fs @s")
    fields = {"object": 1, "offset": 0, "bytes": 512, "toguid": guid(f"{pool}/fs@s"),
              "toname": f"{pool}/fs@s", "compressok": True, "rawok": True}
    theirs = nvt_fields(zrepl.encode_resume_token(fields))
    assert theirs["toname"] == f"{pool}/fs@s" and int(theirs["toguid"], 0) == fields["toguid"]
    assert "rawok" in theirs and "compressok" in theirs and "embedok" not in theirs


def test_a_forged_non_raw_token_for_an_encrypted_dataset_is_refused_and_nothing_is_sent(
        make_pool, zfs_tree, zfs_shim, tmp_path):
    src = make_pool("src")
    zfs_tree(src, "secret {encryption=on} @s1 @s2")
    cfg = tmp_path / "zrepl.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [global]
        status_file = "{tmp_path}/status.json"
        runtime_dir = "{tmp_path}/run"

        [[jobs]]
        name = "src"
        type = "source"
        filesystems = {{ "{src}/secret" = true }}
        serve = {{ type = "stdinserver", client_identities = ["backup"] }}
        send = {{ encrypted = true }}
        [jobs.snapshotting]
        type = "manual"
        """))
    s2 = guid(f"{src}/secret@s2")
    # the attacker's token: the encrypted snapshot, WITHOUT rawok (a plaintext stream)
    forged = zrepl.encode_resume_token({"object": 1, "offset": 0, "bytes": 0, "toguid": s2,
                                        "toname": f"{src}/secret@s2"})
    conn = zrepl.ssh_connect(zrepl_argv("--config", str(cfg), "stdinserver", "backup"), name="stdinserver",
                             timeout=120, env=zrepl_env(zfs_shim.env))
    try:
        conn.handshake_client("backup")
        got = []
        for req in ({"fs": f"{src}/secret", "to": "s2", "to_guid": s2, "resume_token": forged},
                    {"fs": f"{src}/secret", "to": "s1", "to_guid": guid(f"{src}/secret@s1"),
                     "resume_token": forged}):
            with pytest.raises(zrepl.RemoteError) as ei:
                conn.request("sender.send", req, stream_out=lambda body, s: got.append(s.copy_to(0)))
            assert "refusing the resume token" in str(ei.value)
        assert got == []
    finally:
        conn.close()
    assert zfs_shim.count("send") == 0  # nothing was sent, not even a size estimate
