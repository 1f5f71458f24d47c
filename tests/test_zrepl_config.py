"""zrepl's own config tests and sample configs, ported.

zrepl's YAML inputs are written here as TOML with the same keys and values; its sample configs are
in tests/zrepl_samples/ (converted once, key for key; each file names its source). Each case names
the zrepl file and test it comes from (zrepl/zrepl, internal/config/... and internal/daemon/job/...).
Deliberate differences assert our documented behaviour (README: Coming from zrepl): no tcp/tls
transports (ssh+stdinserver and local instead), no `include`, a local connect needs its listener in
the same config, the default log outlet is stderr.
"""

import json
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "zrepl_samples"
import zrepl  # noqa: E402


def parse(text: str) -> zrepl.Config:
    return zrepl.parse_config(text, "test.toml")


def errors_of(text: str) -> list[zrepl.ConfigError]:
    with pytest.raises(zrepl.ConfigError) as info:
        parse(text)
    exc = info.value
    return exc.errors if isinstance(exc, zrepl.ConfigErrors) else [exc]


def toml_value(value) -> str:
    """A TOML inline value (the tests below rewrite parsed samples)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_document(data: dict) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items() if k != "jobs"]
    for job in data.get("jobs", []):
        lines += ["[[jobs]]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in job.items()]
    return "\n".join(lines) + "\n"


# ---- sample configs: internal/config/config_test.go TestSampleConfigsAreParsedWithoutErrors and
# internal/daemon/job/build_jobs_test.go TestSampleConfigsAreBuiltWithoutErrors ----

UNSUPPORTED = "transport is not supported by zrepl.py"
# sample -> the errors we report (key path, words of the message); empty = it loads.
SAMPLE_OUTCOMES = {
    # two sinks on one local listener: zrepl lets them share it (a connection reaches either of them)
    "bandwidth_limit": [("jobs[2].serve.listener_name", "already served by job 'limited_sink'")],
    "empty": [],
    "include.d__snap": [],
    "include": [("include", "include is not supported")],
    "include_directory": [("include", "include is not supported")],
    "local": [],
    "pull": [("jobs[0].connect.type", UNSUPPORTED)],
    "pull_ssh": [],
    "push": [("jobs[0].connect.type", UNSUPPORTED)],
    "quickstart_backup_to_external_disk": [],
    "quickstart_continuous_server_backup_receiver": [("jobs[0].serve.type", UNSUPPORTED)],
    "quickstart_continuous_server_backup_sender": [("jobs[0].connect.type", UNSUPPORTED)],
    "quickstart_fan_out_replication_source": [("jobs[1].serve.type", UNSUPPORTED),
                                              ("jobs[2].serve.type", UNSUPPORTED)],
    "quickstart_fan_out_replication_target": [("jobs[0].connect.type", UNSUPPORTED)],
    "sink": [("jobs[0].serve.type", UNSUPPORTED)],
    "snap": [],
    "snap_cron": [],
    "source": [("jobs[0].serve.type", UNSUPPORTED)],
    "source_ssh": [],
    "systemd-default-zrepl": [],
    # internal/config/config_test.go TestInvalidSampleConfigsFailToParse
    "invalid__duplicate_job_names__zrepl": [("jobs[1].name", "already used")],
    "invalid__duplicate_job_names_with_include__zrepl": [("include", "include is not supported")],
    "invalid__duplicate_job_names_with_include__included": [],  # included by the one above
    "invalid__internal_job_name__zrepl": [("jobs[0].name", "must not start with '_'")],
}


def test_every_sample_has_an_expected_outcome():
    assert sorted(p.stem for p in SAMPLES.glob("*.toml")) == sorted(SAMPLE_OUTCOMES)


@pytest.mark.parametrize("name", [pytest.param(n, id=f"config/samples/{n.replace('__', '/')}.yml")
                                  for n in SAMPLE_OUTCOMES])
def test_sample_config(name):
    """zrepl config_test.go TestSampleConfigsAreParsedWithoutErrors, TestInvalidSampleConfigsFailToParse,
    build_jobs_test.go TestSampleConfigsAreBuiltWithoutErrors."""
    text = (SAMPLES / f"{name}.toml").read_text()
    expected = SAMPLE_OUTCOMES[name]
    if not expected:
        parse(text)
        return
    got = [(e.path, e.message) for e in errors_of(text)]
    assert [path for path, _ in got] == [path for path, _ in expected]
    for (_, message), (_, words) in zip(got, expected, strict=True):
        assert words in message


def with_our_transports(data: dict) -> dict:
    """The sample with zrepl's tcp/tls transports replaced by ssh+stdinserver, everything else equal."""
    for job in data.get("jobs", []):
        if job.get("connect", {}).get("type") in ("tcp", "tls"):
            job["connect"] = {"type": "ssh+stdinserver", "host": "backup.example.com",
                              "identity_file": "/etc/zrepl/ssh/identity"}
        if job.get("serve", {}).get("type") in ("tcp", "tls"):
            job["serve"] = {"type": "stdinserver", "client_identities": ["client1"]}
    return data


