"""Sealing: key text, keyring, envelopes, every rejection reason, replay window."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.wire import seal
from peerd.wire.seal import (
    KeyFormatError,
    Keyring,
    KeyringError,
    Opener,
    Sealer,
    SealError,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K3 = bytes(range(64, 96))
A = b"A" * 16
B = b"B" * 16


def counting_nonces() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: next(counter).to_bytes(n, "big")


def reason(opener: Opener, data: bytes) -> str:
    with pytest.raises(SealError) as info:
        opener.open(data)
    return info.value.reason


# --- key text -------------------------------------------------------------------


def test_generate_key_uses_the_random_source_and_round_trips() -> None:
    text = seal.generate_key(lambda n: bytes([7]) * n)
    assert text == "peerd1:" + base64.b64encode(bytes([7]) * 32).decode()
    assert len(text) == 51
    assert seal.parse_key(text) == bytes([7]) * 32
    fresh = seal.generate_key()
    assert seal.parse_key(fresh) != seal.parse_key(seal.generate_key())


def test_format_and_parse_are_inverse() -> None:
    assert seal.parse_key(seal.format_key(K1)) == K1
    assert seal.parse_key("  " + seal.format_key(K1) + "\n") == K1
    with pytest.raises(KeyringError):
        seal.format_key(K1[:31])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must start with 'peerd1:'"),
        (base64.b64encode(K1).decode(), "add the 'peerd1:' prefix"),
        ("peerd2:" + base64.b64encode(K1).decode(), "must start with"),
        ("peerd1:" + base64.b64encode(K1).decode().rstrip("="), "not valid base64"),
        ("peerd1:" + base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not valid base64"),
        ("peerd1:" + base64.b64encode(K1[:16]).decode(), "must be 32 bytes, this one is 16"),
        ("peerd1:" + base64.b64encode(K1 + b"x").decode(), "this one is 33"),
        ("peerd1:ключ", "not valid base64"),
    ],
)
def test_parse_key_errors_are_clear_and_never_echo_the_key(text: str, fragment: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        seal.parse_key(text)
    msg = str(info.value)
    assert fragment in msg
    body = text.removeprefix("peerd1:").removeprefix("peerd2:")
    if len(body) > 8:
        assert body[:8] not in msg
    assert isinstance(info.value, ValueError)


def test_key_id_is_domain_separated_sha256_prefix() -> None:
    assert seal.key_id(K1) == hashlib.sha256(b"peerd key id v1\x00" + K1).digest()[:4]
    assert seal.key_id(K1) != seal.key_id(K2)
    assert seal.key_id(K1) != hashlib.sha256(K1).digest()[:4]


def test_load_key_file() -> None:
    text = "\n".join(
        [
            "# cluster keys, newest first",
            "",
            seal.format_key(K2) + "   # primary since March",
            "   " + seal.format_key(K1),
            "#" + seal.format_key(K3),
            "",
        ]
    )
    assert seal.load_key_file(text) == [K2, K1]
    assert seal.load_key_file("") == []
    assert seal.load_key_file("# nothing yet\n\n") == []


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (["# c", seal.format_key(K1), "peerd1:nope"], "line 3: "),
        (["", "", "oops"], "line 3: a key must start"),
        ([seal.format_key(K1), "", seal.format_key(K1)], "line 3: same key as line 1"),
    ],
)
def test_load_key_file_errors_name_the_line(lines: list[str], fragment: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        seal.load_key_file("\n".join(lines))
    assert fragment in str(info.value)


def test_load_key_file_rejects_key_id_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seal, "key_id", lambda key: b"\x00\x00\x00\x01")
    with pytest.raises(KeyFormatError, match="line 2: key id 00000001 collides .* line 1"):
        seal.load_key_file(seal.format_key(K1) + "\n" + seal.format_key(K2))


# --- keyring ----------------------------------------------------------------------------


def test_empty_keyring_is_insecure() -> None:
    for ring in (Keyring(), Keyring([]), Keyring(None)):
        assert ring.insecure
        assert ring.primary is None
        assert ring.list() == []
        assert seal.seal_overhead(ring) == seal.PLAIN_OVERHEAD == 33


def test_keyring_operations() -> None:
    ring = Keyring([K1, K2])
    assert not ring.insecure
    assert ring.primary == K1
    assert seal.seal_overhead(ring) == seal.SEALED_OVERHEAD == 61
    id1, id2, id3 = (seal.key_id(k).hex() for k in (K1, K2, K3))
    assert ring.list() == [(id1, True), (id2, False)]

    assert ring.install(K3) is True
    assert ring.install(K3) is False
    assert ring.list() == [(id1, True), (id2, False), (id3, False)]

    ring.use(K3)
    assert ring.primary == K3
    assert ring.list()[0] == (id3, True)
    assert ring.remove(K1) is True
    assert ring.remove(K1) is False
    assert K1 not in ring and K3 in ring and len(ring) == 2

    with pytest.raises(KeyringError, match="primary"):
        ring.remove(K3)
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(K1)

    ring.replace_all([K1])
    assert ring.list() == [(id1, True)]
    ring.replace_all([])
    assert ring.insecure


def test_first_key_installed_becomes_primary() -> None:
    ring = Keyring()
    ring.install(K2)
    assert ring.primary == K2 and not ring.insecure


@pytest.mark.parametrize("bad", [b"", K1[:31], K1 + b"x", bytearray(K1), "k" * 32])
def test_keyring_rejects_bad_keys(bad: object) -> None:
    ring = Keyring([K1])
    with pytest.raises(KeyringError):
        Keyring([bad])  # type: ignore[list-item]
    with pytest.raises(KeyringError):
        ring.install(bad)  # type: ignore[arg-type]
    with pytest.raises(KeyringError):
        ring.replace_all([K2, bad])  # type: ignore[list-item]
    assert ring.list() == [(seal.key_id(K1).hex(), True)]  # unchanged on error


def test_keyring_rejects_duplicates_and_id_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyringError, match="twice"):
        Keyring([K1, K1])
    monkeypatch.setattr(seal, "key_id", lambda key: b"\x00\x00\x00\x01")
    ring = Keyring([K1])
    with pytest.raises(KeyringError, match="share the key id"):
        ring.install(K2)
    with pytest.raises(KeyringError, match="share the key id"):
        Keyring([K1, K2])
    assert ring.list() == [("00000001", True)]


def test_keyring_repr_does_not_leak_keys() -> None:
    text = repr(Keyring([K1]))
    assert K1.hex() not in text and base64.b64encode(K1).decode() not in text


# --- sealing and opening ---------------------------------------------------------


def test_round_trip_and_layout() -> None:
    ring = Keyring([K1])
    sealer = Sealer(ring, A, 9, nonce_source=lambda n: b"\x05" * n)
    env = sealer.seal(b"payload")
    assert len(env) == len(b"payload") + seal.SEALED_OVERHEAD
    assert env[0] == seal.VERSION_SEALED
    assert env[1:5] == seal.key_id(K1)
    assert env[5:17] == b"\x05" * 12
    inner = ChaCha20Poly1305(K1).decrypt(env[5:17], env[17:], env[:17])
    assert inner == A + (9).to_bytes(4, "big") + (0).to_bytes(8, "big") + b"payload"
    assert Opener(ring).open(env) == (A, b"payload")
    assert sealer.counter == 1


def test_plaintext_round_trip_and_layout() -> None:
    ring = Keyring()
    env = Sealer(ring, A, 9).seal(b"payload")
    assert (
        env
        == bytes([seal.VERSION_PLAIN]) + bytes(4) + A + bytes([0, 0, 0, 9]) + bytes(8) + b"payload"
    )
    assert len(env) == len(b"payload") + seal.PLAIN_OVERHEAD
    assert Opener(ring).open(env) == (A, b"payload")


def test_counter_increments_and_nonces_come_from_the_source() -> None:
    ring = Keyring([K1])
    sealer = Sealer(ring, A, 1, nonce_source=counting_nonces())
    envs = [sealer.seal(b"x") for _ in range(3)]
    assert [e[5:17] for e in envs] == [i.to_bytes(12, "big") for i in range(3)]
    cipher = ChaCha20Poly1305(K1)
    counters = [int.from_bytes(cipher.decrypt(e[5:17], e[17:], e[:17])[20:28], "big") for e in envs]
    assert counters == [0, 1, 2]
    assert Sealer(ring, A, 1).seal(b"x")[5:17] != Sealer(ring, A, 1).seal(b"x")[5:17]


def test_sealer_validates_its_arguments() -> None:
    ring = Keyring([K1])
    with pytest.raises(ValueError):
        Sealer(ring, A[:15], 1)
    with pytest.raises(ValueError):
        Sealer(ring, A, -1)
    with pytest.raises(ValueError):
        Sealer(ring, A, 2**32)
    with pytest.raises(ValueError):
        Sealer(ring, A, 1, counter=2**64)
    with pytest.raises(ValueError, match="nonce source"):
        Sealer(ring, A, 1, nonce_source=lambda n: b"short").seal(b"")


def test_counter_exhaustion_is_an_error_not_a_wrap() -> None:
    sealer = Sealer(Keyring([K1]), A, 1, counter=seal.COUNTER_MAX)
    sealer.seal(b"last")
    with pytest.raises(OverflowError):
        sealer.seal(b"one too many")


def test_opener_validates_its_arguments() -> None:
    for kwargs in ({"window": 0}, {"max_senders": 0}, {"max_size": 0}):
        with pytest.raises(ValueError):
            Opener(Keyring(), **kwargs)


# --- every rejection reason --------------------------------------------------------


def test_too_large() -> None:
    ring = Keyring([K1])
    env = Sealer(ring, A, 1).seal(b"x" * 100)
    assert Opener(ring, max_size=len(env)).open(env) == (A, b"x" * 100)
    assert reason(Opener(ring, max_size=len(env) - 1), env) == "too_large"
    assert reason(Opener(ring), b"\x01" * 65537) == "too_large"


def test_malformed() -> None:
    keyed, plain = Keyring([K1]), Keyring()
    env = Sealer(keyed, A, 1).seal(b"")
    assert len(env) == seal.SEALED_OVERHEAD
    assert reason(Opener(keyed), b"") == "malformed"
    assert reason(Opener(keyed), env[:-1]) == "malformed"  # truncated
    assert reason(Opener(keyed), b"\x00" + env[1:]) == "malformed"  # unknown version
    assert reason(Opener(keyed), b"\x03" + env[1:]) == "malformed"
    penv = Sealer(plain, A, 1).seal(b"")
    assert reason(Opener(plain), penv[:-1]) == "malformed"
    assert reason(Opener(plain), penv[:1] + b"\x00\x00\x00\x01" + penv[5:]) == "malformed"


def test_modes_never_mix() -> None:
    keyed, plain = Keyring([K1]), Keyring()
    assert reason(Opener(keyed), Sealer(plain, A, 1).seal(b"hi")) == "plaintext_rejected"
    assert reason(Opener(plain), Sealer(keyed, A, 1).seal(b"hi")) == "encrypted_rejected"


def test_unknown_key() -> None:
    env = Sealer(Keyring([K1]), A, 1).seal(b"hi")
    assert reason(Opener(Keyring([K2])), env) == "unknown_key"
    assert reason(Opener(Keyring([K2, K3])), env) == "unknown_key"


def test_wrong_key_under_a_known_key_id_fails_authentication() -> None:
    env = Sealer(Keyring([K1]), A, 1).seal(b"hi")
    forged = env[:1] + seal.key_id(K2) + env[5:]
    assert reason(Opener(Keyring([K2])), forged) == "auth_failed"


@pytest.mark.parametrize("where", ["version", "key_id", "nonce", "ciphertext", "tag"])
def test_any_bit_flip_fails(where: str) -> None:
    ring = Keyring([K1, K2])
    env = bytearray(Sealer(ring, A, 1).seal(b"some payload"))
    index = {"version": 0, "key_id": 2, "nonce": 10, "ciphertext": 20, "tag": len(env) - 1}[where]
    env[index] ^= 0x01
    expected = {"version": "malformed", "key_id": "unknown_key"}.get(where, "auth_failed")
    assert reason(Opener(ring), bytes(env)) == expected


def test_replay_of_the_same_envelope() -> None:
    ring = Keyring([K1])
    env = Sealer(ring, A, 1).seal(b"hi")
    opener = Opener(ring)
    opener.open(env)
    assert reason(opener, env) == "replay"


def test_old_epoch_is_a_replay_and_a_new_epoch_is_accepted_at_once() -> None:
    ring = Keyring([K1])
    opener = Opener(ring)
    old = Sealer(ring, A, 5)
    old_envs = [old.seal(b"old") for _ in range(3)]
    opener.open(old_envs[0])
    opener.open(old_envs[1])
    # The peer restarts with a higher generation; its counter starts over at 0.
    new = Sealer(ring, A, 6)
    assert opener.open(new.seal(b"new")) == (A, b"new")
    # Anything from the earlier life is now a replay, even never-seen counters.
    assert reason(opener, old_envs[2]) == "replay"
    assert reason(opener, Sealer(ring, A, 4).seal(b"older")) == "replay"


def test_window_slides() -> None:
    ring = Keyring()
    sealer = Sealer(ring, A, 1)
    envs = [sealer.seal(str(i).encode()) for i in range(20)]
    opener = Opener(ring, window=8)
    opener.open(envs[10])
    # Out of order inside the window: accepted once each.
    for i in (9, 3, 5):
        assert opener.open(envs[i])[1] == str(i).encode()
        assert reason(opener, envs[i]) == "replay"
    assert reason(opener, envs[2]) == "replay"  # 10 - 2 >= 8: outside the window
    opener.open(envs[12])  # slides by 2: counter 5 is now the oldest slot
    assert reason(opener, envs[4]) == "replay"
    assert reason(opener, envs[5]) == "replay"  # already seen, still tracked
    assert opener.open(envs[6])[1] == b"6"
    assert opener.open(envs[11])[1] == b"11"
    opener.open(envs[19])  # a jump of 7 keeps 12..19 in the window
    assert reason(opener, envs[12]) == "replay"
    assert reason(opener, envs[11]) == "replay"
    assert opener.open(envs[13])[1] == b"13"


def test_big_jump_resets_the_window() -> None:
    ring = Keyring()
    opener = Opener(ring, window=4)
    opener.open(Sealer(ring, A, 1, counter=0).seal(b""))
    opener.open(Sealer(ring, A, 1, counter=1000).seal(b""))
    assert opener.open(Sealer(ring, A, 1, counter=997).seal(b"ok")) == (A, b"ok")
    assert reason(opener, Sealer(ring, A, 1, counter=996).seal(b"")) == "replay"


def test_window_is_only_updated_after_authentication() -> None:
    ring = Keyring([K1])
    opener = Opener(ring, window=4)
    sealer = Sealer(ring, A, 1)
    envs = [sealer.seal(b"") for _ in range(3)]
    opener.open(envs[2])
    forged = bytearray(Sealer(ring, A, 1, counter=1_000_000).seal(b""))
    forged[-1] ^= 1
    assert reason(opener, bytes(forged)) == "auth_failed"
    forged_epoch = bytearray(Sealer(ring, A, 99).seal(b""))
    forged_epoch[30] ^= 1
    assert reason(opener, bytes(forged_epoch)) == "auth_failed"
    # Had either forgery moved the window, counter 0 would now be a replay.
    assert opener.open(envs[0]) == (A, b"")


def test_senders_are_tracked_separately() -> None:
    ring = Keyring([K1])
    opener = Opener(ring)
    env_a = Sealer(ring, A, 1).seal(b"a")
    env_b = Sealer(ring, B, 1).seal(b"b")
    assert opener.open(env_a) == (A, b"a")
    assert opener.open(env_b) == (B, b"b")
    assert len(opener) == 2
    opener.forget(A)
    assert opener.open(env_a) == (A, b"a")


def test_sender_table_is_bounded_least_recently_heard_first() -> None:
    ring = Keyring()
    opener = Opener(ring, max_senders=2)
    senders = {s: Sealer(ring, s, 1) for s in (A, B, b"C" * 16)}
    first = {s: sealer.seal(b"") for s, sealer in senders.items()}
    opener.open(first[A])
    opener.open(first[B])
    opener.open(senders[A].seal(b""))  # A is now more recent than B
    opener.open(first[b"C" * 16])  # evicts B
    assert len(opener) == 2
    assert reason(opener, first[A]) == "replay"
    # B was forgotten, so its old envelope is accepted once more (documented).
    assert opener.open(first[B]) == (B, b"")


# --- key rotation ------------------------------------------------------------------


def test_key_rotation_without_losing_packets() -> None:
    rings = [Keyring([K1]) for _ in range(3)]
    sealers = [Sealer(r, bytes([i]) * 16, 1) for i, r in enumerate(rings)]
    openers = [Opener(r) for r in rings]

    def all_hear(i: int) -> None:
        env = sealers[i].seal(b"ping")
        for j, opener in enumerate(openers):
            if j != i:
                assert opener.open(env) == (bytes([i]) * 16, b"ping")

    # 1. Install the new key everywhere; everyone still seals with K1.
    for r in rings:
        r.install(K2)
    all_hear(0)
    # 2. Switch one node first: the others accept K2 already, and it still
    #    accepts K1 from the nodes not switched yet.
    rings[0].use(K2)
    assert sealers[0].seal(b"")[1:5] == seal.key_id(K2)
    all_hear(0)
    all_hear(1)
    for r in rings[1:]:
        r.use(K2)
    all_hear(2)
    # 3. Remove the old key everywhere: K1 envelopes are now refused.
    stale = Sealer(Keyring([K1]), b"\x09" * 16, 1).seal(b"old")
    assert openers[1].open(stale) == (b"\x09" * 16, b"old")
    for r in rings:
        r.remove(K1)
    all_hear(1)
    stale = Sealer(Keyring([K1]), b"\x09" * 16, 1, counter=1).seal(b"old")
    assert reason(openers[1], stale) == "unknown_key"


def test_keyring_changes_apply_at_once_to_sealer_and_opener() -> None:
    ring = Keyring()
    sealer, opener = Sealer(ring, A, 1), Opener(ring)
    assert sealer.seal(b"")[0] == seal.VERSION_PLAIN
    ring.install(K1)
    env = sealer.seal(b"")
    assert env[0] == seal.VERSION_SEALED and env[1:5] == seal.key_id(K1)
    assert opener.open(env) == (A, b"")
    ring.replace_all([K2])
    assert reason(opener, env) == "unknown_key"
    ring.replace_all([])
    assert sealer.seal(b"")[0] == seal.VERSION_PLAIN


def test_every_reason_label_is_listed() -> None:
    assert set(seal.SEAL_REASONS) == {
        "too_large",
        "malformed",
        "plaintext_rejected",
        "encrypted_rejected",
        "unknown_key",
        "auth_failed",
        "replay",
    }


# --- properties --------------------------------------------------------------------------


@FAST
@given(
    st.binary(max_size=2000),
    st.binary(min_size=16, max_size=16),
    st.integers(min_value=0, max_value=seal.EPOCH_MAX),
    st.booleans(),
)
def test_seal_open_round_trip(payload: bytes, sender: bytes, epoch: int, keyed: bool) -> None:
    ring = Keyring([K1] if keyed else [])
    env = Sealer(ring, sender, epoch).seal(payload)
    assert len(env) == len(payload) + seal.seal_overhead(ring)
    assert Opener(ring).open(env) == (sender, payload)


@FUZZ
@given(st.binary(max_size=200), st.booleans())
def test_open_arbitrary_bytes_raises_only_seal_error(data: bytes, keyed: bool) -> None:
    opener = Opener(Keyring([K1] if keyed else []))
    try:
        opener.open(data)
    except SealError as err:
        assert err.reason in seal.SEAL_REASONS


@FUZZ
@given(st.binary(max_size=64), st.data())
def test_any_change_to_a_sealed_envelope_is_rejected(payload: bytes, data: st.DataObject) -> None:
    ring = Keyring([K1, K2])
    env = Sealer(ring, A, 3, nonce_source=lambda n: b"\x01" * n).seal(payload)
    mutated = bytearray(env)
    op = data.draw(st.sampled_from(["flip", "cut", "append", "replace"]))
    if op == "flip":
        i = data.draw(st.integers(min_value=0, max_value=len(env) - 1))
        mutated[i] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    elif op == "cut":
        del mutated[data.draw(st.integers(min_value=0, max_value=len(env) - 1)) :]
    elif op == "append":
        mutated += data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(min_value=0, max_value=len(env) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        mutated[i : i + len(chunk)] = chunk
    if bytes(mutated) == env:
        return
    with pytest.raises(SealError) as info:
        Opener(ring).open(bytes(mutated))
    assert info.value.reason in seal.SEAL_REASONS


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=70),
    st.lists(
        st.tuples(
            st.sampled_from([A, B]),
            st.integers(min_value=0, max_value=3),
            st.integers(min_value=0, max_value=150),
        ),
        max_size=120,
    ),
)
def test_replay_window_matches_a_reference_model(
    window: int, events: list[tuple[bytes, int, int]]
) -> None:
    ring = Keyring()
    opener = Opener(ring, window=window)
    model: dict[bytes, tuple[int, int, set[int]]] = {}
    for sender, epoch, counter in events:
        env = Sealer(ring, sender, epoch, counter=counter).seal(b"")
        state = model.get(sender)
        if state is None or epoch > state[0]:
            expect, model[sender] = True, (epoch, counter, {counter})
        elif epoch < state[0]:
            expect = False
        else:
            _, top, seen = state
            expect = counter not in seen and top - counter < window
            if expect:
                seen.add(counter)
                model[sender] = (epoch, max(top, counter), seen)
        try:
            opener.open(env)
            accepted = True
        except SealError as err:
            assert err.reason == "replay"
            accepted = False
        assert accepted == expect, (sender, epoch, counter)
