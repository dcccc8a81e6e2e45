"""The state directory: what must survive a restart.

Layout (directory mode 0700, files 0600, all small text files)::

    <state-dir>/
      lock          flock()ed while a daemon runs: one daemon per state dir
      node_id       32 hex chars: 16 random bytes, created once, never changed
      generation    decimal; +1 at every start (also the seal epoch)
      incarnation   decimal; highest incarnation this node has used
      peers         JSON list of [host, port]: last known peers (join seeds)
      keyring       keys in the key-file format (``peerd1:...``, one a line,
                    primary first); written only when keys change over the
                    API (keys.install/use/remove, here or, with --cluster,
                    from another node); secret; once it exists it is the
                    keyring at start and --key-file is ignored (a warning
                    says so when they differ)
      tags          JSON: tags set at run time (``peerd tags set``), kept as
                    changes to the configured tags (see peerd.shell.tags)

Why each exists: the node id makes a restarted node the same node; the
generation marks entries from an earlier life as stale and lets peers'
replay windows accept the new life at once (new epoch); the incarnation
must never be reused, or a restarted node could not refute suspicion about
its previous life; the peers let a restarted node rejoin without --join.

Every write is atomic (temp file, fsync, rename, fsync directory), so a
crash leaves either the old or the new content, never a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from peerd.shell.tags import NodeTags
from peerd.wire.messages import NODE_ID_BYTES, Addr

MAX_SAVED_PEERS = 64


class StateError(Exception):
    """The state directory is unusable (corrupt file, permissions, locked)."""


def default_state_dir() -> Path:
    """/var/lib/peerd as root, else $XDG_STATE_HOME/peerd or ~/.local/state/peerd."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/peerd")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "peerd"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StateDir:
    """Owns one state directory while the daemon runs (holds its lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # --- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Create the directory (0700) if needed and take the lock."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create state directory {self.path}: {e.strerror}") from e
        if not self.path.is_dir():
            raise StateError(f"state directory {self.path} is not a directory")
        try:
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(self.path, 0o700)
        except OSError as e:
            raise StateError(f"cannot set mode 0700 on {self.path}: {e.strerror}") from e
        try:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateError(f"cannot open {self.path / 'lock'}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StateError(
                f"state directory {self.path} is in use by another peerd "
                "(each daemon needs its own --state-dir)"
            ) from e
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StateDir:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- node id ------------------------------------------------------------

    def check(self) -> None:
        """Read every file a start reads, writing nothing and taking no lock
        (``peerd agent --check-config``): StateError for what a start would
        refuse. A missing directory or file is fine (a start creates it)."""
        text = self._read_text(self.path / "node_id")
        if text is not None:
            self._parse_node_id(text)
        self._read_int("generation")
        self._read_int("incarnation")
        self.peers()

    def node_id(self) -> bytes:
        """The node id, created (16 random bytes) on first use."""
        path = self.path / "node_id"
        text = self._read_text(path)
        if text is None:
            node_id = secrets.token_bytes(NODE_ID_BYTES)
            self._write(path, node_id.hex() + "\n")
            return node_id
        return self._parse_node_id(text)

    def _parse_node_id(self, text: str) -> bytes:
        path = self.path / "node_id"
        try:
            node_id = bytes.fromhex(text.strip())
        except ValueError:
            node_id = b""
        if len(node_id) != NODE_ID_BYTES:
            raise StateError(
                f"{path} is corrupt: expected {NODE_ID_BYTES * 2} hex characters; "
                "remove it to give this node a new identity"
            )
        return node_id

    # --- counters -----------------------------------------------------------

    def _read_int(self, name: str) -> int | None:
        path = self.path / name
        text = self._read_text(path)
        if text is None:
            return None
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = -1
        if value < 0:
            raise StateError(f"{path} is corrupt: expected a non-negative integer")
        return value

    def next_generation(self) -> int:
        """Read, increment and persist the generation (first start: 1)."""
        generation = (self._read_int("generation") or 0) + 1
        self._write(self.path / "generation", f"{generation}\n")
        return generation

    def generation(self) -> int:
        return self._read_int("generation") or 0

    def incarnation(self) -> int:
        """The highest incarnation persisted (0 when never written)."""
        return self._read_int("incarnation") or 0

    def start_incarnation(self) -> int:
        """Persisted + 1, persisted at once: the new life refutes stale
        suspicion immediately, and a crash right now cannot reuse it."""
        incarnation = self.incarnation() + 1
        self.save_incarnation(incarnation)
        return incarnation

    def save_incarnation(self, incarnation: int) -> None:
        self._write(self.path / "incarnation", f"{incarnation}\n")

    # --- peers --------------------------------------------------------------

    def peers(self) -> list[Addr]:
        """Last known peers; a corrupt file is an error (the operator should see it)."""
        path = self.path / "peers"
        text = self._read_text(path)
        if text is None:
            return []
        try:
            raw = json.loads(text)
            if not isinstance(raw, list):
                raise ValueError
            out: list[Addr] = []
            for item in raw:
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not isinstance(item[1], int)
                    or isinstance(item[1], bool)
                    or not 0 < item[1] < 65536
                ):
                    raise ValueError
                out.append((item[0], item[1]))
        except ValueError as e:
            raise StateError(
                f"{path} is corrupt: expected a JSON list of [host, port]; "
                "remove it (it only holds join hints)"
            ) from e
        return out

    def save_peers(self, peers: Iterable[Addr]) -> None:
        unique = list(dict.fromkeys((h, int(p)) for h, p in peers))[:MAX_SAVED_PEERS]
        self._write(self.path / "peers", json.dumps([list(a) for a in unique]) + "\n")

    # --- keyring ------------------------------------------------------------

    @property
    def keyring_path(self) -> Path:
        return self.path / "keyring"

    def keyring_text(self) -> str | None:
        return self._read_text(self.keyring_path)

    def save_keyring_text(self, text: str) -> None:
        self._write(self.keyring_path, text)

    # --- tags ---------------------------------------------------------------

    @property
    def tags_path(self) -> Path:
        return self.path / "tags"

    def tags(self) -> NodeTags | None:
        """The tags saved by the last run (None: never saved); a corrupt file
        is an error, as for the peers."""
        text = self._read_text(self.tags_path)
        if text is None:
            return None
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError
            configured, runtime = raw.get("configured", {}), raw.get("runtime", {})
            if not isinstance(configured, dict) or not isinstance(runtime, dict):
                raise ValueError
            if not all(isinstance(v, str) for v in configured.values()):
                raise ValueError
            if not all(v is None or isinstance(v, str) for v in runtime.values()):
                raise ValueError
        except ValueError as e:
            raise StateError(
                f"{self.tags_path} is corrupt: expected a JSON object with "
                '"configured" and "runtime" maps; remove it (the tags set at run '
                "time are then lost; the configured ones stay)"
            ) from e
        return NodeTags(dict(configured), dict(runtime))

    def save_tags(self, tags: NodeTags) -> None:
        data = {"configured": tags.configured, "runtime": tags.runtime}
        self._write(self.tags_path, json.dumps(data, sort_keys=True) + "\n")

    # --- helpers ------------------------------------------------------------

    def _read_text(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as e:
            raise StateError(f"{path} is corrupt: not ASCII text") from e
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from e

    def _write(self, path: Path, text: str) -> None:
        try:
            atomic_write(path, text.encode("ascii"))
        except OSError as e:
            raise StateError(f"cannot write {path}: {e.strerror}") from e
