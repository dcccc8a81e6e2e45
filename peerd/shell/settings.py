"""Agent settings: a TOML file, overridden by command-line flags.

The file's top-level keys mirror the ``peerd agent`` flags (dashes become
underscores); a ``[swim]`` table overrides fields of the chosen preset::

    name = "web1"
    bind = "0.0.0.0:7950"
    advertise = "10.0.0.5:7950"
    advertise_nat = false             # true: advertise need not be ours (NAT)
    join = ["10.0.0.2:7950", "10.0.0.3"]
    api_socket = "/run/peerd/api.sock"
    state_dir = "/var/lib/peerd"
    key_file = "/etc/peerd/keys"      # relative paths: relative to this file
    preset = "lan"                    # lan | wan | local
    insecure = false
    log_level = "info"                # debug | info | warning | error
    metrics_addr = "127.0.0.1:7951"   # serve /metrics over HTTP (default: off)

    [swim]
    probe_interval_s = 0.5
    suspicion_mult = 5

    [links]                           # peer links (partial mesh, messages to names)
    idle_s = 60.0
    max_direct_links = 32

    [messages]                        # messages to names
    send_timeout_s = 10.0
    mailbox_messages = 16384

    [tags]                            # this node's tags (--tag K=V adds/overrides)
    role = "web"
    dc = "eu-1"

    [api]                             # who may do what (peerd.shell.authz)
    admin_group = "peerd-admins"
    [api.scopes.billing]
    register = ["user:billing"]

Everything is checked before the daemon starts: an unknown key or a bad
value is a :class:`SettingsError` naming the key, so a typo cannot silently
leave a default in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerd.core.config import PRESETS, SwimConfig
from peerd.core.registry.config import RegistryConfig
from peerd.core.swim.base import tags_problem
from peerd.shell.api_limits import MAILBOX_TOTAL_MAX, ApiLimits, api_limits_problem
from peerd.shell.authz import ApiPolicy, PolicyError, take_api_policy
from peerd.shell.bounds import MIN_MAILBOX_BYTES as MIN_MAILBOX_BYTES
from peerd.shell.bounds import out_of_range
from peerd.shell.hostaddr import never_advertised
from peerd.shell.links import LinkLimits
from peerd.shell.logs import LEVEL_NAMES
from peerd.shell.messaging import MessageLimits
from peerd.shell.state import default_state_dir
from peerd.wire.messages import Addr

DEFAULT_PORT = 7950
DEFAULT_BIND: Addr = ("127.0.0.1", DEFAULT_PORT)
DEFAULT_PRESET = "lan"
DEFAULT_LOG_LEVEL = "info"
# A config file is a page of settings; anything larger is not one (and is
# not read whole into memory).
MAX_CONFIG_BYTES = 1 << 20


class SettingsError(Exception):
    """A setting is unknown or invalid. ``key`` names it (``swim.probe_interval_s``)."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {reason}")
        self.key = key
        self.reason = reason
        self.source = source


@dataclass(frozen=True, slots=True)
class Settings:
    name: str
    bind: Addr
    advertise: Addr | None  # None: derive from bind after binding
    join: tuple[tuple[str, int], ...]  # host may be a DNS name, resolved at start
    api_socket: Path
    state_dir: Path
    key_file: Path | None
    preset: str
    insecure: bool
    log_level: str
    swim: SwimConfig
    config_file: Path | None = None
    registry: RegistryConfig = dataclasses.field(default_factory=RegistryConfig)
    metrics_addr: Addr | None = None  # HTTP /metrics (Prometheus text), off when None
    links: LinkLimits = dataclasses.field(default_factory=LinkLimits)  # [links]
    messages: MessageLimits = dataclasses.field(default_factory=MessageLimits)  # [messages]
    api: ApiLimits = dataclasses.field(default_factory=ApiLimits)  # [api]
    tags: tuple[tuple[str, str], ...] = ()  # [tags] with --tag on top, sorted by key
    advertise_nat: bool = False  # advertise may be an address of a NAT, not of this host
    api_policy: ApiPolicy = dataclasses.field(default_factory=ApiPolicy)  # [api] authorization


