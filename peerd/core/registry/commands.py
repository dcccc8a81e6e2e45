"""Registry commands from the API: register, unregister, update metadata,
and the end of a connection.

Every entry belongs to the API connection that made it: only that
connection may change it, and when the connection closes (its process
exited) its entries are removed cluster-wide. A name is refused at once
when a live claim to it is already known here; a claim made concurrently
elsewhere is resolved later, when both are known (the older claim wins, see
peerd.core.registry.base). Limits per connection and per daemon bound what
a local client can make every node in the cluster hold. A command answers
with one CommandResult: at once, or for wait=settled once every live member
acknowledged the write.
"""

from __future__ import annotations

from peerd.core.events import (
    CommandResult,
    ConnClosed,
    Register,
    Unregister,
    UpdateMeta,
)
from peerd.core.registry.base import Settle, entry_to_dict
from peerd.core.registry.spread import RegistrySpread
from peerd.core.timers import RegSettleTimeout
from peerd.wire import codec
from peerd.wire.messages import (
    RegKind,
)

# Limits on what one connection, and one daemon, may hold.
MAX_ENTRIES_PER_CONN = 10_000
MAX_LOCAL_ENTRIES = 200_000
MAX_META_BYTES = 1024


def meta_problem(meta: tuple[tuple[str, str], ...]) -> str | None:
    if len({k for k, _ in meta}) != len(meta):
        return "duplicate metadata key"
    if len(meta) > codec.MAX_TAGS:
        return f"at most {codec.MAX_TAGS} metadata keys"
    size = sum(len(k.encode()) + len(v.encode()) for k, v in meta)
    if size > MAX_META_BYTES:
        return f"metadata takes {size} bytes, at most {MAX_META_BYTES}"
    for k, v in meta:
        if not k or len(k.encode()) > codec.MAX_TAG_KEY_BYTES:
            return f"metadata keys are 1 to {codec.MAX_TAG_KEY_BYTES} bytes"
        if len(v.encode()) > codec.MAX_TAG_VALUE_BYTES:
            return f"metadata values are at most {codec.MAX_TAG_VALUE_BYTES} bytes"
    return None


def name_problem(scope: str, name: str) -> str | None:
    if not name:
        return "empty name"
    if len(name.encode()) > codec.MAX_REG_NAME_BYTES:
        return f"names are at most {codec.MAX_REG_NAME_BYTES} bytes"
    if not scope or len(scope.encode()) > codec.MAX_SCOPE_BYTES:
        return f"scopes are 1 to {codec.MAX_SCOPE_BYTES} bytes"
    return None


class RegistryCommands(RegistrySpread):
    """API commands on our own entries (see the module docstring)."""

    # --- API commands -------------------------------------------------------------

    def command(self, cmd: Register | Unregister | UpdateMeta | ConnClosed) -> None:
        match cmd:
            case Register():
                self._register(cmd)
            case Unregister():
                self._unregister(cmd)
            case UpdateMeta():
                self._update(cmd)
            case ConnClosed(conn):
                self.drop_conn(conn)

    def _register(self, cmd: Register) -> None:
        problem = name_problem(cmd.scope, cmd.name) or meta_problem(cmd.meta)
        if problem:
            self._fail(cmd.ref, "bad_args", problem)
            return
        owned = self._owned.setdefault(cmd.conn, {})
        key = (cmd.kind, cmd.scope, cmd.name)
        if key in owned:
            what = "name" if cmd.kind is RegKind.NAME else "group membership"
            self._fail(
                cmd.ref,
                "conflict",
                f"this connection already holds the {what} {cmd.scope}/{cmd.name}",
            )
            return
        if cmd.kind is RegKind.NAME:
            holder = self.state.lookup(cmd.scope, cmd.name)
            if holder is not None:
                self._fail(
                    cmd.ref,
                    "conflict",
                    f"{cmd.scope}/{cmd.name} is held by pid "
                    f"{holder.entry.pid} on node "
                    f"{holder.origin.hex()[:12]}",
                )
                return
        if len(owned) >= MAX_ENTRIES_PER_CONN or len(self._owner_of) >= MAX_LOCAL_ENTRIES:
            self._fail(cmd.ref, "unavailable", "too many registrations")
            return
        entry, delta = self.state.register(
            cmd.kind,
            cmd.scope,
            cmd.name,
            claimed_ms=cmd.claimed_ms,
            pid=cmd.pid,
            uid=cmd.uid,
            meta=cmd.meta,
        )
        owned[key] = entry.eid
        self._owner_of[entry.eid] = cmd.conn
        settle = cmd.settle_s is not None and self.members.live_peer_count() > 0
        self._spread(delta, ack=settle)
        result = entry_to_dict(self.node_id, entry)
        if settle:
            assert cmd.settle_s is not None
            self._settles[cmd.ref] = Settle(cmd.ref, entry.eid, delta.top)
            self._arm(RegSettleTimeout, cmd.settle_s, cmd.ref)
            return
        if cmd.settle_s is not None:
            result.update(settled=True, won=self._won(entry))
        self._out.append(CommandResult(cmd.ref, value=result))

    def _unregister(self, cmd: Unregister) -> None:
        eid = self._owned.get(cmd.conn, {}).get((cmd.kind, cmd.scope, cmd.name))
        if eid is None:
            what = "name" if cmd.kind is RegKind.NAME else "group membership"
            self._fail(
                cmd.ref, "not_found", f"this connection holds no {what} {cmd.scope}/{cmd.name}"
            )
            return
        self._remove_local(cmd.conn, eid)
        self._out.append(CommandResult(cmd.ref, value={}))

    def _update(self, cmd: UpdateMeta) -> None:
        problem = meta_problem(cmd.meta)
        if problem:
            self._fail(cmd.ref, "bad_args", problem)
            return
        eid = self._owned.get(cmd.conn, {}).get((cmd.kind, cmd.scope, cmd.name))
        if eid is None:
            self._fail(cmd.ref, "not_found", f"this connection holds no {cmd.scope}/{cmd.name}")
            return
        res = self.state.update_meta(eid, cmd.meta)
        assert res is not None
        self._spread(res[1])
        self._out.append(CommandResult(cmd.ref, value=entry_to_dict(self.node_id, res[0])))

    def drop_conn(self, conn: int) -> None:
        for eid in list(self._owned.get(conn, {}).values()):
            self._remove_local(conn, eid)
        self._owned.pop(conn, None)

    def _remove_local(self, conn: int, eid: int) -> None:
        entry = self.state.local.entries.get(eid)
        if entry is not None:
            self._owned.get(conn, {}).pop((entry.kind, entry.scope, entry.name), None)
        self._owner_of.pop(eid, None)
        self._notified = {mark for mark in self._notified if mark[0] != eid}
        delta = self.state.unregister(eid)
        if delta is not None:
            self._spread(delta)
        self._emit_changes()
