"""State directory: identity, generation, incarnation and peers survive restarts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from peerd.shell import state as statemod
from peerd.shell.state import StateDir, StateError, atomic_write


def test_creates_private_directory_and_stable_node_id(tmp_path: Path) -> None:
    path = tmp_path / "a" / "state"
    with StateDir(path) as st:
        node_id = st.node_id()
        assert len(node_id) == 16
        assert st.node_id() == node_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "node_id").stat().st_mode) == 0o600
    with StateDir(path) as st:
        assert st.node_id() == node_id


def test_loose_directory_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    with StateDir(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_generation_increments_at_each_start(tmp_path: Path) -> None:
    gens = []
    for _ in range(3):
        with StateDir(tmp_path) as st:
            gens.append(st.next_generation())
    assert gens == [1, 2, 3]
    assert (tmp_path / "generation").read_text() == "3\n"


def test_start_incarnation_is_persisted_plus_one_and_saved_at_once(tmp_path: Path) -> None:
    with StateDir(tmp_path) as st:
        assert st.start_incarnation() == 1
        st.save_incarnation(7)
    with StateDir(tmp_path) as st:
        assert st.incarnation() == 7
        assert st.start_incarnation() == 8
        # A crash right now must not let the next life reuse 8.
        assert st.incarnation() == 8


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_failure_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statemod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_write_failure_is_a_state_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with StateDir(tmp_path) as st:

        def broken_replace(src: object, dst: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(statemod.os, "replace", broken_replace)
        with pytest.raises(StateError, match="incarnation.*No space"):
            st.save_incarnation(3)


@pytest.mark.parametrize(
    ("name", "content", "call"),
    [
        ("node_id", "not hex\n", "node_id"),
        ("node_id", "abcd\n", "node_id"),
        ("generation", "many\n", "next_generation"),
        ("generation", "-4\n", "next_generation"),
        ("incarnation", "1.5\n", "start_incarnation"),
        ("peers", '{"a": 1}\n', "peers"),
        ("peers", '[["10.0.0.1", 99999]]\n', "peers"),
        ("peers", '[["10.0.0.1"]]\n', "peers"),
        ("peers", "not json", "peers"),
    ],
)
def test_corrupt_file_is_a_clear_error(tmp_path: Path, name: str, content: str, call: str) -> None:
    (tmp_path / name).write_text(content)
    with StateDir(tmp_path) as st, pytest.raises(StateError) as info:
        getattr(st, call)()
    message = str(info.value)
    assert str(tmp_path / name) in message
    assert "corrupt" in message


def test_binary_garbage_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "generation").write_bytes(b"\xff\xfe\x00")
    with StateDir(tmp_path) as st, pytest.raises(StateError, match="generation.*corrupt"):
        st.next_generation()


def test_peers_round_trip_deduplicated(tmp_path: Path) -> None:
    with StateDir(tmp_path) as st:
        assert st.peers() == []
        st.save_peers([("10.0.0.1", 7950), ("::1", 7951), ("10.0.0.1", 7950)])
        assert st.peers() == [("10.0.0.1", 7950), ("::1", 7951)]


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    with StateDir(tmp_path), pytest.raises(StateError, match="in use by another peerd"):
        StateDir(tmp_path).open()
    with StateDir(tmp_path):
        pass  # released


def test_unusable_path_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot create state directory"):
        StateDir(tmp_path / "file" / "sub").open()


def test_default_state_dir_respects_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(statemod.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert statemod.default_state_dir() == tmp_path / "peerd"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert statemod.default_state_dir() == Path.home() / ".local" / "state" / "peerd"
    monkeypatch.setattr(statemod.os, "geteuid", lambda: 0)
    assert statemod.default_state_dir() == Path("/var/lib/peerd")
