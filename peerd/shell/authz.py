"""Who may do what on the local API: the daemon's authorization policy.

Why. The API socket's file mode used to be the only access control, so every
process that could open the socket (every member of ``peerd-clients``, the
group documented as "applications that may use the API") was cluster
admin: it could install a key of its own, switch the primary key, make the
node leave, join it to any address, retag it, and register or send in any
scope. This module splits the API the way Consul's ACLs split its agent
endpoints and the kernel splits root's powers into capabilities: operations
that change the node itself are *administrative*; operations a client does
for itself (registry entries bound to its connection, messages, lookups)
are checked per *scope* against a policy from the config file. Ownership of
a name (only the connection that registered it may change or drop it) is
the core's rule and stays as it was; this module decides who may enter a
scope at all.

What is trusted: the kernel, nothing else. On Linux every accepted
``AF_UNIX`` connection carries the credentials the connecting process had
at ``connect()`` time: ``SO_PEERCRED`` (pid, effective uid and gid) and
``SO_PEERGROUPS`` (its supplementary groups, Linux 4.13+). A client cannot
forge them, and nothing it sends in a frame (names, pids, metadata) is used
for authorization. They are a snapshot: a process that connects as root and
then drops privileges keeps root's rights *on that connection*, and a
connection handed to another process (``SCM_RIGHTS``) keeps its opener's
rights, which is the ordinary Unix rule for file descriptors (rights are
checked at open).

Why ``SO_PEERGROUPS`` for the groups, and not ``/proc`` or the group
database: ``/proc/PID/status`` is read *after* accept, so the process may
have changed its groups since it connected, or exited and had its pid
reused by another process (a race an attacker can try to win), and under
``peerd.service``'s ``ProtectProc=invisible`` other users' processes are not
even visible; the group database (``getgrouplist`` of the uid) says what
the user would get at a new login, not what this process holds (a service
sandboxed with its groups dropped would still count as a member), and may
block the event loop on a network directory. ``SO_PEERGROUPS`` is the
kernel's snapshot at connect, like ``SO_PEERCRED``. Only a kernel without it
(``ENOPROTOOPT``) falls back to ``/proc/PID/status``, read at accept, with
that race; when neither works the caller counts by its uid and primary gid
alone. Names in the policy (users, groups, the admin group) are resolved to
ids once, when the daemon starts or reloads, never per request.

The rules, op by op (:data:`OP_RULES`):

* administrative (``keys.install``, ``keys.use``, ``keys.remove``,
  ``leave``, ``join``, ``set-tags``, and any op this table does not name, so
  a new op is closed until it is classified): root, the daemon's own user,
  and members of ``[api] admin_group`` (default ``peerd-admins``; a group
  that does not exist means nobody else). Admins also pass every rule below.
  Reloading is SIGHUP, which only root and the daemon's user can send.
* per scope, from ``[api.scopes.NAME]`` (``register``, ``send``, ``read``:
  lists of ``"*"``, ``"user:NAME"``, ``"uid:N"``, ``"group:NAME"``,
  ``"gid:N"``): ``register``, ``group.join`` and ``update`` need
  ``register``; ``send`` to a name or group needs ``send``; ``lookup``,
  ``group.members`` and ``list``/``groups`` of one scope need ``read``;
  ``list``/``groups`` of every scope and ``watch`` of the ``registry`` topic
  only show the scopes the caller may read. A scope without a section, and
  a key missing from a section, take the ``[api.scopes."*"]`` section's
  value, and that defaults to everyone: with no policy at all every scope
  (``default`` included) is open to whoever can open the socket, as before.
* ``event`` (user events, broadcast to every node): ``[api] events``,
  default everyone.
* open to every caller: ``status``, ``members``, ``keys.list`` (key ids and
  whether they are in the key file, never key material), ``watch`` and
  ``unwatch``, ``unregister`` and ``group.leave`` (they only ever drop the
  caller's own entries), and ``send`` with ``reply_to`` (an answer to a
  message the caller received).

A refused call is answered with error ``forbidden`` naming the rule, counted
(``api_forbidden.<rule>.<op>``, exported as
``peerd_api_forbidden_total{reason, op}``) and logged (rate limited per uid
and op: a local process must not be able to flood the journal).
"""

