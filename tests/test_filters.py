"""Section 2: dataset names, the filesystems filter, timestamp naming and cron specs (pure, no zfs)."""

import calendar
import datetime as dt
import random

import pytest

import zrepl
from zrepl import (
    TIMESTAMP_FORMATS,
    ZFS_NAME_MAX,
    CronSpec,
    DatasetFilter,
    format_timestamp,
    is_descendant,
    snapshot_name,
    split_version_name,
    validate_dataset_name,
    validate_snapshot_short_name,
    validate_timestamp_format,
)


def utc(*fields: int) -> float:
    return float(calendar.timegm(fields + (0,) * (6 - len(fields))))


def local(ts: float, zone: str) -> str:
    return dt.datetime.fromtimestamp(ts, zrepl.resolve_zone(zone)).isoformat()


# ---- dataset and snapshot names ----

@pytest.mark.parametrize("name", ["tank", "tank/a", "tank/with space", "tank/a-b_c:d.e", "Pool1/x.y", "t/..a", "t/a.."])
def test_valid_dataset_names(name):
    assert validate_dataset_name(name) == name


@pytest.mark.parametrize("name,needle", [
    ("", "empty"),
    ("/tank", "start or end"),
    ("tank/", "start or end"),
    ("tank//a", "empty component"),
    ("tank/./a", "'.'"),
    ("tank/..", "'..'"),
    ("tank/a@snap", "'tank/a@snap' contains '@'"),
    ("tank/a#bm", "'#'"),
    ("tank/a%b", "'%'"),
    ("tank/a\nb", "control character"),
    ("tank/a\x7fb", "control character"),
    ("tank/é", "allows only"),
    ("1tank/a", "start with a letter"),
    ("_tank", "start with a letter"),
    ("tank/" + "a" * 251, "at most 255"),
])
def test_invalid_dataset_names(name, needle):
    with pytest.raises(ValueError) as e:
        validate_dataset_name(name)
    assert needle in str(e.value)


def test_dataset_name_length_limit_is_inclusive():
    name = "tank/" + "a" * (ZFS_NAME_MAX - 5)
    assert len(name) == 255
    assert validate_dataset_name(name) == name


@pytest.mark.parametrize("name", ["zrepl_20240101_000000_000", "a b", "x:y.z-1", "..x"])
def test_valid_snapshot_short_names(name):
    assert validate_snapshot_short_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a@b", "a#b", "a+b", "tab\t", "x" * 256])
def test_invalid_snapshot_short_names(name):
    with pytest.raises(ValueError):
        validate_snapshot_short_name(name)


def test_split_version_name():
    assert split_version_name("tank/fs@snap 1") == ("tank/fs", "@", "snap 1")
    assert split_version_name("tank#zrepl_CURSOR") == ("tank", "#", "zrepl_CURSOR")
    for bad in ["tank/fs", "tank/fs@", "@snap", "tank/fs@a@b", "tank/fs@a#b", "/tank@x", "tank/fs@a/b"]:
        with pytest.raises(ValueError):
            split_version_name(bad)
    with pytest.raises(ValueError, match="at most 255"):
        split_version_name("tank/" + "a" * 200 + "@" + "b" * 60)


def test_is_descendant_is_component_wise():
    assert is_descendant("tank/foo/bar", "tank/foo")
    assert is_descendant("tank/foo", "tank")
    assert not is_descendant("tank/foobar", "tank/foo")
    assert not is_descendant("tank/foo", "tank/fo")
    assert not is_descendant("tank", "tank")
    assert is_descendant("tank", "tank", include_self=True)
    assert not is_descendant("tank", "tank/foo")


# ---- filesystems filter ----

def test_filter_zrepl_documentation_example():
    f = DatasetFilter({"tank<": True, "tank/foo<": False, "tank/foo/bar": True})
    assert f.accepts("tank")
    assert f.accepts("tank/other")
    assert not f.accepts("tank/foo")
    assert f.explain("tank/foo/bar") == (True, "tank/foo/bar")
    assert f.explain("tank/foo/bar/loo") == (False, "tank/foo<")
    assert f.explain("zroot") == (False, None)


