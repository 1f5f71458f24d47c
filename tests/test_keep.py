"""Section 3: keep rules and prune decisions (pure, no zfs)."""

import pytest

from zrepl import (
    GridInterval,
    KeepGrid,
    KeepLastN,
    KeepNotReplicated,
    KeepRegex,
    PruneContext,
    Version,
    compile_regex,
    decide_prune,
    parse_grid,
)

H = 3600
D = 86400
FS = "tank/data"


def snap(name: str, creation: int, txg: int | None = None, guid: int | None = None) -> Version:
    txg = creation if txg is None else txg
    return Version(FS, name, "snapshot", guid if guid is not None else 1000 + txg, txg, creation)


def bookmark(name: str, creation: int, txg: int, guid: int) -> Version:
    return Version(FS, name, "bookmark", guid, txg, creation)


def short(names) -> set[str]:
    return {n.split("@", 1)[1] for n in names}


# ---- grid parsing ----

def test_parse_grid_valid():
    g = parse_grid(" 1x1h(keep=all) |24 x 1h|  14x1d ( keep = 2 ) ")
    assert g == [GridInterval(1, H, None), GridInterval(24, H, 1), GridInterval(14, D, 2)]


@pytest.mark.parametrize("spec,needle", [
    ("", "non-empty"),
    ("0x1h", "at least 1"),
    ("1x1h(keep=0)", "keep=0"),
    ("1x1h(keep=-1)", "keep must be a positive number"),
    ("1x1h(keep=some)", "keep must be a positive number"),
    ("1x1h(foo=1)", "only parameter"),
    ("1h", "expected 'N x DURATION'"),
    ("1x1h | | 1x1d", "2 of 3"),
    ("2x1y", "1 of 1 ('2x1y')"),
    ("1x0s", "positive"),
    ("24x1h | 1x30m", "lengths must not decrease"),
    ("1x1h | 1x1d(keep=all) | 1x1h", "3 of 3"),
])
def test_parse_grid_errors(spec, needle):
    with pytest.raises(ValueError) as e:
        parse_grid(spec)
    assert needle in str(e.value)


def test_parse_grid_allows_shorter_after_leading_keep_all():
    g = parse_grid("1x1d(keep=all) | 2x1d(keep=all) | 24x1h | 7x1d")
    assert [i.length for i in g] == [D, D, H, D]
    with pytest.raises(ValueError, match="must not decrease"):
        parse_grid("1x1d(keep=all) | 1x2d | 24x1h")


def test_grid_interval_validates_itself():
    with pytest.raises(ValueError):
        GridInterval(0, H, 1)
    with pytest.raises(ValueError):
        GridInterval(1, 0, 1)
    with pytest.raises(ValueError):
        GridInterval(1, H, 0)
    assert str(GridInterval(24, H, 1)) == "24x1h"
    assert str(GridInterval(1, 90 * 60, None)) == "1x90m(keep=all)"


# ---- grid semantics ----

def test_grid_bucket_boundaries_belong_to_older_bucket():
    # zrepl's retentiongrid: buckets are (edge - len, edge]; now = youngest matching snapshot.
    rule = KeepGrid(parse_grid("3x10m"), regex="^z")
    now = 10_000_000
    snaps = [
        snap("z_now", now),                  # bucket 0 (now is inclusive)
        snap("z_m05", now - 5 * 60),         # bucket 0, and the oldest there
        snap("z_m10", now - 10 * 60),        # exactly on edge -> bucket 1 (the older one)
        snap("z_m15", now - 15 * 60),        # bucket 1
        snap("z_m30", now - 30 * 60),        # exactly on the oldest edge -> outside -> not kept
        snap("z_m29", now - 29 * 60),        # bucket 2
    ]
    kept = short(rule.keep(snaps, PruneContext()))
    # Bucket 0 = {z_now, z_m05} keeps the oldest: z_m05. Bucket 1 = {z_m10, z_m15} keeps z_m15.
    assert kept == {"z_m05", "z_m15", "z_m29"}


