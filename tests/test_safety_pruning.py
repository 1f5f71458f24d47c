"""Pruning never touches what is not this job's (issue 8 items 2, 4 and 15): a receiver dataset is
pruned only when it is established as this sender's replica, its incremental base always stays,
and no job destroys what another replicating job or client has not received yet."""

import textwrap

import pytest

import zrepl
from zrepl import DatasetInfo, Version


def snap(ds, name, txg, guid, creation=None, userrefs=0):
    return Version(ds, name, "snapshot", guid, txg, creation if creation is not None else 1_700_000_000 + txg,
                   userrefs)


def cursor(ds, job, txg, guid):
    return Version(ds, zrepl.cursor_bookmark_name(guid, job), "bookmark", guid, txg, 1_700_000_000 + txg)


class FakeReceiver:
    """The Receiver role over an in-memory listing; records destroys."""

    info = zrepl.PeerInfo(job="sink", type="sink", abstraction_job="sink", root="backup")

    def __init__(self, listing):
        self.listing = listing
        self.destroyed = []

    def list_filesystems(self):
        return self.listing

    def hold_tags(self, fs, names):
        return {}

    def destroy_snapshots(self, fs, names):
        self.destroyed.append((fs, list(names)))
        return zrepl.DestroyResult(list(names), {})


def receiver_with(sender_fs, versions):
    ds = DatasetInfo(f"backup/{sender_fs}", "filesystem", versions=versions)
    return FakeReceiver({sender_fs: zrepl.ReceiverFilesystem(ds)})


KEEP_ONE = [zrepl.KeepLastN(1)]


def test_another_jobs_dataset_with_the_same_name_is_never_pruned():
    # two pull jobs, same root_fs, both hosts have tank/data: no common guid, not our replica
    mine = DatasetInfo("tank/data", "filesystem", versions=[snap("tank/data", f"m{i}", i, 100 + i) for i in range(3)])
    theirs = [snap("backup/tank/data", f"t{i}", i, 900 + i) for i in range(30)]
    receiver = receiver_with("tank/data", theirs)
    results = zrepl.prune_receiver(receiver, receiver.listing, [mine], KEEP_ONE)
    assert results == [] and receiver.destroyed == []


def test_a_diverged_receiver_is_not_pruned():
    common = snap("tank/data", "a", 10, 0xA)
    sender = DatasetInfo("tank/data", "filesystem", versions=[common])
    receiver = receiver_with("tank/data", [snap("backup/tank/data", "a", 5, 0xA),
                                           snap("backup/tank/data", "made-here", 6, 0xEE)])
    assert zrepl.prune_receiver(receiver, receiver.listing, [sender], KEEP_ONE) == []
    assert receiver.destroyed == []


def test_a_filesystem_refused_this_run_is_not_pruned_on_the_receiver():
    a = snap("tank/data", "a", 10, 0xA)
    sender = DatasetInfo("tank/data", "filesystem", versions=[a])
    receiver = receiver_with("tank/data", [snap("backup/tank/data", "old", 1, 0x1),
                                           snap("backup/tank/data", "a", 5, 0xA)])
    assert zrepl.prune_receiver(receiver, receiver.listing, [sender], KEEP_ONE, refused=["tank/data"]) == []
    assert receiver.destroyed == []


def test_the_incremental_base_stays_whatever_the_rules_say():
    # the sender's newest common snapshot is OLDER than a receiver snapshot? impossible unless
    # diverged; here: the rule keeps only foo-*, the base is not foo-*: it stays anyway
    base = snap("tank/data", "zrepl_2", 20, 0x2)
    sender = DatasetInfo("tank/data", "filesystem", versions=[base])
    r_old, r_base = snap("backup/tank/data", "zrepl_1", 1, 0x1), snap("backup/tank/data", "zrepl_2", 2, 0x2)
    receiver = receiver_with("tank/data", [r_old, r_base])
    [result] = zrepl.prune_receiver(receiver, receiver.listing, [sender], [zrepl.KeepRegex("^foo-")])
    assert receiver.destroyed == [("tank/data", ["zrepl_1"])]
    assert "incremental base" in result.kept[r_base.full_name][0]