def test_filter_subtree_is_component_wise():
    f = DatasetFilter({"tank/foo<": True})
    assert f.accepts("tank/foo")
    assert f.accepts("tank/foo/x/y")
    assert not f.accepts("tank/foobar")
    assert not f.accepts("tank")


def test_filter_exact_beats_subtree_on_same_path():
    f = DatasetFilter({"tank/a<": True, "tank/a": False})
    assert f.explain("tank/a") == (False, "tank/a")
    assert f.explain("tank/a/b") == (True, "tank/a<")


def test_filter_longest_subtree_wins_regardless_of_order():
    for mapping in ({"tank<": False, "tank/a/b<": True, "tank/a<": False},
                    {"tank/a<": False, "tank/a/b<": True, "tank<": False}):
        f = DatasetFilter(mapping)
        assert f.explain("tank/a/b/c") == (True, "tank/a/b<")
        assert f.explain("tank/a/x") == (False, "tank/a<")


def test_filter_exact_pattern_does_not_match_children():
    f = DatasetFilter({"tank/a": True})
    assert f.accepts("tank/a")
    assert not f.accepts("tank/a/b")


def test_filter_root_pattern_and_accept_all():
    f = DatasetFilter({"<": True, "tmp<": False})
    assert f.explain("zroot/x") == (True, "<")
    assert not f.accepts("tmp/cache")
    everything = DatasetFilter.accept_all()
    assert everything.accepts("any/pool/at/all")
    assert not DatasetFilter({}).accepts("tank")
    assert f.filter(["tmp", "a", "tmp/b", "b"]) == ["a", "b"]


@pytest.mark.parametrize("mapping,needle", [
    ({"tank<<": True}, "only once"),
    ({"tank</a": True}, "only once"),
    ({"<tank": True}, "only once"),
    ({"tank/": True}, "tank/"),
    ({"tank//a<": True}, "tank//a<"),
    ({"tank@snap": True}, "tank@snap"),
    ({"tank": "yes"}, "true or false"),
    ({"tank": 1}, "true or false"),
])
def test_filter_invalid_patterns(mapping, needle):
    with pytest.raises(ValueError) as e:
        DatasetFilter(mapping)
    assert needle in str(e.value)


# ---- timestamps ----

T = utc(2024, 5, 14, 21, 16, 23)  # a Tuesday; Berlin is UTC+2 then, New York UTC-4


def test_builtin_formats_in_utc():
    assert format_timestamp("dense", T) == "20240514_211623_000"
    assert format_timestamp("human", T) == "2024-05-14_21:16:23"
    assert format_timestamp("iso-8601", T) == "2024-05-14T21:16:23.000Z"
    assert format_timestamp("unix-seconds", T) == "1715721383"
    assert format_timestamp("DENSE", T) == "20240514_211623_000"  # zrepl matches names case-insensitively
    assert set(TIMESTAMP_FORMATS) == {"dense", "human", "iso-8601", "unix-seconds"}


def test_iso8601_with_zone_replaces_plus():
    assert format_timestamp("iso-8601", T, "Europe/Berlin") == "2024-05-14T23:16:23.000_0200"
    assert format_timestamp("iso-8601", T, "America/New_York") == "2024-05-14T17:16:23.000-0400"


def test_custom_strftime_and_plus_replacement():
    assert format_timestamp("%Y-%m-%d_%H:%M", T) == "2024-05-14_21:16"
    assert format_timestamp("%Y-%m-%d_%H:%M:%S%z", T, "Europe/Berlin") == "2024-05-14_23:16:23_0200"
    with pytest.raises(ValueError, match="'\\+'"):
        format_timestamp("%Y+%m", T)


def test_formats_without_offset_require_utc():
    for fmt in ("dense", "human", "unix-seconds"):
        with pytest.raises(ValueError, match="requires location 'UTC'"):
            format_timestamp(fmt, T, "Europe/Berlin")
    with pytest.raises(ValueError, match="unknown time zone"):
        format_timestamp("iso-8601", T, "Mars/Olympus")
    assert format_timestamp("iso-8601", T, "Local")  # the host's zone is always resolvable


