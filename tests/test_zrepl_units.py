"""zrepl's own unit tests for units, ported: data sizes (bandwidth limits), durations, and the hook
output ring buffer.

Same inputs, same expected outputs, against section 1. Each case names the zrepl file and test it
comes from (zrepl/zrepl, internal/...).
"""


import pytest


import zrepl  # noqa: E402
from zrepl import RingBuffer, parse_data_rate  # noqa: E402

# ---- internal/util/datasizeunit/datasizeunit_test.go: TestBits ----

BITS = [
    ("23 bit", 23), ("23bit", 23), ("10MiB", 10 * (1 << 20) * 8), ("10 MiB", 8 * 10 * (1 << 20)),
    ("10.5 Kib", 10.5 * (1 << 10)), ("10.5Kib", 10.5 * (1 << 10)),
    ("1 bit", 1), ("1 B", 8), ("1 Kb", 1e3), ("1 Kib", 1 << 10), ("1 Mb", 1e6), ("1 Mib", 1 << 20),
    ("1 Gb", 1e9), ("1 Gib", 1 << 30), ("1 Tb", 1e12), ("1 Tib", 1 << 40),
]


@pytest.mark.parametrize("text,bits", [pytest.param(t, b, id=f"datasizeunit_test.go:TestBits/{t}") for t, b in BITS])
def test_bits(text, bits):
    """zrepl internal/util/datasizeunit/datasizeunit_test.go TestBits (zrepl counts bits; we return bytes)."""
    assert parse_data_rate(text) == bits / 8


def test_bandwidth_examples_from_the_issue():
    assert parse_data_rate("1 Mb") == 125000
    assert parse_data_rate("1 Kib") == 128
    assert parse_data_rate("10.5 Kib") == 1344
    assert parse_data_rate("23 bit") == 2.875
    assert parse_data_rate("1 MB") == 1_000_000 and parse_data_rate("1 MiB") == 1 << 20


@pytest.mark.parametrize("text", ["10 mb", "10 kB", "10", "1.5 bit", "MiB", "10 MiBs", " 10 MiB", "1e3 B", "10 KiB/s"])
def test_data_rates_zrepl_refuses(text):
    """datasizeunit.go's grammar: a unit is required, case matters, bits are whole."""
    with pytest.raises(ValueError):
        parse_data_rate(text)


def bandwidth(table: str) -> zrepl.BandwidthLimit | None:
    config = zrepl.parse_config(f"""
[[jobs]]
name = "s"
type = "sink"
root_fs = "pool/sink"
serve = {{ type = "local", listener_name = "l" }}
recv = {{ bandwidth_limit = {table} }}
""")
    return config.jobs[0].recv.bandwidth_limit


def test_no_limit_config():
    """zrepl internal/util/bandwidthlimit/bandwidthlimit_test.go TestNoLimitConfig: no limit is a
    valid config (zrepl's default max is "-1 B", and a negative max means no limit)."""
    assert bandwidth('{ max = "-1 B" }') is None
    limit = bandwidth('{ max = "23 bit", bucket_capacity = "1 KiB" }')
    assert limit is not None and (limit.max, limit.bucket_capacity) == (2.875, 1024)


@pytest.mark.parametrize("table,needle", [
    ('{ max = "1 bit" }', "too small"),  # build_jobs.go: at least one byte
    ('{ max = "0 B" }', "must not be 0"),
    ('{ max = "1 MB", bucket_capacity = "0 B" }', "at least 1 byte"),  # bandwidthlimit.go ValidateConfig
])
def test_bandwidth_limits_zrepl_refuses(table, needle):
    with pytest.raises(zrepl.ConfigError) as info:
        bandwidth(table)
    assert info.value.path.startswith("jobs[0].recv.bandwidth_limit") and needle in info.value.message


# ---- internal/config/config_positiveintervalormanual_test.go: TestPositiveDurationOrManual ----

def pull_interval(value: str) -> float | None:
    config = zrepl.parse_config(f"""
[[jobs]]
name = "p"
type = "pull"
root_fs = "pool/backup"
interval = "{value}"
connect = {{ type = "ssh+stdinserver", host = "h", identity_file = "/k" }}
pruning = {{ keep_sender = [], keep_receiver = [] }}
""")
    return config.jobs[0].interval


