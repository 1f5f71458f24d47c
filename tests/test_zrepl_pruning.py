"""zrepl's own unit tests for pruning, ported: keep rules and the retention grid.

Same inputs, same expected outputs, run against section 3 (keep rules, `fit_grid`, `decide_prune`).
Each case names the zrepl file and test it comes from (zrepl/zrepl, internal/pruning/...). Where we
deliberately differ the case asserts OUR documented behaviour and says why (README: Coming from
zrepl). zrepl's snapshots carry only a name and a date; ours also a createtxg, which ZFS assigns in
creation order, so the ports give each snapshot the createtxg of its position in time.
"""


import pytest


from zrepl import (  # noqa: E402
    GridInterval,
    KeepGrid,
    KeepLastN,
    KeepNotReplicated,
    KeepRegex,
    PruneContext,
    Version,
    decide_prune,
    fit_grid,
    parse_grid,
)

FS = "pool/fs"
MINUTE = 60


def snaps(*specs: tuple[str, float]) -> list[Version]:
    """(name, date) pairs -> snapshots; createtxg follows the dates (ties: list order), as ZFS would."""
    order = sorted(range(len(specs)), key=lambda i: (specs[i][1], i))
    txg = {i: 100 + rank for rank, i in enumerate(order)}
    return [Version(FS, name, "snapshot", 5000 + i, txg[i], int(date)) for i, (name, date) in enumerate(specs)]


def destroyed(inputs: list[Version], rules) -> set[str]:
    return {v.name for v in decide_prune(inputs, rules).destroy}


# ---- internal/pruning/keep_last_n_test.go: TestKeepLastN ----

def o(minutes: int) -> float:
    return 123 + minutes * MINUTE


S1 = [("1", o(10)), ("2", o(20)), ("3", o(15)), ("4", o(30)), ("5", o(30))]
AB = [("a1", o(10)), ("b1", o(11)), ("a2", o(20)), ("b2", o(21)), ("a3", o(30)), ("b3", o(31))]


@pytest.mark.parametrize("inputs,rules,expected", [
    pytest.param(S1, [KeepLastN(2)], {"1", "2", "3"}, id="keep_last_n_test.go:TestKeepLastN/keep2"),
    pytest.param(S1, [KeepLastN(1)], {"1", "2", "3", "4"},
                 id="keep_last_n_test.go:TestKeepLastN/keep1OfTwoWithSameTime"),
    pytest.param(S1, [KeepLastN(100)], set(), id="keep_last_n_test.go:TestKeepLastN/keepMany"),
    pytest.param([], [KeepLastN(100)], set(), id="keep_last_n_test.go:TestKeepLastN/empty_input"),
    pytest.param(S1, [KeepLastN(4, "")], {"1"}, id="keep_last_n_test.go:TestKeepLastN/empty_regex"),
    pytest.param(AB, [KeepLastN(2, "^a"), KeepLastN(2, "^b")], {"a1", "b1"},
                 id="keep_last_n_test.go:TestKeepLastN/multiple_regexes"),
    pytest.param([("a1", o(10)), ("b1", o(11)), ("a2", o(12))], [KeepLastN(4, "a")], {"b1"},
                 id="keep_last_n_test.go:TestKeepLastN/keep_more_than_matching"),
])
def test_keep_last_n(inputs, rules, expected):
    """zrepl internal/pruning/keep_last_n_test.go TestKeepLastN (table cases)."""
    assert destroyed(snaps(*inputs), rules) == expected


def test_keep_last_n_must_be_positive_and_allows_empty_regex():
    """zrepl internal/pruning/keep_last_n_test.go TestKeepLastN/mustBePositive, /emptyRegexAllowed."""
    for count in (0, -5):
        with pytest.raises(ValueError):
            KeepLastN(count, "foo")
    assert KeepLastN(23, "").regex == ""


