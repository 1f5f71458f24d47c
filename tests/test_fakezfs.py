"""The ZFS double itself, where it could lie: its texts and exit codes against what OpenZFS 2.3.2
printed in the test guest (quoted literally below), its resume tokens against a real one, and
the semantics zrepl depends on (guids survive a send, receive refusals, atomic batch destroys,
resumable state, kill and broken pipes). tests/zfs/test_fakezfs_fidelity_zfs.py replays a
scenario on both and compares them."""

from __future__ import annotations

import subprocess
import threading

import pytest

import zrepl
from fakezfs import FakeZfs, Unsupported, decode_token, encode_token, token_contents

# the listing zrepl.py once used, with a user property last: the double prints values raw, as zfs
# does (zrepl.py no longer lists user properties for that reason, see LIST_PROPERTIES)
LIST = ["zfs", "list", "-H", "-p", "-r", "-t", "filesystem,volume,snapshot,bookmark", "-o",
        ",".join((*zrepl.LIST_PROPERTIES, "zrepl:placeholder"))]
LIST_COLUMNS = LIST[-1].split(",")

# A token OpenZFS 2.3.2 wrote after `zfs send -i zprobe/a@s3 zprobe/a@s6 | zfs recv -s` was cut.
REAL_TOKEN = ("1-e91650f00-e0-789c636064000310a501c49c50360710a715e5e7a69766a63040c1e3c4def90d5bb3172800d9ec48ea"
              "f293b252934b18181aa1ea30e4d3d28a534b40323270793624f9a4ca92d46220bd434f0eabfe927c882b968459fcfdf0"
              "b8ae5403499e132c9f97989bcac0505550949f94aa9fe8506c0673320300766c2018")
REAL_TOKEN_CONTENTS = ("resume token contents:\nnvlist version: 0\n\tfromguid = 0xa06bb5809f8d61e3\n\tobject = 0x81\n"
                       "\toffset = 0x1c0000\n\tbytes = 0x1e2eb8\n\ttoguid = 0x757ee3f0fd3856a4\n"
                       "\ttoname = zprobe/a@s6\n")


@pytest.fixture
def fake() -> FakeZfs:
    fake = FakeZfs(clock=lambda: 1_800_000_000)
    fake.world.tree("p", "a @s1 @s2 #bm1=s1 @s3\na/b {zrepl:placeholder=on} @s1\na/b/c\nph {zrepl:placeholder=on}")
    yield fake
    assert fake.errors == []


