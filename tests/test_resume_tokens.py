"""Resume tokens are untrusted input (issue 8 item 1): decoded here byte for byte as ZFS writes
them, and accepted by the sending side only for exactly the step it was asked for."""

import struct
import zlib

import pytest

import zrepl
from zrepl import DatasetInfo, Version

FS = "tank/secret"
A = Version(FS, "a", "snapshot", 0xA1, 10, 1_700_000_010)
B = Version(FS, "b", "snapshot", 0xB2, 20, 1_700_000_020)
OTHER = Version("tank/other", "x", "snapshot", 0xC3, 30, 1_700_000_030)


def token(**fields):
    base = {"object": 1, "offset": 0, "bytes": 4096, "toguid": B.guid, "toname": f"{FS}@b"}
    base.update(fields)
    return zrepl.encode_resume_token({k: v for k, v in base.items() if v is not None})


def test_roundtrip_decodes_every_field_and_the_flags():
    t = zrepl.decode_resume_token(token(fromguid=A.guid, rawok=True, compressok=True))
    assert (t.toguid, t.toname, t.fromguid, t.bytes) == (B.guid, f"{FS}@b", A.guid, 4096)
    assert t.raw and t.flags == {"rawok", "compressok"}
    full = zrepl.decode_resume_token(token())
    assert full.fromguid is None and not full.raw


def _raw_token(packed: bytes) -> str:
    compressed = zlib.compress(packed)
    return f"1-{zrepl._fletcher4_first_word(compressed):x}-{len(packed):x}-{compressed.hex()}"


def _packed(t: str) -> bytes:
    return zlib.decompress(bytes.fromhex(t.rsplit("-", 1)[1]))


def _pair(name: str, dtype: int, nelem: int, data: bytes) -> bytes:
    raw = name.encode() + b"\0"
    size = zrepl._nv_align(16 + len(raw)) + zrepl._nv_align(len(data))
    head = struct.pack("<ihhii", size, len(raw), 0, nelem, dtype) + raw
    head += b"\0" * (zrepl._nv_align(len(head)) - len(head)) + data
    return head + b"\0" * (size - len(head))


def test_ambiguous_or_foreign_tokens_are_refused():
    good = _packed(token())
    body, end = good[:-4], good[-4:]
    dup_toguid = body + _pair("toguid", 8, 1, struct.pack("<Q", OTHER.guid)) + end
    nested = body + _pair("extra", 19, 1, b"\0" * 24) + end  # an embedded nvlist
    unknown = body + _pair("resume_redact_book", 9, 1, b"x\0") + end
    wrong_type = _packed(zrepl.encode_resume_token({"toguid": "0xb2", "toname": f"{FS}@b"}))
    xdr = b"\x01\x01\x00\x00" + good[4:]
    trailing = good + b"\0" * 8
    for packed in (dup_toguid, nested, unknown, wrong_type, xdr, trailing):
        with pytest.raises(ValueError):
            zrepl.decode_resume_token(_raw_token(packed))
    t = token()
    version, checksum, length, payload = t.split("-")
    for bad in (f"2-{checksum}-{length}-{payload}", f"1-{int(checksum, 16) + 1:x}-{length}-{payload}",
                f"1-{checksum}-{int(length, 16) + 1:x}-{payload}", t + "0", "1-abc", t.upper(), t + "\n"):
        with pytest.raises(ValueError):
            zrepl.decode_resume_token(bad)
    # a NEWLINE in toname cannot fake further keys: the name itself is refused
    with pytest.raises(ValueError):
        zrepl.decode_resume_token(token(toname=f"{FS}@b\n\trawok = 1"))


class ListingZfs(zrepl.Zfs):
    """A ZFS layer that only answers listings (the endpoint checks tokens against its own)."""

    def __init__(self, datasets):
        super().__init__()
        self.datasets = {d.name: d for d in datasets}
        self.ran = []

    def list_datasets(self, roots, properties=zrepl.LIST_PROPERTIES, depth=None):
        return {n: d for n, d in self.datasets.items() if any(zrepl.is_descendant(n, r, True) for r in roots)}

    def run(self, argv, **kwargs):
        self.ran.append(list(argv))
        raise AssertionError(f"no zfs command may run: {argv}")

    spawn = run


