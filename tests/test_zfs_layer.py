"""The ZFS command layer without ZFS: the listing parser, error classification, listing roots,
argv builders, names validated before anything is spawned, and the stderr ring buffer."""
import pytest

import zrepl

LISTING = "\n".join([
    "tank\tfilesystem\t111\t1\t1700000000\t-\t-\toff",
    "tank/with space\tfilesystem\t222\t5\t1700000100\t-\t-\toff",
    "tank/with space@b\tsnapshot\t333\t9\t1700000200\t0\t-\toff",
    "tank/with space@a\tsnapshot\t444\t12\t1700000300\t2\t-\toff",
    "tank/with space#zrepl_CURSOR_G_00000000000001bd_J_push\tbookmark\t445\t12\t1700000300\t-\t-\t-",
    "tank/vol\tvolume\t555\t20\t1700000400\t-\t1-abc-def\taes-256-gcm",
])


def test_parse_zfs_list_orders_by_createtxg_and_keeps_props():
    ds = zrepl.parse_zfs_list(LISTING)
    assert set(ds) == {"tank", "tank/with space", "tank/vol"}
    fs = ds["tank/with space"]
    assert [v.name for v in fs.snapshots()] == ["b", "a"]  # createtxg order, not name order
    assert fs.snapshots()[1].userrefs == 2
    assert fs.bookmarks()[0].full_name == "tank/with space#zrepl_CURSOR_G_00000000000001bd_J_push"
    vol = ds["tank/vol"]
    assert vol.type == "volume" and vol.props["receive_resume_token"] == "1-abc-def"
    assert "receive_resume_token" not in ds["tank"].props  # "-" means unset
    assert vol.props["encryption"] == "aes-256-gcm"
    # no user property is listed: a value with a TAB or NEWLINE cannot shift or forge rows
    assert not any(":" in p for p in zrepl.LIST_PROPERTIES)


def test_parse_zfs_list_skips_rows_zfs_cannot_print():
    forged = LISTING + "\ntank/with space@fake\tsnapshot\tnot-a-number\t99\t1700000900\t0\t-\toff"
    ds = zrepl.parse_zfs_list(forged)
    assert [v.name for v in ds["tank/with space"].snapshots()] == ["b", "a"]


