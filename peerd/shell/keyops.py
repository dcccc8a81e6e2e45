"""Key operations: the API's ``keys.*`` ops and peers' KeyRequests.

Keys changed over the API (keys.install/use/remove) apply at once (the sealer
and opener share the keyring) and are written to ``<state-dir>/keyring``;
at the next start that file, when present, is the keyring and ``--key-file``
is only used while it does not exist (like Serf's keyring file). With
``cluster: true`` they act on every live member: peers' KeyRequests arrive
as stream requests that the runner answers itself (peerd.shell.keys), so
the core never sees them: the keyring belongs to the shell, which seals and
opens packets, not to the protocol. This mixin of
:class:`peerd.shell.runner.Runner` holds that glue; the keyring and the
cluster-wide procedure are :mod:`peerd.shell.keys`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peerd.api.protocol import (
    ApiError,
    ErrorCode,
    format_addr,
)
from peerd.shell.keys import KeyManager, Target, cluster_op
from peerd.shell.ports import NodeLike, StreamPort
from peerd.wire import codec
from peerd.wire.codec import DecodeError
from peerd.wire.messages import (
    Addr,
    KeyOp,
    KeyRequest,
    Status,
)
from peerd.wire.seal import key_id


class KeyOps:
    """Key glue of the Runner: cluster-wide key ops and peers' KeyRequests."""

    # Provided by Runner (peerd.shell.runner), which this is a mixin of.
    node: NodeLike
    keys: KeyManager | None
    streams: StreamPort
    counters: collections.Counter[str]

    if TYPE_CHECKING:

        async def call_in_runner(self, fn: Callable[[], Any]) -> Any: ...

    async def _keys_cluster(self, op: str, text: str) -> dict[str, Any]:
        """keys.install/use/remove with ``cluster``: see peerd.shell.keys.cluster_op."""
        keys = self._keys()
        request = getattr(self.streams, "request", None)
        if request is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon cannot reach its peers")
        kop = {"keys.install": KeyOp.INSTALL, "keys.use": KeyOp.USE}.get(op, KeyOp.REMOVE)

        def targets() -> tuple[bytes, Target, list[Target]]:
            if kop is KeyOp.INSTALL:
                key = keys.resolve(text, need_key=True)
            else:
                try:
                    key = key_id(keys.resolve(text))
                except ApiError:
                    # remove/use of a key this node lacks: a full id still names it.
                    if len(text) != 8:
                        raise
                    key = bytes.fromhex(text)
            me = self.node.local_member()
            peers = [
                Target(m.node, m.name, m.addr)
                for m in self.node.members()
                if m.node != me.node and m.status in (Status.ALIVE, Status.SUSPECT)
            ]
            return key, Target(me.node, me.name, me.addr), peers

        key, me, peers = await self.call_in_runner(targets)
        return await cluster_op(
            kop, key, keys, me, peers, request, format_addr, self.call_in_runner
        )

    def _on_key_request(self, stream: int, src: Addr, data: bytes) -> None:
        """A peer's KeyRequest (peerd keys ... --cluster): answered here, in
        the shell that owns the keyring; the core never sees it."""
        try:
            msg = codec.decode(data)
        except DecodeError as e:
            self.counters[f"key_request_drop_{e.reason}"] += 1
            self.streams.reply(stream, None)
            return
        if self.keys is None or not isinstance(msg, KeyRequest):
            self.counters["key_request_drop_unexpected"] += 1
            self.streams.reply(stream, None)
            return
        self.counters["key_requests_in"] += 1
        reply = self.keys.on_request(msg, format_addr(src))
        self.streams.reply(stream, codec.encode(reply))

    def _keys(self) -> KeyManager:
        if self.keys is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "no keyring in this daemon")
        return self.keys
