"""The API authorization policy (peerd.shell.authz), without a daemon:
parsing the [api] table, the checks op by op, refusals counted and worded,
scope filtering of lists and watches, and reading a peer's groups."""

from __future__ import annotations

import collections
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.api.protocol import ApiError, ErrorCode, Op
from peerd.shell.api_socket import PeerCred
from peerd.shell.authz import (
    OP_RULES,
    ApiPolicy,
    Authz,
    PolicyError,
    Rule,
    ScopePolicy,
    parse_api_table,
    peer_groups,
    proc_groups,
)
from peerd.shell.metrics import render
from peerd.shell.settings import SettingsError, check_config, load_file
from peerd.shell.watches import Watch

DAEMON = 990
ADMINS = 4000  # gid of "peerd-admins" in these tests
USERS = {"billing": 1500, "app": 1600}
GROUPS = {"peerd-admins": ADMINS, "billing-clients": 4100}


class Conn:
    def __init__(self, uid: int, gid: int = 100, groups: tuple[int, ...] = ()) -> None:
        self.cred: PeerCred | None = PeerCred(1234, uid, gid, groups)


def authz(policy: ApiPolicy | None = None) -> Authz:
    return Authz(
        policy or ApiPolicy(),
        daemon_uid=DAEMON,
        users=USERS.get,
        groups=GROUPS.get,
    )


def refusal(a: Authz, conn: object, op: str, **args: Any) -> str:
    with pytest.raises(ApiError) as info:
        a.check(conn, op, args)
    assert info.value.code == ErrorCode.FORBIDDEN
    return info.value.message


ADMIN_OPS = (
    Op.KEYS_INSTALL,
    Op.KEYS_USE,
    Op.KEYS_REMOVE,
    Op.LEAVE,
    Op.JOIN,
    Op.SET_TAGS,
)


def test_every_op_is_classified_and_admin_ops_are_the_node_changing_ones() -> None:
    assert set(OP_RULES) == {str(op) for op in Op}
    assert {op for op, rule in OP_RULES.items() if rule is Rule.ADMIN} == set(ADMIN_OPS)
    # An op nobody classified (a future one) is administrative.
    a = authz()
    assert refusal(a, Conn(1000), "new.op").startswith("new.op needs root")
    assert a.counters["api_forbidden.admin.other"] == 1


@pytest.mark.parametrize("op", ADMIN_OPS)
def test_admin_ops_need_root_the_daemon_user_or_the_admin_group(op: str) -> None:
    a = authz()
    message = refusal(a, Conn(1000), op)
    assert message.startswith(f"{op} needs root, the daemon's user")
    assert "group peerd-admins (api.admin_group)" in message
    assert "uid 1000" in message
    assert a.counters[f"api_forbidden.admin.{op}"] == 1
    for allowed in (
        Conn(0),
        Conn(DAEMON),
        Conn(1000, gid=ADMINS),  # primary group
        Conn(1000, groups=(7, ADMINS)),  # supplementary group (SO_PEERGROUPS)
    ):
        a.check(allowed, op, {})
    a.check(None, op, {})  # the daemon itself, in process


def test_missing_admin_group_means_only_root_and_the_daemon_user() -> None:
    a = authz(ApiPolicy(admin_group="no-such-group"))
    assert a.admin_gid is None
    message = refusal(a, Conn(1000, groups=(ADMINS,)), Op.KEYS_INSTALL)
    assert "group no-such-group of api.admin_group does not exist" in message
    a.check(Conn(0), Op.KEYS_INSTALL, {})
    a.check(Conn(DAEMON), Op.KEYS_INSTALL, {})
    empty = authz(ApiPolicy(admin_group=""))
    assert "api.admin_group is empty" in refusal(empty, Conn(1000, gid=ADMINS), Op.LEAVE)


def test_a_connection_without_credentials_is_nobody() -> None:
    conn = Conn(1000)
    conn.cred = None
    a = authz()
    assert "credentials are unknown" in refusal(a, conn, Op.LEAVE)
    a.check(conn, Op.REGISTER, {"name": "x"})  # open scope: everyone