def test_grid_keeps_k_oldest_per_bucket_and_all():
    rule = KeepGrid(parse_grid("1x1h(keep=all) | 2x1h(keep=2) | 1x1d"), regex=".")
    now = 50 * D
    snaps = [snap(f"s{m}", now - m * 60) for m in (0, 10, 59, 61, 70, 80, 119, 130, 500, 1000, 1500, 1700)]
    kept = short(rule.keep(snaps, PruneContext()))
    # (now-1h, now] keep=all: s0 s10 s59; (now-2h, now-1h]: s61 s70 s80 s119 -> 2 oldest: s119 s80;
    # (now-3h, now-2h]: s130 -> kept; (now-27h, now-3h]: s500 s1000 s1500 -> oldest s1500;
    # s1700 (28h20m) is older than the last bucket.
    assert kept == {"s0", "s10", "s59", "s119", "s80", "s130", "s1500"}


def test_grid_youngest_matching_defines_now_and_ignores_non_matching():
    rule = KeepGrid(parse_grid("1x1h | 1x1d"), regex="^zrepl_")
    snaps = [
        snap("manual_new", 100 * D),         # non-matching, much younger: does not move "now"
        snap("zrepl_a", 10 * D),             # now
        snap("zrepl_b", 10 * D - 30 * 60),   # bucket 0 (oldest there)
        snap("zrepl_c", 10 * D - 2 * H),     # bucket 1
        snap("zrepl_d", 10 * D - 3 * H),     # bucket 1, older -> kept instead of c
        snap("zrepl_e", 10 * D - 2 * D),     # older than the grid
    ]
    kept = short(rule.keep(snaps, PruneContext()))
    assert kept == {"zrepl_b", "zrepl_d"}
    assert KeepGrid(parse_grid("1x1h"), regex="^nothing").keep(snaps, PruneContext()) == set()


def test_grid_ties_resolved_by_createtxg():
    rule = KeepGrid(parse_grid("1x1h | 1x1h"), regex=".")
    now = 10 * D
    snaps = [snap("now", now, txg=10), snap("b", now - 2 * H + 60, txg=3), snap("a", now - 2 * H + 60, txg=2)]
    assert short(rule.keep(snaps, PruneContext())) == {"now", "a"}


def test_grid_rule_validation_and_describe():
    with pytest.raises(ValueError, match="regex"):
        KeepGrid(parse_grid("1x1h"), regex="")
    with pytest.raises(ValueError, match="invalid regular expression"):
        KeepGrid(parse_grid("1x1h"), regex="(")
    with pytest.raises(ValueError, match="at least one"):
        KeepGrid((), regex="x")
    with pytest.raises(ValueError, match="must not decrease"):
        KeepGrid([GridInterval(1, D, 1), GridInterval(1, H, 1)], regex="x")
    rule = KeepGrid([GridInterval(1, H, None), GridInterval(24, H, 1)], regex="^zrepl_")
    assert rule.describe() == "grid(1x1h(keep=all) | 24x1h, regex='^zrepl_')"
    assert KeepGrid("1x1h | 7x1d", regex="^z").intervals == (GridInterval(1, H, 1), GridInterval(7, D, 1))
    assert hash(rule) == hash(KeepGrid(tuple(rule.intervals), regex="^zrepl_"))


# ---- last_n ----

def test_last_n_newest_by_creation_ties_by_createtxg_then_name():
    snaps = [snap("a", 100, 1), snap("c", 200, 2), snap("b", 200, 3), snap("d", 50, 4)]
    assert short(KeepLastN(2).keep(snaps, PruneContext())) == {"c", "b"}
    # same second: the later createtxg is newer, whatever the names say
    assert short(KeepLastN(1).keep(snaps, PruneContext())) == {"b"}
    assert short(KeepLastN(10).keep(snaps, PruneContext())) == {"a", "b", "c", "d"}
    # the case CI hit: c then b in one second, a a second later: the two newest are a and b
    made = [snap("c", 300, 10), snap("b", 300, 11), snap("a", 301, 12)]
    assert short(KeepLastN(2).keep(made, PruneContext())) == {"a", "b"}
    # with the same createtxg (unknown), names decide, descending
    assert short(KeepLastN(1).keep([snap("x", 5, 0), snap("y", 5, 0)], PruneContext())) == {"y"}