@pytest.mark.parametrize("name", [n for n, errs in SAMPLE_OUTCOMES.items() if errs and errs[0][1] == UNSUPPORTED])
def test_sample_config_loads_with_our_transport(name):
    """The samples refused only for their transport load once it is ssh+stdinserver: nothing else in
    them differs."""
    data = with_our_transports(tomllib.loads((SAMPLES / f"{name}.toml").read_text()))
    parse(toml_document(data))


def test_sample_bandwidth_limit():
    """zrepl build_jobs_test.go testSampleConfig_BandwidthLimit, with the third sink on a listener of
    its own (zrepl.py refuses two jobs serving one local listener, see above)."""
    text = (SAMPLES / "bandwidth_limit.toml").read_text()
    assert text.count('listener_name = "localsink" }') == 2
    head, sep, tail = text.rpartition('listener_name = "localsink"')
    config = parse(head + 'listener_name = "another_localsink"' + tail)
    limited_sink, limited_push, unlimited_sink = config.jobs
    sink_limit, push_limit = limited_sink.recv.bandwidth_limit, limited_push.send.bandwidth_limit
    assert (sink_limit.max, sink_limit.bucket_capacity) == (12345, 1 << 17)
    assert (push_limit.max, push_limit.bucket_capacity) == (54321, 1024)
    assert unlimited_sink.recv.bandwidth_limit is None


# ---- internal/config/config_test.go TestEmptyConfig ----

@pytest.mark.parametrize("text", ["", "\n", "# comments only\n"])
def test_empty_config(text):
    """zrepl config_test.go TestEmptyConfig ("" and "\\n"; its "---" is YAML, see below)."""
    config = parse(text)
    assert config.jobs == [] and config.global_ is not None


def test_yaml_document_marker_gets_the_yaml_hint():
    """zrepl config_test.go TestEmptyConfig accepts "---" (an empty YAML document); zrepl.py reads
    TOML and says so."""
    (error,) = errors_of("---\n")
    assert "this looks like YAML" in error.message and "Coming from zrepl" in error.message


# ---- internal/config/config_minimal_test.go TestJobsOnlyWorks ----

JOBS_ONLY = """
[[jobs]]
name = "push"
type = "push"
connect = { type = "tcp", address = "localhost:2342" }
snapshotting = { type = "manual" }
pruning = { keep_sender = [{ type = "not_replicated" }], keep_receiver = [{ type = "last_n", count = 1 }] }
[jobs.filesystems]
"pool1/var/db<" = true
"pool1/usr/home<" = true
"pool1/usr/home/paranoid" = false
"pool1/poudriere/ports<" = false
"""


