"""The cluster file (daemons/core/config.py): the shipped file loads; every problem is reported."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from daemons.core.config import (Broker, Limits, RaftSettings, Security, TlsSettings,
                                 load_cluster, parse_cluster)
from daemons.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "config", "cluster.yaml")
SOURCE = "cluster.yaml"
PROBLEM = re.compile(r"^(?P<source>[^:]+): (?P<path>[A-Za-z_][\w.\[\]]*): (?P<message>.+)$")


@pytest.fixture
def raw() -> dict:
    with open(SHIPPED, encoding="utf-8") as f:
        return yaml.safe_load(f)


def problems(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_cluster(copy.deepcopy(raw), SOURCE, "/etc/tarefa")
    assert info.value.message == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(raw: object) -> str:
    found = problems(raw)
    assert len(found) == 1, found
    return found[0]


def add_replica(raw: dict, n: int) -> None:
    raw["replicas"].append({"id": f"replica-{n}", "host": "127.0.0.1", "raft_port": 7000 + n,
                            "grpc_port": 7100 + n, "data_dir": f"data/replica-{n}"})


# ---- the good file --------------------------------------------------------------------------


def test_shipped_cluster_file_loads():
    cluster = load_cluster(SHIPPED)
    assert cluster.path == SHIPPED
    assert cluster.name == "tarefa" and cluster.log_level == "info"
    assert cluster.grace_seconds == 5.0
    assert [r.id for r in cluster.replicas] == ["replica-1", "replica-2", "replica-3"]
    r1 = cluster.replica("replica-1")
    assert (r1.host, r1.raft_port, r1.grpc_port) == ("127.0.0.1", 7001, 7101)
    assert r1.raft_address == "127.0.0.1:7001" and r1.grpc_address == "127.0.0.1:7101"
    # relative paths are relative to the file's directory
    assert r1.data_dir == os.path.join(ROOT, "run", "data", "replica-1")
    assert [(p.id, p.port, p.services) for p in cluster.portals] == [
        ("portal-admin", 7201, ("admin",)), ("portal-client-1", 7211, ("client",)),
        ("portal-client-2", 7212, ("client",))]
    assert cluster.portals[0].cache_entries == 10000 and cluster.portals[0].cache_ttl == 30.0
    assert cluster.listener is not None
    assert cluster.listener.audit_log == os.path.join(ROOT, "run", "audit", "audit.jsonl")
    assert cluster.broker == Broker("127.0.0.1", 1883, None, None,
                                    os.path.join(ROOT, "run", "secrets", "mqtt"))
    # the default stack is secured: tokens, TLS, Raft password, per-daemon MQTT logins
    secrets = os.path.join(ROOT, "run", "secrets")
    assert cluster.security == Security(
        auth="token", admin_token_file=os.path.join(secrets, "admin.token"),
        raft_password_file=os.path.join(secrets, "raft.password"),
        tls=TlsSettings(os.path.join(secrets, "tls", "ca.crt"), os.path.join(secrets, "tls")))
    assert cluster.limits == Limits(client_write_rate=500.0, client_write_burst=1000)
    # the file spells out the defaults, but syncs the journal: one machine, one power cut
    assert cluster.raft == dataclasses.replace(RaftSettings(), fsync=True)
    assert isinstance(cluster.raft.compaction_min_seconds, float)


def test_minimal_file_gets_defaults():
    raw = {"security": {"auth": "cid-only"},
           "replicas": [{"id": f"r{i}", "host": "h", "raft_port": 1000 + i, "grpc_port": 2000 + i,
                         "data_dir": f"d{i}"} for i in range(3)]}
    cluster = parse_cluster(raw, SOURCE, "/srv/tarefa")
    assert cluster.security == Security(auth="cid-only") and cluster.limits == Limits()
    assert cluster.raft == RaftSettings() and cluster.broker == Broker()
    assert cluster.portals == () and cluster.listener is None
    assert cluster.name == "tarefa" and cluster.log_level == "info"
    assert cluster.replicas[2].data_dir == "/srv/tarefa/d2"


def test_unknown_replica_id():
    with pytest.raises(ConfigError, match="no replica with id 'replica-9'"):
        load_cluster(SHIPPED).replica("replica-9")


# ---- one test per kind of problem ---------------------------------------------------------


def test_unknown_top_level_key(raw):
    raw["colour"] = "blue"
    problem = only_problem(raw)
    assert problem.startswith("cluster.yaml: colour: unknown key (allowed: cluster, log_level")


def test_unknown_nested_keys(raw):
    raw["raft"]["election_timeout"] = 1.0
    found = problems(raw)
    assert len(found) == 1
    assert found[0].startswith("cluster.yaml: raft.election_timeout: unknown key (allowed: ")
    assert "election_timeout_min" in found[0]

    del raw["raft"]["election_timeout"]
    raw["replicas"][1]["datadir"] = "x"
    assert only_problem(raw).startswith("cluster.yaml: replicas[1].datadir: unknown key")
    del raw["replicas"][1]["datadir"]
    raw["broker"]["tls"] = True
    assert only_problem(raw).startswith("cluster.yaml: broker.tls: unknown key")


@pytest.mark.parametrize("value", ["7001", 0, 65536, -1, 7001.0, None])
def test_port_must_be_an_integer_in_range(raw, value):
    raw["replicas"][1]["raft_port"] = value
    assert only_problem(raw) == (
        f"cluster.yaml: replicas[1].raft_port: must be an integer 1..65535 (got {value!r})")


@pytest.mark.parametrize("key,value", [
    ("heartbeat_period", -0.05), ("connection_timeout", 0), ("apply_timeout", "5"),
    ("connection_retry", float("nan")),
])
def test_seconds_must_be_a_positive_number(raw, key, value):
    raw["raft"][key] = value
    assert only_problem(raw) == (
        f"cluster.yaml: raft.{key}: must be a number of seconds > 0 (got {value!r})")


def test_infinite_seconds_are_more_than_a_week(raw):
    raw["raft"]["compaction_min_seconds"] = float("inf")
    assert only_problem(raw) == ("cluster.yaml: raft.compaction_min_seconds: must be at most "
                                 "604800 seconds (a week; got inf)")


def test_negative_grace_seconds(raw):
    raw["grace_seconds"] = -5
    assert only_problem(raw) == "cluster.yaml: grace_seconds: must be a number of seconds > 0 (got -5)"


def test_huge_integer_seconds_is_a_problem_not_a_crash(raw):
    # YAML reads 1 followed by 400 zeros as an int; float() of it overflows.
    raw["grace_seconds"] = 10 ** 400
    found = problems(raw)
    assert len(found) == 1 and found[0].startswith("cluster.yaml: grace_seconds: "), found


def test_bool_is_not_an_int_and_int_is_not_a_bool(raw):
    raw["raft"]["batched_append"] = 1
    raw["raft"]["max_batch_commands"] = True
    raw["portals"][0]["port"] = True
    raw["grace_seconds"] = True
    assert sorted(problems(raw)) == sorted([
        "cluster.yaml: raft.batched_append: must be true or false (got 1)",
        "cluster.yaml: raft.max_batch_commands: must be an integer >= 1 (got True)",
        "cluster.yaml: portals[0].port: must be an integer 1..65535 (got True)",
        "cluster.yaml: grace_seconds: must be a number of seconds > 0 (got True)",
    ])


@pytest.mark.parametrize("value", [0, -3, 2.5, "10"])
def test_positive_int(raw, value):
    raw["raft"]["dedupe_window"] = value
    assert only_problem(raw) == (
        f"cluster.yaml: raft.dedupe_window: must be an integer >= 1 (got {value!r})")


@pytest.mark.parametrize("value", ["admin", [], {"admin": True}, None])
def test_services_must_be_a_list(raw, value):
    raw["portals"][0]["services"] = value
    assert only_problem(raw) == (
        "cluster.yaml: portals[0].services: must be a non-empty list of admin, client")


@pytest.mark.parametrize("value", [["admin", "root"], ["client", "client"], [["admin"]]])
def test_services_unknown_or_repeated(raw, value):
    raw["portals"][1]["services"] = value
    assert only_problem(raw) == (
        "cluster.yaml: portals[1].services: must list each of admin, client at most once "
        f"(got {value!r})")


@pytest.mark.parametrize("value", ["verbose", "INFO", 3])
def test_log_level_choice(raw, value):
    raw["log_level"] = value
    assert only_problem(raw) == (
        f"cluster.yaml: log_level: must be one of debug, info, warning, error (got {value!r})")


@pytest.mark.parametrize("value", ["", "   ", 5, None])
def test_strings_must_be_non_empty_text(raw, value):
    raw["replicas"][0]["host"] = value
    problem = only_problem(raw)
    assert problem.startswith("cluster.yaml: replicas[0].host: must be a non-empty string (got ")


@pytest.mark.parametrize("key", ["id", "host", "raft_port", "grpc_port", "data_dir"])
def test_missing_required_replica_key(raw, key):
    del raw["replicas"][2][key]
    assert only_problem(raw) == f"cluster.yaml: replicas[2].{key}: required"


def test_missing_required_portal_key(raw):
    del raw["portals"][0]["services"]
    assert only_problem(raw) == "cluster.yaml: portals[0].services: required"


def test_missing_replicas(raw):
    del raw["replicas"]
    assert only_problem(raw) == "cluster.yaml: replicas: required"


def test_replicas_not_a_list(raw):
    raw["replicas"] = {"replica-1": {}}
    assert only_problem(raw).startswith("cluster.yaml: replicas: must be a list (got dict")


def test_section_not_a_mapping(raw):
    raw["raft"] = [1, 2]
    assert only_problem(raw) == "cluster.yaml: raft: must be a mapping (got list [1, 2])"


def test_duplicate_daemon_id(raw):
    raw["replicas"][2]["id"] = "replica-1"
    raw["portals"][1]["id"] = "replica-2"
    assert sorted(problems(raw)) == [
        "cluster.yaml: portals[1].id: duplicate id 'replica-2' (also replicas[1].id)",
        "cluster.yaml: replicas[2].id: duplicate id 'replica-1' (also replicas[0].id)",
    ]


@pytest.mark.parametrize("section,index,value", [
    ("portals", 0, "../../evil"), ("portals", 1, "portal c"), ("replicas", 0, "-r"),
    ("replicas", 2, "r" * 65), ("listener", None, "listener/1"),
])
def test_daemon_id_spelling(raw, section, index, value):
    # Ids name files, ACL lines, MQTT sessions and supervisord programs.
    daemon = raw[section] if index is None else raw[section][index]
    daemon["id"] = value
    where = section if index is None else f"{section}[{index}]"
    assert only_problem(raw) == (
        f"cluster.yaml: {where}.id: {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit")


def test_admin_token_must_be_printable_ascii(raw):
    raw["security"] = {"auth": "token", "admin_token": "\u00e9" * 16}
    assert only_problem(raw) == ("cluster.yaml: security.admin_token: must be printable ASCII "
                                 "(no accents, tabs or control characters)")


@pytest.mark.parametrize("value", ["ca", "tarefa", "broker", "mosquitto.acl", "CA"])
def test_reserved_daemon_ids(raw, value):
    raw["portals"][0]["id"] = value
    assert only_problem(raw).startswith(f"cluster.yaml: portals[0].id: {value!r} is reserved")


def test_keep_files_is_bounded(raw):
    raw["listener"]["keep_files"] = 10_001
    assert only_problem(raw) == \
        "cluster.yaml: listener.keep_files: must be at most 10000 (got 10001)"
    raw["listener"]["keep_files"] = 10_000
    assert parse_cluster(raw, SOURCE, "/etc/tarefa").listener.keep_files == 10_000


def test_duplicate_host_port(raw):
    raw["portals"][1]["port"] = 7001
    assert only_problem(raw) == (
        "cluster.yaml: portals[1].port: port 7001 on 127.0.0.1 is already used by "
        "replicas[0].raft_port")


def test_same_port_twice_in_one_replica_and_broker_clash(raw):
    raw["replicas"][1]["grpc_port"] = 7002
    raw["listener"]["port"] = 1883
    assert sorted(problems(raw)) == [
        "cluster.yaml: listener.port: port 1883 on 127.0.0.1 is already used by broker.port",
        "cluster.yaml: replicas[1].grpc_port: port 7002 on 127.0.0.1 is already used by "
        "replicas[1].raft_port",
    ]


def test_same_port_on_different_hosts_is_fine(raw):
    raw["replicas"][1]["host"] = "10.0.0.2"
    raw["replicas"][1]["raft_port"] = 7001
    assert parse_cluster(raw, SOURCE, "/x").replicas[1].raft_address == "10.0.0.2:7001"


@pytest.mark.parametrize("host", ["::1", "[::1]", "fe80::1%eth0"])
def test_an_ipv6_literal_host_is_refused_by_name(raw, host):
    # It passed the check, then the start said the port "is in use": the
    # address "::1:7101" is misread by PySyncObj and gRPC alike.
    raw["replicas"][0]["host"] = host
    assert only_problem(raw) == (
        f"cluster.yaml: replicas[0].host: must be a host name or an IPv4 address (got str "
        f"{host!r}) (IPv6 literals are not supported: give a host name that resolves to the "
        "address)")


@pytest.mark.parametrize("host", ["http://x", "a b", "-x", "x:1"])
def test_a_host_that_is_not_a_name_is_refused(raw, host):
    raw["portals"][0]["host"] = host
    assert only_problem(raw).startswith(
        "cluster.yaml: portals[0].host: must be a host name or an IPv4 address")


@pytest.mark.parametrize("host", ["localhost", "10.0.0.2", "replica-1.example.org", "node_2",
                                  "a"])
def test_host_names_and_ipv4_addresses_are_fine(raw, host):
    raw["listener"]["host"] = host
    assert parse_cluster(raw, SOURCE, "/x").listener.host == host


def test_even_replica_count(raw):
    add_replica(raw, 4)
    assert only_problem(raw).startswith(
        "cluster.yaml: replicas: need an odd number of replicas, at least 3 (got 4)")


@pytest.mark.parametrize("count", [0, 1, 2])
def test_fewer_than_three_replicas(raw, count):
    raw["replicas"] = raw["replicas"][:count]
    assert only_problem(raw).startswith(
        f"cluster.yaml: replicas: need an odd number of replicas, at least 3 (got {count})")


def test_five_replicas_are_fine(raw):
    add_replica(raw, 4)
    add_replica(raw, 5)
    assert len(parse_cluster(raw, SOURCE, "/x").replicas) == 5


@pytest.mark.parametrize("low,high", [(1.4, 1.4), (1.5, 1.4)])
def test_election_timeout_min_must_be_below_max(raw, low, high):
    raw["raft"]["election_timeout_min"] = low
    raw["raft"]["election_timeout_max"] = high
    assert only_problem(raw) == (
        f"cluster.yaml: raft.election_timeout_max: must be greater than election_timeout_min "
        f"({low})")


def test_heartbeat_too_large(raw):
    raw["raft"]["heartbeat_period"] = 0.2  # 3 x 0.2 >= 0.4
    assert only_problem(raw).startswith(
        "cluster.yaml: raft.heartbeat_period: must be less than a third of "
        "election_timeout_min (0.4)")


def test_leader_fallback_timeout_too_small(raw):
    raw["raft"]["leader_fallback_timeout"] = 1.0
    assert only_problem(raw) == (
        "cluster.yaml: raft.leader_fallback_timeout: must be at least election_timeout_max (1.4)")


def test_raft_settings_pysyncobj_would_refuse_at_start(raw):
    # PySyncObj's SyncObjConf.validate() asserts these; they used to pass the
    # check and then stop the replica with a misleading "damaged journal" line.
    raw["raft"]["election_timeout_max"] = 2.0
    raw["raft"]["leader_fallback_timeout"] = 2.0
    raw["raft"]["compaction_min_entries"] = 1
    assert sorted(problems(raw)) == [
        "cluster.yaml: raft.compaction_min_entries: must be at least 2; PySyncObj refuses to "
        "start otherwise",
        "cluster.yaml: raft.connection_timeout: must be at least election_timeout_max (2.0); "
        "PySyncObj refuses to start otherwise",
    ]


def test_settings_that_pass_the_check_pass_pysyncobjs(raw, tmp_path):
    """The defaults and the edge of each relation satisfy SyncObjConf.validate()."""
    from daemons.replica.state_machine import syncobj_conf
    for settings in ({}, {"election_timeout_max": 2.0, "connection_timeout": 2.0,
                          "leader_fallback_timeout": 2.0, "compaction_min_entries": 2},
                     {"election_timeout_min": 0.31, "heartbeat_period": 0.1}):
        raw["raft"] = settings
        raft = parse_cluster(copy.deepcopy(raw), SOURCE, "/x").raft
        syncobj_conf(raft, str(tmp_path)).validate()


def test_values_beyond_what_the_libraries_take(raw):
    raw["limits"] = {"max_message_bytes": 3_000_000_000}
    raw["grace_seconds"] = 1e12
    raw["raft"]["apply_timeout"] = 1e200
    assert sorted(problems(raw)) == [
        "cluster.yaml: grace_seconds: must be at most 604800 seconds (a week; got 1000000000000.0)",
        "cluster.yaml: limits.max_message_bytes: must be an integer 1..2147483647 "
        "(got 3000000000)",
        "cluster.yaml: raft.apply_timeout: must be at most 604800 seconds (a week; got 1e+200)",
    ]


def test_loopback_spellings_are_one_host(raw):
    raw["portals"][0]["host"] = "localhost"
    raw["portals"][0]["port"] = raw["replicas"][0]["grpc_port"]
    assert only_problem(raw) == (
        f"cluster.yaml: portals[0].port: port {raw['replicas'][0]['grpc_port']} on localhost is "
        "already used by replicas[0].grpc_port")


def test_default_ports_clash_too(raw):
    del raw["broker"]  # the default broker port, 1883
    raw["listener"] = {k: v for k, v in raw["listener"].items() if k != "port"}  # 7301
    raw["portals"][0]["port"] = 1883
    raw["portals"][1]["port"] = 7301
    assert sorted(problems(raw)) == [
        "cluster.yaml: listener.port: port 7301 on 127.0.0.1 is already used by portals[1].port",
        "cluster.yaml: portals[0].port: port 1883 on 127.0.0.1 is already used by broker.port",
    ]


def test_the_listeners_default_id_clashes_too(raw):
    # Both would be `tarefa-<cluster>-listener` to the broker and share one login.
    raw["listener"] = {k: v for k, v in raw["listener"].items() if k != "id"}  # "listener"
    raw["portals"][1]["id"] = "listener"
    assert problems(raw) == [
        "cluster.yaml: listener.id: duplicate id 'listener' (also portals[1].id)"]


def test_two_replicas_on_one_data_dir(raw):
    # Another spelling of the same directory.
    raw["replicas"][1]["data_dir"] = os.path.join("alias", "..", raw["replicas"][0]["data_dir"])
    found = only_problem(raw)
    assert found.startswith("cluster.yaml: replicas[1].data_dir: ") and \
        found.endswith("is already the data dir of replicas[0].data_dir"), found
    raw["replicas"][1]["host"] = "10.0.0.2"  # another machine: its own disk
    parse_cluster(raw, SOURCE, "/x")


def test_a_key_given_twice_is_reported_with_its_line(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("log_level: info\nraft:\n  heartbeat_period: 0.05\n"
                    "  heartbeat_period: 0.1\nlog_level: debug\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    problems = info.value.problems
    assert sorted(problems[:2]) == [
        f"{path}: line 4: key 'heartbeat_period' given twice in one mapping",
        f"{path}: line 5: key 'log_level' given twice in one mapping",
    ]
    # ... and, all at once, what is wrong with the rest (here: no replicas, ...).
    assert f"{path}: replicas: required" in problems[2:]


def test_yaml_merge_keys_still_load(tmp_path):
    """The duplicate-key check must leave `<<: *anchor` to PyYAML (a given key wins)."""
    with open(SHIPPED, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    del doc["portals"]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc) + (
        "portals:\n"
        "  - &portal {id: portal-a, host: 127.0.0.1, port: 7291, services: [client]}\n"
        "  - <<: *portal\n"
        "    id: portal-b\n"
        "    port: 7292\n"))
    cluster = load_cluster(str(path))
    assert [(p.id, p.port, p.services) for p in cluster.portals] == [
        ("portal-a", 7291, ("client",)), ("portal-b", 7292, ("client",))]


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_bytes("cluster: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    assert info.value.problems == [
        f"{path}: line 1: not UTF-8 text (byte b'\\xe9'; save the file as UTF-8)"]


def test_absurd_nesting_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    assert len(info.value.problems) == 1 and str(path) in info.value.problems[0]


def shipped_with(tmp_path, old: str, new: str) -> str:
    """The shipped file with the first `old` replaced (comments and all, as typed)."""
    with open(SHIPPED, encoding="utf-8") as fh:
        text = fh.read()
    assert old in text
    path = tmp_path / "cluster.yaml"
    path.write_text(text.replace(old, new, 1))
    return str(path)


@pytest.mark.parametrize("old,new,expected", [
    # YAML 1.1 read these as octal 7681 and base-60 90, and the file passed.
    ("raft_port: 7001 ", "raft_port: 017001 ",
     "replicas[0].raft_port: must be an integer 1..65535 (got '017001')"),
    ("grace_seconds: 5 ", "grace_seconds: 1:30 ",
     "grace_seconds: must be a number of seconds > 0 (got '1:30')"),
    ("raft_port: 7001 ", "raft_port: 0x1b59 ",
     "replicas[0].raft_port: must be an integer 1..65535 (got '0x1b59')"),
])
def test_numbers_are_decimal_not_yaml_1_1_octal_or_base_60(tmp_path, old, new, expected):
    path = shipped_with(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert info.value.problems == [f"{path}: {expected}"]


def test_decimal_numbers_still_load(tmp_path):
    path = shipped_with(tmp_path, "compaction_min_entries: 5000 ",
                        "compaction_min_entries: 5_000 ")
    assert load_cluster(path).raft.compaction_min_entries == 5000
    cluster = load_cluster(shipped_with(tmp_path, "grace_seconds: 5 ", "grace_seconds: 2.5 "))
    assert cluster.grace_seconds == 2.5


def test_an_integer_too_long_to_read_is_a_problem_not_a_crash(tmp_path):
    path = shipped_with(tmp_path, "grace_seconds: 5 ", "grace_seconds: 1" + "0" * 5000 + " ")
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(f"{path}: a value cannot be read: ")


def test_a_huge_number_is_shown_shortened_and_the_reason_is_right(raw):
    raw["grace_seconds"] = 10 ** 400
    found = only_problem(raw)
    assert "must be at most 604800 seconds" in found and len(found) < 200, found


def test_a_bare_listener_section_is_checked_for_clashes(raw):
    """`listener:` alone is the defaults (id listener, port 7301): found by
    review, it escaped the duplicate id and port checks."""
    raw["listener"] = None
    raw["replicas"][1]["raft_port"] = 7301
    raw["replicas"][2]["id"] = "listener"
    found = problems(raw)
    assert any("7301" in p and "listener" in p for p in found), found
    assert any("replicas[2].id" in p or "listener.id" in p for p in found), found


def test_a_wrong_value_built_from_anchors_is_shown_in_bounded_time(tmp_path):
    """Found by review: each level repeating the previous one ten times, the
    full repr of an 11-line file grew tenfold per level before being cut."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    lines.append("replicas: *l8")
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    assert all(len(p) < 400 for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("value", [2000, 262_144, 524_287])
def test_max_message_bytes_has_room_for_the_largest_valid_request(raw, value):
    """Found by review: 2000 passed, then a valid 3 KB description was refused
    with gRPC's 'larger than max'."""
    raw.setdefault("limits", {})["max_message_bytes"] = value
    assert only_problem(raw).startswith(
        f"cluster.yaml: limits.max_message_bytes: must be at least 524288 (512 KiB: ")
    raw["limits"]["max_message_bytes"] = 524_288
    assert parse_cluster(raw, SOURCE, "/x").limits.max_message_bytes == 524_288


def test_a_file_rewritten_through_read_yaml_loads_the_same(tmp_path):
    """systemd/install-helper.py rewrites an accepted file (read_yaml, then
    yaml.safe_dump): found by review, read with yaml.safe_load `id: 007`
    became the number 7 and the rewritten copy failed the check."""
    from daemons.core.config import read_yaml

    path = shipped_with(tmp_path, "id: replica-3", "id: 007")
    before = load_cluster(path)
    assert before.replicas[2].id == "007"
    copy = tmp_path / "copy.yaml"
    with open(path, encoding="utf-8") as fh:
        copy.write_text(yaml.safe_dump(read_yaml(fh.read()), sort_keys=False))
    assert load_cluster(str(copy)).replicas[2].id == "007"


def test_the_default_audit_log_is_relative_to_the_file(raw):
    del raw["listener"]["audit_log"]
    assert parse_cluster(raw, SOURCE, "/etc/tarefa").listener.audit_log == \
        "/etc/tarefa/audit.jsonl"
    raw["listener"] = None  # the whole section by default
    assert parse_cluster(raw, SOURCE, "/etc/tarefa").listener.audit_log == \
        "/etc/tarefa/audit.jsonl"


def test_unreadable_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_cluster(missing)
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]
    with pytest.raises(ConfigError) as info:
        load_cluster(str(tmp_path))
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


