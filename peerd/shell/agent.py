"""``peerd agent``: start one daemon (settings, state, sockets, core, runner).

Exit codes: 0 after a graceful leave (SIGINT/SIGTERM or the API ``leave``);
1 when the environment prevents running (address in use, state directory
unusable); 2 for a configuration error (bad flag or file, a non-loopback
bind without keys, unusable sockets passed by systemd); 70 when the core or
the shell hit a bug (logged with its traceback once; systemd restarts the
daemon).

Under systemd (:mod:`peerd.shell.systemd`) the daemon reports READY=1 once
its sockets are bound and the first join attempt has finished, keeps STATUS=
up to date with the member counts, pings the watchdog from the runner's
loop, takes the API socket from socket activation when one is passed, and
says STOPPING=1 when it starts to leave.

SIGHUP reloads: the config file is read again (with the same flags on top)
and what can change in a running daemon is applied without leaving the
cluster: ``log_level``, the keyring (the key file, or the keyring saved in
the state directory, by the same rule as at start) and the configured tags
(``[tags]``, ``--tag``; see :mod:`peerd.shell.tags` for how they meet tags
set at run time). Other changed settings
are logged as needing a restart. A config that does not validate is logged
and the running configuration stays.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import random
import secrets
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from peerd.api.protocol import ApiError
from peerd.core.mesh.config import PRESETS as MESH_PRESETS
from peerd.core.peer import Peer
from peerd.core.swim.base import tags_problem
from peerd.shell.api_server import serve_api
from peerd.shell.authz import authz_for
from peerd.shell.hostaddr import advertise_problem, resolve_join
from peerd.shell.keys import KeyManager
from peerd.shell.links import LinkManager
from peerd.shell.logs import LEVEL_NAMES, LimitedLog, Logger, format_addr, install_stdlib_bridge
from peerd.shell.messaging import names_config
from peerd.shell.metrics import MetricsBindError, TrafficCounter, open_metrics_socket, serve_http
from peerd.shell.runner import Runner, open_inputs
from peerd.shell.serve import EXIT_FAILURE, serve
from peerd.shell.settings import Settings, SettingsError, check_config, resolve
from peerd.shell.state import StateDir, StateError
from peerd.shell.systemd import (
    ActivationError,
    Notifier,
    SystemdLifecycle,
    listen_fds,
    socket_path,
    stderr_is_journal,
    take_api_socket,
    watchdog_interval,
)
from peerd.shell.tags import NodeTags
from peerd.shell.tcp import TcpEndpoint, TcpLimits, open_tcp_listener
from peerd.shell.udp import BindError, KernelDrops, UdpEndpoint, open_udp_socket
from peerd.wire.messages import Addr, tags_from_mapping
from peerd.wire.seal import (
    KeyFormatError,
    Keyring,
    KeyringError,
    Opener,
    Sealer,
    load_key_file,
    seal_overhead,
)

EXIT_CONFIG = 2

# Datagrams larger than this are dropped before any cryptography. Roomy next
# to max_packet_bytes (peers may be configured differently), far below 64 KiB.
MIN_DATAGRAM_LIMIT = 9216


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``peerd agent`` flags. Defaults are None so that a config file can
    supply them and flags that were given override it."""
    parser.add_argument("--name", help="node name (default: the host name)")
    parser.add_argument(
        "--bind", metavar="HOST:PORT", help="UDP+TCP address to listen on (default 127.0.0.1:7950)"
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="address peers use to reach us (default: the bind address)",
    )
    parser.add_argument(
        "--advertise-nat",
        action="store_true",
        default=None,
        help="--advertise need not be an address of this host (a NAT maps it here)",
    )
    parser.add_argument(
        "--join", metavar="HOST:PORT", action="append", help="peer to join at start (repeatable)"
    )
    parser.add_argument("--api-socket", metavar="PATH", help="Unix socket of the local API")
    parser.add_argument(
        "--state-dir", metavar="DIR", help="state directory (node id, incarnation, peers, keyring)"
    )
    parser.add_argument("--config", metavar="FILE.toml", help="settings file (flags override)")
    parser.add_argument(
        "--key-file", metavar="FILE", help="cluster keys, one a line, primary first"
    )
    parser.add_argument(
        "--preset", choices=["lan", "wan", "local"], help="timing preset (default lan)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback bind without keys (plaintext gossip)",
    )
    parser.add_argument("--log-level", choices=list(LEVEL_NAMES), help="default info")
    parser.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics "
        "(default: off; keep it on loopback)",
    )
    parser.add_argument(
        "--tag",
        metavar="KEY=VALUE",
        action="append",
        help="a tag of this node (repeatable; wins over the config file's [tags] for "
        "its key; see README, Tags)",
    )
    parser.add_argument(
        "--check-config",
        metavar="FILE.toml",
        help="validate a settings file and exit (0 valid, 2 invalid)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``peerd agent``; returns the process exit code."""
    if getattr(args, "check_config", None):
        return _check_config(args.check_config, args)
    try:
        settings = resolve(args)
    except SettingsError as e:
        print(f"peerd agent: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logger = Logger(LEVEL_NAMES[settings.log_level], journal=stderr_is_journal())
    install_stdlib_bridge(logger)
    try:
        return _start(settings, logger, args)
    except _Refuse as e:
        logger.error(str(e))
        return e.code


def _check_config(path: str, args: argparse.Namespace | None = None) -> int:
    """``--check-config FILE``: the file, with the other flags given on top
    (as ``peerd agent --config FILE ...`` would read them), through the same
    :func:`preflight` as a start, so what passes here does not refuse there."""
    try:
        if args is None:
            settings = check_config(path)
        else:
            settings = resolve(argparse.Namespace(**{**vars(args), "config": path}))
        preflight(settings, StateDir(settings.state_dir), None, probe=True)
    except (SettingsError, _Refuse) as e:
        print(f"peerd agent: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok")
    return 0


def preflight(
    settings: Settings,
    state: StateDir,
    logger: Logger | None,
    *,
    api_path: bool = True,
    probe: bool = False,
) -> list[bytes]:
    """Every start-up refusal that the settings and the files they name decide
    (run by ``--check-config`` and by the start itself): the key file and the
    saved keyring must parse, a non-loopback bind needs a key or ``insecure``,
    the API socket path must fit a Unix socket address, ``advertise`` must be
    an address of this host (:mod:`peerd.shell.hostaddr`), and an unspecified bind
    without ``advertise`` needs a non-loopback address on this host. Returns
    the keys to start with. With ``probe`` (check-config: the start does it
    for real) also the state files a start reads, and that the bind and
    metrics hosts are addresses of this host (bound on port 0, so a running
    daemon's own port is not in the way). What only the start can find out
    (a port in use, an unwritable state directory) is not checked."""
    try:
        keys = _initial_keys(settings, state, logger)
        if probe:
            state.check()
    except StateError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    if probe:
        try:
            open_udp_socket((settings.bind[0], 0)).close()
            if settings.metrics_addr is not None:
                open_metrics_socket((settings.metrics_addr[0], 0)).close()
        except (BindError, MetricsBindError) as e:
            raise _Refuse(str(e).replace(":0:", ":", 1), EXIT_FAILURE) from e
    _check_keys(settings, keys)
    if settings.advertise is not None and (
        problem := advertise_problem(settings.advertise, nat=settings.advertise_nat)
    ):
        raise _Refuse(f"advertise {format_addr(settings.advertise)}: {problem}", EXIT_CONFIG)
    if api_path:  # (not when systemd hands over the API socket)
        _check_api_socket(settings)
    if settings.advertise is None:
        family = socket.AF_INET6 if ":" in settings.bind[0] else socket.AF_INET
        _default_advertise(settings.bind, family)
    return keys


# sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_UNIX_PATH_BYTES = 107


def _check_api_socket(settings: Settings) -> None:
    size = len(os.fsencode(settings.api_socket))
    if size > MAX_UNIX_PATH_BYTES:
        raise _Refuse(
            f"api_socket {settings.api_socket} is {size} bytes long; a Unix socket path "
            f"holds at most {MAX_UNIX_PATH_BYTES}: choose a shorter one",
            EXIT_CONFIG,
        )


def _default_advertise(bound: Addr, family: socket.AddressFamily) -> Addr | None:
    """The advertise address for a bind without ``advertise``: the bind itself,
    or for an unspecified bind the first non-loopback address (None: use the
    bound address)."""
    if not ipaddress.ip_address(bound[0]).is_unspecified:
        return None
    picked = pick_advertise(family)
    if picked is None:
        raise _Refuse(
            f"bind {format_addr(bound)} is unspecified and no "
            "non-loopback address was found: give --advertise",
            EXIT_CONFIG,
        )
    return (picked, bound[1])


EPHEMERAL_BIND_ATTEMPTS = 32


def bind_endpoints(bind: Addr) -> tuple[socket.socket, socket.socket]:
    """The UDP socket and the TCP listener, on one host:port.

    With port 0 the kernel picks the UDP port, and that port may be taken for
    TCP (by any connection whose ephemeral local port it is, common on a busy
    loopback): then another port is tried, up to EPHEMERAL_BIND_ATTEMPTS
    times, instead of refusing to start. A port given by the user is tried
    once. Raises BindError."""
    attempts = EPHEMERAL_BIND_ATTEMPTS if bind[1] == 0 else 1
    for attempt in range(1, attempts + 1):
        udp_sock = open_udp_socket(bind)
        try:
            return udp_sock, open_tcp_listener((bind[0], udp_sock.getsockname()[1]))
        except BindError as e:
            udp_sock.close()
            if not e.in_use or attempt == attempts:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


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


def _initial_keys(settings: Settings, state: StateDir, logger: Logger | None) -> list[bytes]:
    """The state keyring (written by the API) wins over --key-file once it exists."""
    file_keys = _load_key_file(settings.key_file) if settings.key_file else None
    text = state.keyring_text()
    if text is None:
        return file_keys or []
    try:
        keys = load_key_file(text)
    except KeyFormatError as e:
        raise _Refuse(f"{state.keyring_path} is corrupt: {e}", EXIT_FAILURE) from e
    if file_keys is not None and file_keys != keys and logger is not None:
        logger.warning(
            "using the keyring saved by keys.install/use/remove; --key-file differs "
            "and is ignored (remove the saved keyring to go back to the key file)",
            keyring=str(state.keyring_path),
        )
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


def _start(settings: Settings, logger: Logger, args: argparse.Namespace | None = None) -> int:
    # Until the signal task listens, a SIGHUP (reload) must not kill the daemon.
    old_hup: Any = None
    with contextlib.suppress(ValueError):  # not the main thread (embedded use)
        old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Consumed at once (the variables are removed): the fds are ours to close.
    try:
        api_sock = take_api_socket(listen_fds(), logger)
    except ActivationError as e:
        raise _Refuse(str(e), EXIT_CONFIG) from e
    state = StateDir(settings.state_dir)
    try:
        state.open()
    except StateError as e:
        if api_sock is not None:
            api_sock.close()
        raise _Refuse(str(e), EXIT_FAILURE) from e
    try:
        return _start_locked(settings, logger, state, api_sock, args)
    finally:
        state.close()
        if old_hup is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGHUP, old_hup)


def _start_tags(settings: Settings, state: StateDir, logger: Logger) -> NodeTags:
    """The configured tags with the run-time changes saved by earlier runs on
    top, by the rule of :mod:`peerd.shell.tags`; saved again (reconciled)."""
    saved = state.tags()
    tags = saved if saved is not None else NodeTags()
    before = tags.copy()
    dropped = tags.reconfigure(dict(settings.tags))
    if dropped:
        logger.info("configured tags replace tags set at run time", keys=",".join(dropped))
    problem = tags_problem(settings.swim, tuple(sorted(tags.effective().items())))
    if problem is not None:
        logger.warning(
            "tags set at run time do not fit with the configured ones; dropped",
            problem=problem,
            keys=",".join(sorted(tags.runtime)),
        )
        tags.runtime.clear()
    if saved is None and not tags.configured:
        return tags  # nothing to remember
    if tags != before or saved is None:
        state.save_tags(tags)
    return tags


def _check_keys(settings: Settings, keys: list[bytes]) -> None:
    bind = settings.bind
    if not keys and not _is_loopback(bind[0]) and not settings.insecure:
        raise _Refuse(
            f"refusing to bind {format_addr(bind)} without a key: gossip would be "
            "unauthenticated plaintext. Give --key-file (make a key with "
            "`peerd keys generate`), or --insecure to accept that",
            EXIT_CONFIG,
        )


def _start_locked(
    settings: Settings,
    logger: Logger,
    state: StateDir,
    api_sock: socket.socket | None = None,
    args: argparse.Namespace | None = None,
) -> int:
    bind = settings.bind
    keys = preflight(settings, state, logger, api_path=api_sock is None)
    try:
        if not keys and not _is_loopback(bind[0]):
            logger.warning(
                "--insecure: gossip on a non-loopback address is unauthenticated "
                "plaintext; anyone who can reach the port can inject members"
            )
        node_id = state.node_id()
        saved_peers = state.peers()
        node_tags = _start_tags(settings, state, logger)
    except StateError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    try:
        udp_sock, tcp_sock = bind_endpoints(bind)
    except BindError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    bound: Addr = (bind[0], udp_sock.getsockname()[1])
    metrics_sock: socket.socket | None = None
    if settings.metrics_addr is not None:
        try:
            metrics_sock = open_metrics_socket(settings.metrics_addr)
        except MetricsBindError as e:
            udp_sock.close()
            tcp_sock.close()
            raise _Refuse(str(e), EXIT_FAILURE) from e
        if not _is_loopback(settings.metrics_addr[0]):
            logger.warning(
                "metrics are served without authentication on a non-loopback address",
                metrics=settings.metrics_addr,
            )
    try:
        # Only now that nothing else can fail first: each counts one life.
        generation = state.next_generation()
        incarnation = state.start_incarnation()
    except StateError as e:
        raise _Refuse(str(e), EXIT_FAILURE) from e
    advertise = settings.advertise
    if advertise is None:
        picked = _default_advertise(bound, udp_sock.family)
        if picked is not None:
            advertise = picked
            logger.info(
                "advertising the first non-loopback address; set --advertise to choose another",
                advertise=advertise,
            )
        else:
            advertise = bound
    seeds = resolve_join(settings.join, udp_sock.family, logger)
    seeds += [p for p in saved_peers if p != advertise and p not in seeds]
    sockets = _Sockets(udp_sock, tcp_sock, api_sock, metrics_sock)
    code: int = trio.run(
        _serve_daemon,
        settings,
        logger,
        state,
        sockets,
        keys,
        node_id,
        generation,
        incarnation,
        advertise,
        tuple(seeds),
        args,
        node_tags,
    )
    return code


@dataclasses.dataclass
class _Sockets:
    udp: socket.socket
    tcp: socket.socket
    api: socket.socket | None  # from socket activation; None: bind settings.api_socket
    metrics: socket.socket | None


async def _serve_daemon(
    settings: Settings,
    logger: Logger,
    state: StateDir,
    sockets: _Sockets,
    keys: list[bytes],
    node_id: bytes,
    generation: int,
    incarnation: int,
    advertise: Addr,
    seeds: tuple[Addr, ...],
    args: argparse.Namespace | None = None,
    node_tags: NodeTags | None = None,
) -> int:
    udp_sock, tcp_sock = sockets.udp, sockets.tcp
    node_tags = node_tags if node_tags is not None else NodeTags(dict(settings.tags))
    keyring = Keyring(keys)
    limits = TcpLimits(hello_timeout_s=settings.links.hello_timeout_s)
    # One sealer for both transports (one counter sequence per epoch), one opener.
    sealer = Sealer(keyring, node_id, generation)
    opener = Opener(keyring, max_size=limits.max_frame)
    counters: Counter[str] = Counter()
    net_log = LimitedLog(logger)
    inputs = open_inputs()
    max_datagram = max(
        MIN_DATAGRAM_LIMIT, 2 * (settings.swim.max_packet_bytes + seal_overhead(keyring))
    )
    udp = UdpEndpoint(
        udp_sock,
        sealer=sealer,
        opener=opener,
        inputs=inputs[0],
        counters=counters,
        log=net_log,
        max_datagram=max_datagram,
    )
    tcp = TcpEndpoint(
        trio.SocketListener(trio.socket.from_stdlib_socket(tcp_sock)),
        sealer=sealer,
        opener=opener,
        inputs=inputs[0],
        counters=counters,
        log=net_log,
        limits=limits,
    )
    links = LinkManager(
        node_id,
        sealer=sealer,
        keyring=keyring,
        inputs=inputs[0],
        counters=counters,
        log=net_log,
        limits=settings.links,
    )
    tcp.on_link = links.accept
    node = make_peer(settings, node_id, advertise, incarnation, generation, node_tags)
    notifier = Notifier(logger=logger)
    watchdog_s = watchdog_interval()
    lifecycle = (
        SystemdLifecycle(notifier, lambda: _member_counts(node), watchdog_s=watchdog_s)
        if notifier.enabled
        else None
    )
    key_manager = KeyManager(keyring, keys, state, logger, key_file=settings.key_file)
    runner = Runner(
        node,
        packets=udp,
        streams=tcp,
        logger=logger,
        inputs=inputs,
        state=state,
        keys=key_manager,
        config=settings.swim,
        seeds=seeds,
        counters=counters,
        lifecycle=lifecycle,
        traffic=TrafficCounter(counters),
        links=links,
    )
    runner.node_tags = node_tags  # set-tags keeps run-time changes in the state dir
    runner.authz = authz = authz_for(settings.api_policy, counters, logger)  # who may do what
    mesh = node.mesh
    assert mesh is not None
    runner.counter_sources["hyparview"] = mesh.hyparview.counters
    runner.counter_sources["plumtree"] = mesh.plumtree.counters
    runner.gauge_sources["mesh_active"] = lambda: len(mesh.hyparview.active())
    runner.gauge_sources["mesh_passive"] = lambda: len(mesh.hyparview.passive())
    runner.gauge_sources["links_open"] = lambda: links.open_count
    # SWIM's watch links are TCP connections too (kept apart from the mesh's).
    runner.gauge_sources["watch_links"] = lambda: len(tcp.watch_links) + tcp.links_in
    runner.gauge_sources["tcp_preauth_connections"] = lambda: tcp.preauth.connections
    runner.gauge_sources["tcp_preauth_bytes"] = lambda: tcp.preauth.reserved
    # what the kernel dropped because we did not read fast enough (a flood)
    runner.counter_sources["udp_drop"] = KernelDrops(udp.sock)

    async def udp_service(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await udp.run()

    api_target: Any = sockets.api if sockets.api is not None else str(settings.api_socket)

    async def api_service(*, task_status: trio.TaskStatus[Any]) -> None:
        await serve_api(
            api_target,
            runner,
            mailbox_messages=settings.messages.mailbox_messages,
            mailbox_bytes=settings.messages.mailbox_bytes,
            mailbox_total_bytes=settings.messages.mailbox_total_bytes,
            limits=settings.api,
            task_status=_ApiStarted(task_status, runner),
        )

    services: list[Any] = [tcp.run, links.run, udp_service, api_service]
    metrics_sock = sockets.metrics
    if metrics_sock is not None:

        async def snapshot() -> dict[str, Any]:
            return dict(await runner.call_in_runner(runner._status))

        async def metrics_service(*, task_status: trio.TaskStatus[None]) -> None:
            await serve_http(metrics_sock, snapshot, task_status=task_status)

        services.append(metrics_service)

    api_text = (
        f"{socket_path(sockets.api)} (from systemd)"
        if sockets.api is not None
        else str(settings.api_socket)
    )
    fields: dict[str, object] = {}
    if metrics_sock is not None:
        fields["metrics"] = metrics_sock.getsockname()[:2]
    if notifier.enabled:
        fields["systemd"] = "notify" + (f", watchdog every {watchdog_s:g}s" if watchdog_s else "")
    logger.info(
        "peerd starting",
        name=settings.name,
        id=node_id.hex(),
        addr=advertise,
        bind=udp.local_addr,
        generation=generation,
        incarnation=incarnation,
        preset=settings.preset,
        keys=len(keys) if keys else "none (plaintext)",
        seeds=len(seeds),
        api=api_text,
        api_admins=authz.describe(),
        **fields,
    )
    reloader = Reloader(args, settings, logger, state, runner, key_manager, lifecycle)
    try:
        code = await serve(runner, services, handle_signals=True, on_reload=reloader)
    finally:
        udp.close()
        notifier.close()
    logger.info("peerd stopped", exit=code, reason=runner.exit_reason or "cancelled")
    return code


def make_peer(
    settings: Settings,
    node_id: bytes,
    advertise: Addr,
    incarnation: int,
    generation: int,
    node_tags: NodeTags,
) -> Peer:
    """The daemon's core: membership and registry, the partial mesh of the
    preset, and messages to names with the ``[messages]`` settings; each
    subsystem draws from its own generator, seeded from the system's."""
    return Peer(
        node_id=node_id,
        name=settings.name,
        addr=advertise,
        config=settings.swim,
        rng=random.Random(secrets.randbits(64)),
        incarnation=incarnation,
        generation=generation,
        tags=tags_from_mapping(node_tags.effective()),
        mesh=MESH_PRESETS.get(settings.preset, MESH_PRESETS["lan"])(),
        names=names_config(settings.messages),
        mesh_rng=random.Random(secrets.randbits(64)),
        names_rng=random.Random(secrets.randbits(64)),
        registry=settings.registry,
    )


def _member_counts(node: Peer) -> dict[str, int]:
    counts: Counter[str] = Counter(m.status.label for m in node.members())
    return dict(counts)


# Settings a running daemon cannot take over (sockets are bound, the core is built).
_RESTART_ONLY = (
    "name",
    "bind",
    "advertise",
    "advertise_nat",
    "join",
    "api_socket",
    "state_dir",
    "preset",
    "insecure",
    "swim",
    "metrics_addr",
    "links",
    "messages",
    "api",
)


class Reloader:
    """SIGHUP: read the config file and the keys again, keep the membership.

    The flags the daemon was started with still override the file, as at
    start. Only ``log_level``, the keyring and the tags apply to the running daemon;
    every other change is logged as needing a restart.
    """

    def __init__(
        self,
        args: argparse.Namespace | None,
        settings: Settings,
        logger: Logger,
        state: StateDir,
        runner: Runner,
        keys: KeyManager,
        lifecycle: SystemdLifecycle | None,
    ) -> None:
        self.args = args
        self.settings = settings
        self.logger = logger
        self.state = state
        self.runner = runner
        self.keys = keys
        self.lifecycle = lifecycle
        self.reloads = 0

    async def __call__(self) -> None:
        self.reloads += 1
        if self.lifecycle is not None:
            self.lifecycle.reloading()
        source = str(self.settings.config_file) if self.settings.config_file else "flags only"
        self.logger.info("reloading", config=source)
        problem = None
        try:
            await self._reload()
        except (SettingsError, _Refuse, KeyringError, ApiError, StateError) as e:
            problem = str(getattr(e, "message", None) or e)
            self.logger.error("reload failed; the running configuration stays", error=problem)
        if self.lifecycle is not None:
            self.lifecycle.reloaded(problem)

    async def _reload(self) -> None:
        new = resolve(self.args if self.args is not None else argparse.Namespace())
        keys = preflight(new, self.state, self.logger, api_path=False)
        old = self.settings
        changed: list[str] = []
        if new.log_level != old.log_level:
            self.logger.level = LEVEL_NAMES[new.log_level]
            install_stdlib_bridge(self.logger)
            changed.append("log_level")
        if await self.runner.call_in_runner(lambda: self.keys.replace(keys)):
            changed.append("keys")
        if await self.runner.call_in_runner(lambda: self.runner.reconfigure_tags(new.tags)):
            changed.append("tags")
        if new.api_policy != old.api_policy:
            changed.append("api_policy")  # names are resolved again on every reload anyway
        self.runner.authz = authz_for(new.api_policy, self.runner.counters, self.logger)
        restart = [k for k in _RESTART_ONLY if getattr(new, k) != getattr(old, k)]
        if restart:
            self.logger.warning(
                "changed settings need a restart to apply; running with the old values",
                settings=",".join(restart),
            )
        # Remember what is applied, so the next reload compares with the running values.
        self.settings = dataclasses.replace(
            old,
            log_level=new.log_level,
            key_file=new.key_file,
            tags=new.tags,
            api_policy=new.api_policy,
        )
        self.keys.key_file = new.key_file
        self.logger.info(
            "reloaded",
            changed=",".join(changed) or "nothing",
            keys=len(keys) if keys else "none (plaintext)",
        )


class _ApiStarted:
    """Passes the API server's readiness on, and shows its counters in `status`."""

    def __init__(self, inner: trio.TaskStatus[Any], runner: Runner) -> None:
        self.inner = inner
        self.runner = runner

    def started(self, value: Any = None) -> None:
        counters = getattr(value, "counters", None)
        if isinstance(counters, Counter):
            self.runner.counter_sources["api"] = counters
        connections = getattr(value, "connections", None)
        if isinstance(connections, dict):
            self.runner.gauge_sources["api_connections"] = lambda: len(connections)
        shared = getattr(value, "shared", None)
        if shared is not None:
            self.runner.gauge_sources["api_mailbox_bytes"] = lambda: shared.mailboxes.used
        self.inner.started(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peerd agent", description="Run the peerd daemon.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