def test_jobs_only_works():
    """zrepl config_minimal_test.go TestJobsOnlyWorks: a config with only jobs. DIFFERS only in the
    tcp transport, which zrepl.py refuses by name; with ssh+stdinserver it loads."""
    (error,) = errors_of(JOBS_ONLY)
    assert error.path == "jobs[0].connect.type" and UNSUPPORTED in error.message
    config = parse(JOBS_ONLY.replace('{ type = "tcp", address = "localhost:2342" }',
                                     '{ type = "ssh+stdinserver", host = "localhost", identity_file = "/k" }'))
    assert config.jobs[0].filesystems.accepts("pool1/usr/home/alice")
    assert not config.jobs[0].filesystems.accepts("pool1/usr/home/paranoid")


# ---- internal/config/config_global_test.go ----

DUMMY_SINK = """
[[jobs]]
name = "dummyjob"
type = "sink"
root_fs = "zroot/foo"
serve = { type = "stdinserver", client_identities = ["foo"] }
"""


OUTLETS = [
    'type = "stdout"\nlevel = "debug"\nformat = "human"',
    'type = "syslog"\nlevel = "info"\nretry_interval = "20s"\nformat = "human"',
    'type = "tcp"\nlevel = "debug"\nformat = "json"\naddress = "logserver.example.com:1234"',
    'type = "tcp"\nlevel = "debug"\nformat = "json"\naddress = "encryptedlogserver.example.com:1234"\n'
    'retry_interval = "20s"\n'
    'tls = { ca = "/etc/zrepl/log/ca.crt", cert = "/etc/zrepl/log/key.pem", key = "/etc/zrepl/log/cert.pem" }',
]


def logging_section(outlets: list[str]) -> str:
    return "".join(f"[[global.logging]]\n{o}\n" for o in outlets)


def test_outlet_types():
    """zrepl config_global_test.go TestOutletTypes: stdout, syslog (with retry_interval) and two tcp
    outlets. DIFFERS: zrepl.py has no tcp outlet and says so on each; stdout and syslog load."""
    errors = errors_of(logging_section(OUTLETS) + DUMMY_SINK)
    assert [(e.path, "tcp log outlet is not supported" in e.message) for e in errors] == [
        ("global.logging[2].type", True), ("global.logging[3].type", True)]
    config = parse(logging_section(OUTLETS[:2]) + DUMMY_SINK)
    assert [(o.type, o.level, o.retry_interval) for o in config.global_.logging] == [
        ("stdout", "debug", 10.0), ("syslog", "info", 20.0)]


def test_default_logging_outlet():
    """zrepl config_global_test.go TestDefaultLoggingOutlet: one outlet, format human. DIFFERS in the
    outlet: zrepl's default writes to stdout, zrepl.py's to stderr (stdout carries command output
    and the stdinserver protocol). The default level is the quiet-on-success question (issue 9)."""
    (outlet,) = parse(DUMMY_SINK).global_.logging
    assert (outlet.type, outlet.format) == ("stderr", "human")


def test_prometheus_monitoring():
    """zrepl config_global_test.go TestPrometheusMonitoring."""
    config = parse('[global]\nmonitoring = [{ type = "prometheus", listen = ":9811" }]\n' + DUMMY_SINK)
    assert config.global_.monitoring == [zrepl.MonitoringOutlet(type="prometheus", listen=":9811")]


@pytest.mark.parametrize("facility", [None, "kern", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
                                      "authpriv", "ftp", *(f"local{i}" for i in range(8))])
def test_syslog_logging_outlet_facility(facility):
    """zrepl config_global_test.go TestSyslogLoggingOutletFacility (no facility = local0)."""
    key = f', facility = "{facility}"' if facility else ""
    config = parse(f'[global]\nlogging = [{{ type = "syslog", level = "info", format = "human"{key} }}]\n' + DUMMY_SINK)
    assert config.global_.logging[0].facility == (facility or "local0")


# ---- internal/config/config_snapshotting_test.go ----

