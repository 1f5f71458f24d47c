"""Issue 14 (reliability), one host test per item, each written against the broken behaviour the
campaign found (the campaigns themselves are guest tests: tests/zfs/test_campaign_*_zfs.py)."""
from __future__ import annotations

import json
import random
import zlib

import pytest

import zrepl
from fakezfs import FakeZfs
from support import run, snap_config


# ---- item 1: a stream property never decides our placeholder mark, on any receive ---------------

@pytest.mark.parametrize("creates", [True, False])
def test_every_receive_forces_or_strips_the_placeholder_mark(creates):
    inherit, override = zrepl.receive_property_args(zrepl.RecvConfig(), creates, "filesystem")
    if creates:
        assert override[zrepl.PLACEHOLDER_PROPERTY] == "off"
    else:  # incremental and resumed streams carry the sender's user properties too
        assert zrepl.PLACEHOLDER_PROPERTY in inherit and zrepl.PLACEHOLDER_PROPERTY not in override
    argv = zrepl.recv_argv("r/x", inherit=inherit, override=override)
    assert argv.count(zrepl.PLACEHOLDER_PROPERTY) + argv.count(zrepl.PLACEHOLDER_PROPERTY + "=off") == 1


def test_a_tab_or_newline_in_a_user_property_cannot_reach_the_listing_parser():
    # zfs list -H prints values raw: a listed user property could shift columns or forge rows
    assert not any(":" in p for p in zrepl.LIST_PROPERTIES)
    argv = zrepl.zfs_list_argv(["tank/sink"])
    assert not any(":" in col for col in argv[argv.index("-o") + 1].split(","))


# ---- item 3: a broken status document never breaks a run -----------------------------------------

def _broken_documents() -> dict[str, str]:
    good = {"version": 1, "jobs": {"snap": {"last_run": {"result": "ok", "started": 1, "finished": 2},
                                             "filesystems": {"tank/a": {"state": "done"}}, "hooks": [{"ok": 1}]}}}
    docs = {
        "filesystems list": {**good, "jobs": {"snap": {**good["jobs"]["snap"], "filesystems": {"tank/a": ["a"]}}}},
        "hook -1": {**good, "jobs": {"snap": {**good["jobs"]["snap"], "hooks": [-1]}}},
        "jobs a list": {**good, "jobs": ["snap"]},
        "version huge": {**good, "version": 10 ** 30},
        "last_run string": {**good, "jobs": {"snap": {"last_run": "x"}}},
    }
    out = {k: json.dumps(v) for k, v in docs.items()}
    out["NaN"] = json.dumps(good).replace('"started": 1', '"started": NaN')
    out["1e400"] = json.dumps(good).replace('"started": 1', '"started": 1e400')
    out["nested 200 kB"] = "[" * 100_000 + "]" * 100_000
    out["not json"] = "{"
    out["binary"] = "\udcff"
    return out


@pytest.mark.parametrize("case", sorted(_broken_documents()))
def test_a_broken_status_document_is_unknown_for_status_and_rewritten_by_run(tmp_path, case):
    (tmp_path / "status").mkdir()
    path = tmp_path / "status" / "status.json"
    cfg = snap_config(tmp_path, {"snap": "tank/a"}, global_={"status_file": str(path)})
    path.write_text(_broken_documents()[case], errors="surrogateescape")
    status = run("--config", cfg, "status")
    assert status.code in (0, 1, 2, 3) and "internal error" not in status.stdout + status.stderr, status
    assert "Traceback" not in status.stderr
    result = run("--config", cfg, "run", zfs=FakeZfs.with_filesystems("tank/a"))
    assert result.code == 0, result
    doc = json.loads(path.read_text())
    assert doc["jobs"]["snap"]["last_run"]["result"] == "ok"
    assert run("--config", cfg, "status").code == 0


# ---- item 4: environment errors are exit 2 with the path; a dry run needs no lock ---------------

@pytest.mark.parametrize("case", ["runtime dir is a file", "lock is a directory"])
def test_environment_errors_exit_2_naming_the_path(tmp_path, case):
    cfg = snap_config(tmp_path, {"snap": "tank/a"})
    if case == "runtime dir is a file":
        (tmp_path / "run").write_text("x")
        named = str(tmp_path / "run")
    else:
        lock_dir = zrepl.JobLock(str(tmp_path / "run"), "snap").path
        (tmp_path / "run").mkdir(mode=0o700)
        (tmp_path / "run" / "jobs").mkdir(mode=0o700)
        (tmp_path / "run" / "jobs" / "snap.lock").mkdir()
        named = lock_dir
    result = run("--config", cfg, "run", zfs=FakeZfs.with_filesystems("tank/a"))
    assert result.code == 2 and "internal error" not in result.stderr, result
    assert named in result.stderr
    dry = run("--config", cfg, "run", "--dry-run", zfs=FakeZfs.with_filesystems("tank/a"))
    assert "internal error" not in dry.stderr, dry
    assert dry.code == 0 and "would snapshot" in dry.stdout, dry  # a dry run needs no lock, writes nothing


# ---- item 5 and 6: config fuzz classes end in exit 2 with a key path ----------------------------

SNAP = """[[jobs]]
name = "{name}"
type = "snap"
filesystems = {{ "tank/a<" = true }}
snapshotting = {{ type = "periodic", prefix = "zrepl_", interval = {interval}, timestamp_format = "{fmt}" }}
pruning = {{ keep = [ {{ type = "regex", regex = "{regex}" }} ] }}
"""