# --- addresses ----------------------------------------------------------------


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 literal."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        host, port_text = text, ""  # bare IPv6 literal
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text:
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: port must be a number")
        port = int(port_text)
    else:
        port = default_port
    if not 0 <= port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def parse_ip_addr(text: str, *, allow_unspecified: bool, allow_port_zero: bool) -> Addr:
    """An address whose host must be an IP literal (what we bind or gossip;
    what we gossip, ``allow_unspecified=False``, is never multicast or
    broadcast either: :mod:`peerd.shell.hostaddr`)."""
    host, port = parse_hostport(text)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 or IPv6 address") from None
    if not allow_unspecified and (problem := never_advertised(ip)) is not None:
        raise ValueError(problem)
    if port == 0 and not allow_port_zero:
        raise ValueError("port 0 is not allowed here")
    return str(ip), port


# --- SwimConfig fields -----------------------------------------------------------

_SWIM_FIELDS = {f.name: f for f in dataclasses.fields(SwimConfig)}
# [swim] also takes the registry's flush delay: it was a SwimConfig field until
# the registry became membership's sibling with a RegistryConfig of its own,
# and the file option keeps working (it goes to Settings.registry).
_REGISTRY_IN_SWIM = {
    f.name: f for f in dataclasses.fields(RegistryConfig) if f.name == "registry_flush_s"
}
_SWIM_FIELDS.update(_REGISTRY_IN_SWIM)


def _field_value(key: str, kind: object, value: object, source: str | None) -> object:
    """One table entry checked against its dataclass field's type
    (``kind``: a string, annotations are postponed) and its range
    (:data:`peerd.shell.bounds.BOUNDS`)."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise SettingsError(key, f"expected true or false, got {value!r}", source)
        return value
    if isinstance(value, bool):
        raise SettingsError(key, f"expected a number, got {value!r}", source)
    if kind == "int":
        if not isinstance(value, int):
            raise SettingsError(key, f"expected an integer, got {value!r}", source)
    elif kind == "float":
        if not isinstance(value, (int, float)):
            raise SettingsError(key, f"expected a number, got {value!r}", source)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(key, "must be finite", source)
    else:  # pragma: no cover - a new field type needs a rule here
        raise SettingsError(key, f"unsupported field type {kind}", source)
    assert isinstance(value, (int, float))
    problem = out_of_range(key, value)
    if problem is not None:
        raise SettingsError(key, problem, source)
    return value


def _check_fields(
    table: str,
    fields: dict[str, dataclasses.Field[Any]],
    overrides: dict[str, Any],
    source: str | None,
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in fields:
            raise SettingsError(f"{table}.{name}", "unknown setting", source)
        changes[name] = _field_value(f"{table}.{name}", fields[name].type, value, source)
    return changes


def check_swim_fields(overrides: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Each ``[swim]`` entry checked on its own (known field, type, range)."""
    return _check_fields("swim", _SWIM_FIELDS, overrides, source)


def build_swim(preset: str, overrides: dict[str, Any], source: str | None = None) -> SwimConfig:
    """The preset with ``overrides`` applied, validated field by field and as a whole."""
    if preset not in PRESETS:
        raise SettingsError(
            "preset", f"unknown preset {preset!r} (one of {_choices(PRESETS)})", source
        )
    changes = check_swim_fields(overrides, source)
    for name in _REGISTRY_IN_SWIM:
        changes.pop(name, None)
    config = PRESETS[preset]().replace(**changes)
    if config.probe_timeout_s > config.probe_interval_s:
        raise SettingsError(
            "swim.probe_timeout_s",
            f"must not exceed probe_interval_s ({config.probe_timeout_s} > "
            f"{config.probe_interval_s})",
            source,
        )
    return config


def build_registry(overrides: dict[str, Any], source: str | None = None) -> RegistryConfig:
    """The registry's config: defaults, with the ``[swim]`` entries that are its own."""
    changes = check_swim_fields(overrides, source)
    return RegistryConfig(**{k: v for k, v in changes.items() if k in _REGISTRY_IN_SWIM})