def test_open_ops_and_the_default_policy_keep_todays_behaviour() -> None:
    a = authz()
    nobody = Conn(65534, 65534)
    for op, args in [
        (Op.STATUS, {}),
        (Op.MEMBERS, {}),
        (Op.KEYS_LIST, {}),
        (Op.WATCH, {"topics": ["registry"]}),
        (Op.UNWATCH, {"stream": 1}),
        (Op.REGISTER, {"name": "x"}),
        (Op.REGISTER, {"name": "x", "scope": "other"}),
        (Op.GROUP_JOIN, {"group": "g", "scope": "any"}),
        (Op.UPDATE, {"name": "x", "meta": {}}),
        (Op.UNREGISTER, {"name": "x"}),
        (Op.GROUP_LEAVE, {"group": "g"}),
        (Op.SEND, {"name": "x", "payload": b""}),
        (Op.LOOKUP, {"name": "x"}),
        (Op.LIST, {}),
        (Op.GROUPS, {"scope": "s"}),
        (Op.GROUP_MEMBERS, {"group": "g"}),
        (Op.EVENT, {"name": "e"}),
    ]:
        a.check(nobody, op, args)
    assert a.read_open and a.readable(nobody) is None
    assert not a.counters


def billing_policy() -> ApiPolicy:
    return parse_api_table(
        {
            "scopes": {
                "billing": {
                    "register": ["user:billing"],
                    "send": ["group:billing-clients", "uid:1700"],
                    "read": ["group:billing-clients", "user:billing"],
                },
                "*": {"register": ["user:app"]},
                "open": {"register": ["*"]},
            },
            "events": ["gid:4100"],
        }
    )


def test_scope_policy_register_send_read() -> None:
    a = authz(billing_policy())
    billing, client, app, other = Conn(1500), Conn(1000, groups=(4100,)), Conn(1600), Conn(1000)
    # register (and group.join, update) in billing: only user billing (and admins)
    a.check(billing, Op.REGISTER, {"scope": "billing", "name": "invoices"})
    a.check(billing, Op.UPDATE, {"scope": "billing", "name": "invoices", "meta": {}})
    a.check(Conn(DAEMON), Op.GROUP_JOIN, {"scope": "billing", "group": "g"})
    message = refusal(a, client, Op.REGISTER, scope="billing", name="invoices")
    assert message.startswith("register in scope 'billing' needs user:billing")
    assert "(api.scopes.billing.register)" in message
    refusal(a, app, Op.GROUP_JOIN, scope="billing", group="g")
    # send: the group, or uid 1700; a reply needs nothing
    a.check(client, Op.SEND, {"scope": "billing", "name": "invoices"})
    a.check(Conn(1700), Op.SEND, {"scope": "billing", "group": "g"})
    assert "api.scopes.billing.send" in refusal(a, app, Op.SEND, scope="billing", name="x")
    a.check(app, Op.SEND, {"reply_to": "token"})
    # read: lookup, group.members, list/groups of that scope
    a.check(client, Op.LOOKUP, {"scope": "billing", "name": "invoices"})
    for op in (Op.LOOKUP, Op.GROUP_MEMBERS, Op.LIST, Op.GROUPS):
        refusal(a, other, op, scope="billing", name="x", group="g")
    # unregister / group.leave only touch the caller's own entries: open
    a.check(other, Op.UNREGISTER, {"scope": "billing", "name": "invoices"})
    # scopes without a section: the "*" section (register: user app only);
    # keys missing from it: everyone
    a.check(app, Op.REGISTER, {"scope": "jobs", "name": "x"})
    message = refusal(a, other, Op.REGISTER, scope="jobs", name="x")
    assert "scope 'jobs' needs user:app" in message and 'api.scopes."*".register' in message
    refusal(a, other, Op.REGISTER, name="x")  # "default" has no section either
    a.check(other, Op.SEND, {"scope": "jobs", "name": "x"})
    a.check(other, Op.LOOKUP, {"scope": "jobs", "name": "x"})
    # a section's missing keys come from "*", not from everyone
    a.check(other, Op.REGISTER, {"scope": "open", "name": "x"})
    # events
    a.check(client, Op.EVENT, {"name": "deploy"})
    assert "(api.events)" in refusal(a, other, Op.EVENT, name="deploy")
    assert a.counters == collections.Counter(
        {
            "api_forbidden.register.register": 3,
            "api_forbidden.register.group.join": 1,
            "api_forbidden.send.send": 1,
            "api_forbidden.read.lookup": 1,
            "api_forbidden.read.group.members": 1,
            "api_forbidden.read.list": 1,
            "api_forbidden.read.groups": 1,
            "api_forbidden.event.event": 1,
        }
    )


def test_unknown_names_match_nobody_and_are_reported() -> None:
    policy = parse_api_table({"scopes": {"s": {"register": ["user:ghost", "group:ghosts"]}}})
    a = authz(policy)
    assert a.unresolved == [
        "api.scopes.s.register: user:ghost",
        "api.scopes.s.register: group:ghosts",
    ]
    assert "needs user:ghost, group:ghosts" in refusal(
        a, Conn(1000), Op.REGISTER, scope="s", name="x"
    )
    nobody = authz(parse_api_table({"scopes": {"s": {"register": []}}}))
    assert "needs nobody" in refusal(nobody, Conn(1000), Op.REGISTER, scope="s", name="x")