def test_keep_last_n_same_second_tie_goes_by_createtxg_not_name():
    """DIFFERS from zrepl (keep_last_n.go: ties by name descending). Two snapshots of the same
    second: zrepl keeps the one whose name sorts last ("b"), even when "a" was made after it; we
    keep the one ZFS made last (higher createtxg). README: Coming from zrepl."""
    b_first = [Version(FS, "b", "snapshot", 1, 10, 1000), Version(FS, "a", "snapshot", 2, 11, 1000)]
    assert destroyed(b_first, [KeepLastN(1)]) == {"b"}  # zrepl would destroy "a"


# ---- internal/pruning/keep_not_replicated_test.go: TestNewKeepNotReplicated ----

def test_keep_not_replicated_destroys_only_replicated():
    """zrepl internal/pruning/keep_not_replicated_test.go TestNewKeepNotReplicated/destroysOnlyReplicated.

    ADAPTED input: the zrepl case marks snapshots 1 and 3 replicated and 2 not, which zrepl's own
    pruner never produces (pruner.go: a snapshot counts as replicated when it is older than the
    replication cursor; at the cursor only with keep_snapshot_at_cursor = false). With the cursor
    on 3 and keep_snapshot_at_cursor = false, 1, 2 and 3 are replicated; 4 (newer) is not."""
    inputs = snaps(("1", 1), ("2", 2), ("3", 3), ("4", 4))
    cursor = inputs[2]
    ctx = PruneContext(cursor_guid=cursor.guid, cursor_createtxg=cursor.createtxg)
    decision = decide_prune(inputs, [KeepNotReplicated(keep_snapshot_at_cursor=False)], ctx)
    assert {v.name for v in decision.destroy} == {"1", "2", "3"}
    ctx = PruneContext(cursor_guid=cursor.guid, cursor_createtxg=cursor.createtxg)
    assert destroyed_with(inputs, [KeepNotReplicated()], ctx) == {"1", "2"}


def destroyed_with(inputs, rules, ctx) -> set[str]:
    return {v.name for v in decide_prune(inputs, rules, ctx).destroy}


def test_keep_not_replicated_empty():
    """zrepl internal/pruning/keep_not_replicated_test.go TestNewKeepNotReplicated/empty."""
    assert destroyed_with([], [KeepNotReplicated()], PruneContext(cursor_guid=1, cursor_createtxg=1)) == set()


# ---- internal/pruning/keep_regex_test.go: TestKeepRegexNegation ----

def test_keep_regex_negation():
    """zrepl internal/pruning/keep_regex_test.go TestKeepRegexNegation."""
    inputs = snaps(("zrepl_foobar", 1), ("zrepl", 2), ("barfoo", 3))
    assert destroyed(inputs, [KeepRegex("^zrepl_")]) == {"zrepl", "barfoo"}
    assert destroyed(inputs, [KeepRegex("^zrepl_", negate=True)]) == {"zrepl_foobar"}


# ---- internal/pruning/pruning_test.go: TestPruneSnapshots ----

PRUNE_S1 = [("foo_123", 0), ("foo_456", 0), ("bar_123", 0)]
DISJOINT = [("p1_a", 4), ("p2_a", 5), ("p1_b", 14), ("p2_b", 15), ("p1_c", 29), ("p2_c", 30)]


@pytest.mark.parametrize("inputs,rules,expected", [
    pytest.param(PRUNE_S1, [KeepRegex("foo_")], {"bar_123"}, id="pruning_test.go:TestPruneSnapshots/simple"),
    pytest.param(PRUNE_S1, [KeepRegex("foo_"), KeepRegex("bar_")], set(),
                 id="pruning_test.go:TestPruneSnapshots/multipleRules"),
    pytest.param(PRUNE_S1, [KeepRegex("notInS1"), KeepRegex("bar_")], {"foo_123", "foo_456"},
                 id="pruning_test.go:TestPruneSnapshots/onlyThoseRemovedByAllAreRemoved"),
    pytest.param(PRUNE_S1, [], set(), id="pruning_test.go:TestPruneSnapshots/noRulesKeepsAll"),
    pytest.param(PRUNE_S1, (), set(), id="pruning_test.go:TestPruneSnapshots/nilRulesKeepsAll"),
    pytest.param([], [KeepRegex("foo_")], set(), id="pruning_test.go:TestPruneSnapshots/noSnaps"),
    pytest.param(DISJOINT, [KeepGrid(tuple(parse_grid("1x10s | 1x10s")), "^p1_"),
                            KeepGrid(tuple(parse_grid("1x10s | 1x10s")), "^p2_")], {"p1_a", "p2_a"},
                 id="pruning_test.go:TestPruneSnapshots/multiple_grids_with_disjoint_regexes"),
])
def test_prune_snapshots(inputs, rules, expected):
    """zrepl internal/pruning/pruning_test.go TestPruneSnapshots (table cases)."""
    assert destroyed(snaps(*inputs), rules) == expected


