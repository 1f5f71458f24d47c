"""Listings at 100,000 snapshots without holding them twice (issue 12 item 4): repeated values are
one object each, the text is parsed a line at a time with splitlines' exact cuts, and a serving
side lets go of its listing once the client has it. Figures: bench/memory.py, bench/README.md."""
import gc
import threading

import pytest

import zrepl

COLUMNS = len(zrepl.LIST_PROPERTIES)


def row(name, kind, guid, createtxg, creation, userrefs="-"):
    values = {"name": name, "type": kind, "guid": guid, "createtxg": createtxg, "creation": creation,
              "userrefs": userrefs, "receive_resume_token": "-", "encryption": "off" if kind == "filesystem" else "-"}
    return "\t".join(str(values[c]) for c in zrepl.LIST_PROPERTIES)


def recursive_listing(filesystems, snapshots):
    """What `zfs snapshot -r` leaves: every filesystem's k-th snapshot has one name, txg and time."""
    lines = []
    guid = 1000
    for i in range(filesystems):
        fs = f"tank/fs{i}"
        guid += 1
        lines.append(row(fs, "filesystem", guid, 5 + i, 1_700_000_000))
        for k in range(snapshots):
            guid += 1
            lines.append(row(f"{fs}@zrepl_{k:04d}", "snapshot", guid, 100 + k, 1_700_000_000 + 600 * k, 0))
    return "\n".join(lines) + "\n"


def test_snapshots_of_one_recursive_snapshot_share_their_name_txg_and_time():
    listing = zrepl.parse_zfs_list(recursive_listing(3, 4))
    a, b, c = (listing[f"tank/fs{i}"].snapshots() for i in range(3))
    for x, y, z in zip(a, b, c, strict=True):
        assert x.name == y.name == z.name and x.name is y.name is z.name
        assert x.createtxg is y.createtxg is z.createtxg and x.creation is y.creation is z.creation
        assert x.kind is y.kind is z.kind  # the constant, not each row's copy of it
        assert x.guid != y.guid  # a guid is never shared: each snapshot has its own
    assert [v.name for v in a] == [f"zrepl_{k:04d}" for k in range(4)]
    assert [v.createtxg for v in a] == [100, 101, 102, 103]
    assert all(type(v.kind) is str and v.kind == "snapshot" for v in a)


def test_a_client_copy_from_the_wire_shares_the_names_of_the_listing_it_copies():
    original = zrepl.parse_zfs_list(recursive_listing(2, 3))
    shared = zrepl.ListingValues()
    copies = [[zrepl.version_from_wire(ds.name, zrepl.version_to_wire(v), shared) for v in ds.versions]
              for ds in original.values()]
    for ds, copy in zip(original.values(), copies, strict=True):
        assert copy == ds.versions
        assert all(c.name is v.name for c, v in zip(copy, ds.versions, strict=True))
    assert all(x.creation is y.creation for x, y in zip(copies[0], copies[1], strict=True))


@pytest.mark.parametrize("text", [
    row("tank", "filesystem", 1, 1, 17) + "\r\n" + row("tank@a", "snapshot", 2, 3, 17, 0) + "\r\n",
    row("tank", "filesystem", 1, 1, 17) + "\n" + row("tank@a", "snapshot", 2, 3, 17, 0),  # no final newline
    row("tank", "filesystem", 1, 1, 17) + "\n\n\n" + row("tank@a", "snapshot", 2, 3, 17, 0) + "\n",
    row("tank", "filesystem", 1, 1, 17) + "\x1c" + row("tank@a", "snapshot", 2, 3, 17, 0) + "\u2028",
])
def test_the_text_is_cut_into_lines_where_splitlines_cuts_it(text):
    listing = zrepl.parse_zfs_list(text)
    assert [v.full_name for v in listing["tank"].versions] == ["tank@a"]


@pytest.mark.parametrize("breaker", ["\r", "\x0b", "\x0c", "\x1d", "\x1e", "\x85", "\u2029"])
def test_a_line_break_inside_a_row_still_makes_a_short_row_that_fails_the_listing(breaker):
    # splitlines() has always cut here; the line-at-a-time parse must cut here too, not read one
    # long row with a strange name (which it would skip with a warning: a different outcome)
    text = row("tank", "filesystem", 1, 1, 17) + "\n" + row(f"tank@a{breaker}b", "snapshot", 2, 3, 17, 0) + "\n"
    with pytest.raises(ValueError, match="columns"):
        zrepl.parse_zfs_list(text)


class StubReceiverEndpoint:
    """Just enough of a ReceiverEndpoint for receiver_handlers' listing."""

    def __init__(self, listing):
        self.listing = listing
        self.info = zrepl.PeerInfo(job="sink", type="sink", abstraction_job="sink", root="tank/sink/c")
        self.listed = 0

    def list_filesystems(self):
        """The listing, handed over: from here on only what the handlers keep holds it."""
        self.listed += 1
        listing, self.listing = self.listing, {}
        return {name: zrepl.ReceiverFilesystem(ds, None) for name, ds in listing.items()}


def live_versions():
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is zrepl.Version)


def test_a_sink_lets_go_of_its_listing_once_the_client_has_it():
    before = live_versions()  # other tests' leftovers
    listing = zrepl.parse_zfs_list(recursive_listing(40, 60))
    total = sum(len(ds.versions) for ds in listing.values())
    stub = StubReceiverEndpoint(listing)
    client, server = zrepl.local_pair(timeout=60)
    thread = threading.Thread(target=zrepl.serve_connection, args=(server, zrepl.receiver_handlers(stub)),
                              daemon=True)
    thread.start()
    try:
        client.handshake_client("c")
        assert client.stats.frames_received.get("RESPONSE", 0) == 0
        receiver = zrepl.RemoteReceiver(client)
        del listing
        got = receiver.list_filesystems()
        assert sum(len(e.dataset.versions) for e in got.values()) == total
        assert client.stats.frames_received.get("RESPONSE", 0) > 2  # several pages
        assert live_versions() - before == total  # the client's copy; the sink's pages are gone
        with pytest.raises(zrepl.RemoteError):
            client.request("receiver.list", {"offset": 1})  # nothing left to serve from
        assert stub.listed == 1
    finally:
        client.close()
        thread.join(10)


def test_a_receiver_endpoint_keeps_datasets_not_versions(fake_zfs):
    fake_zfs.world.tree("tank", "sink\nsink/c\nsink/c/prod @a @b\nsink/c/prod/fs @a @b @c")
    ep = zrepl.ReceiverEndpoint(fake_zfs, "sink", "tank/sink", "c", zrepl.RecvConfig())
    listing = ep.list_filesystems()
    assert [v.name for v in listing["prod/fs"].dataset.snapshots()] == ["a", "b", "c"]
    assert sorted(ep._run.datasets) == ["tank/sink/c", "tank/sink/c/prod", "tank/sink/c/prod/fs"]
    assert all(ds.versions == [] for ds in ep._run.datasets.values())
    # the same props: what the run marks on its copy (placeholders) the endpoint sees
    assert ep._run.datasets["tank/sink/c/prod/fs"].props is listing["prod/fs"].dataset.props
