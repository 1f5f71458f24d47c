"""zrepl's own unit tests for names, ported: the filesystems filter, dataset/snapshot/bookmark name
checks, job names and abstraction (bookmark/hold) name parsing.

Same inputs, same expected outputs, against section 2 and the config parser. Each case names the
zrepl file and test it comes from (zrepl/zrepl, internal/...).
"""

import json

import pytest


import zrepl  # noqa: E402
from zrepl import DatasetFilter  # noqa: E402

# ---- internal/daemon/filters/fsmapfilter_test.go: TestDatasetMapFilter ----

FILTER_CASES = {
    "default_no_match": ({}, {"": False, "foo": False, "zroot": False}),
    "more_specific_path_has_precedence": (
        {"tank<": True, "tank/tmp<": False, "tank/home/x<": False, "tank/home/x/1": True},
        {"zroot": False, "tank": True, "tank/tmp": False, "tank/tmp/foo": False, "tank/home/x": False,
         "tank/home/y": True, "tank/home/x/1": True, "tank/home/x/2": False}),
    "precedence_of_specific_over_subtree_wildcard_on_same_path": (
        {"tank/home/bob": True, "tank/home/bob<": False},
        {"tank/home/bob": True, "tank/home/bob/downloads": False}),
}


@pytest.mark.parametrize("case", [pytest.param(name, id=f"fsmapfilter_test.go:TestDatasetMapFilter/{name}")
                                  for name in FILTER_CASES])
def test_dataset_map_filter(case):
    """zrepl internal/daemon/filters/fsmapfilter_test.go TestDatasetMapFilter."""
    patterns, checks = FILTER_CASES[case]
    f = DatasetFilter(patterns)
    assert {name: f.accepts(name) for name in checks} == checks


# ---- internal/zfs/namecheck_test.go: TestEntityNamecheck ----

MAX = 255  # zrepl's MaxDatasetNameLen


def entity_ok(name: str, kind: str) -> bool:
    try:
        if kind == "filesystem":
            zrepl.validate_dataset_name(name)
        else:
            _, sep, _ = zrepl.split_version_name(name)
            if sep != ("@" if kind == "snapshot" else "#"):
                return False
    except ValueError:
        return False
    return True


NAMECHECK = [
    ("/", "filesystem", False), ("/foo", "filesystem", False), ("/foo@bar", "snapshot", False),
    ("foo", "bookmark", False), ("foo", "snapshot", False), ("foo@bar", "bookmark", False),
    ("foo#bar", "snapshot", False), ("foo#book", "bookmark", True), ("foo#book@bar", "bookmark", False),
    ("foo/book@bar", "snapshot", True), ("foo/book#bar", "bookmark", True), ("foo/for%idden", "filesystem", False),
    ("foo/bår", "filesystem", False), ("", "filesystem", False), ("foo/bar@", "snapshot", False),
    ("foo/bar#", "bookmark", False), ("foo/bar#@blah", "bookmark", False),
    ("foo bar/baz bar@blah foo", "snapshot", True), ("foo bar/baz bar@#lah foo", "snapshot", False),
    ("foo bar/baz bar@@lah foo", "snapshot", False), ("foo bar/baz bar##lah foo", "bookmark", False),
    ("foo bar/baz@blah/foo", "snapshot", False), ("foo bar/baz@blah/foo", "filesystem", False),
    ("foo/b\tr@ba\tz", "snapshot", False), ("foo/b\tr@baz", "snapshot", False), ("foo/bar@ba\tz", "snapshot", False),
    ("foo/./bar", "filesystem", False), ("foo/../bar", "filesystem", False), ("foo/bar@..", "filesystem", False),
    ("foo/bar@.", "filesystem", False), ("a" * MAX, "filesystem", True), ("a" * MAX + "a", "filesystem", False),
    ("a" * (MAX - 2) + "/a", "filesystem", True), ("a" * (MAX - 4) + "/a@b", "snapshot", True),
    ("a" * MAX + "/a@b", "snapshot", False), ("foo/bar@23+42", "snapshot", False),
]


@pytest.mark.parametrize("name,kind,ok", [
    pytest.param(*c, id=f"namecheck_test.go:TestEntityNamecheck/{c[0][:40]!r}/{c[1]}") for c in NAMECHECK])
def test_entity_namecheck(name, kind, ok):
    """zrepl internal/zfs/namecheck_test.go TestEntityNamecheck."""
    assert entity_ok(name, kind) == ok


# ---- internal/daemon/job/build_jobs_test.go: TestJobIDErrorHandling ----

