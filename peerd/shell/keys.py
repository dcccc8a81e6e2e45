"""The keyring as the API and peers see it: keys.* ops, ids, the cluster-wide form.

The seal :class:`Keyring` does not hand out its key bytes, so
:class:`KeyManager` mirrors the list (primary first) to write it back to
``<state-dir>/keyring`` after every change over the API or from a peer.

Safety rules (a key change must never cut a node off its cluster):

- ``install`` on a node without keys (plaintext) would make the key primary:
  the node would seal what its peers, all plaintext, reject, and reject what
  they send. Refused unless ``force`` (a peer's request is never forced).
- ``use``/``remove`` accept a key or a key id (a hex prefix of the id that
  ``keys list`` shows): an unknown or ambiguous id is an error.
- ``--cluster`` (:func:`cluster_op`): first ask every live member for its
  keyring (KeyRequest QUERY, over the sealed push-pull stream transport),
  refuse before changing anything when the change would cut one off
  (``use K`` while a member lacks K or did not answer; ``remove K`` while a
  member seals with K; any op on a plaintext cluster), then apply it on every
  member and on this node and report per node.
"""

from __future__ import annotations

import builtins
import string
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerd.api.protocol import ApiError, ErrorCode
from peerd.shell.logs import Logger
from peerd.shell.state import StateDir, StateError
from peerd.wire import codec
from peerd.wire.messages import Addr, KeyOp, KeyReply, KeyRequest, KeyStatus, NodeId
from peerd.wire.seal import (
    KEY_PREFIX,
    KeyFormatError,
    Keyring,
    KeyringError,
    format_key,
    key_id,
    load_key_file,
    parse_key,
)

_HEX = frozenset(string.hexdigits.lower())
_STATUS_TEXT = {
    KeyStatus.OK: "ok",
    KeyStatus.NOT_INSTALLED: "not_installed",
    KeyStatus.PRIMARY: "primary",
    KeyStatus.PLAINTEXT: "plaintext",
    KeyStatus.FAILED: "failed",
}


def plaintext_refusal(kid: str) -> str:
    return (
        f"this node runs without keys (plaintext): installing key {kid} would make it "
        "the primary at once, and peers that run without keys reject sealed packets, "
        "so this node would be cut off from its cluster. Move a cluster to keys by "
        "giving every node the key file and restarting them (README: moving a "
        "plaintext cluster to keys); --force installs anyway"
    )


