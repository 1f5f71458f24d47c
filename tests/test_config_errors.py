"""Config errors that help (issue 13 item 8, issue 14 items 5, 6, 9), zrepl's [global] keys (issue 9
item 5) and global options after the subcommand (issue 9 item 4). In-process: parse_config and
zrepl.main."""

import textwrap
from pathlib import Path

import pytest
from support import SNAP_JOB_TOML as SNAP

import zrepl

ROOT = Path(__file__).resolve().parents[1]



def errors_of(text: str, file: str = "test.toml") -> list[zrepl.ConfigError]:
    with pytest.raises(zrepl.ConfigError) as info:
        zrepl.parse_config(textwrap.dedent(text), file)
    exc = info.value
    return exc.errors if isinstance(exc, zrepl.ConfigErrors) else [exc]


def only_error(text: str, file: str = "test.toml") -> zrepl.ConfigError:
    (error,) = errors_of(text, file)
    return error


def snap_with(old: str, new: str) -> str:
    assert old in SNAP
    return SNAP.replace(old, new)


# ---- issue 13 item 8: errors that know where the user comes from ----

def test_yaml_gets_a_pointer_to_the_readme():
    yaml = "jobs:\n- name: snapjob\n  type: snap\n"
    for file in ("zrepl.yml", "zrepl.toml"):
        error = only_error(yaml, file)
        assert "this looks like YAML; zrepl.py reads TOML (see README: Coming from zrepl)" in error.message


def test_jobs_as_a_table_says_use_double_brackets():
    error = only_error('[jobs]\nname = "x"\ntype = "snap"\n')
    assert error.path == "jobs" and "write [[jobs]]" in error.message and "{'" not in error.message


def test_nested_array_of_tables_written_as_a_table():
    error = only_error(snap_with('keep = [{ type = "last_n", count = 5 }]', '[jobs.pruning.keep]\ntype = "regex"'))
    assert error.path == "jobs[0].pruning.keep" and "[[jobs.pruning.keep]]" in error.message


def test_keep_sender_in_a_snap_job_points_to_keep():
    error = only_error(snap_with("keep = [", "keep_sender = []\nkeep = ["))
    assert error.path == "jobs[0].pruning.keep_sender" and "`keep`" in error.message


def test_keep_in_a_push_job_points_to_keep_sender():
    text = """
    [[jobs]]
    name = "p"
    type = "push"
    filesystems = { "tank<" = true }
    connect = { type = "ssh+stdinserver", host = "h", identity_file = "/k" }
    snapshotting = { type = "manual" }
    pruning = { keep = [], keep_sender = [], keep_receiver = [] }
    """
    error = only_error(text)
    assert error.path == "jobs[0].pruning.keep" and "keep_sender and keep_receiver" in error.message


def test_valid_keys_list_is_complete():
    error = only_error("[global]\nlogingg = []\n" + SNAP)
    assert error.path == "global.logingg"
    assert "valid keys here: control, logging, monitoring, runtime_dir, serve, status, status_file" in error.message
    error = only_error(snap_with('interval = "10m"', 'interval = "10m"\nintervall = "1h"'))
    assert "hooks, interval, prefix, timestamp_format, timestamp_location, type" in error.message


def test_all_errors_of_a_config_in_one_pass():
    text = """
    [global]
    runtime_dir = "relative"
    bogus = 1
    [[jobs]]
    name = "a/b"
    type = "snap"
    filesystems = { "tank<" = "yes" }
    snapshotting = { type = "periodic", prefix = "zrepl_", interval = "ten minutes" }
    pruning = { keep = [{ type = "last_n", count = 0 }, { type = "grid", grid = "1x1h", regex = "(" }] }
    [[jobs]]
    name = "b"
    type = "snapp"
    """
    errors = errors_of(text)
    assert [e.path for e in errors] == [
        "global.runtime_dir", "global.bogus", "jobs[0].name", "jobs[0].filesystems", "jobs[0].snapshotting.interval",
        "jobs[0].pruning.keep[0].count", "jobs[0].pruning.keep[1].regex", "jobs[1].type"]
    text_form = str(zrepl.ConfigErrors(errors))
    assert text_form.splitlines()[0].endswith("(and 7 more)") and len(text_form.splitlines()) == 8


