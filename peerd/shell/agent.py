"""``peerd agent``: start one daemon (settings, state, sockets, core, runner).

Exit codes: 0 after a graceful leave (SIGINT/SIGTERM or the API ``leave``);
1 when the environment prevents running (address in use, state directory
unusable); 2 for a configuration error (bad flag or file, a non-loopback
bind without keys); 70 when the core or the shell hit a bug (logged with its
traceback once; systemd restarts the daemon).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import secrets
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from peerd.core.node import Node
from peerd.shell.api_server import serve_api
from peerd.shell.logs import LEVEL_NAMES, LimitedLog, Logger, format_addr, install_stdlib_bridge
from peerd.shell.runner import EXIT_FAILURE, KeyManager, Runner, open_inputs, serve
from peerd.shell.settings import Settings, SettingsError, check_config, resolve
from peerd.shell.state import StateDir, StateError
from peerd.shell.tcp import TcpEndpoint, TcpLimits, open_tcp_listener
from peerd.shell.udp import BindError, UdpEndpoint, open_udp_socket
from peerd.wire.messages import Addr
from peerd.wire.seal import KeyFormatError, Keyring, Opener, Sealer, load_key_file, seal_overhead

EXIT_CONFIG = 2

# Datagrams larger than this are dropped before any cryptography. Roomy next
# to max_packet_bytes (peers may be configured differently), far below 64 KiB.
MIN_DATAGRAM_LIMIT = 9216


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``peerd agent`` flags. Defaults are None so that a config file can
    supply them and flags that were given override it."""
    parser.add_argument("--name", help="node name (default: the host name)")
    parser.add_argument("--bind", metavar="HOST:PORT",
                        help="UDP+TCP address to listen on (default 127.0.0.1:7950)")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="address peers use to reach us (default: the bind address)")
    parser.add_argument("--join", metavar="HOST:PORT", action="append",
                        help="peer to join at start (repeatable)")
    parser.add_argument("--api-socket", metavar="PATH", help="Unix socket of the local API")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="state directory (node id, incarnation, peers, keyring)")
    parser.add_argument("--config", metavar="FILE.toml", help="settings file (flags override)")
    parser.add_argument("--key-file", metavar="FILE",
                        help="cluster keys, one a line, primary first")
    parser.add_argument("--preset", choices=["lan", "wan", "local"],
                        help="timing preset (default lan)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow a non-loopback bind without keys (plaintext gossip)")
    parser.add_argument("--log-level", choices=list(LEVEL_NAMES), help="default info")
    parser.add_argument("--check-config", metavar="FILE.toml",
                        help="validate a settings file and exit (0 valid, 2 invalid)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``peerd agent``; returns the process exit code."""
    if getattr(args, "check_config", None):
        return _check_config(args.check_config)
    try:
        settings = resolve(args)
    except SettingsError as e:
        print(f"peerd agent: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logger = Logger(LEVEL_NAMES[settings.log_level])
    install_stdlib_bridge(logger)
    try:
        return _start(settings, logger)
    except _Refuse as e:
        logger.error(str(e))
        return e.code


def _check_config(path: str) -> int:
    try:
        settings = check_config(path)
        if settings.key_file is not None:
            _load_key_file(settings.key_file)
    except SettingsError as e:
        print(f"peerd agent: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except _Refuse as e:
        print(f"peerd agent: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok")
    return 0


class _Refuse(Exception):
    """Startup cannot go on; ``code`` is the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- pieces of the start-up ------------------------------------------------------


def _load_key_file(path: Path) -> list[bytes]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _Refuse(f"cannot read key file {path}: {e.strerror}", EXIT_CONFIG) from e
    try:
        return load_key_file(text)
    except KeyFormatError as e:
        raise _Refuse(f"key file {path}: {e}", EXIT_CONFIG) from e
    except UnicodeDecodeError as e:
        raise _Refuse(f"key file {path}: not text", EXIT_CONFIG) from e


def _initial_keys(settings: Settings, state: StateDir, logger: Logger) -> list[bytes]:
    """The state keyring (written by the API) wins over --key-file once it exists."""
    file_keys = _load_key_file(settings.key_file) if settings.key_file else None
    text = state.keyring_text()
    if text is None:
        return file_keys or []
    try:
        keys = load_key_file(text)
    except KeyFormatError as e:
        raise _Refuse(f"{state.keyring_path} is corrupt: {e}", EXIT_FAILURE) from e
    if file_keys is not None and file_keys != keys:
        logger.warning("using the keyring saved by keys.install/use/remove; --key-file differs "
                       "and is ignored (remove the saved keyring to go back to the key file)",
                       keyring=str(state.keyring_path))
    return keys


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def pick_advertise(family: socket.AddressFamily) -> str | None:
    """The address this host uses to reach the outside (no packet is sent),
    else the first non-loopback address of the host name."""
    probe = "192.0.2.1" if family == socket.AF_INET else "2001:db8::1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            ip = ipaddress.ip_address(s.getsockname()[0])
        if not (ip.is_loopback or ip.is_unspecified):
            return str(ip)
    except OSError:
        pass
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_DGRAM)
    except OSError:
        return None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
            return str(ip)
    return None


def _resolve_seeds(hosts: tuple[tuple[str, int], ...], family: socket.AddressFamily,
                   logger: Logger) -> list[Addr]:
    """Join targets as IP literals (the core speaks addresses, not names)."""
    out: list[Addr] = []
    for host, port in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            out.append((host, port))
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as e:
            logger.warning("cannot resolve join address; skipped", host=host, error=str(e))
            continue
        # Prefer our own family: a v4 socket cannot send to a v6 peer.
        infos.sort(key=lambda i: i[0] != family)
        out.append((str(infos[0][4][0]), port))
    return out


def _start(settings: Settings, logger: Logger) -> int:
    state = StateDir(settings.state_dir)
    try:
        state.open()
    except StateError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    try:
        return _start_locked(settings, logger, state)
    finally:
        state.close()


def _start_locked(settings: Settings, logger: Logger, state: StateDir) -> int:
    bind = settings.bind
    try:
        keys = _initial_keys(settings, state, logger)
        if not keys and not _is_loopback(bind[0]) and not settings.insecure:
            raise _Refuse(
                f"refusing to bind {format_addr(bind)} without a key: gossip would be "
                "unauthenticated plaintext. Give --key-file (make a key with "
                "`peerd keys generate`), or --insecure to accept that",
                EXIT_CONFIG,
            )
        if not keys and not _is_loopback(bind[0]):
            logger.warning("--insecure: gossip on a non-loopback address is unauthenticated "
                           "plaintext; anyone who can reach the port can inject members")
        node_id = state.node_id()
        saved_peers = state.peers()
    except StateError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    try:
        udp_sock = open_udp_socket(bind)
    except BindError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    bound: Addr = (bind[0], udp_sock.getsockname()[1])
    try:
        tcp_sock = open_tcp_listener(bound)
    except BindError as e:
        udp_sock.close()
        raise _Refuse(str(e), EXIT_FAILURE) from e
    try:
        # Only now that nothing else can fail first: each counts one life.
        generation = state.next_generation()
        incarnation = state.start_incarnation()
    except StateError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    advertise = settings.advertise
    if advertise is None:
        if ipaddress.ip_address(bound[0]).is_unspecified:
            picked = pick_advertise(udp_sock.family)
            if picked is None:
                raise _Refuse(f"bind {format_addr(bind)} is unspecified and no "
                              "non-loopback address was found: give --advertise",
                              EXIT_CONFIG)
            advertise = (picked, bound[1])
            logger.info("advertising the first non-loopback address; set --advertise "
                        "to choose another", advertise=advertise)
        else:
            advertise = bound
    seeds = _resolve_seeds(settings.join, udp_sock.family, logger)
    seeds += [p for p in saved_peers if p != advertise and p not in seeds]
    code: int = trio.run(_serve_daemon, settings, logger, state, udp_sock, tcp_sock, keys,
                         node_id, generation, incarnation, advertise, tuple(seeds))
    return code


async def _serve_daemon(settings: Settings, logger: Logger, state: StateDir,
                        udp_sock: socket.socket, tcp_sock: socket.socket,
                        keys: list[bytes], node_id: bytes, generation: int, incarnation: int,
                        advertise: Addr, seeds: tuple[Addr, ...]) -> int:
    keyring = Keyring(keys)
    limits = TcpLimits()
    # One sealer for both transports (one counter sequence per epoch), one opener.
    sealer = Sealer(keyring, node_id, generation)
    opener = Opener(keyring, max_size=limits.max_frame)
    counters: Counter[str] = Counter()
    net_log = LimitedLog(logger)
    inputs = open_inputs()
    max_datagram = max(MIN_DATAGRAM_LIMIT,
                       2 * (settings.swim.max_packet_bytes + seal_overhead(keyring)))
    udp = UdpEndpoint(udp_sock, sealer=sealer, opener=opener, inputs=inputs[0],
                      counters=counters, log=net_log, max_datagram=max_datagram)
    tcp = TcpEndpoint(trio.SocketListener(trio.socket.from_stdlib_socket(tcp_sock)),
                      sealer=sealer, opener=opener, inputs=inputs[0], counters=counters,
                      log=net_log, limits=limits)
    node = Node(node_id=node_id, name=settings.name, addr=advertise, config=settings.swim,
                rng=random.Random(secrets.randbits(64)), incarnation=incarnation,
                generation=generation)
    runner = Runner(node, packets=udp, streams=tcp, logger=logger, inputs=inputs, state=state,
                    keys=KeyManager(keyring, keys, state, logger), config=settings.swim,
                    seeds=seeds, counters=counters)

    async def udp_service(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await udp.run()

    async def api_service(*, task_status: trio.TaskStatus[Any]) -> None:
        await serve_api(str(settings.api_socket), runner, task_status=_ApiStarted(
            task_status, runner))

    logger.info(
        "peerd starting", name=settings.name, id=node_id.hex(), addr=advertise,
        bind=udp.local_addr, generation=generation, incarnation=incarnation,
        preset=settings.preset, keys=len(keys) if keys else "none (plaintext)",
        seeds=len(seeds), api=str(settings.api_socket),
    )
    try:
        code = await serve(runner, [tcp.run, udp_service, api_service], handle_signals=True)
    finally:
        udp.close()
    logger.info("peerd stopped", exit=code, reason=runner.exit_reason or "cancelled")
    return code


class _ApiStarted:
    """Passes the API server's readiness on, and shows its counters in `status`."""

    def __init__(self, inner: trio.TaskStatus[Any], runner: Runner) -> None:
        self.inner = inner
        self.runner = runner

    def started(self, value: Any = None) -> None:
        counters = getattr(value, "counters", None)
        if isinstance(counters, Counter):
            self.runner.counter_sources["api"] = counters
        self.inner.started(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peerd agent", description="Run the peerd daemon.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