def test_unreplicated_by_other_jobs_stays_on_the_sender():
    fs = "tank/data"
    versions = [snap(fs, f"s{i}", i * 10, 0x10 + i) for i in range(1, 6)] + [cursor(fs, "other", 20, 0x12)]
    ds = DatasetInfo(fs, "filesystem", versions=versions)
    destroyed = []

    def destroy(dataset, names):
        destroyed.extend(names)
        return zrepl.DestroyResult(list(names), {})
    [result] = zrepl.prune_datasets([ds], KEEP_ONE, destroy, guards=["other", "idle"])
    assert destroyed == ["s1"]  # s2 (other's cursor) and newer stay; "idle" has no cursor: no say
    assert result.kept[f"{fs}@s2"] == ["not yet replicated by job other"]


def test_a_source_keeps_what_its_other_clients_need_and_says_so(tmp_path):
    fs = "tank/data"
    a, b, c = snap(fs, "a", 10, 0xA), snap(fs, "b", 20, 0xB), snap(fs, "c", 30, 0xC)
    ds = DatasetInfo(fs, "filesystem", versions=[a, b, c, cursor(fs, "src:slow", 10, 0xA)])
    zfs = RecordingZfs([ds])
    ep = zrepl.SenderEndpoint(zfs, "src", zrepl.DatasetFilter({"tank/data": True}), zrepl.SendConfig(),
                              job_type="source", abstraction_job="src:fast", guards=["src:fast", "src:slow"])
    result = ep.destroy_snapshots(fs, ["a", "b"])
    assert result.kept == {"a": "not yet replicated by job src:slow", "b": "not yet replicated by job src:slow"}
    assert result.destroyed == [] and zfs.destroys == []


def test_a_read_only_source_destroys_nothing():
    fs = "tank/data"
    zfs = RecordingZfs([DatasetInfo(fs, "filesystem", versions=[snap(fs, "a", 10, 0xA)])])
    ep = zrepl.SenderEndpoint(zfs, "src", zrepl.DatasetFilter({fs: True}), zrepl.SendConfig(), job_type="source",
                              read_only=True)
    with pytest.raises(zrepl.EndpointError, match="read-only source"):
        ep.destroy_snapshots(fs, ["a"])
    assert zfs.destroys == []


def test_bookmark_names_take_guids_from_our_listing_not_the_client():
    fs = "tank/data"
    zfs = RecordingZfs([DatasetInfo(fs, "filesystem", versions=[snap(fs, "a", 10, 0xA)])])
    ep = zrepl.SenderEndpoint(zfs, "src", zrepl.DatasetFilter({fs: True}), zrepl.SendConfig(), job_type="source")
    for call in (lambda: ep.complete(fs, "a", 0xBAD, "guarantee_resumability"),
                 lambda: ep.protect(fs, "guarantee_incremental", [("a", 0xBAD)], None)):
        with pytest.raises(zrepl.EndpointError, match="does not exist on the sender"):
            call()
    assert zfs.commands == []


class RecordingZfs(zrepl.Zfs):
    def __init__(self, datasets):
        super().__init__()
        self.datasets = {d.name: d for d in datasets}
        self.commands, self.destroys = [], []

    def list_datasets(self, roots, properties=zrepl.LIST_PROPERTIES, depth=None):
        return {n: d for n, d in self.datasets.items()
                if not roots or any(zrepl.is_descendant(n, r, True) for r in roots)}

    def run(self, argv, **kwargs):
        self.commands.append(list(argv))
        if argv[1] == "destroy":
            self.destroys.append(argv[-1])
        import subprocess
        return subprocess.CompletedProcess(argv, 0, b"", b"")


def parse(text):
    return zrepl.parse_config(textwrap.dedent(text), "test.toml")