def test_snapshot_name_and_invalid_results():
    assert snapshot_name("zrepl_", "dense", T) == "zrepl_20240514_211623_000"
    with pytest.raises(ValueError, match="invalid snapshot name"):
        snapshot_name("zrepl_", "%Y/%m/%d", T)
    with pytest.raises(ValueError, match="invalid snapshot name"):
        snapshot_name("bad@", "dense", T)


def test_validate_timestamp_format():
    validate_timestamp_format("dense")
    validate_timestamp_format("iso-8601", "Europe/Berlin")
    validate_timestamp_format("%Y%m%d_%H%M%S")
    with pytest.raises(ValueError, match="invalid snapshot name"):
        validate_timestamp_format("%d/%m")
    with pytest.raises(ValueError, match="no date or time field"):
        validate_timestamp_format("daily")
    with pytest.raises(ValueError, match="requires location"):
        validate_timestamp_format("human", "Local")


# ---- cron ----

@pytest.mark.parametrize("spec,needle", [
    ("61 * * * *", "minute field '61' out of range 0-59"),
    ("* 24 * * *", "hour field '24' out of range 0-23"),
    ("* * 0 * *", "day-of-month field '0' out of range 1-31"),
    ("* * * 13 *", "month field '13' out of range 1-12"),
    ("* * * * 8", "day-of-week field '8' out of range 0-7"),
    ("* * * *", "5 fields"),
    ("* * * * * * *", "6 with seconds first"),
    ("*/0 * * * *", "step must be a positive number"),
    ("5-1 * * * *", "range start is after its end"),
    ("a * * * *", "not a number"),
    ("1,,2 * * * *", "empty list element"),
    ("* * * FOO *", "not a number or name"),
    ("0 0 31 2 *", "never fires"),
    ("0 0 30,31 2 *", "never fires"),
])
def test_cron_parse_errors(spec, needle):
    with pytest.raises(ValueError) as e:
        CronSpec.parse(spec)
    assert needle in str(e.value)


def test_cron_parse_fields():
    c = CronSpec.parse("0,30 9-17/4 * jan-Mar MON-fri")
    assert c.minutes == {0, 30}
    assert c.hours == {9, 13, 17}
    assert c.months == {1, 2, 3}
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert CronSpec.parse("0 0 * * 7").weekdays == {0}
    assert CronSpec.parse("0 0 * * 5-7").weekdays == {5, 6, 0}
    assert CronSpec.parse("*/15 * * * *").minutes == {0, 15, 30, 45}
    assert CronSpec.parse("10/20 * * * *").minutes == {10, 30, 50}
    daily = CronSpec.parse("@daily")
    assert (daily.minutes, daily.hours, daily.days) == ({0}, {0}, frozenset(range(1, 32)))
    assert CronSpec.parse("@hourly").minutes == {0} and CronSpec.parse("@hourly").hours == set(range(24))
    assert str(CronSpec.parse(" 5 4 * * * ")) == "5 4 * * *"


def test_cron_next_after_is_strict_and_crosses_year():
    c = CronSpec.parse("0 0 1 1 *")
    assert c.next_after(utc(2024, 1, 1)) == utc(2025, 1, 1)
    assert c.next_after(utc(2023, 12, 31, 23, 59, 59)) == utc(2024, 1, 1)
    assert c.last_at_or_before(utc(2024, 1, 1)) == utc(2024, 1, 1)
    assert c.last_at_or_before(utc(2023, 12, 31, 23, 59)) == utc(2023, 1, 1)