def test_last_n_with_regex_only_counts_and_keeps_matches():
    snaps = [snap("zrepl_1", 10), snap("zrepl_2", 20), snap("manual", 30), snap("zrepl_3", 40)]
    kept = KeepLastN(2, regex="^zrepl_").keep(snaps, PruneContext())
    assert short(kept) == {"zrepl_2", "zrepl_3"}
    # More than there are: still never keeps non-matching ones (zrepl <0.7 did, a bug fixed upstream).
    assert short(KeepLastN(10, regex="^zrepl_").keep(snaps, PruneContext())) == {"zrepl_1", "zrepl_2", "zrepl_3"}


def test_last_n_validation_and_describe():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            KeepLastN(bad)
    with pytest.raises(ValueError, match="invalid regular expression"):
        KeepLastN(3, regex="[")
    assert KeepLastN(10).describe() == "last_n(count=10)"
    assert KeepLastN(3, regex="^z").describe() == "last_n(count=3, regex='^z')"


# ---- regex ----

def test_regex_unanchored_and_negate():
    snaps = [snap("zrepl_1", 1), snap("manual_zrepl", 2), snap("other", 3)]
    assert short(KeepRegex("zrepl").keep(snaps, PruneContext())) == {"zrepl_1", "manual_zrepl"}
    assert short(KeepRegex("^zrepl_").keep(snaps, PruneContext())) == {"zrepl_1"}
    assert short(KeepRegex("^zrepl_", negate=True).keep(snaps, PruneContext())) == {"manual_zrepl", "other"}
    assert KeepRegex("^manual_", negate=True).describe() == "regex(regex='^manual_', negate=true)"
    with pytest.raises(ValueError, match="invalid regular expression"):
        KeepRegex("*x")


def test_compile_regex():
    assert compile_regex("a+").search("xaa")
    with pytest.raises(ValueError) as e:
        compile_regex("(unclosed")
    assert "(unclosed" in str(e.value) and "missing closing )" in str(e.value)


# ---- not_replicated ----

def _chain():
    return [snap("s1", 100, 10, 0x11), snap("s2", 200, 20, 0x22), snap("s3", 300, 30, 0x33), snap("s4", 400, 40, 0x44)]


def test_not_replicated_with_cursor():
    ctx = PruneContext(cursor_guid=0x22, cursor_createtxg=20)
    assert short(KeepNotReplicated().keep(_chain(), ctx)) == {"s2", "s3", "s4"}
    assert short(KeepNotReplicated(keep_snapshot_at_cursor=False).keep(_chain(), ctx)) == {"s3", "s4"}
    assert ctx.notes == []


def test_not_replicated_cursor_guid_only_and_snapshot_gone():
    assert short(KeepNotReplicated().keep(_chain(), PruneContext(cursor_guid=0x33))) == {"s3", "s4"}
    # The cursor's snapshot was destroyed, but the bookmark's createtxg still orders the rest.
    ctx = PruneContext(cursor_guid=0x99, cursor_createtxg=25)
    assert short(KeepNotReplicated().keep(_chain(), ctx)) == {"s3", "s4"}
    # Without createtxg nothing can be proven replicated.
    ctx = PruneContext(cursor_guid=0x99)
    assert short(KeepNotReplicated().keep(_chain(), ctx)) == {"s1", "s2", "s3", "s4"}
    assert len(ctx.notes) == 1 and "keeping every snapshot" in ctx.notes[0]


def test_not_replicated_without_cursor_keeps_everything_with_note():
    ctx = PruneContext()
    assert short(KeepNotReplicated().keep(_chain(), ctx)) == {"s1", "s2", "s3", "s4"}
    assert "no replication cursor" in ctx.notes[0]
    assert KeepNotReplicated().describe() == "not_replicated"
    assert KeepNotReplicated(False).describe() == "not_replicated(keep_snapshot_at_cursor=false)"


# ---- decide_prune ----

