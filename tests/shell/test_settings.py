"""Settings: TOML file + flags; every mistake names its key."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from peerd.core.config import lan, local, wan
from peerd.shell import agent
from peerd.shell.settings import (
    SettingsError,
    check_config,
    parse_hostport,
    resolve,
)


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    return parser.parse_args(list(argv))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peerd.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("10.0.0.1", ("10.0.0.1", 7950)),
        ("[::1]:81", ("::1", 81)),
        ("[fe80::1]", ("fe80::1", 7950)),
        ("::1", ("::1", 7950)),
        ("node-a.example:9", ("node-a.example", 9)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "[::1", "[::1]x", "h:port", "h:70000", ":80"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_defaults(tmp_path: Path) -> None:
    s = resolve(parse_args("--state-dir", str(tmp_path), "--api-socket", str(tmp_path / "a")))
    assert s.bind == ("127.0.0.1", 7950)
    assert s.advertise is None
    assert s.preset == "lan"
    assert s.log_level == "info"
    assert not s.insecure
    assert s.name  # the host name


def test_file_values_and_swim_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name = "web1"
bind = "[::]:7000"
advertise = "[2001:db8::5]:7000"
join = ["10.0.0.2:7950", "seed.example"]
state_dir = "state"
key_file = "keys"
preset = "wan"
log_level = "debug"
insecure = true

[swim]
probe_interval_s = 6
indirect_checks = 5
""",
    )
    s = resolve(parse_args("--config", str(path)))
    assert s.name == "web1"
    assert s.bind == ("::", 7000)
    assert s.advertise == ("2001:db8::5", 7000)
    assert s.join == (("10.0.0.2", 7950), ("seed.example", 7950))
    assert s.state_dir == tmp_path / "state"  # relative to the file
    assert s.key_file == tmp_path / "keys"
    assert s.insecure
    assert s.swim == wan().replace(probe_interval_s=6.0, indirect_checks=5)
    assert isinstance(s.swim.probe_interval_s, float)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'name = "a"\npreset = "wan"\njoin = ["10.0.0.9"]\n[swim]\nprobe_timeout_s = 0.1\n'
    )
    s = resolve(
        parse_args(
            "--config", str(path), "--name", "b", "--preset", "local", "--join", "10.0.0.1:1"
        )
    )
    assert s.name == "b"
    assert s.join == (("10.0.0.1", 1),)
    # [swim] still applies on top of the preset chosen on the command line.
    assert s.swim == local().replace(probe_timeout_s=0.1)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('nmae = "x"', "nmae", "unknown setting"),
        ('api-socket = "/x"', "api-socket", "underscores"),
        ("[swim]\nprobe_intervall_s = 1", "swim.probe_intervall_s", "unknown setting"),
        ('[swim]\nprobe_interval_s = "1s"', "swim.probe_interval_s", "expected a number"),
        ("[swim]\nindirect_checks = 2.5", "swim.indirect_checks", "expected an integer"),
        ("[swim]\nindirect_checks = true", "swim.indirect_checks", "expected a number"),
        ("[swim]\ngossip_fanout = -1", "swim.gossip_fanout", "-1 is out of range: must be 1 to 32"),
        ("[swim]\nprobe_interval_s = 0", "swim.probe_interval_s", "0 is out of range"),
        ("[swim]\nprobe_timeout_s = 5", "swim.probe_timeout_s", "probe_interval_s"),
        ("[swim]\nmax_packet_bytes = 100", "swim.max_packet_bytes", "must be 512 to 65000"),
        ('bind = "localhost:1"', "bind", "not an IPv4 or IPv6"),
        ('advertise = "0.0.0.0:1"', "advertise", "unspecified"),
        ('join = "10.0.0.1"', "join", "list"),
        ('join = ["10.0.0.1:0"]', "join", "port 0"),
        ('preset = "fast"', "preset", "unknown preset"),
        ("[links]\nidle = 5\n", "links.idle", "unknown setting"),
        ("[links]\nidle_s = -1\n", "links.idle_s", "-1 is out of range"),
        ("[links]\nidle_s = 0\n", "links.idle_s", "0 is out of range: must be 1 to 86400"),
        ("[links]\nidle_s = inf\n", "links.idle_s", "finite"),
        ('[links]\nconnect_timeout_s = "5"\n', "links.connect_timeout_s", "a number"),
        ("[links]\nmax_links = 2.5\n", "links.max_links", "an integer"),
        ("[links]\nmax_links = true\n", "links.max_links", "a number"),
        ("[links]\nmax_frame = 1000\n", "links.max_frame", "unknown setting"),  # not exposed
        (
            "[links]\nmax_direct_links = 300\n",
            "links.max_direct_links",
            "must not exceed max_links (300 > 256)",
        ),
        ("links = 3\n", "links", "expected a table ([links])"),
        ("[messages]\nsend_timeout_s = 0\n", "messages.send_timeout_s", "out of range"),
        ("[messages]\nmailbox_messages = 0\n", "messages.mailbox_messages", "out of range"),
        ("[messages]\nmailbox_bytes = 1000\n", "messages.mailbox_bytes", "must be 266240 to"),
        ("[messages]\nmailbox = 5\n", "messages.mailbox", "unknown setting"),
        ('messages = "x"\n', "messages", "expected a table ([messages])"),
        ('log_level = "loud"', "log_level", "unknown level"),
        ("insecure = 1", "insecure", "true or false"),
        ("name = 5", "name", "expected a string"),
        ('name = "a b"', "name", "spaces"),
        ("swim = 3", "swim", "table"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(SettingsError) as info:
        check_config(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not valid TOML"):
        check_config(write(tmp_path, "name = \n"))
    with pytest.raises(SettingsError, match="not found"):
        check_config(tmp_path / "absent.toml")


def test_cross_field_checks_use_the_final_preset(tmp_path: Path) -> None:
    # probe_interval_s = 2.5 is below wan's 3 s probe timeout, fine with lan's.
    path = write(tmp_path, 'preset = "wan"\n[swim]\nprobe_interval_s = 2.5\n')
    with pytest.raises(SettingsError, match="probe_timeout_s"):
        resolve(parse_args("--config", str(path)))
    lan = resolve(parse_args("--config", str(path), "--preset", "lan"))
    assert lan.swim.probe_interval_s == 2.5


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(SettingsError) as info:
        resolve(parse_args("--bind", "nohost:1"))
    assert info.value.key == "--bind"
    with pytest.raises(SettingsError) as info:
        resolve(parse_args("--join", "[::1"))
    assert info.value.key == "--join"


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, 'name = "x"\n[swim]\nsuspicion_mult = 5\n')
    assert agent.run(parse_args("--check-config", str(good))) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[swim]\nsuspicion_mult = -5\n")
    assert agent.run(parse_args("--check-config", str(bad))) == 2
    assert "swim.suspicion_mult" in capsys.readouterr().err


def test_check_config_reads_the_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keys").write_text("not a key\n")
    path = write(tmp_path, 'key_file = "keys"\n')
    assert agent.run(parse_args("--check-config", str(path))) == 2
    assert "line 1" in capsys.readouterr().err


def test_agent_exits_2_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "colour = 1\n")
    assert agent.run(parse_args("--config", str(path))) == 2
    assert "colour: unknown setting" in capsys.readouterr().err


