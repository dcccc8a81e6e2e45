"""Keys that cannot cut a node off, and --check-config parity (issue 13), with real daemons.

Each test drives the CLI (`python -m peerd keys ...`), as an operator does,
against daemons started by the harness on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peerd.wire.seal import generate_key, key_id, parse_key

from .harness import Cluster, Daemon, hold_for, view, wait_until

pytestmark = pytest.mark.proc


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def keys(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("keys", *args, "--api-socket", str(d.sock))


def kid(key: str) -> str:
    return key_id(parse_key(key)).hex()


def keyring(d: Daemon) -> list[tuple[str, bool]]:
    return [(k["id"], k["primary"]) for k in d.api("keys.list") if k.get("installed", True)]


def seal_drops(d: Daemon) -> int:
    return sum(
        v for k, v in d.counters().items() if k.startswith(("udp_drop_seal", "tcp_drop_seal"))
    )


def all_alive(daemons: list[Daemon]) -> bool:
    want = {x.name: ("alive", x.addr) for x in daemons}
    assert all(view(d) == want for d in daemons), {d.name: view(d) for d in daemons}
    return True


def test_install_on_a_plaintext_node_is_refused_and_the_node_stays(cluster: Cluster) -> None:
    daemons = cluster.start_cluster(["a", "b", "c"])
    b = daemons[1]
    key = generate_key()
    out = keys(b, "install", key)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "plaintext" in out.stderr and "--force" in out.stderr, out.stderr
    assert keyring(b) == []
    assert not (b.state_dir / "keyring").exists()
    # Today's failure: within 5 s the peers declared b dead. It stays alive.
    hold_for(lambda: all_alive(daemons), 3.0, "b to stay alive in every view")
    assert all(seal_drops(d) == 0 for d in daemons)
    # --force does what it says: b seals with the key and is cut off (the
    # peers drop its sealed packets, it drops their plaintext).
    forced = keys(b, "install", key, "--force")
    assert forced.returncode == 0, forced.stderr
    assert keyring(b) == [(kid(key), True)]
    wait_until(lambda: seal_drops(daemons[0]) > 0, 10.0, "a to drop b's sealed packets")


def start_keyed(cluster: Cluster, tmp_path: Path, key: str) -> list[Daemon]:
    key_file = tmp_path / "cluster.keys"
    key_file.write_text(key + "\n")
    return cluster.start_cluster(["a", "b", "c"], key_file=key_file, preset="lan")


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in result["nodes"]}


def test_cluster_install_use_remove_report_per_node(cluster: Cluster, tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    daemons = start_keyed(cluster, tmp_path, old)
    a = daemons[0]
    drops = {d.name: seal_drops(d) for d in daemons}

    def run(*args: str) -> dict[str, dict[str, Any]]:
        out = keys(a, *args, "--cluster", "--json")
        assert out.returncode == 0, (out.stdout, out.stderr)
        result = json.loads(out.stdout)
        assert result["ok"] == 3 and result["failed"] == 0, result
        nodes = by_name(result)
        assert sorted(nodes) == ["a", "b", "c"]
        assert result["nodes"][0]["name"] == "a"  # this node first
        return nodes

    for n in run("install", new).values():
        assert (
            n["ok"]
            and n["primary"] == kid(old)
            and sorted(n["keys"]) == sorted([kid(old), kid(new)])
        ), n
    for d in daemons:
        assert keyring(d) == [(kid(old), True), (kid(new), False)]
    # use by the id `keys list` shows, remove by a unique prefix of it
    for n in run("use", kid(new)).values():
        assert n["primary"] == kid(new), n
    for d in daemons:
        assert keyring(d) == [(kid(new), True), (kid(old), False)]
    for n in run("remove", kid(old)[:6]).values():
        assert n["keys"] == [kid(new)], n
    for d in daemons:
        assert keyring(d) == [(kid(new), True)]
        saved = (d.state_dir / "keyring").read_text()
        assert new in saved and old not in saved
    # The table form names every node and its result.
    again = keys(a, "install", new, "--cluster")
    assert again.returncode == 0, again.stderr
    for name in ("a", "b", "c"):
        assert name in again.stdout
    assert "on 3 of 3 nodes" in again.stdout
    hold_for(lambda: all_alive(daemons), 2.0, "every node to stay alive")
    assert {d.name: seal_drops(d) for d in daemons} == drops


def test_cluster_ops_refuse_before_cutting_a_member_off(cluster: Cluster, tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    daemons = start_keyed(cluster, tmp_path, old)
    a, b, c = daemons
    # Only a has the new key: making it primary everywhere would cut b and c off.
    assert keys(a, "install", new).returncode == 0
    out = keys(a, "use", new, "--cluster")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "nothing changed" in out.stderr and "does not have key" in out.stderr, out.stderr
    assert " b " in out.stderr and " c " in out.stderr, out.stderr
    assert keyring(a) == [(kid(old), True), (kid(new), False)]
    assert keyring(b) == keyring(c) == [(kid(old), True)]
    # Removing the key every member seals with: refused, nothing changed.
    out = keys(a, "remove", kid(old), "--cluster")
    assert out.returncode == 1 and "seals with key" in out.stderr, out.stderr
    assert keyring(b) == [(kid(old), True)]
    # b uses new while c does not have it: removing old would cut c off... and
    # b (its primary is new now, c cannot open it): install everywhere first.
    assert keys(b, "install", new).returncode == 0
    assert keys(c, "install", new).returncode == 0
    assert keys(b, "use", new).returncode == 0
    out = keys(a, "remove", kid(old), "--cluster")
    assert out.returncode == 1, out.stderr
    assert " a " in out.stderr and " c " in out.stderr and " b " not in out.stderr, out.stderr
    assert keyring(c) == [(kid(old), True), (kid(new), False)]
    hold_for(lambda: all_alive(daemons), 2.0, "every node to stay alive")


def test_cluster_ops_refused_on_a_plaintext_cluster(cluster: Cluster) -> None:
    daemons = cluster.start_cluster(["a", "b"])
    out = keys(daemons[0], "install", generate_key(), "--cluster")
    assert out.returncode == 1 and "without keys" in out.stderr, out.stderr
    assert all(keyring(d) == [] for d in daemons)


def test_key_ids_name_keys_and_bad_ids_are_clear_errors(cluster: Cluster, tmp_path: Path) -> None:
    first = generate_key()
    # A second key whose id starts with the same hex digit (1 in 16 tries).
    for _ in range(2000):
        second = generate_key()
        if kid(second)[0] == kid(first)[0] and kid(second)[:2] != kid(first)[:2]:
            break
    else:  # pragma: no cover - probability about 1e-56
        pytest.fail("no key with a shared id prefix found")
    key_file = tmp_path / "k.keys"
    key_file.write_text(first + "\n")
    d = cluster.spawn("solo", key_file=key_file)
    d.wait_ready()
    assert keys(d, "install", second).returncode == 0
    listed = keys(d, "list")
    assert kid(first) in listed.stdout and kid(second) in listed.stdout
    # Ambiguous prefix: an error naming both ids, nothing changed.
    out = keys(d, "use", kid(first)[0])
    assert out.returncode == 1 and "ambiguous" in out.stderr, out.stderr
    assert kid(first) in out.stderr and kid(second) in out.stderr
    # Unknown id.
    unknown = next(c for c in "0123456789abcdef" if c not in (kid(first)[0],)) * 8
    out = keys(d, "remove", unknown)
    assert out.returncode == 1 and "no installed key" in out.stderr, out.stderr
    # An id where the key itself is needed.
    out = keys(d, "install", kid(second))
    assert out.returncode == 1 and "install needs the key itself" in out.stderr, out.stderr
    # Not a key, not an id.
    out = keys(d, "use", "not-a-key")
    assert out.returncode == 1 and "key id" in out.stderr, out.stderr
    assert keyring(d) == [(kid(first), True), (kid(second), False)]
    # The full id and a unique prefix both work.
    assert keys(d, "use", kid(second)).returncode == 0
    assert keyring(d) == [(kid(second), True), (kid(first), False)]
    assert keys(d, "remove", kid(first)[:2]).returncode == 0
    assert keyring(d) == [(kid(second), True)]


def test_keys_list_shows_where_keyring_and_key_file_disagree(
    cluster: Cluster, tmp_path: Path
) -> None:
    old, new, extra = generate_key(), generate_key(), generate_key()
    key_file = tmp_path / "k.keys"
    key_file.write_text(old + "\n")
    d = cluster.spawn("solo", key_file=key_file)
    d.wait_ready()
    agree = keys(d, "list")
    assert agree.returncode == 0 and "differ" not in agree.stderr, agree.stderr
    # Rotated over the API: the saved keyring now differs from the file.
    assert keys(d, "install", new).returncode == 0
    assert keys(d, "use", new).returncode == 0
    assert keys(d, "remove", kid(old)).returncode == 0
    key_file.write_text(old + "\n" + extra + "\n")
    rows = {r["id"]: r for r in json.loads(keys(d, "list", "--json").stdout)}
    assert rows[kid(new)] == {
        "id": kid(new),
        "primary": True,
        "installed": True,
        "in_file": False,
        "file_primary": False,
    }
    assert rows[kid(old)] == {
        "id": kid(old),
        "primary": False,
        "installed": False,
        "in_file": True,
        "file_primary": True,
    }
    assert rows[kid(extra)]["installed"] is False and rows[kid(extra)]["in_file"] is True
    table = keys(d, "list")
    assert table.returncode == 0
    assert "KEY FILE" in table.stdout and kid(extra) in table.stdout
    assert "differ" in table.stderr and "wins over the key file" in table.stderr, table.stderr
    # A node started from the stale key file alone cannot join: its push-pull
    # fails and the log says the likely reason is a key mismatch.
    stale = tmp_path / "stale.keys"
    stale.write_text(old + "\n")
    late = cluster.spawn("late", key_file=stale, join=[d.addr])
    line = wait_until(lambda: _pushpull_failure(late), 15.0, "late's join to fail")
    assert "reason=eof" in line and "our keys differ" in line, line
    assert sorted(late.members()) == ["late"]


def _pushpull_failure(d: Daemon) -> str:
    for line in d.log().splitlines():
        if "push-pull failed" in line:
            return line
    return ""


# --- --check-config rejects what the start refuses ---------------------------------------


def check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("agent", "--check-config", str(config), *extra)


def start(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Start a daemon from ``config``; one that would run is stopped at once
    (a bounded timeout: it only has to get past its start-up checks)."""
    try:
        return cli("agent", "--config", str(config), timeout=10.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - started: parity broken
        return subprocess.CompletedProcess([], 0, "", "started")


def test_check_config_rejects_what_the_daemon_refuses(tmp_path: Path) -> None:
    state = tmp_path / "st"
    sock = tmp_path / "s.sock"
    key_file = tmp_path / "k.keys"
    key_file.write_text(generate_key() + "\n")
    base = f'state_dir = "{state}"\napi_socket = "{sock}"\n'
    # 192.0.2.1 (TEST-NET-1) is no address of this host: advertised as a NAT's.
    nat = "advertise_nat = true\n"
    refused = {
        "bind-without-key": base + 'bind = "0.0.0.0:0"\nadvertise = "192.0.2.1:7950"\n' + nat,
        "v6-bind-without-key": base + 'bind = "[::]:0"\nadvertise = "192.0.2.1:7950"\n' + nat,
        "api-socket-too-long": f'state_dir = "{state}"\nbind = "127.0.0.1:0"\n'
        f'api_socket = "/tmp/{"x" * 120}.sock"\n',
        # 192.0.2.0/24 (TEST-NET-1) is not an address of this host.
        "bind-not-on-this-host": base + f'bind = "192.0.2.77:7950"\nkey_file = "{key_file}"\n',
        "advertise-not-on-this-host": base
        + 'bind = "127.0.0.1:0"\nadvertise = "192.0.2.79:7950"\n',
        "metrics-not-on-this-host": base
        + 'bind = "127.0.0.1:0"\nmetrics_addr = "192.0.2.78:7951"\n',
        "corrupt-node-id": f'state_dir = "{tmp_path / "bad-state"}"\napi_socket = "{sock}"\n'
        'bind = "127.0.0.1:0"\n',
    }
    (tmp_path / "bad-state").mkdir(mode=0o700)
    (tmp_path / "bad-state" / "node_id").write_text("not hex\n")
    for name, text in refused.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        checked = check(config)
        assert checked.returncode == 2, (name, checked.stdout, checked.stderr)
        started = start(config, tmp_path)
        assert started.returncode in (1, 2) and started.stderr != "started", (name, started)
        # The reason is the same words in both.
        reason = checked.stderr.split(": ", 1)[1].split(":")[0].strip()
        assert reason and reason in started.stderr, (name, reason, started.stderr)
    # With a key, or insecure, the bind passes.
    for name, extra in [
        ("with-key", f'key_file = "{key_file}"\n'),
        ("insecure", "insecure = true\n"),
    ]:
        config = tmp_path / f"{name}.toml"
        config.write_text(refused["bind-without-key"] + extra)
        ok = check(config)
        assert ok.returncode == 0 and "ok" in ok.stdout, (name, ok.stderr)
    # A keyring saved in the state directory counts, as it does at start:
    # check-config reads the state directory the flags (or the file) name.
    saved = tmp_path / "saved-state"
    saved.mkdir(mode=0o700)
    (saved / "keyring").write_text(generate_key() + "\n")
    config = tmp_path / "no-state.toml"
    config.write_text(
        f'api_socket = "{sock}"\nbind = "0.0.0.0:0"\nadvertise = "192.0.2.1:7950"\n' + nat
    )
    assert check(config, "--state-dir", str(saved)).returncode == 0
    assert check(config, "--state-dir", str(tmp_path / "empty")).returncode == 2
    # A corrupt saved keyring is refused by both.
    (saved / "keyring").write_text("not a key\n")
    bad = check(config, "--state-dir", str(saved))
    assert bad.returncode == 2 and "corrupt" in bad.stderr, bad.stderr
