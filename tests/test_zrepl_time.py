"""zrepl's own unit tests for time, ported: snapshot timestamp formats and cron specs.

Same inputs, same expected outputs, against section 2 (format_timestamp, CronSpec). Each case names
the zrepl file and test it comes from (zrepl/zrepl, internal/...). Deliberate differences assert our
documented behaviour (README: Coming from zrepl).
"""

import calendar

import pytest


import zrepl  # noqa: E402
from zrepl import CronSpec, format_timestamp  # noqa: E402


def utc(*fields: int) -> float:
    return float(calendar.timegm(fields + (0,) * (6 - len(fields))))


T = utc(2024, 5, 14, 21, 16, 23)  # the instant zrepl's timestamp tests format

# ---- internal/daemon/snapper/snapname/timestamp/timestamp_test.go ----


def test_legacy_iso8601_format():
    """zrepl timestamp_test.go TestLegacyIso8601Format: in UTC, iso-8601 is Go's
    "2006-01-02T15:04:05.000Z": milliseconds, then a literal Z."""
    assert format_timestamp("iso-8601", T + 0.4567) == "2024-05-14T21:16:23.456Z"
    assert format_timestamp("iso-8601", T) == "2024-05-14T21:16:23.000Z"


def test_iso8601_prints_time_zone_offset():
    """zrepl timestamp_test.go TestIso8601PrintsTimeZoneOffset."""
    assert format_timestamp("iso-8601", T, "Europe/Berlin") == "2024-05-14T23:16:23.000_0200"


@pytest.mark.parametrize("fmt", ["dense", "human", "unix-seconds"])
def test_builtin_formats_error_on_non_utc_location(fmt):
    """zrepl timestamp_test.go TestBuiltinFormatsErrorOnNonUtcLocation."""
    with pytest.raises(ValueError, match="requires location 'UTC'"):
        format_timestamp(fmt, T, "Europe/Berlin")
    format_timestamp("iso-8601", T, "Europe/Berlin")  # prints its zone, so any location is fine


def test_positive_utc_offset_detection():
    """zrepl timestamp_test.go TestPositiveUtcOffsetDetection, by its effect: a positive offset's
    '+' becomes '_', a negative one keeps its '-', UTC prints Z."""
    assert format_timestamp("iso-8601", T, "Europe/Berlin").endswith("_0200")
    assert format_timestamp("iso-8601", T, "America/New_York").endswith("-0400")
    assert format_timestamp("iso-8601", T, "UTC").endswith("Z")


def test_format_can_replace_plus_with_underscore():
    """zrepl timestamp_test.go TestFormatCanReplacePlusWithUnderscore. DIFFERS: zrepl takes a Go time
    layout ("2006-01-02_15:04:05-07:00:00"); zrepl.py takes strftime (README: Coming from zrepl). The
    same name shape, with the '+' of the offset replaced by '_' as zrepl does:"""
    assert format_timestamp("%Y-%m-%d_%H:%M:%S%z", T, "Europe/Berlin") == "2024-05-14_23:16:23_0200"
    # The Go layout itself is refused at configcheck (every snapshot would get the same name), with a hint.
    with pytest.raises(ValueError, match="Go time layout.*%Y-%m-%d_%H:%M:%S"):
        zrepl.validate_timestamp_format("2006-01-02_15:04:05-07:00:00", "Europe/Berlin")


def test_dense_and_human_are_zrepls_layouts():
    """zrepl timestamp.go: dense "20060102_150405_000" (the _000 is literal), human "2006-01-02_15:04:05",
    unix-seconds; zrepl names snapshots with these."""
    assert format_timestamp("dense", T + 0.9) == "20240514_211623_000"
    assert format_timestamp("human", T) == "2024-05-14_21:16:23"
    assert format_timestamp("unix-seconds", T + 0.9) == str(int(T))


# ---- internal/daemon/snapper/cron_test.go: TestCronLibraryWorks ----

def dhm(day: int, hour: int, minute: int) -> float:
    return utc(2022, 7, day, hour, minute)


def hm(hour: int, minute: int) -> float:
    return dhm(23, hour, minute)