from __future__ import annotations

import collections
import enum
import errno
import grp
import os
import pwd
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peerd.api.protocol import ApiError, ErrorCode, Op
from peerd.core.events import LogLevel
from peerd.shell.logs import LimitedLog, Logger, RateLimiter

DEFAULT_ADMIN_GROUP = "peerd-admins"
DEFAULT_SCOPE = "default"  # the API's scope when a request names none
OTHER_SCOPES = "*"  # the policy section that applies to scopes without their own

# --- reading the peer's groups ---------------------------------------------------

# Not in Python's socket module (3.11); 59 on every Linux architecture.
SO_PEERGROUPS: int | None = getattr(
    socket, "SO_PEERGROUPS", 59 if sys.platform.startswith("linux") else None
)
_GROUP_BUFFERS = (64, 65536)  # groups to make room for: usual, then NGROUPS_MAX


def peer_groups(sock: Any, pid: int) -> tuple[int, ...] | None:
    """The supplementary groups of the process at the other end of a Unix
    socket: the kernel's record at connect time (``SO_PEERGROUPS``), else
    ``/proc/PID/status`` read now (see the module docstring for that race),
    else None."""
    if SO_PEERGROUPS is not None:
        for count in _GROUP_BUFFERS:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
            except OSError as e:
                if e.errno == errno.ERANGE:
                    continue  # more groups than that: ask again with room for all
                break
            return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return proc_groups(pid)


def proc_groups(pid: int) -> tuple[int, ...] | None:
    """``Groups:`` of ``/proc/PID/status`` (None if unreadable)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


# --- the policy as configured ----------------------------------------------------


class PolicyError(ValueError):
    """A bad ``[api]`` entry; ``key`` is its path below ``api``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ScopePolicy:
    """One ``[api.scopes.NAME]`` section; None: take the ``"*"`` section's value."""

    register: tuple[str, ...] | None = None
    send: tuple[str, ...] | None = None
    read: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ApiPolicy:
    """The ``[api]`` authorization settings as written (names, not ids)."""

    admin_group: str = DEFAULT_ADMIN_GROUP  # "": no admin group
    events: tuple[str, ...] = ("*",)
    scopes: tuple[tuple[str, ScopePolicy], ...] = ()  # sorted by scope name


AUTHZ_KEYS = ("admin_group", "events", "scopes")
SCOPE_KEYS = ("register", "send", "read")
_PREFIXES = ("user:", "uid:", "group:", "gid:")