@pytest.mark.parametrize("value", [
    pytest.param(v, id=f"config_positiveintervalormanual_test.go:TestPositiveDurationOrManual/{c}")
    for v, c in [("", "empty is error"), ("-1s", "negative is error"), ("0s", "zero seconds is error"),
                 ("0", "zero is error"), ("something", "non-manual is error")]])
def test_positive_duration_or_manual_errors(value):
    """zrepl internal/config/config_positiveintervalormanual_test.go TestPositiveDurationOrManual."""
    with pytest.raises(zrepl.ConfigError) as info:
        pull_interval(value)
    assert info.value.path == "jobs[0].interval"


def test_positive_duration_or_manual_values():
    """zrepl config_positiveintervalormanual_test.go TestPositiveDurationOrManual: positive seconds
    works, manual works."""
    assert pull_interval("1s") == 1
    assert pull_interval("manual") is None


def test_durations_take_zrepl_and_go_forms():
    """zrepl config_duration.go: an integer and s/m/h/d/w (a bare 0 too); its timeouts are Go
    durations (`1m30s`, `500ms`). Decimals (`1.5h`) are our extension."""
    assert [zrepl.parse_duration(v) for v in ("10s", "10m", "2h", "1d", "1w", "0")] == [10, 600, 7200, 86400, 604800, 0]
    assert zrepl.parse_duration("1m30s") == 90 and zrepl.parse_duration("500ms") == 0.5
    assert zrepl.parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="at most 100 years"):
        zrepl.parse_duration("7000w")


# ---- internal/util/circlog/circlog_test.go: TestCircularLog ----

MAX = 1 << 20


def pattern(size: int) -> bytes:
    return (b"\xde\xad\xbe\xef" * (size // 4 + 1))[:size]


def test_circular_log_negative_size_error():
    """circlog_test.go TestCircularLog/negative-size-error."""
    with pytest.raises(ValueError, match="must be positive"):
        RingBuffer(-1)


@pytest.mark.parametrize("size", [pytest.param(32 * 1024 - 1, id="circlog_test.go:TestCircularLog/no-resize"),
                                  pytest.param(32 * 1024 + 1, id="circlog_test.go:TestCircularLog/one-resize")])
def test_circular_log_keeps_everything_below_the_maximum(size):
    """circlog_test.go TestCircularLog/no-resize, /one-resize (zrepl's buffer grows in steps; ours
    is a bytearray: what matters is that every byte below the maximum is kept)."""
    log = RingBuffer(MAX)
    log.write(pattern(size))
    assert log.getvalue() == pattern(size)


def test_circular_log_wrap_exactly_maximum():
    """circlog_test.go TestCircularLog/wrap-exactly-maximum."""
    log = RingBuffer(MAX)
    for _ in range(4):
        log.write(pattern(MAX // 4))
    assert len(log.getvalue()) == MAX and log.dropped == 0


def test_circular_log_wrap_partial():
    """circlog_test.go TestCircularLog/wrap-partial."""
    log = RingBuffer(MAX)
    log.write(b"\x00\x00\x00\x00")
    for _ in range(5):
        log.write(pattern(MAX // 4))
    log.write(b"\xff\xff\xff\xff")
    data = log.getvalue()
    assert len(data) == MAX and data.endswith(b"\xff\xff\xff\xff") and not data.startswith(b"\x00\x00\x00\x00")


def test_circular_log_overflow_write():
    """circlog_test.go TestCircularLog/overflow-write: one write larger than the maximum keeps the
    last MAX bytes, marked "(...)" at the start."""
    log = RingBuffer(MAX)
    log.write(pattern(MAX + 1))
    data = log.getvalue()
    assert len(data) == MAX and data[:5] == b"(...)"


def test_circular_log_stringify():
    """circlog_test.go TestCircularLog/stringify."""
    log = RingBuffer(MAX)
    log.write(b"A harmful truth is better than a useful lie.")
    assert log.text() == "A harmful truth is better than a useful lie."