@pytest.mark.parametrize("text", ["replicas: [1, 2\n", "a: b: c\n", "\tfoo: 1\n", "key: 'open\n"])
def test_invalid_yaml(tmp_path, text):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: not valid YAML: ")


@pytest.mark.parametrize("text,expected", [
    ("", "replicas: required"),
    ("- a\n- b\n", "must be a mapping of settings (got a list of 2 items): is this a "
                   "Tarefa cluster file?"),
    # Never quoted: found by review, `--config` on a credentials file printed it.
    ("token=s3cr3t\n", "must be a mapping of settings (got text of 12 characters): is this "
                       "a Tarefa cluster file?"),
    ("42\n", "must be a mapping of settings (got a number): is this a Tarefa cluster file?"),
])
def test_document_that_is_not_a_mapping(tmp_path, text, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    assert info.value.problems == [f"{path}: {expected}"]


# ---- all at once ------------------------------------------------------------------------


BAD = {
    ("colour", "unknown key"),
    ("raft.heartbeat_period", "must be a number of seconds > 0 (got -1)"),
    ("replicas[1].raft_port", "must be an integer 1..65535 (got 'abc')"),
    ("replicas[2].grpc_port", "required"),
    ("replicas[2].id", "duplicate id 'replica-1' (also replicas[0].id)"),
    ("portals[0].services", "must list each of admin, client at most once (got ['admin', 'x'])"),
    ("portals[2].port", "port 7211 on 127.0.0.1 is already used by portals[1].port"),
    ("broker.port", "must be an integer 1..65535 (got 70000)"),
}


def break_everything(raw: dict) -> dict:
    raw["colour"] = "blue"
    raw["raft"]["heartbeat_period"] = -1
    raw["replicas"][1]["raft_port"] = "abc"
    del raw["replicas"][2]["grpc_port"]
    raw["replicas"][2]["id"] = "replica-1"
    raw["portals"][0]["services"] = ["admin", "x"]
    raw["portals"][2]["port"] = 7211
    raw["broker"]["port"] = 70000
    return raw


def test_every_problem_is_reported_at_once(tmp_path, raw):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(break_everything(raw)))
    with pytest.raises(ConfigError) as info:
        load_cluster(str(path))
    found = info.value.problems
    assert len(found) == len(BAD), "\n".join(found)
    parsed = set()
    for line in found:
        match = PROBLEM.match(line)
        assert match, f"not `<source>: <key path>: <message>`: {line!r}"
        assert match["source"] == str(path)
        parsed.add((match["path"], match["message"]))
    for key, message in BAD:
        assert any(p == key and m.startswith(message) for p, m in parsed), (key, found)
    assert str(info.value) == "\n".join(found)