class KeyManager:
    """The API's and the peers' view of the keyring, persisted to the state directory."""

    def __init__(
        self,
        keyring: Keyring,
        keys: Iterable[bytes],
        state: StateDir | None,
        logger: Logger,
        key_file: Path | None = None,
    ) -> None:
        self.keyring = keyring
        self._keys = list(keys)
        self.state = state
        self.logger = logger
        # The key file the settings name (updated on reload): `keys list`
        # compares it with the running keyring.
        self.key_file = key_file

    # --- reading ----------------------------------------------------------------

    def ids(self) -> tuple[bytes, tuple[bytes, ...]]:
        """(primary key id or b"", every key id), as a KeyReply carries them."""
        ids = tuple(key_id(k) for k in self._keys)
        return (ids[0] if ids else b""), ids

    def list(self, file_only: bool = False) -> builtins.list[dict[str, Any]]:
        """The installed keys, primary first; with a key file, where it differs:
        ``in_file``/``file_primary`` on each key, and with ``file_only`` the
        keys only in the file after them, as entries with ``installed: false``."""
        rows: list[dict[str, Any]] = [
            {"id": kid, "primary": primary, "installed": True}
            for kid, primary in self.keyring.list()
        ]
        file_keys = self._file_keys()
        if file_keys is None:
            return rows
        file_ids = [key_id(k).hex() for k in file_keys]
        for row in rows:
            row["in_file"] = row["id"] in file_ids
            row["file_primary"] = bool(file_ids) and row["id"] == file_ids[0]
        installed = {row["id"] for row in rows}
        for i, kid in enumerate(file_ids):
            if file_only and kid not in installed:
                rows.append(
                    {
                        "id": kid,
                        "primary": False,
                        "installed": False,
                        "in_file": True,
                        "file_primary": i == 0,
                    }
                )
        return rows

    def _file_keys(self) -> builtins.list[bytes] | None:
        if self.key_file is None:
            return None
        try:
            return load_key_file(self.key_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, KeyFormatError) as e:
            self.logger.warning(
                "keys list: cannot read the key file", file=str(self.key_file), error=str(e)
            )
            return None

    # --- naming a key ------------------------------------------------------------

    def resolve(self, text: str, *, need_key: bool = False) -> bytes:
        """The key ``text`` names: the key itself, or (unless ``need_key``)
        a hex prefix of an installed key's id."""
        text = text.strip()
        if text.startswith(KEY_PREFIX) or need_key:
            try:
                return bytes(parse_key(text))
            except KeyFormatError as e:
                hint = ""
                if need_key and _is_id(text):
                    hint = " (install needs the key itself: an id cannot be turned into a key)"
                raise ApiError(ErrorCode.BAD_ARGS, f"{e}{hint}") from None
        if not _is_id(text):
            raise ApiError(
                ErrorCode.BAD_ARGS,
                f"expected a key ({KEY_PREFIX}...) or a key id (hex, as `peerd keys list` "
                f"shows it), got {text[:12]!r}",
            )
        prefix = text.lower()
        matches = [k for k in self._keys if key_id(k).hex().startswith(prefix)]
        if not matches:
            raise ApiError(
                ErrorCode.NOT_FOUND, f"no installed key has an id starting with {prefix!r}"
            )
        if len(matches) > 1:
            ids = ", ".join(key_id(k).hex() for k in matches)
            raise ApiError(
                ErrorCode.BAD_ARGS,
                f"key id {prefix!r} is ambiguous: it matches {ids}; give more digits",
            )
        return matches[0]

    # --- changing (API) -----------------------------------------------------------

    def install(self, text: str, force: bool = False) -> dict[str, Any]:
        key = self.resolve(text, need_key=True)
        if self.keyring.insecure and not force:
            raise ApiError(ErrorCode.CONFLICT, plaintext_refusal(key_id(key).hex()))
        try:
            added = self.keyring.install(key)
        except KeyringError as e:
            raise ApiError(ErrorCode.CONFLICT, str(e)) from None
        if added:
            self._keys.append(key)
            self._persist()
            self.logger.info("key installed", key_id=key_id(key).hex())
        return {}

    def use(self, text: str) -> dict[str, Any]:
        key = self.resolve(text)
        if key not in self._keys:
            raise ApiError(ErrorCode.NOT_FOUND, f"key {key_id(key).hex()} is not installed")
        try:
            self.keyring.use(key)
        except KeyringError as e:
            raise ApiError(ErrorCode.CONFLICT, str(e)) from None
        self._keys = [key, *(k for k in self._keys if k != key)]
        self._persist()
        self.logger.info("primary key changed", key_id=key_id(key).hex())
        return {}

    def remove(self, text: str) -> dict[str, Any]:
        key = self.resolve(text)
        if key not in self._keys:
            raise ApiError(ErrorCode.NOT_FOUND, f"key {key_id(key).hex()} is not installed")
        try:
            self.keyring.remove(key)
        except KeyringError as e:
            raise ApiError(ErrorCode.CONFLICT, str(e)) from None
        self._keys = [k for k in self._keys if k != key]
        self._persist()
        self.logger.info("key removed", key_id=key_id(key).hex())
        return {}

    def replace(self, keys: Sequence[bytes]) -> bool:
        """Take ``keys`` (primary first) as the whole keyring: a reload.

        Not persisted: the keys came from disk (the key file or the saved
        keyring). Returns False when nothing changed. Raises KeyringError
        (nothing changed then).
        """
        keys = list(keys)
        if keys == self._keys:
            return False
        self.keyring.replace_all(keys)
        old = self._keys
        self._keys = keys
        self.logger.info(
            "keyring reloaded",
            keys=len(keys),
            primary=key_id(keys[0]).hex() if keys else "none (plaintext)",
            added=",".join(key_id(k).hex() for k in keys if k not in old) or "-",
            removed=",".join(key_id(k).hex() for k in old if k not in keys) or "-",
        )
        return True

    # --- changing (a peer's KeyRequest) ------------------------------------------------

    def on_request(self, req: KeyRequest, peer: str) -> KeyReply:
        """Apply a peer's request (never forced) and answer with the keyring after it."""
        status, message = KeyStatus.OK, ""
        if req.op is not KeyOp.QUERY:
            kid = (key_id(req.key) if req.op is KeyOp.INSTALL else req.key).hex()
            try:
                match req.op:
                    case KeyOp.INSTALL:
                        self.install(format_key(req.key))
                    case KeyOp.USE:
                        self.use(kid)
                    case KeyOp.REMOVE:
                        if any(key_id(k).hex() == kid for k in self._keys):
                            self.remove(kid)
            except ApiError as e:
                status, message = _status_of(req.op, e), e.message
            if status is KeyStatus.OK:
                self.logger.info(
                    "keyring changed by a peer", op=req.op.name.lower(), key_id=kid, peer=peer
                )
        primary, ids = self.ids()
        return KeyReply(status, primary, ids, message[:400])

    def _persist(self) -> None:
        if self.state is None:
            return
        text = (
            "# peerd keyring: written by the daemon on keys.install/use/remove.\n"
            "# The first key is the primary. This file overrides --key-file.\n"
            + "".join(format_key(k) + "\n" for k in self._keys)
        )
        try:
            self.state.save_keyring_text(text)
        except StateError as e:
            # The change is live; failing to persist must be loud, not fatal.
            self.logger.error("keyring not persisted", error=str(e))
            raise ApiError(ErrorCode.INTERNAL, f"key changed but not persisted: {e}") from None


def _is_id(text: str) -> bool:
    return 0 < len(text) <= 8 and set(text.lower()) <= _HEX