def test_cron_month_boundaries_and_short_months():
    c = CronSpec.parse("30 12 31 * *")
    assert c.next_after(utc(2024, 1, 31, 13)) == utc(2024, 3, 31, 12, 30)  # February has no 31st
    assert c.last_at_or_before(utc(2024, 3, 30)) == utc(2024, 1, 31, 12, 30)
    leap = CronSpec.parse("0 0 29 2 *")
    assert leap.next_after(utc(2024, 3, 1)) == utc(2028, 2, 29)
    assert leap.last_at_or_before(utc(2025, 1, 1)) == utc(2024, 2, 29)
    assert leap.last_at_or_before(utc(2024, 2, 28)) is None  # more than a year back


def test_cron_dom_dow_or_rule():
    # Both restricted: the 13th OR any Friday.
    c = CronSpec.parse("0 0 13 * 5")
    assert c.next_after(utc(2024, 9, 1)) == utc(2024, 9, 6)  # Friday the 6th
    assert c.next_after(utc(2024, 9, 6)) == utc(2024, 9, 13)  # also Friday
    assert c.next_after(utc(2024, 10, 12)) == utc(2024, 10, 13)  # Sunday the 13th
    # Only day-of-week restricted: AND with an unrestricted day-of-month.
    mondays = CronSpec.parse("0 0 * * 1")
    assert mondays.next_after(utc(2024, 9, 1)) == utc(2024, 9, 2)
    # '*/2' restricts (robfig/cron, zrepl's parser; Vixie cron would call it unrestricted): odd days
    # OR Fridays.
    odd_or_friday = CronSpec.parse("0 0 */2 * 5")
    assert odd_or_friday.next_after(utc(2024, 9, 1)) == utc(2024, 9, 3)
    assert odd_or_friday.next_after(utc(2024, 9, 5)) == utc(2024, 9, 6)
    # '*' with a step of 1 is still unrestricted: only Fridays.
    assert CronSpec.parse("0 0 */1 * 5").next_after(utc(2024, 9, 1)) == utc(2024, 9, 6)


def test_cron_steps_and_ranges():
    c = CronSpec.parse("*/20 8-10/2 * * *")
    fires = []
    t = utc(2024, 6, 1)
    for _ in range(7):
        t = c.next_after(t)
        fires.append(dt.datetime.fromtimestamp(t, dt.UTC).strftime("%d %H:%M"))
    assert fires == ["01 08:00", "01 08:20", "01 08:40", "01 10:00", "01 10:20", "01 10:40", "02 08:00"]


def test_cron_in_a_zone():
    c = CronSpec.parse("0 3 * * *")
    # 03:00 in Berlin (UTC+2 in summer) is 01:00 UTC.
    assert c.next_after(utc(2024, 6, 1, 12), "Europe/Berlin") == utc(2024, 6, 2, 1)
    assert c.last_at_or_before(utc(2024, 6, 1, 12), "Europe/Berlin") == utc(2024, 6, 1, 1)
    assert c.next_after(utc(2024, 12, 1, 12), "Europe/Berlin") == utc(2024, 12, 2, 2)
    with pytest.raises(ValueError, match="unknown time zone"):
        c.next_after(0, "Nowhere/Special")


def test_cron_dst_gap_fires_at_the_jump_and_repeated_hour_fires_twice():
    c = CronSpec.parse("30 2 * * *")
    # 2024-03-31: Berlin jumps from 02:00 CET to 03:00 CEST at 01:00 UTC; 02:30 does not exist.
    assert c.next_after(utc(2024, 3, 30, 12), "Europe/Berlin") == utc(2024, 3, 31, 1)
    assert c.last_at_or_before(utc(2024, 3, 31, 12), "Europe/Berlin") == utc(2024, 3, 31, 1)
    # Standing exactly at (or just before) the jump must still see the skipped 02:30.
    jump = utc(2024, 3, 31, 1)
    assert c.next_after(jump - 30, "Europe/Berlin") == jump
    assert c.last_at_or_before(jump, "Europe/Berlin") == jump
    assert c.last_at_or_before(jump - 1, "Europe/Berlin") == utc(2024, 3, 30, 1, 30)
    # 2024-10-27: 02:30 happens twice (00:30 UTC in CEST, 01:30 UTC in CET).
    first = c.next_after(utc(2024, 10, 26, 12), "Europe/Berlin")
    assert first == utc(2024, 10, 27, 0, 30)
    assert c.next_after(first, "Europe/Berlin") == utc(2024, 10, 27, 1, 30)
    assert c.last_at_or_before(utc(2024, 10, 27, 1, 0), "Europe/Berlin") == first


