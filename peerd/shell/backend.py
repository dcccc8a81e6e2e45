"""The API backend: every API op, answered against the core in the runner task.

The API server (:mod:`peerd.shell.api_server`) parses frames and calls
``call``/``watch``/``begin_batch``/``connection_closed``; this mixin of
:class:`peerd.shell.runner.Runner` answers them. It never touches the core
from the calling task: a read runs as a closure in the runner task
(``call_in_runner``), so it sees one consistent state between two core turns;
a write becomes a core input fed there, and the calling task then waits for
the core's answer. Calls are therefore cancel-safe: a cancelled caller only
stops waiting, it never leaves half-applied state behind.

Registry ops (``register``, ``group.join``...) become core inputs
(:class:`Register`, :class:`Unregister`, :class:`UpdateMeta`) carrying a
fresh ``ref``, the API connection's id and its peer credentials (pid, uid
from SO_PEERCRED) and, for the conflict rule, this host's wall clock in ms
(the shell reads clocks; the core does not). The call waits for the
:class:`CommandResult` with its ref: at once, or, for ``wait: "settled"``,
when every live member acknowledged the entry or the core's timer expired.
Reads (``lookup``, ``list``, ``groups``, ``group.members``) read the local
replica in the runner task. When a connection closes, :class:`ConnClosed`
drops its entries cluster-wide. :class:`RegistryEvent` outputs go to watches
of the ``registry`` topic; a ``conflict`` also goes to the connection that
owned the losing entry, as a connection event (stream 0) that needs no watch.

Watches are bounded channels filled by the loop without waiting (a watcher
that does not read is dropped, never waited for); a watch with a snapshot
reads the current state and registers in one synchronous step, so the cut
and the live events neither overlap nor leave a gap.

The API ``leave`` answers once the leave had time to spread; the daemon then
exits 0, as after SIGTERM.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from peerd.api.protocol import (
    PAGE_BUDGET_BYTES,
    ApiError,
    ErrorCode,
    EventArgs,
    ListArgs,
    Op,
    RegisterArgs,
    RegTarget,
    SendArgs,
    TagUpdate,
    encode_user_event,
    entry_wire_size,
    format_addr,
    member_to_wire,
    parse_event_args,
    parse_join_args,
    parse_key_args,
    parse_key_flags,
    parse_keys_list_args,
    parse_limit_arg,
    parse_list_args,
    parse_register_args,
    parse_send_args,
    parse_set_tags_args,
    parse_target_args,
    parse_update_args,
    reg_entry_to_wire,
    status_to_wire,
)
from peerd.core.config import SwimConfig
from peerd.core.events import (
    BroadcastResult,
    CommandResult,
    ConnClosed,
    Input,
    Join,
    MarkQuiet,
    MemberInfo,
    PeerInput,
    Register,
    SetTags,
    Unregister,
    UpdateMeta,
)
from peerd.core.swim.base import tags_problem
from peerd.shell.authz import Authz
from peerd.shell.keys import KeyManager
from peerd.shell.logs import Logger
from peerd.shell.messaging import Pending, Sends
from peerd.shell.ports import EventItem, Item, NodeLike, Waiter
from peerd.shell.settings import DEFAULT_PORT
from peerd.shell.state import StateDir, StateError
from peerd.shell.tags import NodeTags
from peerd.shell.watches import TOPICS, SnapshotThenLive, Watch, snapshot_cut
from peerd.wire.messages import (
    Addr,
    Channel,
    NodeId,
    RegKind,
    tags_from_mapping,
)


@dataclass(eq=False, slots=True)
class RegCall:
    """A registry command waiting for its CommandResult."""

    result: CommandResult | None = None
    done: trio.Event | None = None  # made only when the result does not come at once


class Backend:
    """The API server's Backend (call/watch/connection_closed), as a mixin of Runner."""

    # Provided by Runner (peerd.shell.runner), which this is a mixin of.
    node: NodeLike
    config: SwimConfig
    logger: Logger
    state: StateDir | None
    keys: KeyManager | None
    sends: Sends | None
    node_tags: NodeTags | None
    counters: collections.Counter[str]
    counter_sources: dict[str, Mapping[str, int]]
    gauge_sources: dict[str, Callable[[], float]]
    send_channel: trio.MemorySendChannel[Item]
    watcher_buffer: int
    join_timeout_s: float
    in_flight: int
    _started_at: float
    _timers: list[Any]
    _join_waiters: collections.deque[Waiter]
    _join_changed: trio.Event
    _join_lock: trio.Lock
    _leave_waiters: list[Waiter]
    _watches: list[Watch]
    _left: bool
    _finished: bool
    _refs: Iterator[int]
    _reg_calls: dict[int, RegCall]
    _reg_conns: dict[int, Any]
    _deferred: collections.deque[PeerInput]
    _local_brief: tuple[str, str] | None
    # Who may do what (peerd.shell.authz); None: no checks (a runner without an agent).
    authz: Authz | None = None

    if TYPE_CHECKING:

        @property
        def leaving(self) -> bool: ...
        def _handle(self, inp: PeerInput) -> None: ...
        def _begin_leave(self, reason: str = ...) -> None: ...
        def _fan_user_event(
            self, msg_id: bytes, origin: NodeId, name: str, payload: bytes
        ) -> None: ...
        def broadcast(self, channel: Channel, payload: bytes) -> BroadcastResult: ...
        async def call_in_runner(self, fn: Callable[[], Any]) -> Any: ...
        def _keys(self) -> KeyManager: ...
        async def _keys_cluster(self, op: str, text: str) -> dict[str, Any]: ...

    def all_counters(self) -> dict[str, int]:
        merged: collections.Counter[str] = collections.Counter(self.node.counters)
        merged.update(self.counters)
        if merged["mesh_in"]:
            # Registry deltas the mesh delivered: the Peer hands them to the
            # registry itself (counted there as mesh_in); shown by the name
            # the shell counted them under when it did that.
            merged["mesh_delivered_registry"] = merged["mesh_in"]
        for prefix, source in self.counter_sources.items():
            merged.update({f"{prefix}_{k}": v for k, v in source.items()})
        return dict(sorted(merged.items()))

    # --- API backend ---------------------------------------------------------------------

    async def call(self, conn: object, op: str, args: Mapping[str, Any]) -> Any:
        """Answer one API request; ApiError for anything the client got wrong."""
        if self.authz is not None:
            self.authz.check(conn, op, args)
        self.in_flight += 1
        try:
            return await self._call(conn, op, args)
        finally:
            self.in_flight -= 1

    async def _call(self, conn: object, op: str, args: Mapping[str, Any]) -> Any:
        match op:
            case Op.REGISTER:
                return await self._reg_write(conn, parse_register_args(args))
            case Op.GROUP_JOIN:
                return await self._reg_write(conn, parse_register_args(args, RegKind.GROUP))
            case Op.UNREGISTER:
                return await self._reg_write(conn, parse_target_args(args))
            case Op.GROUP_LEAVE:
                return await self._reg_write(conn, parse_target_args(args, RegKind.GROUP))
            case Op.UPDATE:
                return await self._reg_write(conn, parse_update_args(args), update=True)
            case Op.LOOKUP:
                target = parse_target_args(args)
                return await self.call_in_runner(lambda: self._lookup(target))
            case Op.LIST:
                page, readable = parse_list_args(args), self._readable(conn)
                return await self.call_in_runner(lambda: self._list_names(page, readable))
            case Op.GROUPS:
                page, readable = parse_list_args(args), self._readable(conn)
                return await self.call_in_runner(lambda: self._list_groups(page, readable))
            case Op.GROUP_MEMBERS:
                target = parse_target_args(args, RegKind.GROUP)
                limit = parse_limit_arg(args)
                return await self.call_in_runner(lambda: self._group_members(target, limit))
            case Op.STATUS:
                return await self.call_in_runner(self._status)
            case Op.MEMBERS:
                return await self.call_in_runner(
                    lambda: [member_to_wire(m) for m in self.node.members()]
                )
            case Op.SET_TAGS:
                update = parse_set_tags_args(args)
                return await self.call_in_runner(lambda: self._set_tags(update))
            case Op.JOIN:
                return await self._join(parse_join_args(args, default_port=DEFAULT_PORT))
            case Op.LEAVE:
                return await self._leave()
            case Op.EVENT:
                ev = parse_event_args(args)
                return await self.call_in_runner(lambda: self._user_event(ev))
            case Op.SEND:
                send = parse_send_args(args)
                pending: Pending = await self.call_in_runner(lambda: self._send_begin(conn, send))
                assert self.sends is not None
                return await self.sends.wait(pending)
            case Op.KEYS_LIST:
                return self._keys().list(file_only=parse_keys_list_args(args))
            case Op.KEYS_INSTALL | Op.KEYS_USE | Op.KEYS_REMOVE:
                key = parse_key_args(args)
                force, cluster = parse_key_flags(args)
                if cluster:
                    return await self._keys_cluster(op, key)
                if op == Op.KEYS_INSTALL:
                    return await self.call_in_runner(lambda: self._keys().install(key, force))
                if op == Op.KEYS_USE:
                    return await self.call_in_runner(lambda: self._keys().use(key))
                return await self.call_in_runner(lambda: self._keys().remove(key))
            case _:
                raise ApiError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")

    # --- registry ----------------------------------------------------------------------

    def _registry(self) -> Any:
        registry = getattr(self.node, "registry", None)
        if registry is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no registry")
        return registry

    async def _reg_write(
        self, conn: object, cmd: RegisterArgs | RegTarget, update: bool = False
    ) -> dict[str, Any]:
        """Feed one registry command for ``conn`` (a RegTarget is an
        unregister, or with ``update`` a metadata update) and wait for its
        result: at once, or for ``wait: "settled"`` when the core answers."""
        call: RegCall = await self.call_in_runner(lambda: self._reg_begin(conn, cmd, update))
        if call.result is None:
            call.done = trio.Event()
            await call.done.wait()
        return self._reg_value(call)

    def _reg_begin(
        self, conn: object, cmd: RegisterArgs | RegTarget, update: bool = False
    ) -> RegCall:
        """In the runner task: feed the command; its result is filled in when
        the core answers (for a plain write, before this returns)."""
        self._registry()
        conn_id = getattr(conn, "id", None)
        if type(conn_id) is not int:
            raise ApiError(ErrorCode.UNAVAILABLE, "registry writes need an API connection")
        # A connection that closed meanwhile (its ConnClosed may already be
        # handled) must not leave entries behind.
        if getattr(conn, "closed", False):
            raise ApiError(ErrorCode.UNAVAILABLE, "the connection closed")
        cred = getattr(conn, "cred", None)
        pid, uid = (cred.pid, cred.uid) if cred is not None else (0, 0)
        ref = next(self._refs)
        inp: Input
        if isinstance(cmd, RegisterArgs):
            if self.leaving:
                raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
            inp = Register(
                ref,
                conn_id,
                cmd.kind,
                cmd.scope,
                cmd.name,
                cmd.meta,
                pid,
                uid,
                time.time_ns() // 1_000_000,
                cmd.settle_s,
            )
        elif update:
            inp = UpdateMeta(ref, conn_id, cmd.kind, cmd.scope, cmd.name, cmd.meta)
        else:
            inp = Unregister(ref, conn_id, cmd.kind, cmd.scope, cmd.name)
        call = self._reg_calls[ref] = RegCall()
        self._reg_conns[conn_id] = conn
        self._handle(inp)
        if isinstance(cmd, RegisterArgs) and not cmd.messages and self.sends is not None:
            # Its holder takes no messages: the core refuses them (no_receiver).
            eid = self._registry().eid_of(conn_id, cmd.kind, cmd.scope, cmd.name)
            if eid is not None:
                self._handle(MarkQuiet(eid))
        if (
            call.result is not None
            and call.result.error is not None
            and call.result.error[0] == ErrorCode.CONFLICT
            and isinstance(cmd, RegisterArgs)
            and cmd.kind is RegKind.NAME
        ):
            call.result = CommandResult(
                ref,
                error=(
                    ErrorCode.CONFLICT,
                    self._held_by(cmd.scope, cmd.name) or call.result.error[1],
                ),
            )
        return call

    def _held_by(self, scope: str, name: str) -> str | None:
        claim = self._registry().state.lookup(scope, name)
        if claim is None:
            return None
        member = getattr(self.node, "member", None)
        info = member(claim.origin) if member is not None else None
        where = (
            f"node {info.name} ({claim.origin.hex()[:8]})"
            if info is not None
            else f"node {claim.origin.hex()[:8]}"
        )
        return f"{scope}/{name} is held by pid {claim.entry.pid} on {where}"

    def _reg_value(self, call: RegCall) -> dict[str, Any]:
        result = call.result
        assert result is not None
        if result.error is not None:
            raise ApiError(*result.error)
        value = result.value or {}
        if value:
            if self._local_brief is None:  # a node's name and address are fixed
                local = self.node.local_member()
                self._local_brief = (local.name, format_addr(local.addr))
            value["node_name"], value["node_addr"] = self._local_brief
        return value

    # Quick ops: answered at once in the runner task, many per turn (see
    # call_batch and the API server's batching).
    _QUICK_OPS = frozenset(
        {Op.REGISTER, Op.GROUP_JOIN, Op.UNREGISTER, Op.GROUP_LEAVE, Op.UPDATE, Op.LOOKUP}
    )

    def batchable(self, op: str, args: Mapping[str, Any]) -> bool:
        """Registry writes without ``wait`` and lookups answer at once."""
        if op == Op.SEND:
            # Batched so that a connection's sends go out in order, many per turn.
            return self.sends is not None
        return (
            op in self._QUICK_OPS
            and args.get("wait") is None
            and getattr(self.node, "registry", None) is not None
        )

    async def call_batch(
        self, conn: object, requests: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Any]:
        """Answer quick requests in order, in one turn of the runner: the
        results, or an ApiError for each that failed."""
        finish = await self.begin_batch(conn, requests)
        return await finish()

    async def begin_batch(
        self, conn: object, requests: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> Callable[[], Awaitable[list[Any]]]:
        """Start quick requests in order, in one turn of the runner, and return
        what waits for their results. The API server starts a connection's
        next batch while this one waits (sends wait for the owner's daemon):
        the order of the sends is the order of the starts."""
        parsed: list[tuple[str, Any] | ApiError] = []
        for op, args in requests:
            try:
                if self.authz is not None:
                    self.authz.check(conn, op, args)
                parsed.append(self._parse_quick(op, args))
            except ApiError as e:
                parsed.append(e)

        def run() -> list[Any]:
            out: list[Any] = []
            for item in parsed:
                if isinstance(item, ApiError):
                    out.append(item)
                    continue
                op, cmd = item
                try:
                    if op == Op.SEND:
                        out.append(self._send_begin(conn, cmd))
                    elif op == Op.LOOKUP:
                        out.append(self._lookup(cmd))
                    else:
                        call = self._reg_begin(conn, cmd, update=op == Op.UPDATE)
                        out.append(call if call.result is None else self._reg_value(call))
                except ApiError as e:
                    out.append(e)
            return out

        self.in_flight += 1
        try:
            results: list[Any] = await self.call_in_runner(run)
        except BaseException:
            self.in_flight -= 1
            raise

        async def finish() -> list[Any]:
            try:
                if self.sends is not None:
                    for i, r in enumerate(results):
                        if isinstance(r, Pending):
                            try:
                                results[i] = await self.sends.wait(r)
                            except ApiError as e:
                                results[i] = e
                for i, r in enumerate(results):
                    if isinstance(r, RegCall):  # pragma: no cover - quick writes answer at once
                        if r.result is None:
                            r.done = trio.Event()
                            await r.done.wait()
                        try:
                            results[i] = self._reg_value(r)
                        except ApiError as e:
                            results[i] = e
                return results
            finally:
                self.in_flight -= 1

        return finish

    def _parse_quick(self, op: str, args: Mapping[str, Any]) -> tuple[str, Any]:
        match op:
            case Op.SEND:
                return op, parse_send_args(args)
            case Op.REGISTER:
                return op, parse_register_args(args)
            case Op.GROUP_JOIN:
                return op, parse_register_args(args, RegKind.GROUP)
            case Op.UNREGISTER:
                return op, parse_target_args(args)
            case Op.GROUP_LEAVE:
                return op, parse_target_args(args, RegKind.GROUP)
            case Op.UPDATE:
                return op, parse_update_args(args)
            case Op.LOOKUP:
                return op, parse_target_args(args)
        raise ApiError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")  # pragma: no cover

    def _member_of(self) -> Callable[[NodeId], MemberInfo | None]:
        members = {m.node: m for m in self.node.members()}
        return members.get

    def _lookup(self, target: RegTarget) -> dict[str, Any]:
        claim = self._registry().state.lookup(target.scope, target.name)
        if claim is None:
            raise ApiError(
                ErrorCode.NOT_FOUND, f"no name {target.name!r} in scope {target.scope!r}"
            )
        member = getattr(self.node, "member", None)
        return reg_entry_to_wire(
            claim.origin, claim.entry, member(claim.origin) if member is not None else None
        )

    def _readable(self, conn: object) -> Callable[[str], bool] | None:
        """The scopes ``conn`` may read, for lists and watches of every scope."""
        return self.authz.readable(conn) if self.authz is not None else None

    def _list_names(
        self, page: ListArgs, readable: Callable[[str], bool] | None = None
    ) -> dict[str, Any]:
        member_of = self._member_of()
        entries: list[dict[str, Any]] = []
        budget = PAGE_BUDGET_BYTES
        for claim in self._registry().state.names(page.scope, page.prefix):
            key = (claim.entry.scope, claim.entry.name)
            if page.after is not None and key <= page.after:
                continue
            if readable is not None and not readable(claim.entry.scope):
                continue
            budget -= entry_wire_size(claim.entry)
            if len(entries) >= page.limit or budget < 0:
                return {"entries": entries, "more": True}
            entries.append(reg_entry_to_wire(claim.origin, claim.entry, member_of(claim.origin)))
        return {"entries": entries, "more": False}

    def _list_groups(
        self, page: ListArgs, readable: Callable[[str], bool] | None = None
    ) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        for scope, name, count in self._registry().state.groups(page.scope, page.prefix):
            if page.after is not None and (scope, name) <= page.after:
                continue
            if readable is not None and not readable(scope):
                continue
            if len(groups) >= page.limit:
                return {"groups": groups, "more": True}
            groups.append({"scope": scope, "group": name, "members": count})
        return {"groups": groups, "more": False}

    def _group_members(self, target: RegTarget, limit: int) -> dict[str, Any]:
        member_of = self._member_of()
        entries: list[dict[str, Any]] = []
        budget = PAGE_BUDGET_BYTES
        for claim in self._registry().state.group_members(target.scope, target.name):
            budget -= entry_wire_size(claim.entry)
            if len(entries) >= limit or budget < 0:
                return {"entries": entries, "more": True}
            entries.append(reg_entry_to_wire(claim.origin, claim.entry, member_of(claim.origin)))
        return {"entries": entries, "more": False}

    def _send_begin(self, conn: object, args: SendArgs) -> Pending:
        if self.sends is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no peer links")
        if self.leaving:
            raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
        pending, inp = self.sends.start(conn, args)
        self._handle(inp)
        return self.sends.started(pending, args)

    def _user_event(self, ev: EventArgs) -> dict[str, Any]:
        """In the runner task: broadcast a user event (lowest priority channel,
        rate limited by the mesh); local watchers see it too."""
        if self.leaving:
            raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
        result = self.broadcast(Channel.USER, encode_user_event(ev.name, ev.payload))
        if result.error is not None:
            code, message = result.error
            raise ApiError(
                ErrorCode.BAD_ARGS if code == "too_large" else ErrorCode.UNAVAILABLE,
                f"{code}: {message}",
            )
        assert result.id is not None
        self._fan_user_event(result.id, self.node.local_member().node, ev.name, ev.payload)
        return {"id": result.id.hex()}

    def _status(self) -> dict[str, Any]:
        out = status_to_wire(self.node.local_member(), self.node.health_score, self.node.members())
        out["counters"] = self.all_counters()
        out["gauges"] = self.gauges()
        out["leaving"] = self.leaving
        return out

    def gauges(self) -> dict[str, float]:
        """Current values (not totals) for `status` and the metrics."""
        out: dict[str, float] = {
            "timers_pending": len(self._timers),
            "api_watchers": len(self._watches),
            "uptime_s": round(max(0.0, trio.current_time() - self._started_at), 3),
        }
        if self.keys is not None:
            out["keys"] = len(self.keys.keyring)
        for name, source in self.gauge_sources.items():
            try:
                out[name] = source()
            except Exception as e:  # a broken gauge must not break `status`
                self.logger.warning("gauge failed", gauge=name, error=str(e))
        return dict(sorted(out.items()))

    def _set_tags(self, update: TagUpdate) -> dict[str, str]:
        if self.leaving:
            raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
        tags = update.apply(dict(self.node.local_member().tags))
        if len(tags) > self.config.max_tags:
            raise ApiError(
                ErrorCode.BAD_ARGS, f"at most {self.config.max_tags} tags (swim.max_tags)"
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in tags.items())
        if size > self.config.max_tags_bytes:
            raise ApiError(
                ErrorCode.BAD_ARGS,
                f"tags take {size} bytes, more than {self.config.max_tags_bytes} "
                "(swim.max_tags_bytes)",
            )
        if self.node_tags is not None and self.state is not None:
            # Saved before it applies: a change that cannot be kept is refused.
            kept = self.node_tags.copy()
            kept.set_effective(tags)
            try:
                self.state.save_tags(kept)
            except StateError as e:
                self.counters["state_write_errors"] += 1
                self.logger.error("tags not persisted; not changed", error=str(e))
                raise ApiError(ErrorCode.UNAVAILABLE, f"tags not changed: {e}") from None
            self.node_tags = kept
        self._handle(SetTags(tags_from_mapping(tags)))
        return dict(self.node.local_member().tags)

    def reconfigure_tags(self, configured: Iterable[tuple[str, str]]) -> bool:
        """In the runner task, on reload: take the configured tags (run-time
        changes of keys the configuration changed are dropped, see
        :mod:`peerd.shell.tags`). True when the node's tags changed."""
        if self.node_tags is None:
            return False
        tags = self.node_tags.copy()
        dropped = tags.reconfigure(dict(configured))
        if dropped:
            self.logger.info("configured tags replace tags set at run time", keys=",".join(dropped))
        if tags == self.node_tags:
            return False
        effective = tags.effective()
        problem = tags_problem(self.config, tuple(sorted(effective.items())))
        if problem is not None:
            self.logger.warning(
                "tags set at run time do not fit with the configured ones; dropped",
                problem=problem,
                keys=",".join(sorted(tags.runtime)),
            )
            tags.runtime.clear()
            effective = tags.effective()
        if self.state is not None:
            try:
                self.state.save_tags(tags)
            except StateError as e:
                self.counters["state_write_errors"] += 1
                self.logger.error("tags not persisted", error=str(e))
        self.node_tags = tags
        before = dict(self.node.local_member().tags)
        if effective != before and not self.leaving:
            self._handle(SetTags(tags_from_mapping(effective)))
        return effective != before

    async def _join(self, addrs: tuple[Addr, ...]) -> dict[str, int]:
        """One join at a time, after the start's: JoinDone carries no id, so
        results are paired with requests by order, which is only sound when
        a single join is outstanding."""

        def begin() -> Waiter:
            if self.leaving:
                raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
            waiter = Waiter("api")
            self._join_waiters.append(waiter)
            self._handle(Join(addrs))
            return waiter

        with trio.move_on_after(self.join_timeout_s):
            async with self._join_lock:
                while self._join_waiters:
                    await self._join_changed.wait()
                waiter: Waiter = await self.call_in_runner(begin)
                await waiter.done.wait()
                if waiter.result is None:
                    raise ApiError(ErrorCode.UNAVAILABLE, "the node left before the join ended")
                return dict(waiter.result)
        # A started waiter stays queued, so later JoinDones still pair up in order.
        raise ApiError(ErrorCode.UNAVAILABLE, "join did not finish in time")

    async def _leave(self) -> dict[str, Any]:
        def begin() -> Waiter:
            waiter = Waiter("leave")
            if self._left:
                waiter.done.set()
                return waiter
            self._leave_waiters.append(waiter)
            self._begin_leave()
            return waiter

        waiter: Waiter = await self.call_in_runner(begin)
        await waiter.done.wait()
        return {}

    def watch(
        self, conn: object, topics: Sequence[str], snapshot: bool = False
    ) -> trio.abc.ReceiveChannel[EventItem]:
        """Start a watch; events are queued without waiting (see :class:`Watch`).

        With ``snapshot``, the stream starts with the current state of each
        topic (in the order given), each topic's closed by a ``snapshot_end``
        event. The state is read and the watch registered in this one
        synchronous step, between two turns of the runner: one consistent
        cut, every later change arrives as an event, none is missed or
        reported twice."""
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:
            raise ApiError(
                ErrorCode.BAD_ARGS,
                f"unknown topic {unknown[0]!r} (known: {', '.join(sorted(TOPICS))})",
            )
        if self._finished:
            raise ApiError(ErrorCode.UNAVAILABLE, "the daemon is shutting down")
        readable = self._readable(conn)
        first = snapshot_cut(self.node, topics, readable) if snapshot else None
        send, receive = trio.open_memory_channel[EventItem](self.watcher_buffer)
        self._watches.append(Watch(conn, frozenset(topics), send, readable))
        return receive if first is None else SnapshotThenLive(first, receive)

    def holds_state(self, conn: object) -> bool:
        """The connection owns registry entries or sent messages (replies must
        find it): the API server's idle timeout spares it."""
        return getattr(conn, "id", None) in self._reg_conns

    def connection_closed(self, conn: object) -> None:
        keep = []
        for w in self._watches:
            if w.conn is conn:
                w.send.close()
            else:
                keep.append(w)
        self._watches = keep
        conn_id = getattr(conn, "id", None)
        if conn_id is not None and self._reg_conns.pop(conn_id, None) is not None:
            # Its entries go cluster-wide. Must not block: if the input
            # channel is full, the loop takes it at its next turn (a command
            # of this connection still queued sees it closed and is refused).
            try:
                self.send_channel.send_nowait(ConnClosed(conn_id))
            except trio.WouldBlock:
                self.counters["conn_closed_deferred"] += 1
                self._deferred.append(ConnClosed(conn_id))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the runner is gone; so are the entries