# --- [links] and [messages] ------------------------------------------------------

# The fields of LinkLimits an operator may set (timeouts and pool sizes); the
# rest (frame and queue sizes) are protocol tuning. Ranges: peerd.shell.bounds.
_LINK_SETTINGS = (
    "max_links",
    "max_direct_links",
    "idle_s",
    "connect_timeout_s",
    "handshake_timeout_s",
    "write_timeout_s",
    "drain_timeout_s",
    "hello_timeout_s",
)
_TABLE_FIELDS: dict[str, dict[str, dataclasses.Field[Any]]] = {
    "links": {f.name: f for f in dataclasses.fields(LinkLimits) if f.name in _LINK_SETTINGS},
    "messages": {f.name: f for f in dataclasses.fields(MessageLimits)},
    "api": {f.name: f for f in dataclasses.fields(ApiLimits)},
}


def check_table_fields(
    table: str, overrides: dict[str, Any], source: str | None = None
) -> dict[str, Any]:
    """Each ``[links]`` / ``[messages]`` entry checked on its own."""
    return _check_fields(table, _TABLE_FIELDS[table], overrides, source)


def build_links(overrides: dict[str, Any], source: str | None = None) -> LinkLimits:
    """:class:`LinkLimits` with the ``[links]`` entries, checked as a whole
    (``max_direct_links <= max_links``, ``drain_timeout_s <
    write_timeout_s``). Idle links are looked for at least twice per
    ``idle_s``."""
    limits = dataclasses.replace(LinkLimits(), **check_table_fields("links", overrides, source))
    if limits.max_direct_links > limits.max_links:
        raise SettingsError(
            "links.max_direct_links",
            f"must not exceed max_links ({limits.max_direct_links} > {limits.max_links})",
            source,
        )
    if limits.drain_timeout_s >= limits.write_timeout_s:
        # The peer's writes on its new link wait while the old one drains.
        raise SettingsError(
            "links.drain_timeout_s",
            f"must be below links.write_timeout_s ({limits.drain_timeout_s:g} "
            f">= {limits.write_timeout_s:g}): a peer's writes on the link "
            "that replaces a draining one wait that long",
            source,
        )
    return dataclasses.replace(
        limits, reap_interval_s=min(limits.reap_interval_s, limits.idle_s / 2)
    )


def build_messages(overrides: dict[str, Any], source: str | None = None) -> MessageLimits:
    """:class:`MessageLimits` with the ``[messages]`` entries (a mailbox
    holds at least one message of the largest size: its lower bound; all
    mailboxes together at least one mailbox)."""
    limits = MessageLimits(**check_table_fields("messages", overrides, source))
    if not limits.mailbox_bytes <= limits.mailbox_total_bytes <= MAILBOX_TOTAL_MAX:
        raise SettingsError(
            "messages.mailbox_total_bytes",
            f"must be between mailbox_bytes ({limits.mailbox_bytes}) and "
            f"{MAILBOX_TOTAL_MAX}, got {limits.mailbox_total_bytes}",
            source,
        )
    return limits


def build_api(overrides: dict[str, Any], source: str | None = None) -> ApiLimits:
    """:class:`ApiLimits` with the ``[api]`` entries, each within its bounds."""
    limits = ApiLimits(**check_table_fields("api", overrides, source))
    problem = api_limits_problem(limits)
    if problem is not None:
        raise SettingsError(f"api.{problem[0]}", problem[1], source)
    return limits


def _choices(names: object) -> str:
    return ", ".join(sorted(names))  # type: ignore[call-overload]


# --- the file ------------------------------------------------------------------

_TOP_KEYS = {
    "name",
    "bind",
    "advertise",
    "advertise_nat",
    "join",
    "api_socket",
    "state_dir",
    "key_file",
    "preset",
    "insecure",
    "log_level",
    "swim",
    "metrics_addr",
    "links",
    "messages",
    "api",
    "tags",
}