PUSH = """
[[jobs]]
name = "foo"
type = "push"
connect = {{ type = "local", listener_name = "foo", client_identity = "bar" }}
filesystems = {{ "<" = true, "pool/sink<" = false }}
{extra}
pruning = {{ keep_sender = [{{ type = "last_n", count = 10 }}], keep_receiver = [{{ type = "last_n", count = 10 }}] }}

[[jobs]]
name = "sink for the local connect"
type = "sink"
root_fs = "pool/sink"
serve = {{ type = "local", listener_name = "foo" }}
"""
# zrepl's push template connects to listener "foo" without a sink serving it; our config check
# requires one in the same config (the local-listener check), so the template above adds it, and
# keeps the sink's root_fs out of the push filter (configcheck refuses a filter that reaches a
# receive root: the push would snapshot and prune the replicas).


def push(extra: str, snapshotting: str = 'snapshotting = { type = "manual" }') -> zrepl.JobConfig:
    return parse(PUSH.format(extra=f"{snapshotting}\n{extra}")).jobs[0]


def snapshotting(table: str) -> zrepl.SnapshottingConfig:
    return push("", snapshotting=table).snapshotting


def test_snapshotting_manual_periodic_cron_daily():
    """zrepl config_snapshotting_test.go TestSnapshotting/manual, /periodic, /cron, /periodicDaily."""
    assert snapshotting('snapshotting = { type = "manual" }').type == "manual"
    p = snapshotting('snapshotting = { type = "periodic", prefix = "zrepl_", timestamp_format = "dense", '
                     'interval = "10m" }')
    assert (p.type, p.interval, p.prefix) == ("periodic", 600, "zrepl_")
    c = snapshotting('snapshotting = { type = "cron", prefix = "zrepl_", timestamp_format = "human", '
                     'cron = "10 * * * *" }')
    assert (c.type, c.prefix, c.timestamp_format) == ("cron", "zrepl_", "human")
    d = snapshotting('snapshotting = { type = "periodic", prefix = "zrepl_", interval = "1d" }')
    assert (d.interval, d.timestamp_format) == (86400, "dense")


def test_snapshotting_hooks():
    """zrepl config_snapshotting_test.go TestSnapshotting/hooks."""
    hooks = """[jobs.snapshotting]
type = "periodic"
prefix = "zrepl_"
interval = "10m"
[[jobs.snapshotting.hooks]]
type = "command"
path = "/tmp/path/to/command"
[[jobs.snapshotting.hooks]]
type = "command"
path = "/tmp/path/to/command"
filesystems = { "zroot<" = true, "<" = false }
[[jobs.snapshotting.hooks]]
type = "postgres-checkpoint"
dsn = "host=localhost port=5432 user=postgres sslmode=disable"
filesystems = { "tank/postgres/data11" = true }
[[jobs.snapshotting.hooks]]
type = "mysql-lock-tables"
dsn = "root@tcp(localhost)/"
filesystems = { "tank/mysql" = true }
"""
    first, sink = PUSH.format(extra="").split("[[jobs]]")[1:]
    config = parse("[[jobs]]" + first + hooks + "[[jobs]]" + sink)
    hs = config.jobs[0].snapshotting.hooks
    assert hs[0].filesystems.patterns["<"] is True
    assert hs[1].filesystems.patterns["zroot<"] is True
    assert hs[2].filesystems.patterns["tank/postgres/data11"] is True
    assert hs[3].filesystems.patterns["tank/mysql"] is True


@pytest.mark.parametrize("table", ['snapshotting = { type = "periodic", prefix = "zrepl_", interval = "10m" }',
                                   'snapshotting = { type = "cron", prefix = "zrepl_", cron = "10 * * * *" }'])
def test_snapshotting_timestamp_defaults(table):
    """zrepl config_snapshotting_test.go TestSnapshottingTimestampDefaults."""
    s = snapshotting(table)
    assert (s.prefix, s.timestamp_format, s.timestamp_location) == ("zrepl_", "dense", "UTC")


# ---- internal/config/config_send_test.go TestSendOptions ----