def test_raft_relations_are_checked_even_when_another_raft_key_is_bad(raw):
    # Each problem on its own is reported; together, both must be.
    raw["raft"]["leader_fallback_timeout"] = 1.0
    assert only_problem(raw).startswith("cluster.yaml: raft.leader_fallback_timeout: ")
    raw["raft"]["heartbeat_period"] = -1
    assert sorted(problems(raw)) == [
        "cluster.yaml: raft.heartbeat_period: must be a number of seconds > 0 (got -1)",
        "cluster.yaml: raft.leader_fallback_timeout: must be at least election_timeout_max (1.4)",
    ]


def test_problem_lines_name_the_source_as_given(raw):
    raw["replicas"][1]["raft_port"] = 0
    assert only_problem(raw) == "cluster.yaml: replicas[1].raft_port: must be an integer " \
                                "1..65535 (got 0)"


# ---- the daemon's command line ------------------------------------------------------


def run_replica(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemons.replica", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_replica_with_a_bad_file_exits_2_and_prints_every_problem(tmp_path, raw):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(break_everything(raw)))
    done = run_replica("--config", str(path), "--id", "replica-1")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == len(BAD), done.stderr
    assert f"Error: {path}: replicas[1].raft_port: must be an integer 1..65535 (got 'abc')" \
        in errors
    # The hint names a command that runs as given: the replica needs its --id.
    assert "`tarefa-replica --config FILE --id ID --check-config`" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_replica_check_config_on_the_shipped_file_exits_0(tmp_path):
    done = run_replica("--config", SHIPPED, "--id", "replica-2", "--check-config")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{SHIPPED}: OK"
    assert done.stderr == ""


def test_an_empty_id_is_a_usage_error():
    done = run_replica("--config", SHIPPED, "--id", "", "--check-config")
    assert done.returncode == 2 and "--id: must name a daemon" in done.stderr


def test_replica_check_config_refuses_an_unknown_id():
    done = run_replica("--config", SHIPPED, "--id", "replica-7", "--check-config")
    assert done.returncode == 2
    assert "no replica with id 'replica-7'" in done.stderr


# ---- security and limits --------------------------------------------------------------------


def test_authentication_is_the_default_and_needs_an_admin_token(raw):
    del raw["security"]
    assert only_problem(raw) == (
        "cluster.yaml: security: auth: token needs exactly one of admin_token_file or "
        "admin_token (or auth: cid-only, the unauthenticated compatibility mode)")


def test_admin_token_and_file_are_exclusive(raw):
    raw["security"]["admin_token"] = "x" * 32
    assert "exactly one of admin_token_file or admin_token" in only_problem(raw)


def test_inline_admin_token_must_be_long(raw):
    raw["security"]["admin_token_file"] = None
    raw["security"]["admin_token"] = "short"
    assert only_problem(raw) == "cluster.yaml: security.admin_token: must be at least 16 characters"


def test_auth_mode_choice(raw):
    raw["security"]["auth"] = "none"
    assert only_problem(raw) == (
        "cluster.yaml: security.auth: must be one of token, cid-only (got 'none')")


def test_tls_needs_both_paths(raw):
    del raw["security"]["tls"]["cert_dir"]
    assert only_problem(raw) == "cluster.yaml: security.tls.cert_dir: required"


def test_tls_null_means_plaintext(raw):
    raw["security"]["tls"] = None
    assert parse_cluster(raw, SOURCE, "/etc/tarefa").security.tls is None


def test_tls_cert_pair_paths(raw):
    tls = parse_cluster(raw, SOURCE, "/etc/tarefa").security.tls
    assert tls.cert_pair("replica-1") == ("/etc/run/secrets/tls/replica-1.crt",
                                          "/etc/run/secrets/tls/replica-1.key")


@pytest.mark.parametrize("value", [0, -1, "fast", True])
def test_write_rate_must_be_positive(raw, value):
    raw["limits"]["client_write_rate"] = value
    assert "cluster.yaml: limits.client_write_rate: must be a number of operations per second" \
        in only_problem(raw)


def test_burst_needs_a_rate(raw):
    raw["limits"]["client_write_rate"] = None
    assert only_problem(raw) == "cluster.yaml: limits.client_write_burst: needs client_write_rate"


def test_unknown_security_key(raw):
    raw["security"]["password"] = "x"
    assert only_problem(raw).startswith("cluster.yaml: security.password: unknown key")
