"""Sealing: authenticated encryption of every packet, with a keyring.

Why: gossip is trusted blindly by every node (an ``alive`` or ``dead``
message changes cluster state), so a node must only act on packets from
holders of the cluster key, and must not act twice on a captured packet
replayed later. Sealing gives confidentiality, integrity, sender identity
(as far as the key is shared: any key holder can claim any sender id) and
replay protection, with no handshake, so it fits datagrams.

Envelope (normative: proto/wire.cddl, proto/vectors/seal.json)::

    sealed (version 0x01), 61 bytes of overhead:
      version u8 | key_id [4] | nonce [12] |
      ChaCha20-Poly1305(key, nonce, aad = version|key_id|nonce,
                        sender_id [16] | epoch u32 | counter u64 | payload) + tag [16]

    plaintext (version 0x02, no keys configured), 33 bytes of overhead:
      version u8 | 00000000 | sender_id [16] | epoch u32 | counter u64 | payload

Integers are big-endian. The key id is the first 4 bytes of
SHA-256("peerd key id v1" 0x00 | key): it only selects a key, the tag
authenticates. The two versions never mix: a keyed node rejects plaintext
(``plaintext_rejected``) and a keyless node rejects sealed packets
(``encrypted_rejected``), so a misconfigured node is seen in counters, not
silently half-trusted.

Replay protection (as in IPsec ESP / WireGuard): the sender numbers sealed
messages with ``counter`` within its ``epoch``; the daemon uses a generation
counter that grows on every start as the epoch, so a restarted peer is accepted
at once without any shared clock. Per sender the opener keeps the highest epoch
and a sliding bitmap of the last ``window`` counters of that epoch.

Key text format: ``peerd1:`` followed by the standard base64 (with padding)
of the 32 key bytes, e.g. ``peerd1:AAAA...AAA=`` (51 characters).

Everything here is pure: no sockets and no clocks; randomness (nonces, new
keys) comes from an injectable ``nonce_source`` / ``random_source`` that
defaults to :func:`secrets.token_bytes` (the OS's CSPRNG).
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "COUNTER_MAX",
    "EPOCH_MAX",
    "KEY_BYTES",
    "KEY_ID_BYTES",
    "KEY_PREFIX",
    "NONCE_BYTES",
    "PLAIN_OVERHEAD",
    "SEALED_OVERHEAD",
    "SENDER_ID_BYTES",
    "SEAL_REASONS",
    "VERSION_PLAIN",
    "VERSION_SEALED",
    "KeyFormatError",
    "Keyring",
    "KeyringError",
    "Opener",
    "SealError",
    "Sealer",
    "format_key",
    "generate_key",
    "key_id",
    "load_key_file",
    "parse_key",
    "seal_overhead",
]

RandomSource = Callable[[int], bytes]

KEY_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
SENDER_ID_BYTES = 16
EPOCH_MAX = 2**32 - 1
COUNTER_MAX = 2**64 - 1
KEY_PREFIX = "peerd1:"

VERSION_SEALED = 0x01
VERSION_PLAIN = 0x02

_KEY_ID_DOMAIN = b"peerd key id v1\x00"
_NO_KEY_ID = bytes(KEY_ID_BYTES)
_HEADER_SEALED = 1 + KEY_ID_BYTES + NONCE_BYTES  # authenticated as associated data
_HEADER_PLAIN = 1 + KEY_ID_BYTES
_INNER = struct.Struct(">16sIQ")  # sender_id, epoch, counter
assert _INNER.size == SENDER_ID_BYTES + 4 + 8

SEALED_OVERHEAD = _HEADER_SEALED + _INNER.size + TAG_BYTES  # 61
PLAIN_OVERHEAD = _HEADER_PLAIN + _INNER.size  # 33

#: Every ``SealError.reason`` that :meth:`Opener.open` can produce.
SEAL_REASONS = (
    "too_large",
    "malformed",
    "plaintext_rejected",
    "encrypted_rejected",
    "unknown_key",
    "auth_failed",
    "replay",
)


class KeyFormatError(ValueError):
    """A key in text form (command line, key file) is not a valid key."""


class KeyringError(ValueError):
    """A keyring operation that would leave the keyring unusable or ambiguous."""


class SealError(ValueError):
    """An envelope was rejected. ``reason`` is one of :data:`SEAL_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- keys -------------------------------------------------------------------


def key_id(key: bytes) -> bytes:
    """The 4-byte id sent in the clear to select ``key`` (not secret, not unique)."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key).digest()[:KEY_ID_BYTES]


def format_key(key: bytes) -> str:
    """``key`` as one line of text (the inverse of :func:`parse_key`)."""
    _check_key(key)
    return KEY_PREFIX + base64.b64encode(key).decode("ascii")


def generate_key(random_source: RandomSource = secrets.token_bytes) -> str:
    """A new random key in text form."""
    return format_key(random_source(KEY_BYTES))


def parse_key(text: str) -> bytes:
    """The key bytes of a key in text form; raises :class:`KeyFormatError`.

    Surrounding whitespace is ignored. Error messages never echo the key.
    """
    s = text.strip()
    if not s.startswith(KEY_PREFIX):
        hint = ""
        if _b64_len(s) == KEY_BYTES:
            hint = f" (it looks like bare base64: add the {KEY_PREFIX!r} prefix)"
        raise KeyFormatError(f"a key must start with {KEY_PREFIX!r}{hint}")
    body = s[len(KEY_PREFIX) :]
    try:
        key = base64.b64decode(body.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise KeyFormatError(
            f"the text after {KEY_PREFIX!r} is not valid base64 (standard alphabet, with padding)"
        ) from None
    if len(key) != KEY_BYTES:
        raise KeyFormatError(f"a key must be {KEY_BYTES} bytes, this one is {len(key)}")
    return key


def _b64_len(s: str) -> int:
    try:
        return len(base64.b64decode(s.encode("ascii"), validate=True))
    except (UnicodeEncodeError, binascii.Error):
        return -1


def load_key_file(text: str) -> list[bytes]:
    """Keys from a key file: one per line, the first is the primary.

    Blank lines are skipped and ``#`` starts a comment (base64 has no ``#``).
    Raises :class:`KeyFormatError` naming the line. A file with no key gives
    an empty list: whether that means plaintext mode or an error is the
    caller's decision.
    """
    keys: list[bytes] = []
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            key = parse_key(content)
        except KeyFormatError as exc:
            raise KeyFormatError(f"line {lineno}: {exc}") from None
        if key in seen:
            raise KeyFormatError(f"line {lineno}: same key as line {seen[key]}")
        kid = key_id(key)
        for other, other_line in seen.items():
            if key_id(other) == kid:
                raise KeyFormatError(
                    f"line {lineno}: key id {kid.hex()} collides with the key on line "
                    f"{other_line}; generate another key"
                )
        seen[key] = lineno
        keys.append(key)
    return keys


def _check_key(key: bytes) -> None:
    if type(key) is not bytes or len(key) != KEY_BYTES:
        raise KeyringError(f"a key must be {KEY_BYTES} bytes")


# --- keyring ----------------------------------------------------------------


class Keyring:
    """The keys this node accepts; the first (primary) is the one it seals with.

    With no keys the node runs in plaintext mode (:attr:`insecure`). One
    keyring is shared by a :class:`Sealer` and an :class:`Opener`, so every
    change takes effect on the next packet. Rotation without losing packets:
    ``install`` the new key everywhere, then ``use`` it everywhere, then
    ``remove`` the old one everywhere.
    """

    __slots__ = ("_keys", "_ids", "_ciphers", "_primary")

    def __init__(self, keys: Iterable[bytes] | None = None) -> None:
        self._keys: builtins.list[bytes] = []
        self._ids: builtins.list[bytes] = []
        # key id -> AEAD object, built once per key (it holds the key schedule).
        self._ciphers: dict[bytes, ChaCha20Poly1305] = {}
        self._primary: tuple[bytes, ChaCha20Poly1305] | None = None
        self.replace_all(list(keys) if keys is not None else [])

    @property
    def primary(self) -> bytes | None:
        return self._keys[0] if self._keys else None

    @property
    def insecure(self) -> bool:
        """True when there are no keys: packets are sent and accepted unencrypted."""
        return not self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def install(self, key: bytes) -> bool:
        """Accept ``key`` too. Returns False if it was already installed.

        The first key installed in an empty keyring becomes the primary, which
        switches the node from plaintext to sealed mode.
        """
        _check_key(key)
        if key in self._keys:
            return False
        self._rebuild([*self._keys, key])
        return True

    def use(self, key: bytes) -> None:
        """Seal with ``key`` from now on; it must be installed."""
        _check_key(key)
        if key not in self._keys:
            raise KeyringError(f"key {key_id(key).hex()} is not installed")
        self._rebuild([key, *(k for k in self._keys if k != key)])

    def remove(self, key: bytes) -> bool:
        """Stop accepting ``key``. Returns False if it was not installed.

        The primary cannot be removed: ``use`` another key first.
        """
        _check_key(key)
        if key not in self._keys:
            return False
        if key == self._keys[0]:
            raise KeyringError(
                f"key {self._ids[0].hex()} is the primary key: use another key before removing it"
            )
        self._rebuild([k for k in self._keys if k != key])
        return True

    def list(self) -> builtins.list[tuple[str, bool]]:
        """``(key id hex, is_primary)`` for every key, primary first."""
        return [(kid.hex(), i == 0) for i, kid in enumerate(self._ids)]

    def replace_all(self, keys: Iterable[bytes]) -> None:
        """Replace every key at once (a reload); the first is the primary.

        An empty list switches to plaintext mode. Nothing changes on error.
        """
        new = list(keys)
        for k in new:
            _check_key(k)
        if len(set(new)) != len(new):
            raise KeyringError("the same key is listed twice")
        self._rebuild(new)

    def _rebuild(self, keys: builtins.list[bytes]) -> None:
        # Reuse the AEAD objects of keys we keep: building one costs a key schedule.
        reusable = {
            k: (kid, self._ciphers[kid]) for k, kid in zip(self._keys, self._ids, strict=True)
        }
        ids: builtins.list[bytes] = []
        ciphers: dict[bytes, ChaCha20Poly1305] = {}
        for k in keys:
            kid, cipher = reusable.get(k) or (key_id(k), ChaCha20Poly1305(k))
            if kid in ciphers:
                raise KeyringError(f"two keys share the key id {kid.hex()}; generate another key")
            ids.append(kid)
            ciphers[kid] = cipher
        self._keys, self._ids, self._ciphers = keys, ids, ciphers
        self._primary = (ids[0], ciphers[ids[0]]) if keys else None

    def _cipher(self, kid: bytes) -> ChaCha20Poly1305 | None:
        return self._ciphers.get(kid)

    def __repr__(self) -> str:  # never shows key material
        return f"Keyring({self.list()!r})"


def seal_overhead(keyring: Keyring) -> int:
    """Bytes :meth:`Sealer.seal` adds to a payload with this keyring right now."""
    return PLAIN_OVERHEAD if keyring.insecure else SEALED_OVERHEAD


# --- sealing ----------------------------------------------------------------


class Sealer:
    """Seals outgoing payloads as ``sender_id`` in ``epoch``.

    Use exactly one Sealer per (sender_id, epoch), shared by every transport:
    two sealers with the same pair would reuse counters and the receivers
    would drop the second copy of each counter as a replay. ``counter`` (the
    first counter to use) exists for test vectors; the daemon starts at 0 in
    a fresh epoch.
    """

    __slots__ = ("_keyring", "_prefix", "_counter", "_nonce_source", "sender_id", "epoch")

    def __init__(
        self,
        keyring: Keyring,
        sender_id: bytes,
        epoch: int,
        nonce_source: RandomSource = secrets.token_bytes,
        *,
        counter: int = 0,
    ) -> None:
        if type(sender_id) is not bytes or len(sender_id) != SENDER_ID_BYTES:
            raise ValueError(f"sender_id must be {SENDER_ID_BYTES} bytes")
        if type(epoch) is not int or not 0 <= epoch <= EPOCH_MAX:
            raise ValueError("epoch must be an unsigned 32-bit integer")
        if type(counter) is not int or not 0 <= counter <= COUNTER_MAX:
            raise ValueError("counter must be an unsigned 64-bit integer")
        self._keyring = keyring
        self.sender_id = sender_id
        self.epoch = epoch
        self._prefix = sender_id + epoch.to_bytes(4, "big")
        self._counter = counter
        self._nonce_source = nonce_source

    @property
    def counter(self) -> int:
        """The counter the next sealed message will carry."""
        return self._counter

    def seal(self, payload: bytes) -> bytes:
        """The envelope for ``payload`` (sealed with the primary key, or plaintext)."""
        counter = self._counter
        if counter > COUNTER_MAX:
            raise OverflowError("message counter exhausted: start a new epoch")
        self._counter = counter + 1
        inner = self._prefix + counter.to_bytes(8, "big") + payload
        primary = self._keyring._primary
        if primary is None:
            return bytes((VERSION_PLAIN,)) + _NO_KEY_ID + inner
        kid, cipher = primary
        nonce = self._nonce_source(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce source returned {len(nonce)} bytes, not {NONCE_BYTES}")
        header = bytes((VERSION_SEALED,)) + kid + nonce
        return header + cipher.encrypt(nonce, inner, header)


# --- opening ----------------------------------------------------------------


class _ReplayState:
    """Anti-replay state of one sender: epoch, highest counter, and a bitmap
    whose bit i says whether counter ``top - i`` has been accepted."""

    __slots__ = ("epoch", "top", "bitmap")

    def __init__(self, epoch: int, counter: int) -> None:
        self.epoch = epoch
        self.top = counter
        self.bitmap = 1


class Opener:
    """Opens incoming envelopes: checks size, mode, key, tag, then replay.

    ``window`` is how far out of order (in messages) a packet may arrive and
    still be accepted. The per-sender table keeps at most ``max_senders``
    entries, dropping the least recently heard sender: a dropped sender's
    next packet starts a fresh window, so an old packet of it could be
    replayed once. Only authenticated packets create entries, so with keys an
    outsider cannot force evictions.
    """

    __slots__ = ("_keyring", "_window", "_mask", "_max_senders", "_max_size", "_senders")

    def __init__(
        self,
        keyring: Keyring,
        window: int = 1024,
        max_senders: int = 4096,
        max_size: int = 65536,
    ) -> None:
        if window < 1 or max_senders < 1 or max_size < 1:
            raise ValueError("window, max_senders and max_size must be positive")
        self._keyring = keyring
        self._window = window
        self._mask = (1 << window) - 1
        self._max_senders = max_senders
        self._max_size = max_size
        self._senders: OrderedDict[bytes, _ReplayState] = OrderedDict()

    def open(self, data: bytes) -> tuple[bytes, bytes]:
        """``(sender_id, payload)`` of an envelope, or :class:`SealError`."""
        n = len(data)
        if n > self._max_size:
            raise SealError("too_large", f"{n} bytes > {self._max_size}")
        if n == 0:
            raise SealError("malformed", "empty")
        version = data[0]
        if version == VERSION_SEALED:
            if self._keyring._primary is None:
                raise SealError("encrypted_rejected", "sealed packet but no keys configured")
            if n < SEALED_OVERHEAD:
                raise SealError("malformed", "shorter than a sealed envelope")
            kid = bytes(data[1 : _HEADER_SEALED - NONCE_BYTES])
            cipher = self._keyring._cipher(kid)
            if cipher is None:
                raise SealError("unknown_key", f"key id {kid.hex()}")
            header = bytes(data[:_HEADER_SEALED])
            try:
                inner = cipher.decrypt(header[1 + KEY_ID_BYTES :], data[_HEADER_SEALED:], header)
            except InvalidTag:
                raise SealError("auth_failed") from None
        elif version == VERSION_PLAIN:
            if self._keyring._primary is not None:
                raise SealError("plaintext_rejected", "plaintext packet but keys are configured")
            if n < PLAIN_OVERHEAD:
                raise SealError("malformed", "shorter than a plaintext envelope")
            if data[1:_HEADER_PLAIN] != _NO_KEY_ID:
                raise SealError("malformed", "plaintext envelope with a key id")
            inner = bytes(data[_HEADER_PLAIN:])
        else:
            raise SealError("malformed", f"unknown version {version}")
        sender, epoch, counter = _INNER.unpack_from(inner)
        self._check_replay(sender, epoch, counter)
        return sender, inner[_INNER.size :]

    def _check_replay(self, sender: bytes, epoch: int, counter: int) -> None:
        senders = self._senders
        st = senders.get(sender)
        if st is None:
            senders[sender] = _ReplayState(epoch, counter)
            if len(senders) > self._max_senders:
                senders.popitem(last=False)
            return
        if epoch != st.epoch:
            if epoch < st.epoch:
                raise SealError("replay", f"epoch {epoch} < {st.epoch}")
            st.epoch, st.top, st.bitmap = epoch, counter, 1  # the sender restarted
        elif counter > st.top:
            shift = counter - st.top
            st.bitmap = 1 if shift >= self._window else ((st.bitmap << shift) | 1) & self._mask
            st.top = counter
        else:
            back = st.top - counter
            if back >= self._window:
                raise SealError("replay", f"counter {counter} older than the window")
            bit = 1 << back
            if st.bitmap & bit:
                raise SealError("replay", f"counter {counter} already seen")
            st.bitmap |= bit
        senders.move_to_end(sender)

    def forget(self, sender_id: bytes) -> None:
        """Drop the replay state of a sender (e.g. when it is removed for good)."""
        self._senders.pop(sender_id, None)

    def __len__(self) -> int:
        """Number of senders with replay state."""
        return len(self._senders)
