"""Campaign (issue 14): hostile stdinserver clients of a sink on real OpenZFS.

- random frames (garbage bytes, unknown types, random and deeply nested JSON, wrong field types)
  after a valid HELLO, each on a fresh `zrepl.py stdinserver client1`: the server answers with
  frames only (ERROR among them) or closes, never a traceback or an internal error;
- crafted requests of every receiver kind aimed outside client1's subtree (traversing, absolute
  and forged names, foreign streams), over the protocol's own framing;
- hostile stream properties (issue 14 item 1): client1 receives, into its own subtree, an
  incremental stream whose `zrepl:placeholder` holds a TAB and a NEWLINE; the received value
  decides nothing, and client2 can still list and replicate.

Before/after: everything outside client1's subtree (datasets, snapshots, bookmarks, holds,
placeholder marks, resume tokens, on both pools) is identical. Seeded (ZREPL_CAMPAIGN_SEED, printed);
prints trials, recovered (the server stayed sane) and problems.
"""
from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import zrepl
from hostile_wire import garbage_trial
from repltest import state
from support import campaign_seed, sink_job, stdinserver, write_config
from zfstest import REAL_ZFS, get, guid, zfs, zrepl_argv, zrepl_env

HOSTILE_VALUE = "on\tforged\nsink/client2\tfilesystem\t1\t1\t1\t-\t-\t-\t-\t-"


def seed() -> int:
    return campaign_seed()