PULL = '''
[[jobs]]
name = "{name}"
type = "pull"
root_fs = "{root}"
interval = "10m"
connect = {{ type = "local", listener_name = "{listener}", client_identity = "me" }}
[jobs.pruning]
keep_sender = []
keep_receiver = []
'''
SOURCE = '''
[[jobs]]
name = "{name}"
type = "source"
filesystems = {{ "{fs}<" = true }}
serve = {{ type = "local", listener_name = "{listener}" }}
[jobs.snapshotting]
type = "manual"
'''


@pytest.mark.parametrize("roots", [("backup", "backup"), ("backup", "backup/a"), ("backup/a", "backup")])
def test_configcheck_refuses_overlapping_receive_roots(roots):
    text = (PULL.format(name="p1", root=roots[0], listener="l1") + PULL.format(name="p2", root=roots[1], listener="l2")
            + SOURCE.format(name="s1", fs="tank/a", listener="l1")
            + SOURCE.format(name="s2", fs="tank/b", listener="l2"))
    with pytest.raises(zrepl.ConfigError) as ei:
        parse(text)
    assert "overlaps" in str(ei.value) and "jobs[1].root_fs" in str(ei.value)


def test_configcheck_refuses_a_filter_that_reaches_a_receive_root():
    text = (PULL.format(name="p1", root="tank/backup", listener="l1")
            + SOURCE.format(name="s1", fs="tank", listener="l1"))
    with pytest.raises(zrepl.ConfigError, match=r"jobs\[1\].filesystems.*root_fs of pull job 'p1'"):
        parse(text)


def test_configcheck_allows_a_relay_that_names_replicas_but_not_one_that_snapshots_them():
    relay = (PULL.format(name="p1", root="tank/backup", listener="l1")
             + SOURCE.format(name="s1", fs="tank/backup/me", listener="l1"))
    assert [j.name for j in parse(relay).jobs] == ["p1", "s1"]  # A -> B -> C: B serves what it received
    snapshotting = relay.replace('type = "manual"', 'type = "periodic"\nprefix = "zrepl_"\ninterval = "10m"')
    with pytest.raises(zrepl.ConfigError, match=r"jobs\[1\].snapshotting.type.*breaks its next receive"):
        parse(snapshotting)


def test_configcheck_refuses_two_jobs_on_one_local_listener_and_duplicate_listeners():
    text = (PULL.format(name="p1", root="b1", listener="l1") + PULL.format(name="p2", root="b2", listener="l1")
            + SOURCE.format(name="s1", fs="tank", listener="l1"))
    with pytest.raises(zrepl.ConfigError, match="already connects to local listener 'l1' as client 'me'"):
        parse(text)
    # distinct identities get distinct holds on the source (and subtrees on a sink): allowed
    other = PULL.format(name="p2", root="b2", listener="l1").replace('"me"', '"you"')
    parse(PULL.format(name="p1", root="b1", listener="l1") + other + SOURCE.format(name="s1", fs="tank", listener="l1"))
    text = PULL.format(name="p1", root="b1", listener="l1") + SOURCE.format(name="s1", fs="tank/a", listener="l1") \
        + SOURCE.format(name="s2", fs="tank/b", listener="l1")
    with pytest.raises(zrepl.ConfigError, match="already served by job 's1'"):
        parse(text)


def test_fan_out_clients_get_their_own_abstraction_names_and_guard_each_other():
    cfg = parse('''
        [[jobs]]
        name = "src"
        type = "source"
        filesystems = { "tank<" = true }
        serve = { type = "stdinserver", client_identities = ["a", "b"] }
        [jobs.snapshotting]
        type = "manual"

        [[jobs]]
        name = "solo"
        type = "source"
        filesystems = { "pool<" = true }
        serve = { type = "stdinserver", client_identities = ["x"] }
        [jobs.snapshotting]
        type = "manual"
        ''')
    src, solo = cfg.jobs
    assert zrepl.source_abstraction_job(src, "a") == "src:a" and zrepl.source_abstraction_job(solo, "x") == "solo"
    assert zrepl.replication_guards(cfg) == ["src:a", "src:b", "solo"]
    with pytest.raises(zrepl.ConfigError, match="also the name of job 'src:a'"):
        parse(SOURCE.format(name="src:a", fs="pool", listener="l9") + '''
            [[jobs]]
            name = "src"
            type = "source"
            filesystems = { "tank<" = true }
            serve = { type = "stdinserver", client_identities = ["a", "b"] }
            [jobs.snapshotting]
            type = "manual"
            ''')


