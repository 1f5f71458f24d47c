"""Config loading and validation: strict keys, key paths in errors, exit code 2, no tracebacks."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zrepl
from support import SNAP_JOB_TOML

ROOT = Path(__file__).resolve().parents[1]

SNAP_JOB = SNAP_JOB_TOML


def parse(text: str) -> zrepl.Config:
    return zrepl.parse_config(textwrap.dedent(text), "test.toml")


def error_of(text: str) -> zrepl.ConfigError:
    with pytest.raises(zrepl.ConfigError) as info:
        parse(text)
    return info.value


def test_minimal_snap_job_loads_with_defaults():
    cfg = parse(SNAP_JOB)
    job = cfg.job("snapjob")
    assert job.type == "snap"
    assert job.snapshotting.interval == 600
    assert job.filesystems.accepts("tank/x")
    assert cfg.global_.status_file == "/var/lib/zrepl/status.json"
    assert cfg.global_.runtime_dir == "/run/zrepl"


def test_example_config_loads():
    cfg = zrepl.load_config(str(ROOT / "zrepl.example.toml"))
    types = {j.type for j in cfg.jobs}
    assert types == {"snap", "push", "sink", "pull", "source"}


def test_readme_configs_load():
    """Every ```toml block in README.md that has [[jobs]] must be a valid config."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml")[1:]]
    full = [b for b in blocks if "[[jobs]]" in b]
    assert full, "README.md shows no config"
    for block in full:
        zrepl.parse_config(block, "README.md")


def test_key_path_names_the_rule_index():
    err = error_of(SNAP_JOB.replace('keep = [{ type = "last_n", count = 5 }]',
                                    'keep = [{ type = "regex", regex = "x" }, { type = "last_n", count = 0 }]'))
    assert err.path == "jobs[0].pruning.keep[1].count"
    assert "greater than 0" in err.message


def test_unknown_key_is_an_error():
    err = error_of(SNAP_JOB + 'bogus = 1\n')
    assert "unknown" in err.message
    err = error_of(SNAP_JOB.replace('interval = "10m"', 'interval = "10m"\nintervall = "1h"'))
    assert err.path == "jobs[0].snapshotting.intervall"


def test_key_of_another_job_type_is_rejected():
    err = error_of(SNAP_JOB.replace('type = "snap"', 'type = "snap"\nroot_fs = "pool/x"'))
    assert err.path == "jobs[0].root_fs" and "snap job" in err.message


@pytest.mark.parametrize("name,fragment", [("_hidden", "must not start"), ("a/b", "ZFS name"), ("..", "ZFS name"),
                                           ("tab\\there", "ZFS name"), ("newline\\n", "ZFS name")])
def test_bad_job_names(name, fragment):
    err = error_of(SNAP_JOB.replace('name = "snapjob"', f'name = "{name}"'))
    assert err.path == "jobs[0].name" and fragment in err.message


def test_duplicate_job_names():
    err = error_of(SNAP_JOB + SNAP_JOB)
    assert err.path == "jobs[1].name" and "already used" in err.message


@pytest.mark.parametrize("value", ['"10 minutes"', '"-1m"', '"0s"', "true"])
def test_bad_durations(value):
    err = error_of(SNAP_JOB.replace('interval = "10m"', f"interval = {value}"))
    assert err.path == "jobs[0].snapshotting.interval"


def test_durations_parse():
    assert zrepl.parse_duration("30s") == 30
    assert zrepl.parse_duration("1w") == 7 * 86400
    assert zrepl.parse_duration("1.5h") == 5400
    with pytest.raises(ValueError):
        zrepl.parse_duration("1y")


def test_sizes_parse():
    assert zrepl.parse_size("10 MiB") == 10 << 20
    assert zrepl.parse_size("1.5G") == 3 << 29
    assert zrepl.parse_size(512) == 512
    with pytest.raises(ValueError):
        zrepl.parse_size("lots")


@pytest.mark.parametrize("grid", ["0x1h", "1x1h(keep=0)", "24x1d | 1x1h", "1x1q"])
def test_bad_grids(grid):
    err = error_of(SNAP_JOB.replace('keep = [{ type = "last_n", count = 5 }]',
                                    f'keep = [{{ type = "grid", grid = "{grid}", regex = "^z" }}]'))
    assert err.path == "jobs[0].pruning.keep[0].grid"


def test_bad_regex_and_filter():
    err = error_of(SNAP_JOB.replace('count = 5', 'count = 5, regex = "(unclosed"'))
    assert err.path == "jobs[0].pruning.keep[0].regex"
    err = error_of(SNAP_JOB.replace('"tank<" = true', '"tank<<" = true'))
    assert err.path == "jobs[0].filesystems"
    err = error_of(SNAP_JOB.replace('"tank<" = true', '"tank<" = "yes"'))
    assert err.path == "jobs[0].filesystems"


def test_timestamp_format_must_give_a_valid_name():
    err = error_of(SNAP_JOB.replace('interval = "10m"', 'interval = "10m"\ntimestamp_format = "%Y/%m"'))
    assert err.path == "jobs[0].snapshotting.timestamp_format"


def test_not_replicated_is_an_error_in_snap_jobs():
    err = error_of(SNAP_JOB.replace('{ type = "last_n", count = 5 }', '{ type = "not_replicated" }'))
    assert err.path == "jobs[0].pruning.keep[0].type" and "not_replicated" in err.message


def test_cron_spec_validated():
    cron_job = SNAP_JOB.replace('type = "periodic"', 'type = "cron"')
    cfg = parse(cron_job.replace('interval = "10m"', 'cron = "*/5 * * * *"'))
    assert cfg.jobs[0].snapshotting.cron is not None
    err = error_of(cron_job.replace('interval = "10m"', 'cron = "61 * * * *"'))
    assert err.path == "jobs[0].snapshotting.cron"


def test_hook_validation():
    hooks = '[[jobs.snapshotting.hooks]]\ntype = "postgres-checkpoint"\ndsn = "x"\n'
    text = SNAP_JOB.replace("[jobs.pruning]", hooks + "[jobs.pruning]")
    err = error_of(text)
    assert err.path == "jobs[0].snapshotting.hooks[0].filesystems" and "required" in err.message
    hooks = '[[jobs.snapshotting.hooks]]\ntype = "command"\npath = "relative/script"\n'
    err = error_of(SNAP_JOB.replace("[jobs.pruning]", hooks + "[jobs.pruning]"))
    assert err.path == "jobs[0].snapshotting.hooks[0].path" and "absolute" in err.message


def test_toml_syntax_error_has_line():
    err = error_of(SNAP_JOB.replace('prefix = "zrepl_"', 'prefix = "zrepl_'))
    assert err.line is not None and err.line > 1
    assert "test.toml:" in str(err)


def test_local_connect_must_name_a_listener():
    text = """
    [[jobs]]
    name = "p"
    type = "push"
    filesystems = { "tank<" = true }
    connect = { type = "local", listener_name = "nowhere", client_identity = "me" }
    snapshotting = { type = "manual" }
    pruning = { keep_sender = [], keep_receiver = [] }
    """
    err = error_of(text)
    assert err.path == "jobs[0].connect.listener_name"


def test_global_status_thresholds():
    cfg = parse('[global.status]\nwarn_no_success_after = "1h"\ncrit_no_success_after = "3h"\n' + SNAP_JOB)
    assert cfg.global_.status_thresholds.crit_no_success_after == 3 * 3600
    err = error_of('[global.status]\nwarn_no_success_after = "3h"\ncrit_no_success_after = "1h"\n' + SNAP_JOB)
    assert err.path == "global.status.crit_no_success_after"


def run_cli(*args, config_text=None, tmp_path=None):
    cmd = [sys.executable, str(ROOT / "zrepl.py")]
    if config_text is not None:
        path = tmp_path / "zrepl.toml"
        path.write_text(textwrap.dedent(config_text))
        cmd += ["--config", str(path)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True)


def test_configcheck_cli_says_what_it_checked_unless_quiet(tmp_path):
    proc = run_cli("configcheck", config_text=SNAP_JOB, tmp_path=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("config OK: ") and "1 job(s): snapjob (snap)" in proc.stdout
    proc = run_cli("configcheck", "-q", config_text=SNAP_JOB, tmp_path=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_configcheck_cli_error_exit_2_no_traceback(tmp_path):
    proc = run_cli("configcheck", config_text=SNAP_JOB.replace("count = 5", "count = -1"), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "jobs[0].pruning.keep[0].count" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_exit_2(tmp_path):
    proc = run_cli("--config", str(tmp_path / "nope.toml"), "configcheck")
    assert proc.returncode == 2 and "cannot read config" in proc.stderr


def test_usage_error_exit_2():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_test_filesystems_input(tmp_path):
    cfg = SNAP_JOB.replace('{ "tank<" = true }', '{ "tank<" = true, "tank/foo<" = false, "tank/foo/bar" = true }')
    for fs, verdict in [("tank/foo/bar", "ACCEPT"), ("tank/foo/bar/loo", "REJECT"), ("zroot", "REJECT"),
                        ("tank/foobar", "ACCEPT")]:
        proc = run_cli("test", "filesystems", "--job", "snapjob", "--input", fs, config_text=cfg, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{verdict}\t{fs}\t")
    proc = run_cli("test", "filesystems", "--job", "snapjob", "--input", "tank/../x",
                   config_text=cfg, tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