def test_decide_prune_union_of_rules():
    snaps = [snap(f"zrepl_{i}", i * H, i) for i in range(1, 7)] + [snap("manual_keep", 0, 0)]
    rules = [KeepRegex("^zrepl_", negate=True), KeepLastN(2, regex="^zrepl_"),
             KeepNotReplicated()]
    d = decide_prune(snaps, rules, PruneContext(cursor_guid=1000 + 3, cursor_createtxg=3))
    assert [v.name for v in d.destroy] == ["zrepl_1", "zrepl_2"]
    assert short(d.keep) == {"manual_keep", "zrepl_3", "zrepl_4", "zrepl_5", "zrepl_6"}
    assert d.keep[f"{FS}@zrepl_6"] == ["last_n(count=2, regex='^zrepl_')", "not_replicated"]
    assert d.keep[f"{FS}@manual_keep"] == ["regex(regex='^zrepl_', negate=true)"]
    assert d.notes == []


def test_decide_prune_destroy_in_createtxg_order_and_bookmarks_ignored():
    versions = [
        snap("c", 300, 30), bookmark("c", 300, 30, 1030), snap("a", 100, 10), snap("b", 200, 20),
        bookmark("zrepl_CURSOR_G_x", 50, 5, 1005),
    ]
    d = decide_prune(versions, [KeepLastN(1)])
    assert [v.name for v in d.destroy] == ["a", "b"]
    assert all(v.kind == "snapshot" for v in d.destroy)
    assert list(d.keep) == [f"{FS}@c"]
    # A rule that would "keep" nothing still never destroys bookmarks.
    d = decide_prune(versions, [KeepRegex("^nomatch$")])
    assert {v.full_name for v in d.destroy} == {f"{FS}@a", f"{FS}@b", f"{FS}@c"}


def test_decide_prune_empty_rules_keep_everything():
    snaps = [snap("a", 1), snap("b", 2)]
    d = decide_prune(snaps, [])
    assert d.destroy == []
    assert short(d.keep) == {"a", "b"}
    assert d.notes


def test_decide_prune_not_replicated_without_cursor_protects_everything():
    snaps = [snap(f"zrepl_{i}", i * H, i) for i in range(1, 5)]
    d = decide_prune(snaps, [KeepLastN(1), KeepNotReplicated()])
    assert d.destroy == []
    assert any("no replication cursor" in n for n in d.notes)


def test_decide_prune_grid_example_destroys_thinned_snapshots():
    # Hourly snapshots for three days under 1x1h(keep=all) | 24x1h | 2x1d.
    snaps = [snap(f"zrepl_{i:03d}", i * H, i) for i in range(0, 73)]
    d = decide_prune(snaps, [KeepGrid(parse_grid("1x1h(keep=all) | 24x1h | 2x1d"), regex="^zrepl_")])
    kept = sorted(short(d.keep))
    # now = 72h; (71h,72h] -> 72; 24 hourly buckets (47h,71h] -> each one snapshot: 48..71;
    # (23h,47h] -> oldest 24; (-1h,23h] -> oldest 0.
    assert kept == [f"zrepl_{i:03d}" for i in [0, 24] + list(range(48, 73))]
    assert len(d.destroy) == 73 - len(kept)


def test_decide_prune_shares_one_reasons_list_per_rule_combination():
    """A run holds every filesystem's decision to its end (issue 12 item 4): the snapshots kept by
    the same rules share one reasons list, in rule order, not one list each."""
    snaps = [snap(f"zrepl_{i}", i * H, i) for i in range(1, 9)] + [snap("manual", 0, 0)]
    rules = [KeepRegex("^zrepl_", negate=True), KeepLastN(3), KeepNotReplicated()]
    d = decide_prune(snaps, rules, PruneContext(cursor_guid=1000 + 4, cursor_createtxg=4))
    assert [v.name for v in d.destroy] == ["zrepl_1", "zrepl_2", "zrepl_3"]
    unreplicated = d.keep[f"{FS}@zrepl_4"], d.keep[f"{FS}@zrepl_5"]  # at the cursor, and after it
    newest = d.keep[f"{FS}@zrepl_6"], d.keep[f"{FS}@zrepl_7"], d.keep[f"{FS}@zrepl_8"]
    assert unreplicated[0] == ["not_replicated"] and unreplicated[1] is unreplicated[0]
    assert newest[0] == ["last_n(count=3)", "not_replicated"] and all(why is newest[0] for why in newest)
    assert d.keep[f"{FS}@manual"] == ["regex(regex='^zrepl_', negate=true)"]
    assert len({id(why) for why in d.keep.values()}) == 3
    everything = decide_prune(snaps, [])
    assert len({id(why) for why in everything.keep.values()}) == 1