def _brute_fires(spec: CronSpec, start: float, end: float, zone: str) -> list[float]:
    """Reference: walk every minute; a fire is a matching wall clock or the jump over a matching one."""
    tz = zrepl.resolve_zone(zone)
    fires = []
    t = start
    prev_off = dt.datetime.fromtimestamp(t - 60, tz).utcoffset()
    while t <= end:
        d = dt.datetime.fromtimestamp(t, tz)
        wall = d.replace(tzinfo=None)
        off = d.utcoffset()
        hit = spec._matches(wall)
        if not hit and off > prev_off:
            w = wall - (off - prev_off)
            while w < wall and not hit:
                hit = spec._matches(w)
                w += dt.timedelta(minutes=1)
        if hit:
            fires.append(t)
        prev_off = off
        t += 60
    return fires


@pytest.mark.parametrize("zone,start", [
    ("UTC", utc(2023, 12, 30)),
    ("Europe/Berlin", utc(2024, 3, 30, 12)),
    ("Europe/Berlin", utc(2024, 10, 26, 12)),
    ("America/New_York", utc(2024, 11, 2, 12)),
    ("Australia/Lord_Howe", utc(2024, 4, 6, 6)),  # 30-minute DST shift
])
def test_cron_matches_brute_force_reference(zone, start):
    rng = random.Random(f"{zone}{start}")
    specs = ["*/7 * * * *", "30 2 * * *", "0,15,45 1-3 * * *", "*/20 */2 * * 0,6", "59 23 31 12 *",
             "5 0-4 * * *", "45 1 * * *"]
    for _ in range(5):
        specs.append(f"{rng.randrange(60)} {rng.randrange(24)},{rng.randrange(24)} * * *")
    end = start + 3 * 86400
    for text in specs:
        spec = CronSpec.parse(text)
        expected = _brute_fires(spec, start, end, zone)
        got, t = [], start - 1
        while True:
            t = spec.next_after(t, zone)
            if t > end:
                break
            got.append(t)
        assert got == expected, text
        # Walking backwards yields the same fire times.
        back, t = [], end
        while True:
            t = spec.last_at_or_before(t, zone)
            if t is None or t < start:
                break
            back.append(t)
            t -= 1
        assert back[::-1] == expected, text


def test_cron_is_fast_for_sparse_schedules():
    import time as _time
    spec = CronSpec.parse("0 0 29 2 1")  # Feb 29 OR any Monday
    leap_only = CronSpec.parse("0 0 29 2 *")
    began = _time.perf_counter()
    for i in range(50):
        leap_only.next_after(utc(2001, 1, 1) + i * 86400)
        spec.next_after(utc(2001, 1, 1) + i * 86400)
    assert _time.perf_counter() - began < 2.0
    assert leap_only.next_after(utc(2001, 1, 1)) == utc(2004, 2, 29)


@pytest.mark.parametrize("mapping,accepted,unmatched", [
    ({"tank/a": True, "tank/gone": True}, ["tank/a"], ["tank/gone"]),
    ({"tank/a<": True}, ["tank/a/child"], []),  # something below the subtree pattern counts
    ({"tank/a<": True, "tank/a": False}, [], ["tank/a<"]),  # it selected nothing: no effect
    ({"tank/old": False, "<": True}, ["tank/x"], []),  # rejecting patterns and "<" alone are not counted
    ({"tank/a": True}, ["tank/ab"], ["tank/a"]),  # whole components: tank/ab is not tank/a
    ({"tank/a<": True}, ["tank/ab"], ["tank/a<"]),
])
def test_unmatched_names_the_accepting_patterns_that_selected_nothing(mapping, accepted, unmatched):
    assert DatasetFilter(mapping).unmatched(accepted) == unmatched