def test_every_swim_field_can_be_set(tmp_path: Path) -> None:
    """A new SwimConfig field must be settable without touching settings.py."""
    defaults = lan()
    lines = ["[swim]"]
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        lines.append(f"{f.name} = {str(value).lower() if isinstance(value, bool) else value}")
    s = resolve(parse_args("--config", str(write(tmp_path, "\n".join(lines) + "\n"))))
    assert s.swim == defaults


def test_registry_flush_in_swim_goes_to_the_registry_config(tmp_path: Path) -> None:
    """registry_flush_s left SwimConfig for RegistryConfig; [swim] still takes it."""
    s = resolve(parse_args("--config", str(write(tmp_path, "[swim]\nregistry_flush_s = 0.01\n"))))
    assert s.registry.registry_flush_s == 0.01
    assert s.swim == lan() and not hasattr(s.swim, "registry_flush_s")
    assert resolve(parse_args()).registry.registry_flush_s == 0.002
    with pytest.raises(SettingsError, match="registry_flush_s"):
        resolve(parse_args("--config", str(write(tmp_path, "[swim]\nregistry_flush_s = -1\n"))))
    peer = agent.make_peer(s, b"\x01" * 16, ("127.0.0.1", 7950), 0, 1, agent.NodeTags())
    assert peer.registry.config.registry_flush_s == 0.01
