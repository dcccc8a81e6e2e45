"""Talking to systemd with its documented protocols (no libsystemd).

Three small protocols, each an environment variable set by the service
manager (see sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3) and
systemd.exec(5) for JOURNAL_STREAM):

* **Notification** (``NOTIFY_SOCKET``): newline-separated ``KEY=VALUE``
  assignments in one datagram to an ``AF_UNIX`` socket; a path, or an
  abstract name when it starts with ``@``. The daemon says ``READY=1`` once
  its sockets are bound and the first join attempt has finished,
  ``STATUS=...`` with the member counts, ``RELOADING=1`` (with
  ``MONOTONIC_USEC``) and ``READY=1`` around a reload, ``STOPPING=1`` when
  it starts to leave, and ``WATCHDOG=1`` every half ``WATCHDOG_USEC``.
  Sending never blocks (``MSG_DONTWAIT``) and never raises: a service
  manager that stopped listening must not take the daemon down.
* **Watchdog** (``WATCHDOG_USEC``, ``WATCHDOG_PID``): the pings come from
  the runner's loop (:class:`SystemdLifecycle` is the runner's lifecycle),
  the one loop that feeds the core, so a core stuck in a call, or a loop
  that stopped turning, stops the pings and systemd restarts the daemon.
* **Socket activation** (``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``):
  inherited descriptors start at fd 3; they are ours only when
  ``LISTEN_PID`` is our pid. The API socket is the one named ``api``
  (``FileDescriptorName=api`` in peerd.socket), or the only one passed.
* **Journal** (``JOURNAL_STREAM=DEV:INODE``): stderr is connected to the
  journal when its device and inode match; log lines then carry a
  ``<N>`` syslog priority prefix instead of a timestamp (see
  :class:`peerd.shell.logs.Logger`).

Everything here is a no-op when the variables are absent, so the same daemon
runs by hand, under a test, or under systemd.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

from peerd.shell.logs import Logger

SD_LISTEN_FDS_START = 3
API_FD_NAME = "api"


# --- notification -------------------------------------------------------------------


def notify_address(value: str | None) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, None if unusable.

    ``/path`` is a filesystem socket; ``@name`` an abstract one (a leading
    NUL byte on Linux). Other forms (``vsock:``) are not supported here.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET`` (nothing if unset).

    ``sent`` keeps every message sent (the last 64) for tests and debugging;
    ``errors`` counts datagrams that could not be sent.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, logger: Logger | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        self.address = notify_address(raw)
        self.logger = logger
        self.errors = 0
        self.sent: list[str] = []
        self._sock: socket.socket | None = None
        if raw and self.address is None and logger is not None:
            logger.warning(
                "NOTIFY_SOCKET is not a Unix socket path; not notifying systemd", notify_socket=raw
            )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if not sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(
                message.encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address
            )
        except OSError as e:
            self.errors += 1
            if self.logger is not None and (self.errors == 1 or self.errors % 100 == 0):
                self.logger.warning(
                    "cannot notify systemd", error=e.strerror or str(e), failures=self.errors
                )
            return False
        self.sent.append(message)
        del self.sent[:-64]
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(text: str) -> str:
    """A ``STATUS=`` assignment; the value must stay on one line."""
    return "STATUS=" + " ".join(text.split())


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, sent with ``RELOADING=1`` (systemd >= 253
    uses it to tell this reload from an earlier one)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --- watchdog -----------------------------------------------------------------------


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None.

    None when the watchdog is off, malformed, or meant for another process
    (``WATCHDOG_PID`` set to a pid that is not ours).
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


# --- socket activation ----------------------------------------------------------------


class ActivationError(Exception):
    """The passed descriptors do not make sense (a deployment error)."""


@dataclass(frozen=True, slots=True)
class PassedFd:
    fd: int
    name: str


def listen_fds(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None, unset: bool = True
) -> list[PassedFd]:
    """The descriptors passed by socket activation, in order (empty if none).

    Like ``sd_listen_fds_with_names(unset_environment=1)``: the variables are
    removed (so a child process cannot mistake them for its own) and each
    descriptor is made close-on-exec.
    """
    env = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid_text or not count_text:
        return []
    try:
        if int(pid_text) != (os.getpid() if pid is None else pid):
            return []  # meant for another process (inherited by mistake)
        count = int(count_text)
    except ValueError:
        return []
    if count <= 0:
        return []
    names = names_text.split(":") if names_text else []
    out: list[PassedFd] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.append(PassedFd(fd, name))
    return out


def take_api_socket(fds: list[PassedFd], logger: Logger | None = None) -> socket.socket | None:
    """The API listening socket among ``fds``: the one named ``api``, else the
    only one. Unused descriptors are closed (with a warning). None if no fd
    was passed; :class:`ActivationError` if none fits."""
    if not fds:
        return None
    chosen = next((p for p in fds if p.name == API_FD_NAME), None)
    if chosen is None:
        if len(fds) != 1:
            for p in fds:
                _close_fd(p.fd)
            names = ", ".join(p.name for p in fds)
            raise ActivationError(
                f"{len(fds)} sockets were passed ({names}) and none is "
                f"named {API_FD_NAME!r} (FileDescriptorName={API_FD_NAME})"
            )
        chosen = fds[0]
    for p in fds:
        if p is not chosen:
            if logger is not None:
                logger.warning("ignoring a socket passed by systemd", fd=p.fd, name=p.name)
            _close_fd(p.fd)
    try:
        sock = socket.socket(fileno=chosen.fd)
    except OSError as e:
        raise ActivationError(
            f"fd {chosen.fd} ({chosen.name}) passed by systemd is not a socket: {e.strerror or e}"
        ) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        kind = f"{sock.family.name}/{sock.type.name}"
        sock.close()
        raise ActivationError(
            f"fd {chosen.fd} ({chosen.name}) passed by systemd is {kind}"
            f"{'' if listening else ', not listening'}; the API needs a "
            "listening Unix stream socket (ListenStream=/run/peerd/peerd.sock)"
        )
    sock.setblocking(False)
    return sock


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def socket_path(sock: socket.socket) -> str:
    """The path a Unix socket is bound to (for logs); ``?`` if unknown."""
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else "?"
    return str(name) or "?"


# --- journal ---------------------------------------------------------------------------


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the journal stream named by ``JOURNAL_STREAM``.

    The device and inode must match: a child that inherited the variable but
    had its stderr redirected elsewhere must log plain lines.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# --- the runner's lifecycle -----------------------------------------------------------


class SystemdLifecycle:
    """Tells systemd how the daemon is doing; plugged into the runner.

    The runner calls :meth:`started`, :meth:`members_changed`,
    :meth:`leaving` and :meth:`tick` from its own task, the one that owns the
    core, so ``member_counts`` may read the core directly. :attr:`deadline`
    is when :meth:`tick` is due next (runner clock), so the runner waits for
    it alongside its timers.

    STATUS updates are coalesced: at most one per ``status_interval_s``.
    """

    def __init__(
        self,
        notifier: Notifier,
        member_counts: Callable[[], Mapping[str, int]],
        *,
        watchdog_s: float | None = None,
        status_interval_s: float = 1.0,
    ) -> None:
        self.notifier = notifier
        self.member_counts = member_counts
        self.watchdog_s = watchdog_s
        self.status_interval_s = status_interval_s
        self.ready = False
        self.stopping = False
        self.pings = 0
        self.last_status = ""
        self._next_ping = 0.0 if watchdog_s else float("inf")
        self._status_dirty = False
        self._next_status = 0.0

    @property
    def deadline(self) -> float:
        due = self._next_ping
        if self._status_dirty:
            due = min(due, self._next_status)
        return due

    def status_text(self) -> str:
        counts = self.member_counts()
        total = sum(counts.values())
        detail = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("alive", "suspect", "dead", "left"))
        return f"{total} members: {detail}"

    def started(self, now: float, ok: int, failed: int) -> None:
        """The first join attempt finished: the daemon is ready."""
        if self.stopping:
            return
        self.ready = True
        self.last_status = self.status_text()
        joined = "no seeds" if ok + failed == 0 else f"joined {ok} of {ok + failed} seeds"
        self.notifier.notify("READY=1", status_line(f"{self.last_status} ({joined})"))
        self._status_dirty = False
        self._next_status = now + self.status_interval_s

    def members_changed(self, now: float) -> None:
        if not self.ready or self.stopping:
            return
        self._status_dirty = True
        if now >= self._next_status:
            self._send_status(now)

    def tick(self, now: float) -> None:
        if now >= self._next_ping and self.watchdog_s:
            self.notifier.notify("WATCHDOG=1")
            self.pings += 1
            self._next_ping = now + self.watchdog_s
        if self._status_dirty and now >= self._next_status:
            self._send_status(now)

    def _send_status(self, now: float) -> None:
        self._status_dirty = False
        self._next_status = now + self.status_interval_s
        text = self.status_text()
        if text != self.last_status:
            self.last_status = text
            self.notifier.notify(status_line(text))

    def leaving(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.notifier.notify("STOPPING=1", status_line(f"leaving the cluster ({reason})"))

    # Called by the agent's reload (SIGHUP) task, not by the runner.

    def reloading(self) -> None:
        if self.ready and not self.stopping:
            self.notifier.notify(
                "RELOADING=1",
                f"MONOTONIC_USEC={monotonic_usec()}",
                status_line("reloading the configuration"),
            )

    def reloaded(self, problem: str | None = None) -> None:
        if not self.ready or self.stopping:
            return
        status = self.last_status
        if problem:
            status = f"{status} (reload failed: {problem})"
        self.notifier.notify("READY=1", status_line(status))
