"""The files in systemd/: systemd's own checks, and agreement with the code.

``systemd-analyze verify`` insists that every Exec*= binary exists. The units
name /usr/local/bin/peerd (where the README installs it); the test verifies a
copy with that path rewritten to the ``peerd`` script of this installation
(or the Python interpreter when the script is not on PATH). Nothing else in
the copy changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peerd.core.config import SwimConfig
from peerd.core.registry.config import RegistryConfig
from peerd.shell.agent import EXIT_CONFIG
from peerd.shell.api_limits import ApiLimits
from peerd.shell.authz import ApiPolicy
from peerd.shell.links import LinkLimits
from peerd.shell.messaging import MessageLimits
from peerd.shell.settings import (
    _LINK_SETTINGS,
    _TOP_KEYS,
    build_api,
    build_links,
    build_messages,
    build_swim,
    load_file,
)
from peerd.shell.systemd import API_FD_NAME

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED_PEERD = "/usr/local/bin/peerd"
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd); .ci/run installs it",
)


def unit(name: str) -> dict[str, list[str]]:
    """Assignments of a unit file (key -> every value, in order)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@needs_systemd_analyze
def test_systemd_analyze_verify_passes_on_every_unit(tmp_path: Path) -> None:
    binary = shutil.which("peerd") or sys.executable
    copies = []
    for path in sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.socket")):
        text = path.read_text()
        (tmp_path / path.name).write_text(text.replace(INSTALLED_PEERD, binary))
        copies.append(str(tmp_path / path.name))
    assert {Path(c).name for c in copies} == {"peerd.service", "peerd.socket"}
    result = run("systemd-analyze", "verify", *copies)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "peerd" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@needs_systemd_analyze
def test_security_exposure_is_at_most_2() -> None:
    result = run(
        "systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNITS / "peerd.service")
    )
    m = re.search(r"Overall exposure level for peerd\.service: (\d+\.\d+)", result.stdout)
    assert m is not None, result.stdout + result.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security --offline=yes systemd/peerd.service: {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed",
)
def test_sysusers_and_tmpfiles_snippets_apply_to_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run("systemd-sysusers", f"--root={tmp_path}", str(UNITS / "peerd.sysusers"))
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().split()}
    assert re.search(r"^peerd:x:\d+:\d+:.*:/var/lib/peerd:", passwd, re.M)
    assert {"peerd", "peerd-clients"} <= groups
    result = run(
        "systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "peerd.tmpfiles")
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "peerd").stat().st_mode & 0o777 == 0o755


# --- the units agree with the daemon and with each other (no systemd needed) ---------


def test_service_has_what_the_daemon_relies_on() -> None:
    svc = unit("peerd.service")
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) > 0
    assert one["Restart"] == "on-failure"
    assert one["RestartPreventExitStatus"] == str(EXIT_CONFIG)  # bad config: don't loop
    assert svc["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert svc["ExecReload"][0] == (
        f"{INSTALLED_PEERD} agent --check-config /etc/peerd/peerd.toml"
        " --state-dir /var/lib/peerd --api-socket /run/peerd/peerd.sock"
    )
    start = one["ExecStart"].split()
    assert start[:2] == [INSTALLED_PEERD, "agent"]
    flags = dict(zip(start[2::2], start[3::2], strict=True))
    assert flags["--config"] == "/etc/peerd/peerd.toml"
    assert flags["--state-dir"] == "/var/lib/" + one["StateDirectory"]
    assert Path(flags["--api-socket"]).parent == Path("/run") / one["RuntimeDirectory"]
    assert one["ConfigurationDirectory"] == "peerd"
    assert one["RuntimeDirectoryPreserve"] == "yes"  # or stopping would delete the socket
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert one[key] == value, key
    assert "@system-service" in svc["SystemCallFilter"]
    assert one["User"] == "peerd"


def test_socket_unit_matches_the_service_and_the_client_default() -> None:
    sock = {k: v[-1] for k, v in unit("peerd.socket").items()}
    svc = {k: v[-1] for k, v in unit("peerd.service").items()}
    start = svc["ExecStart"].split()
    assert sock["ListenStream"] == start[start.index("--api-socket") + 1]
    assert sock["ListenStream"] == "/run/peerd/peerd.sock"  # the CLI's default for root
    assert sock["FileDescriptorName"] == API_FD_NAME
    assert sock["SocketMode"] == "0660"
    assert sock["Service"] == "peerd.service"
    # The runtime directory exists with the service's owner before the socket
    # is bound in it (else systemd would chown the socket to the service user).
    tmpfiles = (UNITS / "peerd.tmpfiles").read_text()
    runtime = f"/run/{svc['RuntimeDirectory']}"
    assert Path(sock["ListenStream"]).parent == Path(runtime)
    assert re.search(
        rf"^d {re.escape(runtime)} {svc['RuntimeDirectoryMode']} {svc['User']} "
        rf"{svc['Group']} -$",
        tmpfiles,
        re.M,
    )
    sysusers = (UNITS / "peerd.sysusers").read_text()
    assert re.search(rf"^g {re.escape(sock['SocketGroup'])}\b", sysusers, re.M)
    assert re.search(rf"^u {re.escape(svc['User'])}\b", sysusers, re.M)


def test_sample_config_lists_every_option_and_each_example_is_valid(tmp_path: Path) -> None:
    text = (UNITS / "peerd.toml").read_text()
    # Options are "#key = value" (no space after '#'); prose is "# text".
    enabled = re.sub(
        r"^#(?=\w+ = |\[(swim|links|messages|tags|api|api\.scopes\.[\w\"*]+)\])",
        "",
        text,
        flags=re.M,
    )
    path = tmp_path / "peerd.toml"
    path.write_text(enabled)
    values = load_file(path)  # raises SettingsError naming a bad key
    assert set(values) == _TOP_KEYS | {"api_policy"}  # [api]'s policy entries: api_policy
    swim_fields = set(SwimConfig.__dataclass_fields__)
    # [swim] also takes the registry's flush delay (a RegistryConfig field now)
    assert set(values["swim"]) == swim_fields | {"registry_flush_s"}
    build_swim(values["preset"], values["swim"], str(path))
    lan = SwimConfig()
    registry_flush_s = values["swim"].pop("registry_flush_s")
    assert {k: getattr(lan, k) for k in swim_fields} == values["swim"]  # "the lan preset's"
    assert registry_flush_s == RegistryConfig().registry_flush_s
    # [links] and [messages]: every setting, with its default.
    assert build_links(values["links"], str(path)) == LinkLimits()
    assert set(values["links"]) == set(_LINK_SETTINGS)
    assert build_messages(values["messages"], str(path)) == MessageLimits()
    assert set(values["messages"]) == set(MessageLimits.__dataclass_fields__)
    assert build_api(values["api"], str(path)) == ApiLimits()  # [api] too
    assert set(values["api"]) == set(ApiLimits.__dataclass_fields__)
    assert values["tags"] == {"role": "web", "dc": "eu-1"}  # examples of [tags]
    policy = values["api_policy"]  # [api]: the defaults, and two example scopes
    assert (policy.admin_group, policy.events) == (ApiPolicy().admin_group, ApiPolicy().events)
    assert [scope for scope, _ in policy.scopes] == ["*", "billing"]
    # As shipped, every option is commented out: the file is valid and empty.
    assert load_file(UNITS / "peerd.toml") == {}