class ScriptedZfs(zrepl.Zfs):
    """Answers `zfs get` with canned output per argv; records the calls."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.calls = answers, []

    def run(self, argv, *, check=True, timeout=None, input=None):
        import subprocess
        self.calls.append(list(argv))
        out = self.answers[tuple(argv[7:])]
        return subprocess.CompletedProcess(argv, 0, out, b"")



def test_local_placeholders_counts_only_a_locally_set_on():
    zfs = ScriptedZfs({("r/a", "r/b", "r/c"): b"r/a\tlocal\ton\nr/b\tinherited from r/a\ton\nr/c\tlocal\toff\n"})
    assert zfs.local_placeholders(["r/a", "r/b", "r/c"]) == {"r/a"}
    assert len(zfs.calls) == 1


def test_local_placeholders_distrusts_a_forged_line_and_asks_each_dataset():
    # r/evil's value contains a NEWLINE and forges a line claiming r/victim is a placeholder
    forged = b"r/evil\tlocal\tx\nr/victim\tlocal\ton\nr/victim\t-\t-\n"
    zfs = ScriptedZfs({("r/evil", "r/victim"): forged,
                       ("r/evil",): b"x\nr/victim\tlocal\ton\tlocal\n", ("r/victim",): b"-\t-\n"})
    assert zfs.local_placeholders(["r/evil", "r/victim"]) == set()
    assert [c[-1] for c in zfs.calls[1:]] == ["r/evil", "r/victim"]  # one by one after the forgery


def test_parse_zfs_list_rejects_wrong_column_count():
    with pytest.raises(ValueError):
        zrepl.parse_zfs_list("tank\tfilesystem\n")


@pytest.mark.parametrize("stderr,kind", [
    ("cannot open 'tank/x': dataset does not exist", "not-exist"),
    ("cannot destroy snapshot tank/x@a: dataset is busy", "busy"),
    ("cannot destroy snapshot tank/x@a: it's being held. Run 'zfs holds -r tank/x@a' to see holders.", "busy"),
    ("cannot create snapshot 'tank/x@a': out of space", "no-space"),
    ("cannot create 'tank/x': permission denied", "permission"),
    ("cannot create snapshot 'tank/x@a': dataset already exists", "exists"),
    ("something else entirely", "other"),
])
def test_classify_zfs_error(stderr, kind):
    assert zrepl.classify_zfs_error(stderr) == kind
    err = zrepl.ZfsError(["zfs", "destroy", "tank/x@a"], 1, stderr)
    assert err.kind == kind and "zfs destroy tank/x@a" in str(err) and stderr in str(err)


def test_list_roots_cover_filter_with_one_root_per_pool():
    f = zrepl.DatasetFilter({"tank/a<": True, "tank/b/c": True, "tank/a/x<": False, "zroot/home<": True})
    assert zrepl.list_roots_for_filter(f) == ["tank", "zroot"]
    assert zrepl.list_roots_for_filter(zrepl.DatasetFilter({"<": True, "tank/x<": False})) == []


def test_argv_builders_are_lists_with_exact_names():
    assert zrepl.destroy_snapshots_argv("tank/with space", ["a", "b c"]) == ["zfs", "destroy", "tank/with space@a,b c"]
    assert zrepl.snapshot_argv(["p/a@s", "p/b@s"]) == ["zfs", "snapshot", "p/a@s", "p/b@s"]
    assert zrepl.zfs_list_argv(["tank"])[:4] == ["zfs", "list", "-H", "-p"]


def test_zfs_layer_validates_names_before_spawning():
    z = zrepl.Zfs(zfs_bin="/nonexistent/zfs")
    with pytest.raises(ValueError):
        z.destroy_snapshots("tank/../etc", ["a"])
    with pytest.raises(ValueError):
        z.destroy_snapshots("tank/x", ["a,b"])  # a comma would smuggle a second snapshot into the batch
    assert z.counters.total == 0


def test_ring_buffer_keeps_tail():
    rb = zrepl.RingBuffer(10)
    rb.write(b"0123456789")
    rb.write(b"abc")
    # Exactly `capacity` bytes, like zrepl's hook log; the cut shows as "(...)" in place of the first bytes.
    assert rb.getvalue() == b"(...)89abc" and rb.text() == "(...)89abc"
    assert rb.dropped == 3


def test_a_batched_release_counts_as_done_only_when_every_line_says_the_hold_is_gone():
    gone = ("cannot release hold from snapshot 'p/a@s1': no such tag on this dataset\n"
            "cannot release hold from snapshot 'p/b@s1': no such tag on this dataset\n")
    mixed = gone + "cannot release hold from snapshot 'p/c@s1': permission denied\n"
    assert zrepl.says_only_not_exist(gone)
    assert not zrepl.says_only_not_exist(mixed) and not zrepl.says_only_not_exist("")
    assert zrepl.classify_zfs_error(mixed) == zrepl.ZfsErrorKind.NOT_EXIST  # why a kind alone is not enough

    class Refusing(zrepl.Zfs):
        def release(self, tag, names):
            raise zrepl.ZfsError(["zfs", "release", tag, *names], 1, mixed)

    holds = [zrepl.Abstraction("step-hold", "j", f"p/{d}", f"p/{d}@s1", tag="zrepl_STEP_J_j") for d in "abc"]
    with pytest.raises(zrepl.ZfsError, match="permission denied"):
        zrepl.destroy_abstractions(Refusing(), holds)

    class Gone(zrepl.Zfs):
        def release(self, tag, names):
            raise zrepl.ZfsError(["zfs", "release", tag, *names], 1, gone)

    zrepl.destroy_abstractions(Gone(), holds[:2])  # already released: done