def run(fake: FakeZfs, *args: str, input: bytes | None = None) -> tuple[int, str, str]:
    proc = fake.run(["zfs", *args], check=False, input=input)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def pipe(fake: FakeZfs, send: list[str], recv: list[str]) -> tuple[int, str, int, str]:
    """`zfs send ... | zfs recv ...` through spawn, as zrepl's local transport wires them."""
    sender = fake.spawn(["zfs", "send", *send], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL)
    receiver = fake.spawn(["zfs", "recv", *recv], stdin=sender.stdout.fileno(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    sender.stdout.close()
    _, recv_err = receiver.communicate(timeout=10)
    _, send_err = sender.communicate(timeout=10)
    return sender.returncode, send_err.decode(), receiver.returncode, recv_err.decode()


# ---- resume tokens ------------------------------------------------------------------------------

def test_tokens_are_byte_identical_to_openzfs_ones():
    fields = decode_token(REAL_TOKEN)
    assert fields == {"fromguid": 0xA06BB5809F8D61E3, "object": 0x81, "offset": 0x1C0000, "bytes": 0x1E2EB8,
                      "toguid": 0x757EE3F0FD3856A4, "toname": "zprobe/a@s6"}
    assert encode_token(fields) == REAL_TOKEN
    assert token_contents(fields) == REAL_TOKEN_CONTENTS
    flagged = {**fields, "compressok": True, "rawok": True}
    assert decode_token(encode_token(flagged)) == flagged


def test_send_n_v_t_prints_the_token_contents_like_zfs(fake):
    # zrepl's decoder reads this text: the double must print zfs's layout
    rc, out, err = run(fake, "send", "-n", "-v", "-t", REAL_TOKEN)
    assert (rc, err) == (255, "cannot resume send: 'zprobe/a@s6' used in the initial send no longer exists\n")
    assert out == REAL_TOKEN_CONTENTS
    assert run(fake, "send", "-n", "-v", "-t", "1-abc-def")[0::2] == (
        255, "cannot resume send: resume token is corrupt (incorrect checksum)\n")
    assert run(fake, "send", "-n", "-v", "-t", "garbage")[0::2] == (
        255, "cannot resume send: resume token is corrupt (invalid format)\n")


# ---- listing and properties ---------------------------------------------------------------------

def test_list_columns_order_and_inherited_user_properties(fake):
    rc, out, err = run(fake, *LIST[1:], "p/a")
    assert rc == 0 and err == ""
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["p/a", "p/a@s1", "p/a@s2", "p/a@s3", "p/a#bm1", "p/a/b", "p/a/b@s1", "p/a/b/c"]
    w = fake.world
    a = ["p/a", "filesystem", str(w.guid("p/a")), str(w.dataset("p/a").createtxg), "1800000000", "-", "-", "off", "-"]
    assert rows[0] == a
    assert rows[1][5] == "0" and rows[1][1] == "snapshot"
    # a bookmark has the guid, createtxg and creation of its snapshot and "-" for the rest
    assert rows[4] == ["p/a#bm1", "bookmark", rows[1][2], rows[1][3], rows[1][4], "-", "-", "-", "-"]
    # zfs shows inherited user properties on children and snapshots (zrepl must check the source)
    assert [r[-1] for r in rows[5:]] == ["on", "on", "on"]
    assert run(fake, "get", "-H", "-p", "zrepl:placeholder", "p/a/b/c")[1] == \
        "p/a/b/c\tzrepl:placeholder\ton\tinherited from p/a/b\n"
    assert run(fake, "get", "-H", "-p", "-o", "name,property,value,source", "zrepl:placeholder", "p/a/b@s1")[1] == \
        "p/a/b@s1\tzrepl:placeholder\ton\tinherited from p/a/b\n"
    assert run(fake, "get", "-H", "-p", "-o", "value", "zrepl:placeholder", "p/a")[1] == "-\n"


def test_list_depth_one_and_missing_roots(fake):
    out = run(fake, "list", "-H", "-p", "-d", "1", "-t", "filesystem,volume,snapshot,bookmark", "-o", "name", "p/a")[1]
    assert out.split() == ["p/a", "p/a@s1", "p/a@s2", "p/a@s3", "p/a#bm1", "p/a/b"]
    rc, out, err = run(fake, "list", "-H", "-p", "-r", "-o", "name", "p/a/b", "p/nope")
    assert (rc, out, err) == (1, "p/a/b\np/a/b/c\n", "cannot open 'p/nope': dataset does not exist\n")
    rc, _, err = run(fake, "list", "-H", "-p", "-o", "name,nosuchprop", "p/a")
    assert rc == 2 and err.startswith("bad property list: invalid property 'nosuchprop'\nusage:\n")


def test_property_values_are_printed_raw_like_zfs(fake):
    fake.tamper.property("p/a", "zrepl:placeholder", "x\ty\nz")
    out = run(fake, *LIST[1:], "p/a")[1]
    assert "\tx\ty\nz\n" in out  # zfs does not escape: the listing parser has to cope


def test_tamper_makes_hostile_states(fake):
    w = fake.world
    w.tree("p", "admin/data @a")
    fake.tamper.inherited_placeholder("p/admin/data")  # on the parent only: data looks like a placeholder
    listed = zrepl.parse_zfs_list(run(fake, *LIST[1:], "p/admin")[1], LIST_COLUMNS)
    assert listed["p/admin/data"].props["zrepl:placeholder"] == "on"
    assert w.property("p/admin/data", "zrepl:placeholder") == ("on", "inherited from p/admin")
    fake.tamper.creation("p/admin/data@a", 4_000_000_000)  # a sender clock years ahead
    assert listed["p/admin/data"].snapshots()[0].creation != 4_000_000_000
    admin = zrepl.parse_zfs_list(run(fake, *LIST[1:], "p/admin")[1], LIST_COLUMNS)
    assert admin["p/admin/data"].snapshots()[0].creation == \
        4_000_000_000


# ---- error texts observed on OpenZFS 2.3.2 ---------------------------------------------------------

@pytest.mark.parametrize("argv,rc,stderr", [
    (["create", "-o", "zrepl:placeholder=on", "-o", "mountpoint=none", "p/x/y"], 1,
     "cannot create 'p/x/y': parent does not exist\n"),
    (["create", "p/a"], 1, "cannot create 'p/a': dataset already exists\n"),
    (["snapshot", "p/a@s1"], 1, "cannot create snapshot 'p/a@s1': dataset already exists\n"),
    (["snapshot", "p/a@s1", "p/a/b@s2"], 1,
     "cannot create snapshot 'p/a@s1': dataset already exists\nno snapshots were created\n"),
    (["bookmark", "p/a@s1", "p/a#bm1"], 1, "cannot create bookmark 'p/a#bm1': bookmark exists\n"),
    (["hold", "t2", "p/a@nope"], 1, "cannot hold snapshot 'p/a@nope': dataset does not exist\n"),
    (["hold", "t2", "p/a#bm1"], 1, "'p/a#bm1' is not a snapshot\n"),
    (["release", "t9", "p/a@s1"], 1, "cannot release hold from snapshot 'p/a@s1': no such tag on this dataset\n"),
    (["release", "t1", "p/a@nope"], 1, "cannot release hold from snapshot 'p/a@nope': dataset does not exist\n"),
    (["destroy", "p/a@nope,nope2"], 1, "could not find any snapshots to destroy; check snapshot names.\n"),
    (["destroy", "-nv", "p/a@nope"], 1, "could not find any snapshots to destroy; check snapshot names.\n"),
    (["destroy", "p/nope@s1"], 1, "cannot open 'p/nope': dataset does not exist\n"),
    (["destroy", "p/a#nope"], 1, "bookmark 'p/a#nope' does not exist.\n"),
    (["get", "-H", "-p", "-o", "value", "encryption", "p/nope"], 1, "cannot open 'p/nope': dataset does not exist\n"),
    (["send", "-n", "-v", "-P", "p/a@nope"], 1, "cannot open 'p/a@nope': dataset does not exist\n"),
    (["send", "-n", "-v", "-P", "-i", "p/a@s3", "p/a@s1"], 1,
     "warning: cannot send 'p/a@s1': not an earlier snapshot from the same fs\n"),
    (["recv", "-A", "p/a"], 1, "'p/a' does not have any resumable receive state to abort\n"),
])
def test_error_texts_and_exit_codes_are_zfs_ones(fake, argv, rc, stderr):
    assert run(fake, *argv)[0::2] == (rc, stderr)


def test_usage_errors_exit_2_with_the_message_first(fake):
    rc, _, err = run(fake, "snapshot", "p/nope@s1")
    assert rc == 2 and err.startswith("cannot open 'p/nope': dataset does not exist\nusage:\n\tsnapshot [-r]")
    rc, _, err = run(fake, "recv", "-A", "p/nope")
    assert rc == 2 and err.startswith("cannot open 'p/nope': dataset does not exist\nusage:\n\treceive [-vMnsFhu]")


def test_holds_are_per_snapshot_and_block_a_whole_destroy_batch(fake):
    assert run(fake, "hold", "t1", "p/a@s1")[0] == 0
    # one snapshot already has the tag: the other is held all the same, the command fails
    assert run(fake, "hold", "t1", "p/a@s1", "p/a@s2")[0::2] == (
        1, "cannot hold snapshot 'p/a@s1': tag already exists on this dataset\n")
    rc, out, err = run(fake, "holds", "-H", "p/a@s1", "p/a@s2", "p/a@nope")
    assert rc == 1 and err == "cannot open 'p/a@nope': dataset does not exist\n"
    assert [line.split("\t")[:2] for line in out.splitlines()] == [["p/a@s1", "t1"], ["p/a@s2", "t1"]]
    assert zrepl.parse_holds(out) == {"p/a@s1": ["t1"], "p/a@s2": ["t1"]}
    # destroying a batch is one transaction: a held member keeps all of them
    assert run(fake, "destroy", "p/a@s2,s3")[0::2] == (
        1, "cannot destroy snapshot p/a@s2: it's being held. Run 'zfs holds -r p/a@s2' to see holders.\n")
    assert fake.world.snapshots("p/a") == ["s1", "s2", "s3"]
    fake.world.hold("t1", "p/a@s3")  # zfs names every held one (in no fixed order)
    assert sorted(run(fake, "destroy", "p/a@s2,s3")[2].splitlines()) == [
        "cannot destroy snapshot p/a@s2: it's being held. Run 'zfs holds -r p/a@s2' to see holders.",
        "cannot destroy snapshot p/a@s3: it's being held. Run 'zfs holds -r p/a@s3' to see holders."]
    fake.world.dataset("p/a").snapshots[2].holds.clear()
    assert run(fake, "destroy", "-nv", "p/a@s2,s3")[:2] == (0, "would destroy p/a@s2\nwould destroy p/a@s3\n"
                                                             "would reclaim 0B\n")
    assert run(fake, "destroy", "p/a@s3,nope")[0] == 0  # missing names in a batch are skipped
    assert fake.world.snapshots("p/a") == ["s1", "s2"] and fake.world.bookmarks("p/a") == ["bm1"]


# ---- send and receive -----------------------------------------------------------------------------

def test_full_then_incremental_keep_snapshot_guids_and_creation(fake):
    w = fake.world
    w.create("p/dst")
    assert pipe(fake, ["-v", "-P", "p/a@s1"], ["-u", "-s", "-o", "zrepl:placeholder=off", "p/dst/a"])[0::2] == (0, 0)
    assert pipe(fake, ["-I", "p/a@s1", "p/a@s3"], ["-u", "-s", "p/dst/a"])[0::2] == (0, 0)
    src, dst = w.dataset("p/a"), w.dataset("p/dst/a")
    def same(s):
        return s.name, s.guid, s.creation
    assert [same(s) for s in dst.snapshots] == [same(s) for s in src.snapshots]
    assert dst.guid != src.guid
    assert all(d.createtxg > s.createtxg for d, s in zip(dst.snapshots, src.snapshots, strict=True))
    assert w.property("p/dst/a", "zrepl:placeholder") == ("off", "local")
    # an incremental whose snapshot is there already is consumed and ignored, like zfs does
    assert pipe(fake, ["-i", "p/a@s1", "p/a@s2"], ["-u", "-s", "p/dst/a"])[0::2] == (0, 0)


def test_estimates_and_progress_lines_have_zfs_layout(fake):
    rc, out, _ = run(fake, "send", "-n", "-v", "-P", "-I", "p/a@s1", "p/a@s3")
    lines = [line.split("\t") for line in out.splitlines()]
    assert rc == 0 and [line[:3] for line in lines[:2]] == [["incremental", "s1", "p/a@s2"],
                                                            ["incremental", "s2", "p/a@s3"]]
    assert lines[2][0] == "size" and int(lines[2][1]) == int(lines[0][3]) + int(lines[1][3])
    assert zrepl.parse_send_estimate(out) == int(lines[2][1])
    out = run(fake, "send", "-n", "-v", "-P", "-i", "p/a#bm1", "p/a@s3")[1]
    assert out.splitlines()[0].split("\t")[:3] == ["incremental", "p/a#bm1", "p/a@s3"]
    fake.world.write("p/a", 200_000)
    fake.world.snapshot("p/a@big")
    proc = fake.spawn(["zfs", "send", "-v", "-P", "p/a@big"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    stream, err = proc.communicate(timeout=10)
    header, *progress = err.decode().splitlines()[:2], *err.decode().splitlines()[2:]
    assert proc.returncode == 0 and header[0].startswith("full\tp/a@big\t") and header[1].startswith("size\t")
    assert int(header[1].split("\t")[1]) == len(stream)  # the estimate is the stream's length
    counts = [int(line.split("\t")[1]) for line in progress]
    assert counts == sorted(counts) and counts[-1] > 200_000
    assert all(line.split("\t")[2] == "p/a@big" for line in progress)


@pytest.mark.parametrize("send,recv,stderr", [
    (["p/a@s2"], ["-u", "-s", "p/dst/a"],
     "cannot receive new filesystem stream: destination 'p/dst/a' exists\nmust specify -F to overwrite it\n"),
    (["p/a@s2"], ["-u", "-s", "-F", "p/dst/a"],
     "cannot receive new filesystem stream: destination has snapshots (eg. p/dst/a@s1)\n"
     "must destroy them to overwrite it\n"),
    (["p/a@s1"], ["-u", "-s", "p/dst/q/r"],
     "cannot open 'p/dst/q': dataset does not exist\ncannot receive new filesystem stream: unable to restore to "
     "destination\n"),
    (["-i", "p/a@s2", "p/a@s3"], ["-u", "-s", "p/dst/a"],
     "cannot receive incremental stream: most recent snapshot of p/dst/a does not\nmatch incremental source\n"),
    (["-i", "p/a@s1", "p/a@s3"], ["-u", "-s", "p/dst/nothere"],
     "cannot receive incremental stream: destination 'p/dst/nothere' does not exist\n"),
])
def test_receive_refusals_are_zfs_texts(fake, send, recv, stderr):
    fake.world.create("p/dst")
    assert pipe(fake, ["p/a@s1"], ["-u", "-s", "p/dst/a"])[0::2] == (0, 0)
    send_rc, _, recv_rc, recv_err = pipe(fake, send, recv)
    assert (recv_rc, recv_err) == (1, stderr)
    assert send_rc in (0, -13)  # done, or killed by SIGPIPE when the receiver left first


def test_modified_or_diverged_targets_are_refused_and_F_rolls_back(fake):
    w = fake.world
    w.create("p/dst")
    pipe(fake, ["p/a@s1"], ["-u", "-s", "p/dst/a"])
    w.snapshot("p/dst/a@rogue")  # a snapshot alone changes no data: zfs accepts the incremental
    assert pipe(fake, ["-i", "p/a@s1", "p/a@s2"], ["-u", "-s", "p/dst/a"])[2] == 0
    w.write("p/dst/a")
    refused = pipe(fake, ["-i", "p/a@s2", "p/a@s3"], ["-u", "-s", "p/dst/a"])
    assert refused[2:] == (1, "cannot receive incremental stream: destination p/dst/a has been modified\n"
                              "since most recent snapshot\n")
    w.snapshot("p/dst/a@newer")
    assert pipe(fake, ["-i", "p/a@s2", "p/a@s3"], ["-u", "-s", "-F", "p/dst/a"])[2] == 0
    assert w.snapshots("p/dst/a") == ["s1", "rogue", "s2", "s3"]  # -F destroyed @newer


def test_a_forced_full_receive_replaces_an_empty_placeholder_but_not_with_encryption(fake):
    w = fake.world
    before = w.guid("p/ph")
    assert pipe(fake, ["p/a@s1"], ["-u", "-s", "-F", "-o", "zrepl:placeholder=off", "p/ph"])[2] == 0
    assert w.snapshots("p/ph") == ["s1"] and w.guid("p/ph") != before and w.get("p/ph", "zrepl:placeholder") == "off"
    w.create("p/enc", encrypted=True)
    w.tree("p", "enc @e1\nph2 {zrepl:placeholder=on}")
    assert pipe(fake, ["-w", "p/enc@e1"], ["-u", "-s", "-F", "p/ph2"])[2:] == (
        1, "cannot receive new filesystem stream: zfs receive -F cannot be used to destroy an encrypted filesystem "
           "or overwrite an unencrypted one with an encrypted one\n")


def test_raw_sends_keep_the_ciphertext_and_its_key_on_the_sender(fake):
    w = fake.world
    w.create("p/enc", encrypted=True)
    w.tree("p", "enc @e1\nenc/child @c1\ndst")
    assert (w.get("p/enc/child", "encryptionroot"), w.get("p/enc/child", "keystatus")) == ("p/enc", "available")
    assert pipe(fake, ["-w", "p/enc@e1"], ["-u", "-s", "p/dst/enc"])[0::2] == (0, 0)
    assert [w.get("p/dst/enc", p) for p in ("encryption", "encryptionroot", "keystatus")] == [
        "aes-256-gcm", "p/dst/enc", "unavailable"]
    assert w.guid("p/dst/enc@e1") == w.guid("p/enc@e1")
    assert run(fake, "send", "-n", "-v", "-P", "-p", "p/enc@e1")[0::2] == (
        1, "cannot send p/enc@e1: encrypted dataset p/enc may not be sent with properties without the raw flag\n"
           "warning: cannot send 'p/enc@e1': backup failed\n")


def test_a_cut_stream_leaves_a_resume_token_and_the_resumed_stream_completes(fake):
    w = fake.world
    w.create("p/dst")
    pipe(fake, ["p/a@s1"], ["-u", "-s", "p/dst/a"])
    w.write("p/a", 300_000)
    w.snapshot("p/a@big")
    fake.cut("send", 100_000, stderr="connection reset\n")
    send_rc, send_err, recv_rc, recv_err = pipe(fake, ["-v", "-P", "-i", "p/a@s1", "p/a@big"], ["-u", "-s", "p/dst/a"])
    token = w.resume_token("p/dst/a")
    assert (send_rc, recv_rc) == (1, 1) and send_err.endswith("connection reset\n") and token
    assert recv_err == ("cannot receive incremental stream: checksum mismatch or incomplete stream.\n"
                        "Partially received snapshot is saved.\n"
                        "A resuming stream can be generated on the sending system by running:\n"
                        f"    zfs send -t {token}\n")
    assert zrepl.classify_zfs_error(recv_err) == "resume-token"
    listed = zrepl.parse_zfs_list(run(fake, *LIST[1:], "p/dst/a")[1], LIST_COLUMNS)["p/dst/a"]
    assert listed.props["receive_resume_token"] == token
    decoded = zrepl.decode_resume_token(token)  # the double writes tokens as OpenZFS does
    assert f"toname = {decoded.toname}" in run(fake, "send", "-n", "-v", "-t", token)[1]
    assert (decoded.toname, decoded.toguid, decoded.fromguid) == ("p/a@big", w.guid("p/a@big"), w.guid("p/a@s1"))
    assert 0 < decoded.bytes < 300_000
    # another stream is refused while the state is there
    assert pipe(fake, ["-i", "p/a@s1", "p/a@s2"], ["-u", "-s", "p/dst/a"])[3] == (
        'cannot receive incremental stream: destination p/dst/a contains partially-complete state from '
        '"zfs receive -s".\n')
    fake.clear()
    assert pipe(fake, ["-v", "-P", "-t", token], ["-u", "-s", "p/dst/a"])[0::2] == (0, 0)
    assert w.snapshots("p/dst/a") == ["s1", "big"] and w.resume_token("p/dst/a") is None


def test_a_cut_full_receive_makes_a_dataset_that_abort_removes(fake):
    w = fake.world
    w.create("p/dst")
    w.write("p/a", 300_000)
    w.snapshot("p/a@big")
    fake.cut("send", 50_000)
    pipe(fake, ["p/a@big"], ["-u", "-s", "p/dst/new"])
    assert w.snapshots("p/dst/new") == [] and w.resume_token("p/dst/new")
    assert run(fake, "recv", "-A", "p/dst/new")[0] == 0 and not w.exists("p/dst/new")
    pipe(fake, ["p/a@big"], ["-u", "p/dst/nos"])  # without -s: nothing is kept
    assert not w.exists("p/dst/nos")


# ---- processes and fault rules ---------------------------------------------------------------------

def test_kill_ends_a_hung_command_and_a_gone_reader_kills_the_sender_with_sigpipe(fake):
    hang = fake.hang("send")
    proc = fake.spawn(["zfs", "send", "p/a@s1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    assert hang.entered.wait(5) and proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.01)
    proc.kill()
    assert proc.wait(timeout=5) == -9
    proc.stdout.close()
    proc.stderr.close()
    fake.clear()
    fake.world.write("p/a", 1 << 20)
    fake.world.snapshot("p/a@big")
    proc = fake.spawn(["zfs", "send", "p/a@big"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=5) == -13
    proc.stderr.close()


def test_fail_hang_and_run_timeouts(fake):
    fake.fail("destroy", stderr="cannot destroy 'p/a@s1': dataset is busy\n", times=1)
    with pytest.raises(zrepl.ZfsError) as exc:
        fake.destroy_snapshots("p/a", ["s1"])
    assert exc.value.kind == "busy" and fake.world.snapshots("p/a") == ["s1", "s2", "s3"]
    fake.destroy_snapshots("p/a", ["s1"])  # times=1: the second goes through
    assert fake.world.snapshots("p/a") == ["s2", "s3"]
    hang = fake.hang("list")
    with pytest.raises(zrepl.ZfsError) as exc:
        fake.run(["zfs", "list", "-H", "-p", "-o", "name", "p"], timeout=0.05)
    assert exc.value.kind == "timeout"
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(fake.list_one("p/a")))
    t.start()
    assert hang.entered.wait(5)
    hang.release()
    t.join(5)
    assert done and done[0].name == "p/a"


def test_every_argv_is_recorded_and_counted_and_the_unmodelled_is_refused(fake):
    fake.snapshot(["p/a@n1", "p/a/b@n1"])
    fake.hold("t", ["p/a@n1"])
    assert fake.calls == [["zfs", "snapshot", "p/a@n1", "p/a/b@n1"], ["zfs", "hold", "t", "p/a@n1"]]
    assert fake.counters.spawns == {"snapshot": 1, "hold": 1}
    assert fake.world.holds("p/a@n1") == {"t"}
    with pytest.raises(Unsupported):
        fake.run(["zfs", "rename", "p/a", "p/z"])
    with pytest.raises(Unsupported):
        fake.run(["zpool", "list"])
