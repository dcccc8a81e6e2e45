"""Shared helpers for the shell tests: loopback endpoints with real sealing."""

from __future__ import annotations

import collections
import io
import socket

import pytest
import trio

from peerd.core.events import LogLevel
from peerd.shell.logs import LimitedLog, Logger
from peerd.wire.seal import Keyring, Opener, Sealer


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not have_ipv6(), reason="no IPv6 loopback")


class Net:
    """One side's sealing and bookkeeping, as the agent wires it."""

    def __init__(
        self,
        sender_id: bytes,
        keys: list[bytes] | None = None,
        max_size: int = 1 << 20,
        queue: int = 64,
    ) -> None:
        self.keyring = Keyring(keys)
        self.sealer = Sealer(self.keyring, sender_id, 1)
        self.opener = Opener(self.keyring, max_size=max_size)
        self.counters: collections.Counter[str] = collections.Counter()
        self.out = io.StringIO()
        self.log = LimitedLog(Logger(LogLevel.DEBUG, stream=self.out))
        self.send, self.receive = trio.open_memory_channel[object](queue)


def closed_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def closed_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