CRON_NEXT = [
    ("0-10 * * * *", dhm(17, 1, 10), dhm(17, 2, 0)), ("0-10 * * * *", dhm(17, 23, 10), dhm(18, 0, 0)),
    ("0-10 * * * *", hm(1, 9), hm(1, 10)), ("0-10 * * * *", hm(1, 9), hm(1, 10)),
    ("1,3,5 * * * *", hm(1, 1), hm(1, 3)), ("1,3,5 * * * *", hm(1, 2), hm(1, 3)),
    ("1,3,5 * * * *", hm(1, 3), hm(1, 5)), ("1,3,5 * * * *", hm(1, 5), hm(2, 1)),
    ("* 0-5,8,12 * * *", hm(0, 0), hm(0, 1)), ("* 0-5,8,12 * * *", hm(4, 59), hm(5, 0)),
    ("* 0-5,8,12 * * *", hm(5, 0), hm(5, 1)), ("* 0-5,8,12 * * *", hm(5, 59), hm(8, 0)),
    ("* 0-5,8,12 * * *", hm(8, 59), hm(12, 0)),
    ("53 17,18,19 * * *", dhm(23, 17, 52), dhm(23, 17, 53)), ("53 17,18,19 * * *", dhm(23, 17, 53), dhm(23, 18, 53)),
    ("53 17,18,19 * * *", dhm(23, 18, 53), dhm(23, 19, 53)), ("53 17,18,19 * * *", dhm(23, 19, 53), dhm(24, 17, 53)),
]


@pytest.mark.parametrize("spec,now,expected", [pytest.param(*c, id=f"cron_test.go:TestCronLibraryWorks/{i}")
                                               for i, c in enumerate(CRON_NEXT)])
def test_cron_library_works(spec, now, expected):
    """zrepl internal/daemon/snapper/cron_test.go TestCronLibraryWorks (Schedule.Next in UTC)."""
    assert CronSpec.parse(spec).next_after(now) == expected


# ---- internal/config/config_test.go: TestCronSpec ----

@pytest.mark.parametrize("spec", [pytest.param(s, id=f"config_test.go:TestCronSpec/accept/{s}")
                                  for s in ("* * * * *", "0-10 * * * *", "* 0-5,8,12 * * *")])
def test_cron_spec_accepted(spec):
    """zrepl internal/config/config_test.go TestCronSpec, expectAccept."""
    assert CronSpec.parse(spec).minutes


@pytest.mark.parametrize("spec", [pytest.param(s, id=f"config_test.go:TestCronSpec/fail/{s!r}")
                                  for s in ("* * * *", "", "23", "@reboot", "@every 1h30m")])
def test_cron_spec_refused(spec):
    """zrepl internal/config/config_test.go TestCronSpec, expectFail."""
    with pytest.raises(ValueError):
        CronSpec.parse(spec)


def test_cron_spec_daily_shortcut_is_our_extension():
    """zrepl internal/config/config_test.go TestCronSpec expects "@daily" to fail (zrepl turns off
    robfig/cron's descriptors). DIFFERS: zrepl.py accepts @yearly, @monthly, @weekly, @daily and
    @hourly as crontab does (README: Coming from zrepl); @reboot and @every stay refused."""
    daily = CronSpec.parse("@daily")
    assert daily.next_after(utc(2024, 1, 1, 12)) == utc(2024, 1, 2)


def test_cron_spec_six_fields_with_seconds():
    """zrepl internal/config/config_test.go TestCronSpec lists unquoted `* * * * * *` as a failure;
    it fails in YAML (an unquoted `*` is an alias), not in the cron parser: zrepl's parser
    (cron.SecondOptional) takes a 6th, leading seconds field, as zrepl.py does."""
    every_second = CronSpec.parse("* * * * * *")
    assert every_second.next_after(utc(2024, 1, 1, 0, 0, 0)) == utc(2024, 1, 1, 0, 0, 1)
    at_30 = CronSpec.parse("30 0 3 * * *")
    assert at_30.next_after(utc(2024, 1, 1)) == utc(2024, 1, 1, 3, 0, 30)
    assert at_30.next_after(utc(2024, 1, 1, 3, 0, 30)) == utc(2024, 1, 2, 3, 0, 30)
    assert at_30.last_at_or_before(utc(2024, 1, 1, 3, 0, 29)) == utc(2023, 12, 31, 3, 0, 30)
    assert at_30.last_at_or_before(utc(2024, 1, 1, 3, 0, 30)) == utc(2024, 1, 1, 3, 0, 30)
    with pytest.raises(ValueError, match="second field '60' out of range"):
        CronSpec.parse("60 * * * * *")


def test_cron_tz_prefix():
    """robfig/cron (zrepl's parser) takes `TZ=Zone` / `CRON_TZ=Zone` before the fields; the zone wins
    over the location the caller passes."""
    spec = CronSpec.parse("CRON_TZ=Europe/Berlin 0 3 * * *")
    assert spec.next_after(utc(2024, 6, 1, 12), "UTC") == utc(2024, 6, 2, 1)
    assert CronSpec.parse("TZ=UTC 0 3 * * *").next_after(utc(2024, 6, 1, 12), "Europe/Berlin") == utc(2024, 6, 2, 3)
    with pytest.raises(ValueError, match="unknown time zone"):
        CronSpec.parse("TZ=Nowhere/Special 0 3 * * *")