class Sink:
    def __init__(self, src: str, dst: str, cfg: Path):
        self.src, self.dst, self.cfg = src, dst, cfg
        self.client1 = f"{dst}/sink/client1"

    def outside_client1(self) -> list[tuple]:
        return [row for row in state(self.src, self.dst)
                if not zrepl.is_descendant(row[0].split("@")[0].split("#")[0], self.client1, include_self=True)]

    def connect(self, identity: str) -> zrepl.Connection:
        conn = zrepl.ssh_connect(zrepl_argv("--config", str(self.cfg), "stdinserver", identity), name="stdinserver",
                                 timeout=120, env=zrepl_env())
        conn.handshake_client(identity)
        return conn

    def raw(self) -> subprocess.Popen:
        return subprocess.Popen(zrepl_argv("--config", str(self.cfg), "stdinserver", "client1"), env=zrepl_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def make_sink(make_pool, zfs_tree, tmp_path: Path) -> Sink:
    src, dst = make_pool("src"), make_pool("dst")
    zfs_tree(src, "data @a @b\nhostile @h1")
    zfs_tree(dst, "other @o1 @o2 #ob\nsink/client2/x @c1 @c2\nsink/client1/prod @p1")
    zfs("hold", "keep", f"{dst}/other@o1")
    cfg = write_config(tmp_path, sink_job("sink", root_fs=f"{dst}/sink", serve=stdinserver("client1", "client2")))
    return Sink(src, dst, cfg)


def report(name: str, trials: int, recovered: int, problems: list[str]) -> None:
    print(f"campaign {name}: trials={trials} recovered={recovered} problems={len(problems)}")
    for p in problems:
        print(f"  problem: {p}")


def test_random_frames_get_error_frames_or_a_close_never_a_traceback(make_pool, zfs_tree, tmp_path):
    rng = random.Random(seed())
    sink = make_sink(make_pool, zfs_tree, tmp_path)
    before = sink.outside_client1()
    trials, recovered, problems = 0, 0, []
    deadline = time.monotonic() + 100
    while trials < 40 and time.monotonic() < deadline:
        trials += 1
        found = garbage_trial(sink.raw(), rng)
        recovered += not found
        problems += [f"trial {trials} {p}" for p in found]
    if sink.outside_client1() != before:
        problems.append("something outside client1's subtree changed")
    report("random frames", trials, recovered, problems)
    assert problems == [] and trials >= 10


BAD_FS = ["../client2/x", "prod/../../client2/x", "/{dst}/other", "{dst}/other", "client2/../../other", "", ".",
          "prod/x\n", "prod\t/x", "a" * 300, "prod//x", "prod/x@p1", "prod#ob", 5, None, ["prod"], {"fs": "x"}]


def crafted_requests(dst: str, src: str) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for raw in BAD_FS:
        fs = raw.format(dst=dst) if isinstance(raw, str) else raw
        out += [("receiver.destroy", {"fs": fs, "names": ["o1", "c1", "p1"]}),
                ("receiver.clear_token", {"fs": fs}),
                ("receiver.release_stale", {"fs": fs}),
                ("receiver.hold_last_received", {"fs": fs, "snapshot": "o1", "guid": 1}),
                ("receiver.holds", {"fs": fs, "names": ["o1"]}),
                ("receiver.prepare", {"fs": fs, "to": "z", "to_guid": 1, "from": None}),
                ("receiver.placeholders", {"filesystems": [fs]})]
    out += [("receiver.destroy", {"fs": "prod", "names": ["../../other@o1", "p1,o1", "p1@x", ""]}),
            ("receiver.destroy", {"fs": "prod", "names": "p1"}),
            ("receiver.hold_last_received", {"fs": "prod", "snapshot": "p1", "guid": float("inf")}),
            ("receiver.list", {"offset": -1}), ("receiver.list", {"offset": 10 ** 30}),
            ("receiver.list", {"offset": "x"}), ("endpoint.info", {"x": [[[[]]]]})]
    return out


def test_crafted_requests_outside_the_subtree_change_nothing_there(make_pool, zfs_tree, tmp_path):
    rng = random.Random(seed())
    sink = make_sink(make_pool, zfs_tree, tmp_path)
    before = sink.outside_client1()
    requests = crafted_requests(sink.dst, sink.src)
    rng.shuffle(requests)
    trials, recovered, problems, closed = 0, 0, [], 0
    conn = sink.connect("client1")
    for kind, body in requests:
        trials += 1
        try:
            conn.request(kind, body)
            recovered += 1
        except zrepl.RemoteError as exc:
            recovered += "internal error" not in str(exc).lower()
            if "internal error" in str(exc).lower():
                problems.append(f"{kind} {body!r}: {exc}")
        except zrepl.ProtocolError as exc:  # the server may close on what it cannot answer: allowed
            closed += 1
            recovered += 1
            conn.close()
            conn = sink.connect("client1")
            del exc
    # foreign streams: another pool's dataset, and names that leave the subtree
    for fs in ("../client2/x", f"{sink.dst}/other", "client2/x"):
        trials += 1
        producer = subprocess.Popen([REAL_ZFS, "send", f"{sink.dst}/other@o1"], stdout=subprocess.PIPE)
        req = {"fs": fs, "to": "o1", "to_guid": guid(f"{sink.dst}/other@o1"), "from": None}
        try:
            conn.request("receiver.receive", req, stream_in=zrepl.OutgoingStream.from_process(producer, "zfs send"))
            recovered += 1  # a receive that stayed inside client1's subtree is allowed
        except zrepl.RemoteError as exc:
            recovered += "internal error" not in str(exc).lower()
        except zrepl.ProtocolError:
            closed += 1
            recovered += 1
            conn.close()
            conn = sink.connect("client1")
        producer.wait(timeout=120)
    assert conn.request("endpoint.info", {})["root"] == sink.client1  # still serving
    conn.close()
    if sink.outside_client1() != before:
        problems.append("something outside client1's subtree changed: "
                        f"{sorted(set(before) ^ set(sink.outside_client1()))}")
    print(f"crafted requests: connections closed by the server: {closed}")
    report("crafted requests", trials, recovered, problems)
    assert problems == [] and recovered == trials


def test_hostile_stream_property_breaks_nothing_for_the_other_clients(make_pool, zfs_tree, tmp_path):
    sink = make_sink(make_pool, zfs_tree, tmp_path)
    hostile = f"{sink.src}/hostile"
    target = f"{sink.client1}/hostile"
    conn = sink.connect("client1")

    def receive(to: str, send_args: list[str], from_: str | None) -> None:
        producer = subprocess.Popen([REAL_ZFS, "send", "-p", *send_args], stdout=subprocess.PIPE)
        req = {"fs": "hostile", "to": to, "to_guid": guid(f"{hostile}@{to}"), "from": from_,
               "from_guid": None if from_ is None else guid(f"{hostile}{from_}")}
        conn.request("receiver.receive", req, stream_in=zrepl.OutgoingStream.from_process(producer, "zfs send"))
        assert producer.wait(timeout=120) == 0

    zfs("set", f"zrepl:placeholder={HOSTILE_VALUE}", hostile)
    zfs("snapshot", f"{hostile}@h2")
    before = sink.outside_client1()
    receive("h1", [f"{hostile}@h1"], None)
    receive("h2", ["-i", "@h1", f"{hostile}@h2"], "@h1")
    conn.close()
    value_source = zfs("get", "-H", "-o", "value,source", "zrepl:placeholder", target).rstrip("\n")
    received = zfs("get", "-H", "-o", "received", "zrepl:placeholder", target).rstrip("\n")
    print(f"zrepl:placeholder on the replica: {value_source!r}, received column {received!r}")
    assert value_source == "off\tlocal", (value_source, received)
    # the hostile value lands in the subtree anyway (set on the replica itself): nobody else suffers
    zfs("set", f"zrepl:placeholder={HOSTILE_VALUE}", f"{sink.client1}/prod")
    other = sink.connect("client2")
    listed = [name for name, _ in zrepl.fetch_listing(other, "receiver.list")]
    assert any(name.endswith("x") for name in listed), listed
    assert get(f"{sink.client1}/prod", "zrepl:placeholder") == HOSTILE_VALUE
    assert sink.outside_client1() == before  # (client2's own receive below changes its subtree, rightly)
    producer = subprocess.Popen([REAL_ZFS, "send", f"{sink.src}/data@a"], stdout=subprocess.PIPE)
    req = {"fs": "data", "to": "a", "to_guid": guid(f"{sink.src}/data@a"), "from": None}
    other.request("receiver.receive", req, stream_in=zrepl.OutgoingStream.from_process(producer, "zfs send"))
    assert producer.wait(timeout=120) == 0
    assert guid(f"{sink.dst}/sink/client2/data@a") == guid(f"{sink.src}/data@a")
    other.close()