def sender(encrypted_fs=True, encrypted=True):
    props = {"encryption": "aes-256-gcm"} if encrypted_fs else {}
    zfs = ListingZfs([DatasetInfo(FS, "filesystem", props=props, versions=[A, B]),
                      DatasetInfo("tank/other", "filesystem", props=props, versions=[OTHER])])
    cfg = zrepl.SendConfig(encrypted=encrypted)
    return zrepl.SenderEndpoint(zfs, "src", zrepl.DatasetFilter({"tank/secret": True}), cfg, job_type="source"), zfs


def request(tok, **kw):
    fields = {"fs": FS, "to": "b", "to_guid": B.guid, "resume_token": tok}
    fields.update(kw)
    return zrepl.StepRequest(**fields)


def test_the_matching_raw_token_is_accepted():
    ep, _ = sender()
    argv = ep._send_argv(request(token(fromguid=A.guid, rawok=True), from_="@a", from_guid=A.guid), False)
    assert argv[-2:][0] == "-t"


@pytest.mark.parametrize("tok,extra,why", [
    (token(), {}, "non-raw"),  # plaintext of an encrypted dataset
    (token(toguid=OTHER.guid, toname="tank/other@x", rawok=True), {}, "not a snapshot of"),
    (token(toguid=OTHER.guid, rawok=True), {}, "is not tank/secret@b here"),  # guid elsewhere in the pool
    (token(toguid=B.guid, rawok=True), {"to_guid": OTHER.guid}, "is not tank/secret@b here"),
    (token(fromguid=A.guid, rawok=True), {}, "mixed up"),  # an incremental token for a full step
    (token(rawok=True), {"from_": "@a", "from_guid": A.guid}, "mixed up"),
    (token(fromguid=OTHER.guid, rawok=True), {"from_": "@a", "from_guid": OTHER.guid}, "incremental source"),
    ("1-deadbeef-10-00", {}, "refusing the resume token"),
])
def test_a_forged_token_is_refused_before_zfs_runs(tok, extra, why):
    ep, zfs = sender()
    with pytest.raises(zrepl.EndpointError) as ei:
        ep._send_argv(request(tok, **extra), False)
    assert why in str(ei.value) and not ei.value.temporary
    assert zfs.ran == []


def test_a_raw_token_for_a_job_that_sends_plaintext_is_refused_too():
    ep, _ = sender(encrypted_fs=False, encrypted=False)
    with pytest.raises(zrepl.EndpointError, match="asks for a raw send"):
        ep._send_argv(request(token(rawok=True)), False)


# ---- listings of any size (issue 8 item 7) ----

class StubSender:
    """Just enough of a SenderEndpoint for sender_handlers' listing."""

    def __init__(self, datasets):
        self.datasets = datasets
        self.info = zrepl.PeerInfo(job="src", type="source", abstraction_job="src")
        self.job = "src"
        self.listed = 0

    def list_filesystems(self):
        self.listed += 1
        return self.datasets


def test_a_listing_far_over_one_frame_arrives_whole_in_bounded_pages():
    import threading
    datasets = [DatasetInfo(f"tank/fs{i:03}", "filesystem", guid=i + 1, createtxg=1,
                            versions=[Version(f"tank/fs{i:03}", f"zrepl_{j:06}", "snapshot", (i << 20) + j, j + 2,
                                              1_700_000_000 + j) for j in range(80)])
                for i in range(100)]
    stub = StubSender(datasets)
    client, server = zrepl.local_pair(timeout=60)
    thread = threading.Thread(target=zrepl.serve_connection, args=(server, zrepl.sender_handlers(stub)), daemon=True)
    thread.start()
    client.handshake_client("c")
    got = zrepl.RemoteSender(client).list_filesystems()
    client.close()
    thread.join(10)
    assert [(d.name, [(v.name, v.guid) for v in d.versions]) for d in got] == \
        [(d.name, [(v.name, v.guid) for v in d.versions]) for d in datasets]
    assert stub.listed == 1  # one zfs listing, served page by page
    total = sum(len(zrepl.json.dumps(zrepl.listing_item_to_wire(item)))
                for item in zrepl.listing_items((d.name, d) for d in datasets))
    assert total > 4 * zrepl.LISTING_PAGE_BYTES and zrepl.LISTING_PAGE_BYTES * 2 < zrepl.MAX_HEADER_SIZE
    assert client.stats.frames_received.get("RESPONSE", 0) >= total // zrepl.LISTING_PAGE_BYTES


def test_a_page_offset_from_the_peer_is_validated():
    for bad in (-1, 10**9, "0", True, None):
        with pytest.raises(zrepl.EndpointError):
            zrepl.listing_page([{"version": {}}], bad)