def _principals(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(key, 'expected a list like ["*"], ["user:app", "group:app-clients"]')
    for text in value:
        if text == "*":
            continue
        kind, sep, name = text.partition(":")
        if not sep or f"{kind}:" not in _PREFIXES or not name:
            raise PolicyError(
                key, f'{text!r}: expected "*", "user:NAME", "uid:N", "group:NAME" or "gid:N"'
            )
        if kind in ("uid", "gid") and not (name.isascii() and name.isdigit()):
            raise PolicyError(key, f"{text!r}: {kind} must be a number")
    return tuple(value)


def take_api_policy(table: dict[str, Any]) -> ApiPolicy:
    """Take the policy's entries (:data:`AUTHZ_KEYS`) out of the ``[api]``
    table, checked (raises :class:`PolicyError`); other ``[api]`` settings
    stay in ``table`` for their owners."""
    return parse_api_table({k: table.pop(k) for k in AUTHZ_KEYS if k in table})


def parse_api_table(table: Mapping[str, Any]) -> ApiPolicy:
    """The policy's entries of ``[api]``, checked (raises :class:`PolicyError`)."""
    policy = ApiPolicy()
    for key in table:
        if key not in AUTHZ_KEYS:
            raise PolicyError(key, "unknown setting")
    if "admin_group" in table:
        group = table["admin_group"]
        if not isinstance(group, str) or any(c.isspace() or c == ":" for c in group):
            raise PolicyError("admin_group", 'expected a group name ("" for none)')
        policy = ApiPolicy(group, policy.events, policy.scopes)
    if "events" in table:
        policy = ApiPolicy(
            policy.admin_group, _principals("events", table["events"]), policy.scopes
        )
    raw = table.get("scopes", {})
    if not isinstance(raw, dict):
        raise PolicyError("scopes", "expected tables [api.scopes.NAME]")
    scopes: list[tuple[str, ScopePolicy]] = []
    for scope, section in sorted(raw.items()):
        where = f"scopes.{_quote(scope)}"
        if not scope:
            raise PolicyError(where, "a scope name must not be empty")
        if not isinstance(section, dict):
            raise PolicyError(where, "expected a table of register/send/read lists")
        for key in section:
            if key not in SCOPE_KEYS:
                raise PolicyError(f"{where}.{key}", "unknown setting (register, send, read)")
        lists = {k: _principals(f"{where}.{k}", section[k]) for k in SCOPE_KEYS if k in section}
        scopes.append((scope, ScopePolicy(**lists)))
    return ApiPolicy(policy.admin_group, policy.events, tuple(scopes))


def _quote(scope: str) -> str:
    return scope if scope.replace("-", "").replace("_", "").isalnum() else f'"{scope}"'


# --- the policy in force -----------------------------------------------------------


class Rule(enum.Enum):
    """What an op needs (also the ``reason`` label of a refusal)."""

    OPEN = "open"
    ADMIN = "admin"
    REGISTER = "register"
    SEND = "send"
    READ = "read"
    EVENT = "event"


OP_RULES: dict[str, Rule] = {
    Op.STATUS: Rule.OPEN,
    Op.MEMBERS: Rule.OPEN,
    Op.KEYS_LIST: Rule.OPEN,
    Op.WATCH: Rule.OPEN,
    Op.UNWATCH: Rule.OPEN,
    Op.UNREGISTER: Rule.OPEN,
    Op.GROUP_LEAVE: Rule.OPEN,
    Op.SET_TAGS: Rule.ADMIN,
    Op.LEAVE: Rule.ADMIN,
    Op.JOIN: Rule.ADMIN,
    Op.KEYS_INSTALL: Rule.ADMIN,
    Op.KEYS_USE: Rule.ADMIN,
    Op.KEYS_REMOVE: Rule.ADMIN,
    Op.REGISTER: Rule.REGISTER,
    Op.GROUP_JOIN: Rule.REGISTER,
    Op.UPDATE: Rule.REGISTER,
    Op.SEND: Rule.SEND,
    Op.LOOKUP: Rule.READ,
    Op.GROUP_MEMBERS: Rule.READ,
    Op.LIST: Rule.READ,
    Op.GROUPS: Rule.READ,
    Op.EVENT: Rule.EVENT,
}
"""What each op needs; an op missing here is administrative."""

_OPS = frozenset(str(op) for op in Op)


@dataclass(frozen=True, slots=True)
class Who:
    """A resolved list of principals, and where it came from (for messages)."""

    everyone: bool
    uids: frozenset[int]
    gids: frozenset[int]
    text: str  # as configured: "everyone", "user:app, group:web"
    key: str  # the setting: "api.scopes.billing.register", or "default"

    def admits(self, uid: int, gids: Iterable[int]) -> bool:
        return self.everyone or uid in self.uids or not self.gids.isdisjoint(gids)


EVERYONE = Who(True, frozenset(), frozenset(), "everyone", "default")


def _lookup_user(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _lookup_group(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class Authz:
    """The policy in force: names resolved to ids, checks and refusals.

    ``check`` is called for every API request before it is parsed; a caller
    whose connection is None is the daemon itself (in-process calls) and
    passes. ``counters`` and ``logger`` receive the refusals."""

    def __init__(
        self,
        policy: ApiPolicy,
        *,
        daemon_uid: int,
        counters: collections.Counter[str] | None = None,
        logger: Logger | None = None,
        users: Callable[[str], int | None] = _lookup_user,
        groups: Callable[[str], int | None] = _lookup_group,
    ) -> None:
        self.policy = policy
        self.daemon_uid = daemon_uid
        self.daemon_user = _user_name(daemon_uid)
        self.counters = counters if counters is not None else collections.Counter()
        self.log = LimitedLog(logger, RateLimiter(interval_s=10.0, burst=5)) if logger else None
        self.unresolved: list[str] = []  # names that exist on no account of this host
        self._users, self._groups = users, groups
        self.admin_gid = groups(policy.admin_group) if policy.admin_group else None
        self.events = self._resolve(policy.events, "api.events")
        sections = dict(policy.scopes)
        other = sections.pop(OTHER_SCOPES, ScopePolicy())
        self._other = {
            rule: self._resolve(getattr(other, rule.value), f'api.scopes."*".{rule.value}')
            for rule in (Rule.REGISTER, Rule.SEND, Rule.READ)
        }
        self._scopes: dict[str, dict[Rule, Who]] = {}
        for scope, section in sections.items():
            self._scopes[scope] = {
                rule: self._resolve(
                    getattr(section, rule.value),
                    f"api.scopes.{_quote(scope)}.{rule.value}",
                    self._other[rule],
                )
                for rule in self._other
            }
        # Rules open to everyone in every scope: checked with one set lookup
        # (the default policy: every registry and messaging op).
        self._open = frozenset(
            {Rule.OPEN}
            | {
                rule
                for rule, who in self._other.items()
                if who.everyone and all(rules[rule].everyone for rules in self._scopes.values())
            }
            | ({Rule.EVENT} if self.events.everyone else set())
        )
        # Reading is open everywhere: no filtering of lists and watches.
        self.read_open = Rule.READ in self._open

    def _resolve(self, names: tuple[str, ...] | None, key: str, inherit: Who = EVERYONE) -> Who:
        if names is None:
            return inherit
        uids: set[int] = set()
        gids: set[int] = set()
        for text in names:
            if text == "*":
                return Who(True, frozenset(), frozenset(), "everyone", key)
            kind, _, name = text.partition(":")
            if kind in ("uid", "gid"):
                (uids if kind == "uid" else gids).add(int(name))
                continue
            found = (self._users if kind == "user" else self._groups)(name)
            if found is None:
                self.unresolved.append(f"{key}: {text}")
            else:
                (uids if kind == "user" else gids).add(found)
        text = ", ".join(names) if names else "nobody"
        return Who(False, frozenset(uids), frozenset(gids), text, key)

    # --- the checks ---------------------------------------------------------------

    def who(self, scope: str, rule: Rule) -> Who:
        """Who may ``rule`` (register, send, read) in ``scope``, admins aside."""
        rules = self._scopes.get(scope)
        return (rules if rules is not None else self._other)[rule]

    def is_admin(self, cred: Any) -> bool:
        if cred is None:
            return False
        if cred.uid == 0 or cred.uid == self.daemon_uid:
            return True
        return self.admin_gid is not None and self.admin_gid in _gids(cred)

    def check(self, conn: object, op: str, args: Mapping[str, Any]) -> None:
        """Raise ApiError ``forbidden`` (counted, logged) unless the caller may."""
        rule = OP_RULES.get(op, Rule.ADMIN)
        if rule in self._open or conn is None:  # open, or the daemon itself
            return
        scope: str | None = None
        who: Who | None = None
        if rule is Rule.EVENT:
            who = self.events
        elif rule is not Rule.ADMIN:
            if rule is Rule.SEND and "reply_to" in args:
                return  # an answer to a message this caller received
            value = args.get("scope", None if op in (Op.LIST, Op.GROUPS) else DEFAULT_SCOPE)
            if type(value) is not str or not value:
                return  # every scope (filtered by `readable`), or bad args the parser refuses
            scope = value
            who = self.who(scope, rule)
        if who is not None and who.everyone:
            return
        cred = getattr(conn, "cred", None)
        if cred is not None:
            uid, gids = cred.uid, _gids(cred)
            if uid == 0 or uid == self.daemon_uid or self.admin_gid in gids:
                return  # an admin
            if who is not None and who.admits(uid, gids):
                return
        self._refuse(op, rule, cred, scope, who)

    def readable(self, conn: object) -> Callable[[str], bool] | None:
        """For lists of every scope and registry watches: a test of the
        scopes ``conn`` may read, or None when it may read them all."""
        if conn is None or self.read_open:
            return None
        cred = getattr(conn, "cred", None)
        if self.is_admin(cred):
            return None
        if cred is None:
            return lambda scope: self.who(scope, Rule.READ).everyone
        uid, gids = cred.uid, frozenset(_gids(cred))
        return lambda scope: self.who(scope, Rule.READ).admits(uid, gids)

    def _refuse(self, op: str, rule: Rule, cred: Any, scope: str | None, who: Who | None) -> None:
        if rule is Rule.ADMIN or who is None:
            if not self.policy.admin_group:
                group = " (api.admin_group is empty)"
            elif self.admin_gid is None:
                group = f" (group {self.policy.admin_group} of api.admin_group does not exist)"
            else:
                group = f" or a member of group {self.policy.admin_group} (api.admin_group)"
            needs = f"root, the daemon's user {self.daemon_user}{group}"
            message = f"{op} needs {needs}"
        elif scope is not None:
            message = (
                f"{op} in scope {scope!r} needs {who.text} ({who.key}) or an admin "
                f"(root, the daemon's user or group {self.policy.admin_group or '-'})"
            )
        else:
            message = f"{op} needs {who.text} ({who.key}) or an admin"
        if cred is None:
            message += "; this connection's credentials are unknown"
        else:
            message += f"; this connection is uid {cred.uid} gid {cred.gid}"
        name = op if op in _OPS else "other"  # counter names must not come from clients
        self.counters[f"api_forbidden.{rule.value}.{name}"] += 1
        if self.log is not None:
            self.log.log(
                f"forbidden {cred.uid if cred is not None else '?'} {name}",
                LogLevel.WARNING,
                "API call forbidden",
                op=name,
                rule=rule.value,
                scope=scope or "-",
                uid=cred.uid if cred is not None else "?",
                pid=cred.pid if cred is not None else "?",
            )
        raise ApiError(ErrorCode.FORBIDDEN, message)

    def describe(self) -> str:
        """For the start-up log: who the admins are."""
        who = ["root"] if self.daemon_uid == 0 else ["root", self.daemon_user]
        if self.admin_gid is not None:
            who.append(f"group {self.policy.admin_group}")
        return ", ".join(who)


def _gids(cred: Any) -> tuple[int, ...]:
    groups = getattr(cred, "groups", None) or ()
    return (cred.gid, *groups)


def authz_for(policy: ApiPolicy, counters: collections.Counter[str], logger: Logger) -> Authz:
    """The daemon's policy (its user is the process's effective uid), with
    the names that resolve to no account on this host logged once."""
    authz = Authz(policy, daemon_uid=os.geteuid(), counters=counters, logger=logger)
    for where in authz.unresolved:
        logger.warning("API policy names an unknown user or group; it matches nobody", rule=where)
    return authz
