"""One poison datagram into a real daemon: counted, logged, and the daemon
goes on serving its API and the membership protocol (issue 16)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peerd.wire.seal import Keyring, Sealer
from tests.shell.test_agent import api, start, stop, wait_for

MARK = b"\x00poison-for-the-core\x00"

# The daemon, with the membership core's datagram handler made to raise on
# one specific payload (a stand-in for a real bug that a crafted message hits).
PATCHED_AGENT = f"""
import sys
from peerd.core.swim.membership import Node
real = Node._on_packet
def _on_packet(self, src, data):
    if {MARK!r} in data:
        raise RuntimeError("injected core bug")
    return real(self, src, data)
Node._on_packet = _on_packet
from peerd.shell.agent import main
sys.exit(main(sys.argv[1:]))
"""


def start_patched(tmp: Path, name: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            PATCHED_AGENT,
            "--name",
            name,
            "--bind",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp / name),
            "--api-socket",
            str(tmp / f"{name}.sock"),
            "--preset",
            "local",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def alive(sock: Path, name: str) -> bool:
    return any(m["name"] == name and m["status"] == "alive" for m in api(sock, "members"))


@pytest.mark.proc
def test_a_poison_datagram_does_not_stop_the_daemon(tmp_path: Path) -> None:
    a = start_patched(tmp_path, "a")
    b = None
    try:
        status = wait_for("a's API", lambda: api(tmp_path / "a.sock", "status"), proc=a)
        host, port = status["addr"].rsplit(":", 1)
        # A plaintext datagram (the daemon runs without keys on loopback), so
        # it reaches the core.
        sealer = Sealer(Keyring([]), b"\x07" * 16, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(sealer.seal(MARK), (host, int(port)))
        counters = wait_for(
            "the core error to be counted",
            lambda: (
                (c := api(tmp_path / "a.sock", "status")["counters"]).get("core_errors_packet_in")
                and c
            ),
            proc=a,
        )
        assert counters["core_errors_packet_in"] == 1
        # Still a working node: another daemon joins through it, both see each other.
        b = start(tmp_path, "b", "127.0.0.2", "--join", status["addr"])
        wait_for("a to see b", lambda: alive(tmp_path / "a.sock", "b"), proc=a)
        wait_for("b to see a", lambda: alive(tmp_path / "b.sock", "a"), proc=b)
        assert a.poll() is None
        code, err = stop(b)
        b = None
        assert code == 0, err
    finally:
        if b is not None:
            stop(b)
        code, err = stop(a)
    assert code == 0, err
    assert "core raised on one input (a bug): input dropped, the daemon goes on" in err
    assert "kind=packet_in src=127.0.0.1:" in err
    assert "RuntimeError: injected core bug" in err
    assert err.count("Traceback") == 1