# ---- internal/pruning/retentiongrid/retentiongrid_test.go ----

def grid_from_string(spec: str) -> list[GridInterval]:
    """The test helper's notation: `10m|10m,2|1h,-1` = length[,keep] per bucket, -1 = all."""
    intervals = []
    for part in spec.split("|"):
        length, _, keep = part.partition(",")
        seconds = {"s": 1, "m": 60, "h": 3600}[length[-1]] * int(length[:-1])
        count = int(keep or "1")
        intervals.append(GridInterval(1, seconds, None if count == -1 else count))
    return intervals


def fit(spec: str, anchor: float | None, entries: list[tuple[str, float]]) -> set[str]:
    """Kept names; anchor None = zrepl's FitEntries (the youngest entry), else fitEntriesWithNow."""
    if anchor is None:
        anchor = max((date for _, date in entries), default=0)
    return fit_grid(grid_from_string(spec), anchor, [(date, i, name) for i, (name, date) in enumerate(entries)])


def test_grid_empty_input():
    """zrepl retentiongrid_test.go TestEmptyInput."""
    assert fit("10m|10m|10m|1h", None, []) == set()


def test_grid_interval_boundaries_and_alignment():
    """zrepl retentiongrid_test.go TestIntervalBoundariesAndAlignment (fitEntriesWithNow, now = 0)."""
    entries = [("0", 1 * MINUTE), ("1", 0), ("2", -10 * MINUTE), ("3", -20 * MINUTE), ("4", -30 * MINUTE),
               ("5", -40 * MINUTE)]
    assert fit("10m|10m|10m", 0, entries) == {"0", "1", "2", "3"}


def test_grid_keeps_oldest_snaps_in_a_bucket():
    """zrepl retentiongrid_test.go TestKeepsOldestSnapsInABucket."""
    entries = [(str(i), i) for i in range(1, 6)]
    assert fit("1m,2", None, entries) == {"1", "2"}


def test_grid_respects_keep_count_all():
    """zrepl retentiongrid_test.go TestRespectsKeepCountAll."""
    entries = [("a", 0), ("b", -1), ("c", -2), ("d", -60), ("e", -61)]
    assert fit("1m,-1|1m,1", None, entries) == {"a", "b", "c", "e"}


def test_grid_complex():
    """zrepl retentiongrid_test.go TestComplex (fitEntriesWithNow, now = 0)."""
    m = MINUTE
    entries = [("1", 3 * m), ("b1", -6 * m), ("b3", -8 * m), ("b2", -9 * m), ("a", -11 * m), ("c", -19 * m),
               ("foo", -25 * m), ("bar", -26 * m), ("border", -30 * m), ("d", -75 * m), ("q", -90 * m),
               ("e", -91 * m), ("f", -120 * m)]
    assert fit("10m,-1|10m|10m,2|1h", 0, entries) == {"1", "b1", "b3", "b2", "c", "foo", "bar", "d"}


def test_grid_rule_matches_the_grid_fit_through_keep_grid():
    """zrepl internal/pruning/keep_grid.go KeepRule: the grid rule is the fit of the matching
    snapshots, anchored at the youngest of them; non-matching snapshots are not kept by it.
    (TestKeepsOldestSnapsInABucket through the rule, with a foreign snapshot added.)"""
    inputs = snaps(*[(f"zrepl_{i}", i) for i in range(1, 6)], ("manual", 3))
    rule = KeepGrid((GridInterval(1, 60, 2),), "^zrepl_")
    assert destroyed(inputs, [rule]) == {"zrepl_3", "zrepl_4", "zrepl_5", "manual"}