def test_kept_snapshots_read_as_full_names_in_order_even_from_another_dataset():
    """Kept under short names, read as full names: a snapshot of another dataset in the input
    (callers pass one filesystem, but nothing stops them) keeps its own full name."""
    other = Version("tank/other", "x", "snapshot", 7, 5, 5 * H)
    d = decide_prune([snap("a", H, 1), other, snap("b", 9 * H, 9)], [KeepLastN(3)])
    assert list(d.keep) == [f"{FS}@a", "tank/other@x", f"{FS}@b"]
    assert dict(d.keep) == {f"{FS}@a": ["last_n(count=3)"], "tank/other@x": ["last_n(count=3)"],
                            f"{FS}@b": ["last_n(count=3)"]}
    assert list(d.keep.by_short_name()) == [("a", ["last_n(count=3)"]), ("x", ["last_n(count=3)"]),
                                            ("b", ["last_n(count=3)"])]
    assert "tank/other@a" not in d.keep and "a" not in d.keep and f"{FS}@x" not in d.keep
    d.keep.add(FS, "c", ["incremental base"])
    assert list(d.keep)[-1] == f"{FS}@c" and d.keep[f"{FS}@c"] == ["incremental base"] and len(d.keep) == 4


def test_kept_snapshots_cost_no_string_or_list_each():
    """100 bytes a kept snapshot at most (a full-name string, a reasons list and a dict entry
    each cost 220): tracemalloc counts what the decision holds, the listing's versions aside."""
    import tracemalloc
    snaps = [snap(f"zrepl_{i:06d}", i * H, i) for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        d = decide_prune(snaps, [KeepRegex(".*"), KeepLastN(100)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(d.keep) == 20_000 and not d.destroy
    assert held / len(d.keep) < 100, f"{held / len(d.keep):.0f} bytes per kept snapshot"


# ---- grid and clock errors (issue 8 item 14) ----

def _hourly(count: int, start: int) -> list[Version]:
    return [snap(f"zrepl_{i:03d}", start + i * H, txg=10 + i) for i in range(count)]


def test_grid_far_future_snapshot_does_not_anchor_the_grid():
    """200 snapshots, one of them dated two years ahead (a sender clock error): measured from the
    youngest, every real snapshot is "too old" and 199 of 200 would be destroyed. With the caller's
    clock the grid keeps the whole filesystem and says why."""
    now = 1_800_000_000
    history = _hourly(199, now - 199 * H)
    future = snap("zrepl_future", now + 2 * 365 * D, txg=500)
    rules = [KeepGrid(tuple(parse_grid("24x1h | 7x1d")), "^zrepl_")]
    blind = decide_prune(history + [future], rules)  # no clock: zrepl's behaviour
    assert len(blind.destroy) == 199
    ctx = PruneContext(now=now)
    decision = decide_prune(history + [future], rules, ctx)
    assert decision.destroy == []
    assert any("zrepl_future" in n and "nothing is pruned" in n for n in decision.notes), decision.notes
    # Non-matching snapshots are kept too: nothing at all is pruned on that filesystem.
    other = snap("manual", now - 500 * H, txg=1)
    assert decide_prune(history + [future, other], rules, PruneContext(now=now)).destroy == []


def test_grid_small_clock_skew_still_anchors_at_the_youngest():
    now = 1_800_000_000
    history = _hourly(200, now - 199 * H + 30 * 60)  # the youngest is 30 minutes "ahead"
    rules = [KeepGrid(tuple(parse_grid("24x1h | 7x1d")), "^zrepl_")]
    with_clock = decide_prune(history, rules, PruneContext(now=now))
    assert [v.name for v in with_clock.destroy] == [v.name for v in decide_prune(history, rules).destroy]
    assert with_clock.destroy and not with_clock.notes


def test_grid_counts_do_not_cost_memory():
    # A million one-second buckets: arithmetic per interval, not a list of buckets.
    rule = KeepGrid(tuple(parse_grid("1000000x1s | 1x1w")), "^zrepl_")
    kept = rule.keep(_hourly(5, 0), PruneContext())
    assert len(kept) == 5