def _status_of(op: KeyOp, e: ApiError) -> KeyStatus:
    if op is KeyOp.INSTALL and e.code == ErrorCode.CONFLICT and "plaintext" in e.message:
        return KeyStatus.PLAINTEXT
    if op is KeyOp.USE and e.code == ErrorCode.NOT_FOUND:
        return KeyStatus.NOT_INSTALLED
    if op is KeyOp.REMOVE and e.code == ErrorCode.CONFLICT:
        return KeyStatus.PRIMARY
    return KeyStatus.FAILED


# --- the cluster-wide form ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    node: NodeId
    name: str
    addr: Addr


# (address, request bytes) -> reply bytes, or a failure reason (text).
Requester = Callable[[Addr, bytes], Awaitable[bytes | str]]


def _node_row(t: Target, addr: str) -> dict[str, Any]:
    return {"name": t.name, "id": t.node.hex(), "addr": addr}


async def _ask(request: Requester, t: Target, req: KeyRequest) -> KeyReply | str:
    out = await request(t.addr, codec.encode(req))
    if isinstance(out, str):
        return out
    try:
        msg = codec.decode(out)
    except codec.DecodeError as e:
        return f"bad reply: {e.reason}"
    if not isinstance(msg, KeyReply):
        return "bad reply: not a key-reply (an older peerd?)"
    return msg


async def cluster_op(
    op: KeyOp,
    key: bytes,
    local: KeyManager,
    me: Target,
    peers: Sequence[Target],
    request: Requester,
    format_addr: Callable[[Addr], str],
    call_local: Callable[[Callable[[], Any]], Awaitable[Any]],
) -> dict[str, Any]:
    """Check, then apply ``op`` on every member; raises ApiError (conflict)
    before changing anything when a member would be cut off."""
    import trio

    kid = key_id(key) if op is KeyOp.INSTALL else key
    kid_hex = kid.hex()
    local_primary, local_ids = await call_local(local.ids)
    if not local_primary:
        raise ApiError(
            ErrorCode.CONFLICT,
            "this cluster runs without keys (plaintext): --cluster changes need a keyed "
            "cluster. Move a cluster to keys by giving every node the key file and "
            "restarting them (README: moving a plaintext cluster to keys)",
        )
    # 1. Ask everyone (in parallel) for their keyring.
    seen: dict[NodeId, KeyReply | str] = {}

    async def query(t: Target) -> None:
        seen[t.node] = await _ask(request, t, KeyRequest(KeyOp.QUERY, b""))

    async with trio.open_nursery() as nursery:
        for t in peers:
            nursery.start_soon(query, t)
    problems: list[str] = []
    for t in peers:
        r = seen[t.node]
        who = f"{t.name} ({format_addr(t.addr)})"
        if isinstance(r, str):
            if op is not KeyOp.INSTALL:
                problems.append(f"{who} did not answer ({r}): it might be cut off")
            continue
        if not r.primary:
            problems.append(f"{who} runs without keys (plaintext)")
        elif op is KeyOp.USE and kid not in r.keys:
            problems.append(f"{who} does not have key {kid_hex}")
        elif op is KeyOp.REMOVE and r.primary == kid:
            problems.append(f"{who} seals with key {kid_hex} (its primary)")
    if op is KeyOp.USE and kid not in local_ids:
        problems.append(f"this node does not have key {kid_hex}")
    if op is KeyOp.REMOVE and local_primary == kid:
        problems.append(f"this node seals with key {kid_hex} (its primary)")
    if problems:
        fix = {
            KeyOp.USE: "install it everywhere first (peerd keys install KEY --cluster)",
            KeyOp.REMOVE: "make another key primary everywhere first "
            "(peerd keys use OTHER --cluster)",
            KeyOp.INSTALL: "",
        }[op]
        raise ApiError(
            ErrorCode.CONFLICT,
            f"refused, nothing changed: {op.name.lower()} {kid_hex} would cut off a member: "
            + "; ".join(problems)
            + (f". {fix}" if fix else ""),
        )
    # 2. Apply everywhere; this node last (its answer does not depend on it).
    req = KeyRequest(op, key)
    done: dict[NodeId, KeyReply | str] = {}

    async def apply(t: Target) -> None:
        done[t.node] = await _ask(request, t, req)

    async with trio.open_nursery() as nursery:
        for t in peers:
            if not isinstance(seen[t.node], str):
                nursery.start_soon(apply, t)
    local_reply: KeyReply = await call_local(lambda: local.on_request(req, "this node"))
    rows = [_reply_row(me, format_addr(me.addr), local_reply)]
    for t in peers:
        rows.append(_reply_row(t, format_addr(t.addr), done.get(t.node, seen[t.node])))
    failed = sum(1 for r in rows if not r["ok"])
    return {"nodes": rows, "ok": len(rows) - failed, "failed": failed}


def _reply_row(t: Target, addr: str, r: KeyReply | str) -> dict[str, Any]:
    row = _node_row(t, addr)
    if isinstance(r, str):
        row.update(ok=False, status="unreachable", message=r)
        return row
    row.update(
        ok=r.status is KeyStatus.OK,
        status=_STATUS_TEXT[r.status],
        primary=r.primary.hex() if r.primary else None,
        keys=[k.hex() for k in r.keys],
    )
    if r.message:
        row["message"] = r.message
    return row