@pytest.mark.parametrize("table,expected", [
    pytest.param(*c, id=f"config_send_test.go:TestSendOptions/{c[0] or 'send_not_specified'}") for c in [
        ("send = { encrypted = false }", {"encrypted": False}),
        ("send = { encrypted = true }", {"encrypted": True}),
        ("send = {}", {"encrypted": False}),
        ("send = { encrypted = true, send_properties = true }", {"encrypted": True, "send_properties": True}),
        ("send = { send_properties = false }", {"send_properties": False}),
        ("send = { send_properties = true }", {"send_properties": True}),
        ("send = { raw = true }", {"raw": True}),
        ("send = { raw = false }", {"raw": False}),
        ("send = { encrypted = true, raw = true }", {"raw": True, "encrypted": True}),
        ("", {}),
    ]])
def test_send_options(table, expected):
    """zrepl internal/config/config_send_test.go TestSendOptions."""
    send = push(table).send
    assert {key: getattr(send, key) for key in expected} == expected


# ---- internal/config/config_recv_test.go TestRecvOptions ----

PULL = """
[[jobs]]
name = "foo"
type = "pull"
connect = {{ type = "ssh+stdinserver", host = "h", identity_file = "/k" }}
root_fs = "zreplplatformtest"
{extra}
interval = "manual"
pruning = {{ keep_sender = [{{ type = "last_n", count = 10 }}], keep_receiver = [{{ type = "last_n", count = 10 }}] }}
"""


@pytest.mark.parametrize("table,inherit,override", [
    pytest.param(*c[:3], id=f"config_recv_test.go:TestRecvOptions/{c[3]}") for c in [
        # zrepl's YAML leaves keys without a value ("properties:"): TOML has no null, the key is left out.
        ("recv = { properties = {} }", [], {}, "recv_properties_empty"),
        ("recv = { properties = { inherit = [] } }", [], {}, "recv_inherit_empty"),
        ('recv = { properties = { inherit = ["testprop"] } }', ["testprop"], {}, "recv_inherit"),
        ("recv = { properties = { override = {} } }", [], {}, "recv_override_empty"),
        ('recv = { properties = { override = { testprop2 = "test123" } } }', [], {"testprop2": "test123"},
         "recv_override"),
        ('recv = { properties = { inherit = ["testprop"], override = { testprop2 = "test123" } } }', ["testprop"],
         {"testprop2": "test123"}, "recv_override_and_inherit"),
        ("recv = {}", [], {}, "recv_empty"),
        ("", [], {}, "send_not_specified"),
    ]])
def test_recv_options(table, inherit, override):
    """zrepl internal/config/config_recv_test.go TestRecvOptions."""
    recv = parse(PULL.format(extra=table)).jobs[0].recv
    assert (recv.inherit, recv.override) == (inherit, override)


# ---- internal/config/config_transport_test.go TestTransportConnect ----

@pytest.mark.parametrize("connect", [
    pytest.param(c, id=f"config_transport_test.go:TestTransportConnect/{n}") for n, c in [
        ("tcp_with_address_and_port", '{ type = "tcp", address = "10.0.0.23:42" }'),
        ("tls_with_host_and_port", '{ type = "tls", address = "server1.foo.bar:8888", ca = "/etc/zrepl/ca.crt", '
                                   'cert = "/etc/zrepl/backupserver.fullchain", key = "/etc/zrepl/backupserver.key", '
                                   'server_cn = "server1" }'),
        ("tcp_without_port", '{ type = "tcp", address = "10.0.0.23" }'),
        ("tls_without_port", '{ type = "tls", address = "10.0.0.23", ca = "/etc/zrepl/ca.crt", '
                             'cert = "/etc/zrepl/backupserver.fullchain", key = "/etc/zrepl/backupserver.key", '
                             'server_cn = "server1" }'),
    ]])
