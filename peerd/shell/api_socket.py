"""The API socket on disk: binding it safely and knowing who connected.

A daemon restarted after a crash finds its old socket file still there; one
started twice finds a live one. The file is only removed after a connect to
it is refused (a live daemon's socket is never orphaned), anything that is
not a socket is never replaced, and at exit a daemon only unlinks the file if
it is still the one it bound (a newer daemon may own the path by then).
The file's permissions (directory 0o750, socket 0o660) decide who may
connect at all; each connection also records what the kernel says about the
client at connect time, which it cannot forge: SO_PEERCRED (pid, uid, gid)
and SO_PEERGROUPS (its supplementary groups), for the registry's ownership
rules, the authorization policy (:mod:`peerd.shell.authz`) and the logs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass

import trio

from peerd.shell.authz import peer_groups

log = logging.getLogger("peerd.api")

SOCKET_MODE = 0o660


DIRECTORY_MODE = 0o750


LISTEN_BACKLOG = 128


class ApiSocketError(Exception):
    """The API socket could not be set up (in use, not a socket, no permission).
    The message is one line fit for the operator."""


@dataclass(frozen=True, slots=True)
class PeerCred:
    """Credentials of the process at the other end of a Unix socket, as the
    kernel recorded them at connect time (they cannot be forged)."""

    pid: int
    uid: int
    gid: int
    # Supplementary groups (SO_PEERGROUPS), None when they could not be read.
    groups: tuple[int, ...] | None = None


def peer_cred(stream: trio.abc.Stream) -> PeerCred | None:
    """SO_PEERCRED (and SO_PEERGROUPS) of a Unix-socket stream (Linux), else None."""
    sock = getattr(stream, "socket", None)
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or so_peercred is None or sock.family != socket.AF_UNIX:
        return None
    size = struct.calcsize("3i")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, size)
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid, peer_groups(sock, pid))


async def bind_api_socket(
    path: str, *, mode: int = SOCKET_MODE, backlog: int = LISTEN_BACKLOG
) -> trio.socket.SocketType:
    """Bind and listen on a Unix stream socket at ``path``.

    Creates the parent directory (0o750) if missing. A socket file left by a
    crashed daemon is removed, but only after a connect to it is refused:
    removing a live daemon's socket would orphan it silently. Raises
    :class:`ApiSocketError` if another process listens there, if the path is
    something other than a socket, or on any OS error."""
    parent = os.path.dirname(path) or "."
    try:
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=DIRECTORY_MODE, exist_ok=True)
            os.chmod(parent, DIRECTORY_MODE)  # makedirs' mode is filtered by the umask
        _remove_stale_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    except ApiSocketError:
        raise
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ApiSocketError(
                f"API socket {path} is in use: is another peerd running?"
            ) from None
        raise ApiSocketError(f"cannot create API socket {path}: {exc.strerror or exc}") from None
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiSocketError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog must not block the daemon's start
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale API socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # backlog full: someone is listening
    finally:
        probe.close()
    raise ApiSocketError(f"another peerd is already listening on {path}")


def _unlink_if_ours(path: str, inode: tuple[int, int]) -> None:
    # A newer daemon may have replaced the file; never remove its socket.
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except OSError:
        pass