def load_file(path: Path) -> dict[str, Any]:
    """Parse and validate a config file into the same shape :func:`resolve` merges.

    Values are converted (addresses parsed, paths made absolute relative to
    the file) so that CLI flags and file values are interchangeable.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError("config", f"file {path} not found") from None
    except OSError as e:
        raise SettingsError("config", f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise SettingsError("config", f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SettingsError(
            "config", f"{path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError("config", f"{path} is not valid TOML: {e}") from None
    except RecursionError:
        raise SettingsError(
            "config", f"{path} nests arrays or tables too deeply to be a peerd config"
        ) from None
    base = Path(path).resolve().parent
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _TOP_KEYS:
            hint = " (dashes are written as underscores)" if "-" in key else ""
            raise SettingsError(key, f"unknown setting{hint}", source)
        out[key] = _file_value(key, value, base, source)
    if "swim" in out:
        # Field by field here; checks across fields wait for the final preset
        # (a --preset flag may replace the file's).
        out["swim"] = check_swim_fields(out["swim"], source)
    if "api" in out:
        # admin_group, events and [api.scopes.*] are the authorization
        # policy's; the rest of [api] are the socket's bounds (below).
        try:
            out["api_policy"] = take_api_policy(out["api"])
        except PolicyError as e:
            raise SettingsError(f"api.{e.key}", e.reason, source) from None
    for table in ("links", "messages", "api"):
        if table in out:
            out[table] = check_table_fields(table, out[table], source)
    return out


def _file_value(key: str, value: object, base: Path, source: str) -> object:
    def want_str() -> str:
        if not isinstance(value, str):
            raise SettingsError(key, f"expected a string, got {value!r}", source)
        return value

    try:
        match key:
            case "name":
                return _check_name(want_str())
            case "bind":
                return parse_ip_addr(want_str(), allow_unspecified=True, allow_port_zero=True)
            case "advertise":
                return parse_ip_addr(want_str(), allow_unspecified=False, allow_port_zero=False)
            case "metrics_addr":
                return parse_ip_addr(want_str(), allow_unspecified=True, allow_port_zero=True)
            case "join":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise SettingsError(key, 'expected a list of "host:port" strings', source)
                return tuple(_join_addr(v) for v in value)
            case "api_socket" | "state_dir" | "key_file":
                text = want_str()
                if not text:
                    raise SettingsError(key, "must not be empty", source)
                return base / os.path.expanduser(text)
            case "preset":
                text = want_str()
                if text not in PRESETS:
                    raise ValueError(f"unknown preset {text!r} (one of {_choices(PRESETS)})")
                return text
            case "insecure" | "advertise_nat":
                if not isinstance(value, bool):
                    raise SettingsError(key, f"expected true or false, got {value!r}", source)
                return value
            case "log_level":
                text = want_str()
                if text not in LEVEL_NAMES:
                    raise ValueError(f"unknown level {text!r} (one of {_choices(LEVEL_NAMES)})")
                return text
            case "tags":
                if not isinstance(value, dict):
                    raise SettingsError(key, "expected a table ([tags]) of strings", source)
                for k, v in value.items():
                    if not isinstance(v, str):
                        raise SettingsError(f"tags.{k}", f"expected a string, got {v!r}", source)
                return dict(value)
            case "swim" | "links" | "messages" | "api":
                if not isinstance(value, dict):
                    raise SettingsError(key, f"expected a table ([{key}])", source)
                return dict(value)
    except ValueError as e:
        raise SettingsError(key, str(e), source) from None
    raise SettingsError(key, "unknown setting", source)  # pragma: no cover


def _check_name(name: str) -> str:
    if not name or len(name.encode()) > 255:
        raise ValueError("must be 1 to 255 bytes")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise ValueError("must not contain spaces or control characters")
    return name


def _join_addr(text: str) -> tuple[str, int]:
    host, port = parse_hostport(text)
    if port == 0:
        raise ValueError(f"{text!r}: port 0 is not allowed")
    return host, port


# --- merging -------------------------------------------------------------------


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given (argparse defaults are None), converted like file values."""
    out: dict[str, Any] = {}
    try:
        for key in ("name", "bind", "advertise", "log_level", "preset", "metrics_addr"):
            value = getattr(args, key, None)
            if value is None:
                continue
            match key:
                case "name":
                    out[key] = _check_name(value)
                case "bind" | "metrics_addr":
                    out[key] = parse_ip_addr(value, allow_unspecified=True, allow_port_zero=True)
                case "advertise":
                    out[key] = parse_ip_addr(value, allow_unspecified=False, allow_port_zero=False)
                case _:
                    out[key] = value
    except ValueError as e:
        raise SettingsError(f"--{key.replace('_', '-')}", str(e)) from None
    join = getattr(args, "join", None)
    if join:
        try:
            out["join"] = tuple(_join_addr(v) for v in join)
        except ValueError as e:
            raise SettingsError("--join", str(e)) from None
    for key in ("api_socket", "state_dir", "key_file"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = Path(os.path.expanduser(value)).absolute()
    for flag in ("insecure", "advertise_nat"):
        if getattr(args, flag, None):
            out[flag] = True
    tag_flags = getattr(args, "tag", None)
    if tag_flags:
        tags: dict[str, str] = {}
        for text in tag_flags:
            key, sep, value = str(text).partition("=")
            if not sep or not key:
                raise SettingsError("--tag", f"expected KEY=VALUE, got {text!r}")
            tags[key] = value
        out["tags"] = tags
    return out


def check_tags(tags: dict[str, str], swim: SwimConfig, source: str | None = None) -> None:
    """The configured tags must fit the limits a node's tags have (the same
    rule as for ``peerd tags set``)."""
    for key in tags:
        if not key:
            raise SettingsError("tags", "empty tag key", source)
    problem = tags_problem(swim, tuple(sorted(tags.items())))
    if problem is not None:
        raise SettingsError("tags", problem, source)


def default_api_socket() -> Path:
    """The API client's default path (one rule for daemon and CLI); the same
    rule restated in case the client module is missing from a build."""
    try:
        from peerd.api.client import default_socket_path
    except ImportError:
        pass
    else:
        return Path(default_socket_path())
    if os.geteuid() == 0:
        return Path("/run/peerd/peerd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "peerd" / "peerd.sock"
    return Path(f"/tmp/peerd-{os.getuid()}/peerd.sock")


def resolve(args: argparse.Namespace) -> Settings:
    """Merge defaults < config file < flags into one validated :class:`Settings`."""
    config_file: Path | None = None
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        config_file = Path(args.config)
        values.update(load_file(config_file))
    file_tags = values.get("tags", {})
    values.update(cli_values(args))
    values["tags"] = {**file_tags, **values.get("tags", {})}  # a --tag wins for its key
    preset = values.get("preset", DEFAULT_PRESET)
    source = str(config_file) if config_file else None
    swim = build_swim(preset, values.get("swim", {}), source)
    check_tags(values["tags"], swim, source)
    return Settings(
        name=values.get("name") or _check_name(socket.gethostname() or "peerd"),
        bind=values.get("bind", DEFAULT_BIND),
        advertise=values.get("advertise"),
        join=values.get("join", ()),
        api_socket=values.get("api_socket") or default_api_socket(),
        state_dir=values.get("state_dir") or default_state_dir(),
        key_file=values.get("key_file"),
        preset=preset,
        insecure=bool(values.get("insecure", False)),
        log_level=values.get("log_level", DEFAULT_LOG_LEVEL),
        swim=swim,
        registry=build_registry(values.get("swim", {}), source),
        config_file=config_file,
        metrics_addr=values.get("metrics_addr"),
        links=build_links(values.get("links", {}), source),
        messages=build_messages(values.get("messages", {}), source),
        api=build_api(values.get("api", {}), source),
        tags=tuple(sorted(values["tags"].items())),
        advertise_nat=bool(values.get("advertise_nat", False)),
        api_policy=values.get("api_policy", ApiPolicy()),
    )


def check_config(path: Path | str) -> Settings:
    """Validate a config file on its own (``peerd agent --check-config``)."""
    return resolve(argparse.Namespace(config=str(path)))
