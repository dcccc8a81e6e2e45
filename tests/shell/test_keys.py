"""KeyManager: key ids, the plaintext refusal, and a peer's KeyRequest (peerd.shell.keys)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from peerd.api.protocol import ApiError
from peerd.core.events import LogLevel
from peerd.shell.keys import KeyManager
from peerd.shell.logs import Logger
from peerd.shell.state import StateDir
from peerd.wire.messages import KeyOp, KeyRequest, KeyStatus
from peerd.wire.seal import Keyring, format_key, key_id

K1, K2, K3 = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


def manager(keys: list[bytes], state: StateDir | None = None) -> KeyManager:
    return KeyManager(Keyring(keys), keys, state, Logger(LogLevel.ERROR, io.StringIO()))


def test_plaintext_node_refuses_install_unless_forced(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        m = manager([], state)
        with pytest.raises(ApiError) as info:
            m.install(format_key(K1))
        assert info.value.code == "conflict" and "plaintext" in info.value.message
        assert m.keyring.insecure and state.keyring_text() is None
        # A peer can never force it.
        reply = m.on_request(KeyRequest(KeyOp.INSTALL, K1), "peer")
        assert reply.status is KeyStatus.PLAINTEXT and reply.primary == b""
        assert m.keyring.insecure
        m.install(format_key(K1), force=True)
        assert m.keyring.primary == K1


def test_ids_and_prefixes_name_installed_keys() -> None:
    m = manager([K1, K2])
    assert m.resolve(key_id(K2).hex()) == K2
    assert m.resolve(key_id(K2).hex()[:5].upper()) == K2
    with pytest.raises(ApiError) as info:
        m.resolve("")
    assert info.value.code == "bad_args"
    with pytest.raises(ApiError) as info:
        m.resolve(key_id(K3).hex())
    assert info.value.code == "not_found"
    with pytest.raises(ApiError) as info:
        m.install(key_id(K3).hex())
    assert info.value.code == "bad_args" and "key itself" in info.value.message


def test_peer_requests_apply_and_report_the_keyring() -> None:
    m = manager([K1])
    r = m.on_request(KeyRequest(KeyOp.QUERY, b""), "peer")
    assert (r.status, r.primary, r.keys) == (KeyStatus.OK, key_id(K1), (key_id(K1),))
    r = m.on_request(KeyRequest(KeyOp.USE, key_id(K2)), "peer")
    assert r.status is KeyStatus.NOT_INSTALLED and m.keyring.primary == K1
    assert m.on_request(KeyRequest(KeyOp.INSTALL, K2), "peer").status is KeyStatus.OK
    r = m.on_request(KeyRequest(KeyOp.REMOVE, key_id(K1)), "peer")
    assert r.status is KeyStatus.PRIMARY and K1 in m.keyring
    assert m.on_request(KeyRequest(KeyOp.USE, key_id(K2)), "peer").status is KeyStatus.OK
    r = m.on_request(KeyRequest(KeyOp.REMOVE, key_id(K1)), "peer")
    assert (r.status, r.primary, r.keys) == (KeyStatus.OK, key_id(K2), (key_id(K2),))
    # Removing a key this node does not have is already done.
    assert m.on_request(KeyRequest(KeyOp.REMOVE, key_id(K3)), "peer").status is KeyStatus.OK


def test_list_compares_with_the_key_file(tmp_path: Path) -> None:
    m = manager([K2, K1])
    m.key_file = tmp_path / "keys"
    m.key_file.write_text(format_key(K1) + "\n" + format_key(K3) + "\n")
    assert key_id(K3).hex() not in {r["id"] for r in m.list()}  # installed keys only
    rows = {r["id"]: r for r in m.list(file_only=True)}
    assert rows[key_id(K2).hex()] == {
        "id": key_id(K2).hex(),
        "primary": True,
        "installed": True,
        "in_file": False,
        "file_primary": False,
    }
    assert rows[key_id(K1).hex()]["file_primary"] and rows[key_id(K1).hex()]["in_file"]
    assert rows[key_id(K3).hex()]["installed"] is False
    m.key_file.write_text("garbage\n")  # unreadable: no comparison, no failure
    assert all("in_file" not in r for r in m.list())