def test_readable_filters_lists_and_registry_watches() -> None:
    a = authz(parse_api_table({"scopes": {"secret": {"read": []}}}))
    assert not a.read_open
    assert a.readable(Conn(0)) is None and a.readable(None) is None
    readable = a.readable(Conn(1000))
    assert readable is not None
    assert readable("default") and not readable("secret")

    send, receive = trio.open_memory_channel[Any](8)
    w = Watch(object(), frozenset({"registry", "members"}), send, readable)
    assert w.offer(("registered", {"topic": "registry", "scope": "secret", "name": "x"}))
    assert w.offer(("registered", {"topic": "registry", "scope": "default", "name": "y"}))
    assert w.offer(("joined", {"topic": "members", "name": "n"}))
    got = [receive.receive_nowait()[1].get("name") for _ in range(2)]
    assert got == ["y", "n"]
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


def test_refusals_are_exported_as_a_metric() -> None:
    a = authz()
    refusal(a, Conn(1000), Op.KEYS_INSTALL)
    refusal(a, Conn(1000), Op.SET_TAGS)
    refusal(a, Conn(1000), Op.SET_TAGS)
    text = render({"counters": dict(a.counters)})
    assert 'peerd_api_forbidden_total{op="keys.install",reason="admin"} 1' in text
    assert 'peerd_api_forbidden_total{op="set-tags",reason="admin"} 2' in text


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"admins": "x"}, "admins"),
        ({"admin_group": 5}, "admin_group"),
        ({"admin_group": "a b"}, "admin_group"),
        ({"events": "*"}, "events"),
        ({"events": ["root"]}, "events"),
        ({"events": ["uid:abc"]}, "events"),
        ({"events": ["user:"]}, "events"),
        ({"scopes": []}, "scopes"),
        ({"scopes": {"s": ["*"]}}, "scopes.s"),
        ({"scopes": {"s": {"write": ["*"]}}}, "scopes.s.write"),
        ({"scopes": {"s": {"read": [1]}}}, "scopes.s.read"),
        ({"scopes": {"a b": {"read": 1}}}, 'scopes."a b".read'),
    ],
)
def test_bad_tables_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_api_table(table)
    assert info.value.key == key


def test_the_config_file_api_table(tmp_path: Path) -> None:
    path = tmp_path / "peerd.toml"
    path.write_text(
        '[api]\nadmin_group = "ops"\nevents = ["group:ops"]\n'
        '[api.scopes.billing]\nregister = ["user:billing", "gid:7"]\n'
    )
    policy = load_file(path)["api_policy"]
    assert policy == ApiPolicy(
        "ops", ("group:ops",), (("billing", ScopePolicy(register=("user:billing", "gid:7"))),)
    )
    path.write_text('[api.scopes.billing]\nregister = ["billing"]\n')
    with pytest.raises(SettingsError) as info:
        load_file(path)
    assert info.value.key == "api.scopes.billing.register"
    path.write_text('[api]\nadmin_grup = "ops"\n')
    with pytest.raises(SettingsError) as info:
        load_file(path)
    assert info.value.key == "api.admin_grup"
    path.write_text('[api]\nadmin_group = ""\n')
    assert check_config(path).api_policy == ApiPolicy(admin_group="")


def test_peer_groups_are_the_kernels_record_of_the_connecting_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        groups = peer_groups(a, os.getpid())
    assert groups is not None
    assert sorted(groups) == sorted(os.getgroups())
    assert proc_groups(os.getpid()) is not None
    assert sorted(proc_groups(os.getpid()) or ()) == sorted(os.getgroups())
    assert proc_groups(0) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a child process many groups")
def test_peer_groups_of_a_process_with_more_groups_than_the_first_buffer(tmp_path: Path) -> None:
    many = tuple(range(20_000, 20_100))  # 100 groups: more than the first 64-group buffer
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "s")
    listener.bind(path)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        try:
            listener.close()
            os.setgroups(list(many))
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            c.recv(1)  # hold the connection until the parent has read the groups
        finally:
            os._exit(0)
    try:
        conn, _ = listener.accept()
        with conn:
            groups = peer_groups(conn, pid)
            conn.send(b"x")
    finally:
        os.waitpid(pid, 0)
        listener.close()
    assert groups is not None and sorted(groups) == list(many)