def test_zfs_abstractions_release_takes_the_owning_jobs_lock(tmp_path, capsys):
    fs = "tank/data"
    a = snap(fs, "a", 10, 0xA)
    zfs = RecordingZfs([DatasetInfo(fs, "filesystem", versions=[a, cursor(fs, "push", 5, 0x5),
                                                                cursor(fs, "push", 10, 0xA)])])
    cfg = tmp_path / "zrepl.toml"
    cfg.write_text(textwrap.dedent(f'''
        [global]
        runtime_dir = "{tmp_path}/rt"
        status_file = "{tmp_path}/status.json"
        [[jobs]]
        name = "push"
        type = "snap"
        filesystems = {{ "tank<" = true }}
        snapshotting = {{ type = "manual" }}
        pruning = {{ keep = [] }}
        '''))
    running = zrepl.JobLock(f"{tmp_path}/rt", "push")
    assert running.try_acquire()
    code = zrepl.main(["--config", str(cfg), "zfs-abstractions", "release-stale", "--job", "push"], zfs=zfs)
    assert code == 1 and "is running" in capsys.readouterr().err
    assert not [c for c in zfs.commands if c[1] == "destroy"]
    running.release()
    assert zrepl.main(["--config", str(cfg), "zfs-abstractions", "release-stale", "--job", "push"], zfs=zfs) == 0
    stale = f"{fs}#{zrepl.cursor_bookmark_name(5, 'push')}"
    assert [c for c in zfs.commands if c[1] == "destroy"] == [["zfs", "destroy", stale]]


def test_foreign_snapshots_are_named_when_destroyed_or_kept_only_by_last_n(caplog):
    fs = "tank/data"
    ds = DatasetInfo(fs, "filesystem", versions=[snap(fs, "before-upgrade", 1, 1), snap(fs, "zrepl_1", 2, 2),
                                                  snap(fs, "manual", 3, 3), snap(fs, "zrepl_2", 4, 4)])
    destroyed = []

    def destroy(dataset, names):
        destroyed.extend(names)
        return zrepl.DestroyResult(list(names), {})
    zrepl.log.addHandler(caplog.handler)  # the zrepl logger does not propagate once set up
    try:
        [result] = zrepl.prune_datasets([ds], [zrepl.KeepLastN(2)], destroy, own_prefix="zrepl_")
    finally:
        zrepl.log.removeHandler(caplog.handler)
    assert destroyed == ["before-upgrade", "zrepl_1"]
    assert result.foreign_destroyed == ["before-upgrade"] and result.foreign_at_risk == ["manual"]
    assert any("did not make" in r.message and "before-upgrade" in r.message for r in caplog.records)
    summary = zrepl.prune_summary([result])
    assert summary["foreign_destroyed"] == [f"{fs}@before-upgrade"] and summary["foreign_at_risk"] == [f"{fs}@manual"]


def test_the_grid_on_a_receiver_does_not_anchor_on_a_snapshot_from_the_future():
    # a sender's clock error: the receiver keeps the sender's creation dates (issue 8 item 14)
    now = 1_800_000_000
    fs = "backup/tank/data"
    history = [snap(fs, f"zrepl_{i:03}", i + 1, 1000 + i, creation=now - (200 - i) * 3600) for i in range(200)]
    future = snap(fs, "zrepl_future", 500, 5000, creation=now + 2 * 365 * 86400)
    ds = DatasetInfo(fs, "filesystem", versions=history + [future])
    destroyed = []

    def destroy(dataset, names):
        destroyed.extend(names)
        return zrepl.DestroyResult(list(names), {})
    rules = [zrepl.KeepGrid(intervals=tuple(zrepl.parse_grid("24x1h | 7x1d")), regex="^zrepl_")]
    [result] = zrepl.prune_datasets([ds], rules, destroy, now=now)
    assert destroyed == [] and any("future" in n for n in result.notes)