def test_transport_connect(connect):
    """zrepl internal/config/config_transport_test.go TestTransportConnect. DIFFERS for the two valid
    cases: zrepl.py has no tcp/tls transport and refuses both by name (ssh+stdinserver instead); the
    two invalid ones are refused by both."""
    text = PUSH.replace('connect = {{ type = "local", listener_name = "foo", client_identity = "bar" }}',
                        f"connect = {connect.replace('{', '{{').replace('}', '}}')}")
    errors = errors_of(text.format(extra='snapshotting = { type = "manual" }'))
    assert [(e.path, UNSUPPORTED in e.message) for e in errors] == [("jobs[0].connect.type", True)]


# ---- internal/daemon/job/build_jobs_test.go TestReplicationOptions ----

@pytest.mark.parametrize("table,expected", [
    pytest.param(*c[:2], id=f"build_jobs_test.go:TestReplicationOptions/{c[2]}") for c in [
        ("replication = {}", (1, 4), "defaults"),
        ("replication = { concurrency = { steps = 0 } }", "jobs[0].replication.concurrency.steps", "steps_zero"),
        ("replication = { concurrency = { size_estimates = 0 } }", "jobs[0].replication.concurrency.size_estimates",
         "size_estimates_zero"),
        ("replication = { concurrency = { steps = 23, size_estimates = 42 } }", (23, 42), "custom_values"),
        ("replication = { concurrency = { steps = -23, size_estimates = -42 } }",
         ["jobs[0].replication.concurrency.steps", "jobs[0].replication.concurrency.size_estimates"],
         "negative_values_forbidden"),
    ]])
def test_replication_options(table, expected):
    """zrepl internal/daemon/job/build_jobs_test.go TestReplicationOptions."""
    text = PUSH.format(extra='snapshotting = { type = "manual" }\n' + table)
    if isinstance(expected, tuple):
        r = parse(text).jobs[0].replication
        assert (r.concurrency_steps, r.concurrency_size_estimates) == expected
    else:
        paths = [e.path for e in errors_of(text)]
        assert paths == (expected if isinstance(expected, list) else [expected])


# ---- internal/daemon/job/build_jobs_test.go TestValidateReceivingSidesDoNotOverlap ----

def sinks(roots: list[str]) -> str:
    return "".join(f'[[jobs]]\nname = "sink{i}"\ntype = "sink"\nroot_fs = "{root}"\n'
                   f'serve = {{ type = "local", listener_name = "l{i}" }}\n' for i, root in enumerate(roots))


@pytest.mark.parametrize("overlap,roots", [
    pytest.param(overlap, roots, id=f"build_jobs_test.go:TestValidateReceivingSidesDoNotOverlap/{roots}")
    for overlap, roots in [
        (False, []), (False, ["a"]), (False, ["some/path"]), (False, ["zroot/sink1", "zroot/sink2", "zroot/sink3"]),
        (False, ["zroot/foo", "zroot/foobar"]), (True, ["zroot/b", "zroot/b"]),
        (True, ["zroot/foo", "zroot/foo/bar", "zroot/baz"]), (False, ["a/x", "b/x"]), (False, ["a", "b"]),
        (True, ["a", "a"]), (True, ["a/x/y", "a/x"]), (True, ["a/x", "a/x/y"]), (True, ["a/x", "b/x", "a/x/y"]),
        (True, ["a", "a/b", "a/c", "a/b"]), (True, ["a/b", "a/c", "a/b", "a/d", "a/c"]),
    ]])
def test_validate_receiving_sides_do_not_overlap(overlap, roots):
    """zrepl internal/daemon/job/build_jobs_test.go TestValidateReceivingSidesDoNotOverlap, as sink
    jobs with these root_fs (its nil and empty lists are both the empty list here)."""
    if not overlap:
        parse(sinks(roots))
        return
    errors = errors_of(sinks(roots))
    assert errors and all(e.path.endswith(".root_fs") and "overlaps" in e.message for e in errors)


def test_empty_root_fs_is_refused():
    """zrepl build_jobs_test.go TestValidateReceivingSidesDoNotOverlap passes [""] ("not our job to
    determine valid paths"); zrepl.py's config check does judge it: an empty root_fs is no dataset."""
    (error,) = errors_of(sinks([""]))
    assert error.path == "jobs[0].root_fs"