def test_all_errors_through_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(snap_with('interval = "10m"', 'interval = "10m"\nfoo = 1\nbar = 2'))
    assert zrepl.main(["configcheck", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "jobs[0].snapshotting.foo" in err and "jobs[0].snapshotting.bar" in err and "Traceback" not in err


def test_long_values_are_cut():
    error = only_error(snap_with('prefix = "zrepl_"', f'prefix = "{"x" * 100_000}"'))
    assert error.path == "jobs[0].snapshotting.prefix" and len(str(error)) < 400
    error = only_error(snap_with('interval = "10m"', f'interval = "{"9" * 100_000}"'))
    assert len(str(error)) < 400 and "100000 characters" in error.message


# ---- issue 14 items 5 and 6: never an internal error, refuse what cannot work ----

@pytest.mark.parametrize("old,new,path", [
    ('interval = "10m"', f"interval = {2 ** 1024}", "jobs[0].snapshotting.interval"),
    ('interval = "10m"', f"interval = {2 ** 2000}", "jobs[0].snapshotting.interval"),
    ('interval = "10m"', 'interval = "' + "9" * 320 + 's"', "jobs[0].snapshotting.interval"),
    ('interval = "10m"', 'interval = "100000000000d"', "jobs[0].snapshotting.interval"),  # year 21185
    ('interval = "10m"', 'interval = nan', "jobs[0].snapshotting.interval"),
    ('count = 5', 'count = 5, regex = "a{4294967296}"', "jobs[0].pruning.keep[0].regex"),
    ('count = 5', 'count = 5, regex = "' + "(" * 600 + ")" * 600 + '"', "jobs[0].pruning.keep[0].regex"),
    ('keep = [{ type = "last_n", count = 5 }]', 'keep = [{ type = "grid", grid = "99999999999x1h", regex = "x" }]',
     "jobs[0].pruning.keep[0].grid"),
    ('name = "snapjob"', 'name = "snapjob\\n"', "jobs[0].name"),
    ('interval = "10m"', 'interval = "10m"\ntimestamp_format = "%Y%m%d_%H%M"', "jobs[0].snapshotting.timestamp_format"),
    ('interval = "10m"', 'interval = "10m"\ntimestamp_format = "%Y"', "jobs[0].snapshotting.timestamp_format"),
    ('interval = "10m"', 'interval = "10m"\ntimestamp_format = "%Y%m%d_%H%M%S\\u0000%f"',
     "jobs[0].snapshotting.timestamp_format"),
    ('interval = "10m"', 'interval = "10m"\ntimestamp_location = "Nowhere/Special"',
     "jobs[0].snapshotting.timestamp_location"),
])
def test_hostile_values_are_config_errors_on_their_key(old, new, path):
    assert only_error(snap_with(old, new)).path == path


def test_deep_toml_nesting_names_line_and_key():
    error = only_error(snap_with('interval = "10m"', 'interval = "10m"\nx = ' + "[" * 600 + "]" * 600))
    assert (error.line, error.path) == (10, "jobs[0].snapshotting.x") and "nested more than" in error.message
    error = only_error("a = " + "{ b = " * 300 + "1" + " }" * 300 + "\n")
    assert error.line == 1 and error.path == "a"
    # brackets inside strings do not count
    zrepl.parse_config(snap_with('prefix = "zrepl_"', 'prefix = "zrepl_"\n# ' + "[" * 100) +
                       '\n[global]\nstatus_file = "/x/' + "[" * 100 + '"\n')


def test_huge_integer_literal_is_a_config_error():
    error = only_error(snap_with('count = 5', "count = " + "9" * 5000))
    assert error.line == 11 and "too long" in error.message


def test_property_names_with_a_trailing_newline_are_refused():
    text = """
    [[jobs]]
    name = "s"
    type = "sink"
    root_fs = "pool/sink"
    serve = { type = "local", listener_name = "l" }
    recv = { properties = { inherit = ["mountpoint\\n"] } }
    """
    assert only_error(text).path == "jobs[0].recv.properties.inherit[0]"


def test_bad_timestamp_location_is_reported_under_its_own_key():
    error = only_error(snap_with('interval = "10m"', 'interval = "10m"\ntimestamp_format = "human"\n'
                                                     'timestamp_location = "Mars/Olympus"'))
    assert error.path == "jobs[0].snapshotting.timestamp_location"


def test_go_layout_gets_a_strftime_hint():
    error = only_error(snap_with('interval = "10m"', 'interval = "10m"\ntimestamp_format = "20060102_150405"'))
    assert "Go time layout" in error.message and "'%Y%m%d_%H%M%S'" in error.message


# ---- issue 9 item 5: zrepl's [global] keys ----

def test_monitoring_is_zrepls_array_of_outlets():
    text = """
    [global]
    monitoring = [{ type = "prometheus", listen = ":9811" }, { type = "textfile", path = "/var/lib/node/zrepl.prom" },
                  { type = "prometheus", listen = "[::1]:9811", listen_freebind = true }]
    """ + SNAP
    config = zrepl.parse_config(textwrap.dedent(text))
    assert config.global_.monitoring == [
        zrepl.MonitoringOutlet("prometheus", listen=":9811"),
        zrepl.MonitoringOutlet("textfile", path="/var/lib/node/zrepl.prom"),
        zrepl.MonitoringOutlet("prometheus", listen="[::1]:9811", listen_freebind=True)]


@pytest.mark.parametrize("outlet,path", [
    ('{ type = "prometheus" }', "global.monitoring[0].listen"),
    ('{ type = "prometheus", listen = "9811" }', "global.monitoring[0].listen"),
    ('{ type = "prometheus", listen = ":99999" }', "global.monitoring[0].listen"),
    ('{ type = "textfile", path = "relative.prom" }', "global.monitoring[0].path"),
    ('{ type = "textfile", path = "/x", listen = ":1" }', "global.monitoring[0].listen"),
    ('{ type = "graphite" }', "global.monitoring[0].type"),
])
def test_monitoring_outlets_are_validated(outlet, path):
    assert only_error(f"[global]\nmonitoring = [{outlet}]\n" + SNAP).path == path


def test_old_monitoring_table_says_where_the_thresholds_moved():
    error = only_error('[global.monitoring]\nwarn_no_success_after = "1h"\n' + SNAP)
    assert error.path == "global.monitoring" and "[global.status]" in error.message


def test_status_thresholds_under_global_status():
    config = zrepl.parse_config('[global.status]\nwarn_no_success_after = "1h"\ncrit_no_success_after = "3h"\n' + SNAP)
    assert (config.global_.status_thresholds.warn_no_success_after,
            config.global_.status_thresholds.crit_no_success_after) == (3600, 3 * 3600)
    assert zrepl.MonitoringConfig is zrepl.StatusThresholds


def test_logging_outlets_stdout_and_tcp():
    config = zrepl.parse_config('[[global.logging]]\ntype = "stdout"\nlevel = "warn"\nformat = "logfmt"\ntime = false\n'
                                + SNAP)
    assert (config.global_.logging[0].type, config.global_.logging[0].time) == ("stdout", False)
    error = only_error('[[global.logging]]\ntype = "tcp"\nlevel = "warn"\nformat = "json"\naddress = "h:1"\n' + SNAP)
    assert error.path == "global.logging[0].type" and "not supported" in error.message
    error = only_error('[[global.logging]]\ntype = "syslog"\nfacility = "local9"\n' + SNAP)
    assert error.path == "global.logging[0].facility"


def test_control_and_serve_are_stored_and_strict():
    config = zrepl.parse_config('[global.control]\nsockpath = "/run/z/control"\n'
                                '[global.serve.stdinserver]\nsockdir = "/run/z/stdinserver"\n' + SNAP)
    assert config.global_.control.sockpath == "/run/z/control"
    assert config.global_.serve.stdinserver_sockdir == "/run/z/stdinserver"
    defaults = zrepl.parse_config(SNAP).global_
    assert (defaults.control.sockpath, defaults.serve.stdinserver_sockdir) == (
        "/var/run/zrepl/control", "/var/run/zrepl/stdinserver")
    assert only_error('[global.control]\nsockpath = "/x"\nsocket = 1\n' + SNAP).path == "global.control.socket"
    assert only_error('[global.serve]\ntcp = {}\n' + SNAP).path == "global.serve.tcp"
    assert only_error('[global.serve.stdinserver]\nsockdir = "rel"\n' + SNAP).path == \
        "global.serve.stdinserver.sockdir"


def test_example_config_uses_the_new_keys():
    config = zrepl.load_config(str(ROOT / "zrepl.example.toml"))
    assert config.global_.status_thresholds.warn_no_success_after == 2 * 3600


# ---- issue 9 item 4: global options after the subcommand ----

@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "zrepl.toml"
    path.write_text(f'[global]\nruntime_dir = "{tmp_path}/rt"\nstatus_file = "{tmp_path}/status.json"\n' + SNAP)
    return path


@pytest.mark.parametrize("argv", [
    ["configcheck", "--config", "{f}"],
    ["--config", "{f}", "configcheck"],
    ["configcheck", "--config={f}", "--log-level", "debug"],
    ["--config", "/nonexistent", "configcheck", "--config", "{f}"],  # the later one wins
    ["test", "filesystems", "--config", "{f}", "--job", "snapjob", "--input", "tank/a"],
    ["test", "--config", "{f}", "filesystems", "--job", "snapjob", "--input", "tank/a"],
])
def test_global_options_after_the_subcommand(argv, config_file, capsys):
    assert zrepl.main([a.format(f=config_file) for a in argv]) == 0, capsys.readouterr().err


def test_status_with_options_after_the_subcommand(config_file, capsys):
    # no run recorded yet, the config is new: OK (0) "has not run yet", so the config was found and read
    assert zrepl.main(["status", "--config", str(config_file), "--log-level", "debug"]) == 0
    out = capsys.readouterr().out
    assert "has not run yet" in out and "snapjob" in out and "UNKNOWN" not in out


def test_bad_global_option_after_the_subcommand_is_a_usage_error(config_file, capsys):
    with pytest.raises(SystemExit) as info:
        zrepl.main(["configcheck", "--config", str(config_file), "--log-level", "loud"])
    assert info.value.code == 2 and "--log-level" in capsys.readouterr().err


def test_empty_config_option_is_an_error(capsys):
    assert zrepl.main(["configcheck", "--config", ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_listener_check_is_skipped_only_where_a_broken_job_may_serve_it():
    push = """
    [[jobs]]
    name = "p"
    type = "push"
    filesystems = { "tank<" = true }
    connect = { type = "local", listener_name = "backup", client_identity = "me" }
    snapshotting = { type = "manual" }
    pruning = { keep_sender = [], keep_receiver = [] }
    """
    broken_snap = '[[jobs]]\nname = "s"\ntype = "snap"\nfilesystems = { "tank<" = 1 }\n' \
                  'snapshotting = { type = "manual" }\npruning = { keep = [] }\n'
    broken_sink = '[[jobs]]\nname = "k"\ntype = "sink"\nroot_fs = "bad//root"\n' \
                  'serve = { type = "local", listener_name = "backup" }\n'
    paths = [e.path for e in errors_of(textwrap.dedent(push) + broken_snap)]
    assert paths == ["jobs[1].filesystems", "jobs[0].connect.listener_name"]
    paths = [e.path for e in errors_of(textwrap.dedent(push) + broken_sink)]
    assert paths == ["jobs[1].root_fs"]  # the sink serves it; only its own error is reported


def test_excluding_a_receive_root_from_an_everything_filter_is_enough():
    """configcheck refuses a filter that reaches a receive root and says to add "root<" = false;
    doing so must satisfy it, also when the filter accepts everything ("<")."""
    sink = ('[[jobs]]\nname = "k"\ntype = "sink"\nroot_fs = "pool/sink"\n'
            'serve = { type = "local", listener_name = "l" }\n')
    snap = snap_with('{ "tank<" = true }', '{ "<" = true }')
    assert "pool/sink<" in only_error(snap + sink).message
    zrepl.parse_config(snap_with('{ "tank<" = true }', '{ "<" = true, "pool/sink<" = false }') + sink)
    error = only_error(snap_with('{ "tank<" = true }', '{ "<" = true, "pool/sink" = false }') + sink)
    assert error.path == "jobs[0].filesystems"  # only the dataset itself is excluded, its children are not
