"""Configuration that cannot hurt (issue 16): every number in its range, files
that are not configs refused with exit 2, only usable advertise addresses,
every address of a join name, and a wrong cluster key named on both sides."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peerd.core.config import PRESETS, SwimConfig
from peerd.core.events import LogLevel
from peerd.core.registry.config import RegistryConfig
from peerd.shell import agent, hostaddr
from peerd.shell.bounds import BOUNDS, Bound, number
from peerd.shell.links import LinkLimits
from peerd.shell.logs import Logger
from peerd.shell.messaging import MessageLimits
from peerd.shell.settings import (
    _LINK_SETTINGS,
    SettingsError,
    build_swim,
    check_config,
    resolve,
)
from peerd.shell.state import StateDir
from peerd.wire.seal import generate_key
from tests.shell.test_agent import api, args, start, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str | bytes, name: str = "peerd.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def check_cli(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerd", "agent", "--check-config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


# --- every numeric setting has a range -------------------------------------------------

# The values of the issue: each well-typed, each ruinous.
ABSURD = [
    (
        "[swim]\nprobe_interval_s = 1e-6\nprobe_timeout_s = 1e-7\n",
        "swim.probe_interval_s",
        "1e-06",
        "0.05 to 60",
    ),
    ("[swim]\nprobe_interval_s = 1e300\n", "swim.probe_interval_s", "1e+300", "0.05 to 60"),
    ("[links]\nidle_s = 1e-9\n", "links.idle_s", "1e-09", "1 to 86400"),
    (
        "[messages]\nmailbox_bytes = 1_000_000_000_000_000\n",
        "messages.mailbox_bytes",
        "1000000000000000",
        "266240 to 268435456",
    ),
    ("[swim]\ndead_reclaim_s = 0\n", "swim.dead_reclaim_s", "0", "60 to 2592000"),
    ("[swim]\npush_pull_interval_s = 0.001\n", "swim.push_pull_interval_s", "0.001", "0 (off)"),
]


@pytest.mark.parametrize(("text", "key", "value", "span"), ABSURD)
def test_absurd_values_are_refused_naming_setting_value_and_range(
    tmp_path: Path, text: str, key: str, value: str, span: str
) -> None:
    with pytest.raises(SettingsError) as info:
        check_config(write(tmp_path, text))
    assert info.value.key == key
    assert info.value.reason.startswith(f"{value} is out of range: must be ")
    assert span in info.value.reason


def test_check_config_and_the_daemon_exit_2_on_an_out_of_range_value(tmp_path: Path) -> None:
    config = write(tmp_path, "[swim]\nprobe_interval_s = 1e-6\nprobe_timeout_s = 1e-7\n")
    checked = check_cli(config)
    assert checked.returncode == 2, checked
    assert "swim.probe_interval_s: 1e-06 is out of range: must be 0.05 to 60" in checked.stderr
    started = subprocess.run(
        [sys.executable, "-m", "peerd", "agent", "--config", str(config)]
        + ["--state-dir", str(tmp_path / "st"), "--api-socket", str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert started.returncode == 2 and "out of range" in started.stderr, started
    assert not (tmp_path / "st").exists()


def _numeric_settings() -> set[str]:
    swim = {
        f"swim.{f.name}"
        for f in dataclasses.fields(SwimConfig)
        if f.type in ("int", "float")  # annotations are postponed: strings
    }
    swim.add("swim.registry_flush_s")
    links = {f"links.{name}" for name in _LINK_SETTINGS}
    messages = {f"messages.{f.name}" for f in dataclasses.fields(MessageLimits)}
    return swim | links | messages


def test_the_table_bounds_every_numeric_setting_and_holds_every_default() -> None:
    assert set(BOUNDS) == _numeric_settings()
    defaults: dict[str, Any] = {
        **{f"swim.{k}": v for k, v in dataclasses.asdict(SwimConfig()).items()},
        "swim.registry_flush_s": RegistryConfig().registry_flush_s,
        **{f"links.{k}": v for k, v in dataclasses.asdict(LinkLimits()).items()},
        **{f"messages.{k}": v for k, v in dataclasses.asdict(MessageLimits()).items()},
    }
    for key, bound in BOUNDS.items():
        assert bound.allows(defaults[key]), (key, defaults[key], bound)
        assert bound.low <= bound.high
    for name, preset in PRESETS.items():
        for k, v in dataclasses.asdict(preset()).items():
            bound = BOUNDS.get(f"swim.{k}")
            assert bound is None or bound.allows(v), (name, k, v)


def _file_text(key: str, value: float) -> str:
    table, name = key.split(".")
    text = str(int(value)) if isinstance(value, int) else repr(float(value))
    return f"[{table}]\n{name} = {text}\n"


def _typed(key: str, value: float) -> float:
    table, name = key.split(".")
    if key == "swim.registry_flush_s":
        kind = "float"
    else:
        cls = {"swim": SwimConfig, "links": LinkLimits, "messages": MessageLimits}[table]
        kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    return int(value) if kind == "int" else float(value)


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_each_bound_is_inclusive_and_one_step_past_it_is_refused(key: str) -> None:
    from peerd.shell.settings import check_swim_fields, check_table_fields

    table, name = key.split(".")

    def check(value: float) -> None:
        if table == "swim":
            check_swim_fields({name: value})
        else:
            check_table_fields(table, {name: value})

    bound = BOUNDS[key]
    for ok in (bound.low, bound.high):
        check(_typed(key, ok))
    is_int = isinstance(_typed(key, 1), int)
    step = 1 if is_int else max(abs(bound.low), 1e-3) * 1e-3
    below = _typed(key, bound.low - step)
    above = _typed(key, bound.high + (1 if is_int else bound.high * 1e-3))
    for bad in (below, above):
        if bound.off and bad == 0:
            continue
        with pytest.raises(SettingsError, match="out of range"):
            check(bad)


def test_the_sample_config_states_each_range_next_to_its_setting() -> None:
    text = (ROOT / "systemd" / "peerd.toml").read_text()
    stated: dict[str, str] = {}
    table = None
    previous = ""
    for line in text.splitlines():
        if m := re.match(r"^#\[(\w+)\]", line):
            table = m.group(1)
        elif (m := re.match(r"^#(\w+) = ", line)) and table in ("swim", "links", "messages"):
            key = f"{table}.{m.group(1)}"
            if key in BOUNDS:
                r = re.fullmatch(r"# Range: (.+)\.", previous)
                assert r, (key, previous)
                stated[key] = r.group(1)
        previous = line
    assert stated == {key: bound.text() for key, bound in BOUNDS.items()}


def test_bound_text() -> None:
    assert Bound(0.05, 60.0).text() == "0.05 to 60"
    assert Bound(1.0, 86400.0, off=True).text() == "0 (off) or 1 to 86400"
    assert number(1e300) == "1e+300" and number(266240) == "266240"


def test_relations_still_hold_across_settings(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="must not exceed probe_interval_s"):
        build_swim("lan", {"probe_interval_s": 0.1, "probe_timeout_s": 0.2})


# --- files that are not configs --------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'name = "caf\xe9"\n', "is not UTF-8 text (byte 11 is 0xe9)"),
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nests arrays or tables too deeply"),
        ("x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", "nests arrays or tables too deeply"),
        ("# " + "x" * (1 << 20) + "\n", "is larger than 1048576 bytes"),
    ],
    # short ids: older pytest puts the whole parameter in the test id, which
    # goes to the child's environment (PYTEST_CURRENT_TEST) and is too long
    ids=["not-utf8", "deep-arrays", "deep-tables", "too-large"],
)
def test_files_that_are_not_configs_exit_2_with_the_reason(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    config = write(tmp_path, content)
    with pytest.raises(SettingsError, match=re.escape(reason)):
        check_config(config)
    checked = check_cli(config)
    assert checked.returncode == 2, checked.stderr[-2000:]
    assert reason in checked.stderr
    assert "Traceback" not in checked.stderr


# --- advertise ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("224.0.0.1:7950", "multicast"),
        ("[ff02::1]:7950", "multicast"),
        ("255.255.255.255:7950", "broadcast"),
        ("0.0.0.0:7950", "unspecified"),
        ("[::]:7950", "unspecified"),
    ],
)
def test_advertise_never_multicast_broadcast_or_unspecified(
    tmp_path: Path, addr: str, reason: str
) -> None:
    with pytest.raises(SettingsError, match=reason):
        check_config(write(tmp_path, f'advertise = "{addr}"\nadvertise_nat = true\n'))
    with pytest.raises(SettingsError, match=reason):
        resolve(args(tmp_path, "--advertise", addr, "--advertise-nat"))


def test_advertise_must_be_an_address_of_this_host_unless_nat(tmp_path: Path) -> None:
    base = (
        f'state_dir = "{tmp_path / "st"}"\napi_socket = "{tmp_path / "s.sock"}"\n'
        'bind = "127.0.0.1:0"\n'
    )
    foreign = write(tmp_path, base + 'advertise = "192.0.2.10:7950"\n', "foreign.toml")
    checked = check_cli(foreign)
    assert checked.returncode == 2, checked
    assert "advertise 192.0.2.10:7950: 192.0.2.10 is not an address of this host" in (
        checked.stderr
    )
    assert "advertise_nat = true" in checked.stderr
    nat = write(tmp_path, base + 'advertise = "192.0.2.10:7950"\nadvertise_nat = true\n', "n.toml")
    assert check_cli(nat).returncode == 0
    assert check_cli(foreign, "--advertise-nat").returncode == 0
    own = write(tmp_path, base + 'advertise = "127.0.0.3:7950"\n', "own.toml")
    assert check_cli(own).returncode == 0


def test_a_directed_broadcast_of_this_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ipaddress

    monkeypatch.setattr(
        hostaddr, "local_broadcasts", lambda: {ipaddress.IPv4Address("127.255.255.255")}
    )
    problem = hostaddr.advertise_problem(("127.255.255.255", 7950), nat=True)
    assert problem is not None and "broadcast address of a network of this host" in problem
    assert hostaddr.advertise_problem(("127.0.0.1", 7950), nat=False) is None


def test_local_broadcasts_reads_the_interfaces() -> None:
    # Best effort; loopback has none, but whatever it finds is IPv4 and specified.
    assert all(not ip.is_unspecified for ip in hostaddr.local_broadcasts())


# --- a join name is every address it resolves to -----------------------------------------


def test_join_name_gives_every_address_it_resolves_to_in_order() -> None:
    calls: list[tuple[Any, ...]] = []

    def resolver(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        calls.append((host, port))
        v4, v6 = socket.AF_INET, socket.AF_INET6
        return [
            (v6, socket.SOCK_DGRAM, 17, "", ("2001:db8::1", port, 0, 0)),
            (v4, socket.SOCK_DGRAM, 17, "", ("10.0.0.2", port)),
            (v4, socket.SOCK_DGRAM, 17, "", ("10.0.0.1", port)),
            (v4, socket.SOCK_DGRAM, 17, "", ("10.0.0.2", port)),
        ]

    out = io.StringIO()
    seeds = hostaddr.resolve_join(
        [("seeds.example", 7950), ("10.0.0.1", 7950), ("10.0.0.9", 7000)],
        socket.AF_INET,
        Logger(LogLevel.INFO, out),
        resolver=resolver,
    )
    # Our family first, then the resolver's order; each address once.
    assert seeds == [
        ("10.0.0.2", 7950),
        ("10.0.0.1", 7950),
        ("2001:db8::1", 7950),
        ("10.0.0.9", 7000),
    ]
    assert calls == [("seeds.example", 7950)]


def test_join_name_addresses_are_bounded_and_unresolvable_names_skipped() -> None:
    def many(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        if host == "nowhere.example":
            raise socket.gaierror(-2, "Name or service not known")
        return [
            (socket.AF_INET, socket.SOCK_DGRAM, 17, "", (f"10.0.1.{i}", port)) for i in range(40)
        ]

    out = io.StringIO()
    seeds = hostaddr.resolve_join(
        [("nowhere.example", 1), ("many.example", 2)],
        socket.AF_INET,
        Logger(LogLevel.INFO, out),
        resolver=many,
    )
    assert seeds == [(f"10.0.1.{i}", 2) for i in range(hostaddr.MAX_ADDRS_PER_NAME)]
    assert "cannot resolve join address; skipped host=nowhere.example" in out.getvalue()
    assert "resolved=40 used=16" in out.getvalue()


def test_the_daemon_start_resolves_join_names_through_resolve_join(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = [
        (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("10.0.0.7", 7950)),
        (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("10.0.0.8", 7950)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: fake)
    assert agent.resolve_join(
        [("seeds.example", 7950)], socket.AF_INET, Logger(LogLevel.INFO, io.StringIO())
    ) == [("10.0.0.7", 7950), ("10.0.0.8", 7950)]


# --- a wrong cluster key, named on both sides --------------------------------------------


@pytest.mark.proc
def test_a_wrong_key_is_named_on_both_sides(tmp_path: Path) -> None:
    (tmp_path / "a.keys").write_text(generate_key() + "\n")
    (tmp_path / "b.keys").write_text(generate_key() + "\n")
    a = start(tmp_path, "a", "127.0.0.1", "--key-file", str(tmp_path / "a.keys"))
    b = None
    try:
        status = wait_for("a's API", lambda: api(tmp_path / "a.sock", "status"), proc=a)
        b = start(
            tmp_path, "b", "127.0.0.2", "--key-file", str(tmp_path / "b.keys"), "--join",
            status["addr"],
        )  # fmt: skip
        wait_for(
            "a to count b's refused seal",
            lambda: api(tmp_path / "a.sock", "status")["counters"].get("key_refused_by_us"),
            proc=a,
        )
        wait_for(
            "b to count a's close after its first frame",
            lambda: api(tmp_path / "b.sock", "status")["counters"].get("key_refused_by_peer"),
            proc=b,
        )
        code_b, err_b = stop(b)
        b = None
    finally:
        if b is not None:
            stop(b)
        code_a, err_a = stop(a)
    assert code_a == 0 and code_b == 0, (err_a, err_b)
    assert "a different cluster key" in err_a
    assert re.search(r"warn  tcp stream failed: peer closed the connection after our first "
                     r"frame without answering: likely a wrong cluster key", err_b)  # fmt: skip


def test_the_wrong_key_metrics_have_a_family() -> None:
    from peerd.shell.metrics import render

    text = render({"counters": {"key_refused_by_us": 2, "key_refused_by_peer": 1}})
    assert 'peerd_key_refusals_total{by="us"} 2' in text
    assert 'peerd_key_refusals_total{by="peer"} 1' in text


def test_state_dir_untouched_by_a_refused_advertise(tmp_path: Path) -> None:
    settings = resolve(args(tmp_path, "--advertise", "192.0.2.11:7950"))
    with StateDir(tmp_path / "st") as state, pytest.raises(agent._Refuse) as info:
        agent.preflight(settings, state, None)
    assert info.value.code == agent.EXIT_CONFIG
