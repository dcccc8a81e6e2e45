"""`peerd agent` start-up: refusals with clear exits, and one real daemon process."""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peerd.api.client import BlockingClient
from peerd.core.events import LogLevel
from peerd.shell import agent
from peerd.shell.logs import Logger
from peerd.shell.settings import resolve
from peerd.shell.state import StateDir
from peerd.wire.seal import format_key, generate_key


def args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    return parser.parse_args(
        ["--state-dir", str(tmp_path / "state"), "--api-socket", str(tmp_path / "api.sock"), *argv]
    )


def test_non_loopback_bind_without_key_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert agent.run(args(tmp_path, "--bind", "0.0.0.0:0")) == 2
    err = capfd.readouterr().err
    assert "refusing to bind 0.0.0.0:0 without a key" in err
    assert "--insecure" in err
    assert not (tmp_path / "state" / "generation").exists()  # nothing was started


def test_address_in_use_fails_at_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert agent.run(args(tmp_path, "--bind", f"127.0.0.1:{port}")) == 1
    assert "already in use" in capfd.readouterr().err


def test_tcp_port_in_use_fails_at_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert agent.run(args(tmp_path, "--bind", f"127.0.0.1:{port}")) == 1
    assert "cannot bind TCP 127.0.0.1" in capfd.readouterr().err


def test_state_dir_in_use(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with StateDir(tmp_path / "state"):
        assert agent.run(args(tmp_path, "--bind", "127.0.0.1:0")) == 1
    assert "in use by another peerd" in capfd.readouterr().err


def test_bad_key_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys").write_text("peerd1:tooshort\n")
    assert agent.run(args(tmp_path, "--key-file", str(tmp_path / "keys"))) == 2
    assert "key file" in capfd.readouterr().err


def test_port_0_tries_another_port_when_tcp_has_the_one_udp_got(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel's UDP port may be some loopback connection's TCP port: that
    # used to stop the daemon at start ("address already in use").
    taken: list[int] = []
    real = agent.open_tcp_listener

    def busy_twice(addr: tuple[str, int]) -> socket.socket:
        if len(taken) < 2:
            taken.append(addr[1])
            holder = socket.socket()  # really take the TCP port, then try it
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                holder.bind(addr)
                holder.listen(1)
            except OSError:
                pass  # some other socket has it already: the same case
            try:
                return real(addr)
            finally:
                holder.close()
        return real(addr)

    monkeypatch.setattr(agent, "open_tcp_listener", busy_twice)
    udp, tcp = agent.bind_endpoints(("127.0.0.1", 0))
    try:
        port = udp.getsockname()[1]
        assert tcp.getsockname()[1] == port and port not in taken and len(taken) == 2
    finally:
        udp.close()
        tcp.close()


def test_a_given_port_taken_for_tcp_is_refused_at_once() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        with pytest.raises(agent.BindError, match="TCP .*address already in use") as err:
            agent.bind_endpoints(("127.0.0.1", holder.getsockname()[1]))
        assert err.value.in_use
    finally:
        holder.close()


# --- one real daemon ----------------------------------------------------------------


def wait_for(
    what: str,
    fn: Callable[[], Any],
    timeout: float = 15.0,
    proc: subprocess.Popen[str] | None = None,
) -> Any:
    """Poll ``fn`` until it returns something truthy, within a bounded deadline.
    With ``proc``: fail at once, with its stderr, if that daemon exits."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(
                f"daemon exited with {proc.returncode} while waiting for {what}:\n{err}"
            )
        try:
            last = fn()
        except (OSError, ConnectionError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def api(sock: Path, op: str, **kw: Any) -> Any:
    with BlockingClient(sock, timeout=5) as c:
        return c.call(op, **kw)


def start(tmp: Path, name: str, host: str, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peerd",
            "agent",
            "--name",
            name,
            "--bind",
            f"{host}:0",
            "--state-dir",
            str(tmp / name),
            "--api-socket",
            str(tmp / f"{name}.sock"),
            "--preset",
            "local",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon did not stop on SIGTERM:\n{err}") from None
    return proc.returncode, err


@pytest.mark.proc
def test_real_daemons_join_and_stop_cleanly(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(generate_key() + "\n")
    a = start(tmp_path, "a", "127.0.0.1", "--key-file", str(key_file))
    b = None
    try:
        status = wait_for("a's API", lambda: api(tmp_path / "a.sock", "status"), proc=a)
        assert status["name"] == "a" and status["generation"] == 1
        b = start(tmp_path, "b", "127.0.0.2", "--key-file", str(key_file), "--join", status["addr"])
        wait_for(
            "b to see a alive",
            lambda: [
                m
                for m in api(tmp_path / "b.sock", "members")
                if m["name"] == "a" and m["status"] == "alive"
            ],
        )
        wait_for(
            "a to see b alive",
            lambda: [
                m
                for m in api(tmp_path / "a.sock", "members")
                if m["name"] == "b" and m["status"] == "alive"
            ],
        )
        counters = api(tmp_path / "a.sock", "status")["counters"]
        assert counters["tcp_in"] >= 1  # b's join push-pull, sealed and opened
        code, err = stop(b)
        b = None
        assert code == 0, err
        assert "left the cluster" in err
        left = wait_for(
            "a to see b left",
            lambda: [
                m
                for m in api(tmp_path / "a.sock", "members")
                if m["name"] == "b" and m["status"] == "left"
            ],
        )[0]
        # b remembered a: restarted without --join, it rejoins as a new generation
        # with a higher incarnation than anything its earlier life used.
        assert (tmp_path / "b" / "peers").read_text().startswith('[["127.0.0.1", ')
        b = start(tmp_path, "b", "127.0.0.2", "--key-file", str(key_file))
        back = wait_for(
            "a to see b back",
            lambda: [
                m
                for m in api(tmp_path / "a.sock", "members")
                if m["name"] == "b" and m["status"] == "alive"
            ],
        )[0]
        assert back["id"] == left["id"]
        assert back["generation"] == 2
        assert back["incarnation"] > left["incarnation"]
        code, err = stop(b)
        b = None
        assert code == 0, err
    finally:
        if b is not None:
            stop(b)
        code, err = stop(a)
    assert code == 0, err
    assert "Traceback" not in err


def test_saved_keyring_wins_over_the_key_file(tmp_path: Path) -> None:
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    (tmp_path / "keys").write_text(format_key(k1) + "\n")
    settings = resolve(args(tmp_path, "--key-file", str(tmp_path / "keys")))
    out = io.StringIO()
    logger = Logger(LogLevel.INFO, out)
    with StateDir(tmp_path / "state") as state:
        assert agent._initial_keys(settings, state, logger) == [k1]
        assert out.getvalue() == ""
        # keys.install + keys.use over the API wrote the state keyring:
        state.save_keyring_text(f"{format_key(k2)}\n{format_key(k1)}\n")
        assert agent._initial_keys(settings, state, logger) == [k2, k1]
        assert "--key-file differs and is ignored" in out.getvalue()