@pytest.mark.parametrize("fields,key", [
    ({"interval": str(2 ** 1024)}, "interval"),
    ({"interval": '"' + "9" * 320 + 's"'}, "interval"),
    ({"regex": "a{4294967296}"}, "regex"),
    ({"regex": "(" * 600 + ")" * 600}, "regex"),
    ({"name": "snap\\n"}, "name"),
    ({"fmt": "%Y%m%d_%H%M"}, "timestamp_format"),
    ({"fmt": "%Y"}, "timestamp_format"),
    ({"fmt": "%Y%m%d%H%M%S\\u0000x"}, "timestamp_format"),
    ({"interval": '"100000000000d"'}, "interval"),
    ({"regex": "[[:alpha:]]x[[:digit:]]("}, "regex"),
])
def test_configcheck_refuses_with_exit_2_on_the_key(tmp_path, fields, key):
    values = {"name": "snap", "interval": '"10m"', "fmt": "dense", "regex": "^keep"} | fields
    path = tmp_path / "zrepl.toml"
    path.write_text(SNAP.format(**values))
    result = run("--config", path, "configcheck")
    assert result.code == 2, result
    assert key in result.stderr and "internal error" not in result.stderr and "Warning" not in result.stderr
    assert len(result.stderr) < 2000


SINK = """[[jobs]]
name = "sink"
type = "sink"
root_fs = "tank/sink"
serve = {{ type = "local", listener_name = "s" }}
recv = {{ bandwidth_limit = {{ max = {rate} }} }}
"""


@pytest.mark.parametrize("rate", ['"' + "9" * 320 + ' MiB"', '"1e400 B"', str(10 ** 400)])
def test_a_data_rate_of_309_digits_is_a_config_error_on_its_key(tmp_path, rate):
    path = tmp_path / "zrepl.toml"
    path.write_text(SINK.format(rate='"1 MiB"'))
    assert run("--config", path, "configcheck").code == 0
    path.write_text(SINK.format(rate=rate))
    result = run("--config", path, "configcheck")
    assert result.code == 2 and "bandwidth_limit.max" in result.stderr and "internal error" not in result.stderr, result


def test_toml_nested_600_deep_is_a_config_error(tmp_path):
    path = tmp_path / "zrepl.toml"
    path.write_text("x = " + "[" * 600 + "]" * 600 + "\n")
    result = run("--config", path, "configcheck")
    assert result.code == 2 and "internal error" not in result.stderr, result


def test_posix_classes_give_no_future_warning(tmp_path, recwarn):
    path = tmp_path / "zrepl.toml"
    path.write_text(SNAP.format(name="snap", interval='"10m"', fmt="dense", regex="^[[:alpha:]]+$"))
    result = run("--config", path, "configcheck")
    assert result.code == 0 and "Warning" not in result.stderr, result
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


# ---- item 7: garbage on the wire: every decoder bounds its nesting -------------------------------

@pytest.mark.parametrize("payload", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                                     b'{"id": 1, "body": ' + b"[" * 40 + b"]" * 40 + b"}"])
def test_control_frames_nested_deeply_are_a_value_error(payload):
    with pytest.raises(ValueError, match="nested|not a JSON object"):
        zrepl.decode_control(payload)


def test_the_resume_token_decoder_refuses_garbage_with_a_value_error():
    rng = random.Random(14)
    good = zrepl.encode_resume_token({"object": 1, "offset": 0, "bytes": 0, "toguid": 5, "toname": "p/fs@s"})
    assert zrepl.decode_resume_token(good).toname == "p/fs@s"
    bomb = zlib.compress(b"\0" * (1 << 24))
    tokens = [f"1-{zrepl._fletcher4_first_word(bomb):x}-10-{bomb.hex()}", "-n", "", "1-0-0-", "1-" * 10_000]
    for _ in range(300):
        raw = bytearray(bytes.fromhex(good.split("-")[3]))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        tokens.append(f"1-{zrepl._fletcher4_first_word(bytes(raw)):x}-{good.split('-')[2]}-{raw.hex()}")
    for token in tokens:
        try:
            zrepl.decode_resume_token(token)
        except ValueError:
            pass  # never RecursionError, MemoryError, struct.error, UnicodeError escaping as something else


# ---- item 8: exit codes --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["test", "filesystems", "--job", "snap", "--input", ""],
    ["test", "filesystems", "--config", "", "--job", "snap", "--input", "tank/a"],
    ["test", "decoderesumetoken", "--token=-n"],
    ["test", "decoderesumetoken", "--token", ""],
])
def test_cli_misuse_exits_2(tmp_path, argv):
    cfg = snap_config(tmp_path, {"snap": "tank/a"})
    if "--config" not in argv:
        argv = ["--config", cfg, *argv]
    result = run(*argv, zfs=FakeZfs.with_filesystems("tank/a"))
    assert result.code == 2 and "internal error" not in result.stderr, result


def test_status_warn_bogus_is_unknown(tmp_path):
    cfg = snap_config(tmp_path, {"snap": "tank/a"})
    result = run("--config", cfg, "status", "--warn", "bogus")
    assert result.code == zrepl.NAGIOS_UNKNOWN and result.stdout.startswith("UNKNOWN"), result