def push_job_named(name: str) -> str:
    """zrepl's template (a push job over a local connect, pruning last_n 10 on both sides) in TOML,
    plus the sink serving listener "foo": our config check requires the listener a local connect
    names (the local-listener check, README: Coming from zrepl); zrepl checks it when the daemon runs.
    The push filter leaves the sink's root_fs out, which configcheck requires."""
    return f"""
[[jobs]]
name = {json.dumps(name)}
type = "push"
connect = {{ type = "local", listener_name = "foo", client_identity = "bar" }}
filesystems = {{ "<" = true, "pool/sink<" = false }}
snapshotting = {{ type = "manual" }}
pruning = {{ keep_sender = [{{ type = "last_n", count = 10 }}], keep_receiver = [{{ type = "last_n", count = 10 }}] }}

[[jobs]]
name = "sink for the local connect"
type = "sink"
root_fs = "pool/sink"
serve = {{ type = "local", listener_name = "foo" }}
"""


@pytest.mark.parametrize("name,valid", [
    pytest.param(name, valid, id=f"build_jobs_test.go:TestJobIDErrorHandling/{name!r}") for name, valid in [
        ("validjobname", True), ("valid with spaces", True), ("invalid\twith\ttabs", False),
        ("invalid#withdelimiter", False), ("invalid@withdelimiter", False),
        ("withnewline\\nmiddle", False),  # zrepl's YAML has a backslash and an n here, not a newline
        ("withnewline\\n", False), ("withslash/", False), ("withslash/inthemiddle", False), ("/", False)]])
def test_job_id_error_handling(name, valid):
    """zrepl internal/daemon/job/build_jobs_test.go TestJobIDErrorHandling."""
    if valid:
        assert zrepl.parse_config(push_job_named(name)).jobs[0].name == name
    else:
        with pytest.raises(zrepl.ConfigError) as info:
            zrepl.parse_config(push_job_named(name))
        assert info.value.path == "jobs[0].name"


@pytest.mark.parametrize("name", ["job\n", "with\nnewline", "x" * 204])
def test_job_names_zrepl_would_refuse_too(name):
    """A real trailing newline (the name patterns ended in `$`, which matches before it) and a name
    too long for the tentative cursor bookmark zrepl's job-id check builds (endpoint/jobid.go)."""
    with pytest.raises(zrepl.ConfigError) as info:
        zrepl.parse_config(push_job_named(name))
    assert info.value.path == "jobs[0].name"
    assert zrepl.parse_config(push_job_named("x" * 203)).jobs[0].name == "x" * 203


# ---- internal/endpoint/endpoint_zfs_helpers_repr_test.go: TestParseJobAndGuidBookmarkName ----

@pytest.mark.parametrize("name,expected", [
    pytest.param("p1/sync#zrepl_CURSOR_G_932f3a7089080ce2_J_push with legitimate name",
                 ("replication-cursor-bookmark-v2", 0x932f3a7089080ce2, "push with legitimate name"),
                 id="endpoint_zfs_helpers_repr_test.go:TestParseJobAndGuidBookmarkName/legitimate"),
    pytest.param("p1/sync#zrepl_CURSOR_G_932f3a7089_J_push with legitimate name", None,
                 id="endpoint_zfs_helpers_repr_test.go:TestParseJobAndGuidBookmarkName/short-guid"),
    pytest.param("p1/sync#zrepl_CURSOR_G_932f3a7089080ce2_J_push with il\\tlegitimate name", None,
                 id="endpoint_zfs_helpers_repr_test.go:TestParseJobAndGuidBookmarkName/backslash"),
    pytest.param("p1/sync#otherprefix_G_932f3a7089080ce2_J_push with legitimate name", None,
                 id="endpoint_zfs_helpers_repr_test.go:TestParseJobAndGuidBookmarkName/otherprefix"),
])
def test_parse_job_and_guid_bookmark_name(name, expected):
    """zrepl internal/endpoint/endpoint_zfs_helpers_repr_test.go TestParseJobAndGuidBookmarkName."""
    assert zrepl.parse_bookmark_abstraction(name) == expected


def test_hold_tags_with_characters_zfs_never_lists_are_not_ours():
    """zrepl endpoint ParseStepHoldTag / ParseLastReceivedHold run the job-id check on the job part."""
    assert zrepl.parse_hold_tag("zrepl_STEP_J_push job") == ("step-hold", "push job")
    for tag in ("zrepl_STEP_J_a\\b", "zrepl_last_received_J_job\n", "zrepl_STEP_J_a/b", "zrepl_STEP_J_.."):
        assert zrepl.parse_hold_tag(tag) is None
    assert zrepl.parse_bookmark_abstraction("zrepl_CURSOR_G_0000000000000001_J_job\n") is None
