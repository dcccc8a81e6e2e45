"""``peerd watch`` and node tags through real daemons and the real CLI (issue 13).

watch: ``--snapshot`` gives the current state then the changes with no gap
(checked by replaying the stream against a writer that never pauses), every
event names its ``topic``, ``--json`` payloads are UTF-8 text or base64, and
every ``--json`` command reports its errors as JSON. Tags: from ``[tags]``
and ``--tag``, set at run time and kept over a restart, applied on SIGHUP,
and ``peerd members --tag K=REGEX --name REGEX``.

Uses the harness of ``harness.py``: own addresses, state directories and
sockets per test, bounded polling, every process (daemons, CLI, writer
threads' connections) stopped by pid or closed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from peerd.api.client import BlockingClient

from .harness import Cluster, Daemon, wait_until

pytestmark = pytest.mark.proc

CLI_TIMEOUT_S = 30.0
SPREAD_S = 10.0  # a tag change or a join seen by the peers, with margin on a loaded box


def peerd(
    d: Daemon | None, *args: str, sock: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI once against ``d`` (bounded)."""
    where = sock if sock is not None else str(d.sock) if d is not None else None
    argv = [sys.executable, "-m", "peerd", *args]
    if where is not None:
        argv += ["--api-socket", where]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


class CliWatch:
    """``peerd watch ... --json`` as a process; its lines are read by a thread."""

    def __init__(self, d: Daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peerd", "watch", "--json", "--api-socket", str(d.sock), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def events(self) -> list[dict[str, Any]]:
        return list(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._thread.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def cli_watches() -> Iterator[list[CliWatch]]:
    opened: list[CliWatch] = []
    yield opened
    for w in opened:
        w.close()


# --- watch ------------------------------------------------------------------------


class Writer(threading.Thread):
    """Registers w0, w1, ... through one connection as fast as the daemon
    answers, unregistering every third name right after the next one, until
    stopped. Never pauses, so a watch opened meanwhile races with it."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(daemon=True)
        self.client = BlockingClient(d.sock, timeout=10)
        self.count = 0
        self.stop = threading.Event()
        # Set once a watch is open: then at most about 1,000 writes a second,
        # which a CLI watcher keeps up with even on a busy machine (the
        # daemon rightly drops a watcher that falls 256 events behind).
        self.paced = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set() and i < 100_000:
                if self.paced.is_set():
                    self.stop.wait(0.001)
                self.client.register(f"w{i}")
                if i % 3 == 1:
                    self.client.call("unregister", name=f"w{i - 1}")
                i += 1
                self.count = i
        except BaseException as e:  # reported by the test
            self.error = e


def test_watch_snapshot_then_changes_has_no_gap(
    cluster: Cluster, cli_watches: list[CliWatch]
) -> None:
    (a,) = cluster.start_cluster(["snap"])
    writer = Writer(a)
    writer.start()
    try:
        wait_until(lambda: writer.count >= 200 or writer.error, 20.0, "the writer under way")
        assert writer.error is None, writer.error
        writer.paced.set()
        w = CliWatch(a, "--snapshot", "--topic", "members", "--topic", "registry")
        cli_watches.append(w)

        def live_registry_events() -> int:
            lines = w.events()
            ended = [e for e in lines if "event" not in e]
            assert not ended, f"the watch ended: {ended[0]}"
            ends = [i for i, e in enumerate(lines) if e["event"] == "snapshot_end"]
            if len(ends) < 2:
                return 0
            return sum(1 for e in lines[ends[1] + 1 :] if e["topic"] == "registry")

        wait_until(lambda: live_registry_events() >= 300, 30.0, "changes after the snapshot")
    finally:
        writer.stop.set()
        writer.join(15)
    assert writer.error is None, writer.error
    try:
        final = {e["name"] for e in a.api("list", limit=10_000)["entries"]}
        last = f"w{writer.count - 1}"  # registered last, never unregistered
        assert last in final

        def replay() -> tuple[set[str], list[str], int, int]:
            """The snapshot, then every change in order: an add of a present
            name or a removal of an absent one would be a duplicate or a gap."""
            state: set[str] = set()
            problems: list[str] = []
            in_snapshot, ends = 0, 0
            for e in w.events():
                assert "topic" in e and e["topic"] == e["data"]["topic"], e
                if e["event"] == "snapshot_end":
                    ends += 1
                    continue
                if e["topic"] != "registry":
                    continue
                name = e["data"]["name"]
                if e["event"] == "entry":
                    assert ends == 1 and e["data"]["snapshot"] is True, e  # members first
                    in_snapshot += 1
                    state.add(name)
                elif e["event"] == "registered":
                    if name in state:
                        problems.append(f"registered twice: {name}")
                    state.add(name)
                elif e["event"] == "unregistered":
                    if name not in state:
                        problems.append(f"unregistered but never seen: {name}")
                    state.discard(name)
            return state, problems, in_snapshot, ends

        # Every change up to the writer's last reaches the watch (bounded wait).
        wait_until(lambda: last in replay()[0], 20.0, f"{last} on the watch")
        state, problems, in_snapshot, ends = replay()
    finally:
        writer.client.close()
    assert problems == []
    assert ends == 2
    assert 0 < in_snapshot < writer.count  # the cut fell in the middle of the writes
    assert state == final, f"missing {sorted(final - state)[:5]}, extra {sorted(state - final)[:5]}"
    # The members snapshot came first and had this node.
    first = w.events()[0]
    assert first["event"] == "member" and first["topic"] == "members"
    assert first["data"]["name"] == "snap" and first["data"]["snapshot"] is True


def test_watch_events_name_their_topic_and_json_payloads_are_text_or_base64(
    cluster: Cluster, cli_watches: list[CliWatch]
) -> None:
    a = cluster.spawn("topic-a")
    a.wait_ready()
    w = CliWatch(a, "--topic", "members", "--topic", "registry", "--topic", "events")
    cli_watches.append(w)
    wait_until(
        lambda: a.status()["gauges"].get("api_watchers", 0) >= 1, 15.0, "the watch to be open"
    )
    a.api("event", name="hello", payload=b"")
    # "joined" in both topics: a node joins, a process joins a group.
    b = cluster.spawn("topic-b", join=[a.addr])
    b.wait_ready()
    with BlockingClient(a.sock, timeout=10) as c:
        c.join_group("workers")
        a.api("event", name="text", payload="héllo wörld".encode())
        a.api("event", name="binary", payload=b"\xff\x00\xfe")

        def by(event: str, topic: str) -> list[dict[str, Any]]:
            return [e for e in w.events() if e["event"] == event and e["topic"] == topic]

        wait_until(
            lambda: by("joined", "members") and by("joined", "registry"),
            SPREAD_S,
            "joined in both topics",
        )
        wait_until(lambda: len(by("user", "events")) >= 3, SPREAD_S, "the user events")
    (member,) = by("joined", "members")
    assert member["data"]["name"] == "topic-b" and member["data"]["topic"] == "members"
    (entry,) = by("joined", "registry")
    assert entry["data"]["kind"] == "group" and entry["data"]["name"] == "workers"
    users = {e["data"]["name"]: e["data"] for e in by("user", "events")}
    assert users["text"]["payload"] == "héllo wörld"
    assert users["text"]["payload_encoding"] == "utf-8"
    assert users["binary"]["payload"] == "/wD+"  # base64 of ff 00 fe
    assert users["binary"]["payload_encoding"] == "base64"
    assert users["hello"]["payload"] == "" and users["hello"]["payload_encoding"] == "utf-8"
    # Every line names its topic, also in the data the API sent.
    assert all(e["topic"] in ("members", "registry", "events") for e in w.events())
    assert all(e["data"]["topic"] == e["topic"] for e in w.events())


def test_every_json_command_reports_errors_as_json(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.spawn("errs")
    a.wait_ready()

    def error_of(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
        lines = r.stdout.splitlines()
        assert lines, (r.returncode, r.stdout, r.stderr)
        err: dict[str, Any] = json.loads(lines[-1])["error"]
        assert isinstance(err["message"], str) and err["message"]
        return err

    cases: list[tuple[Sequence[str], str | None, str, int]] = [
        (("lookup", "nobody", "--json"), None, "not_found", 1),
        (("send", "nobody", "hi", "--json"), None, "not_found", 1),
        (("event", "", "--json"), None, "bad_args", 1),
        (("members-of", "g", "--scope", "", "--json"), None, "bad_args", 1),
        (("members", "--json", "--tag", "role=("), None, "usage", 2),
        (("members", "--json", "--tag", "novalue"), None, "usage", 2),
        (("watch", "--json", "--topic", "nope"), None, "usage", 2),
        (("lookup", "--json"), None, "usage", 2),
        (("status", "--json"), str(tmp_path / "absent.sock"), "unreachable", 3),
        (("names", "--json"), str(tmp_path / "absent.sock"), "unreachable", 3),
        (("groups", "--json"), str(tmp_path / "absent.sock"), "unreachable", 3),
        (("keys", "list", "--json"), str(tmp_path / "absent.sock"), "unreachable", 3),
        (("watch", "--json"), str(tmp_path / "absent.sock"), "unreachable", 3),
    ]
    for args, sock, code, exit_code in cases:
        r = peerd(a, *args, sock=sock)
        assert r.returncode == exit_code, (args, r.returncode, r.stdout, r.stderr)
        assert error_of(r)["code"] == code, (args, r.stdout)
        assert r.stderr == "", (args, r.stderr)
    # Without --json: text on stderr, nothing on stdout, same exit code.
    r = peerd(a, "lookup", "nobody")
    assert r.returncode == 1 and r.stdout == "" and "not_found" in r.stderr


# --- tags ------------------------------------------------------------------------------


def tags_of(d: Daemon, name: str) -> dict[str, str] | None:
    m = d.members().get(name)
    return None if m is None else dict(m["tags"])


def write_config(path: Path, tags: dict[str, str]) -> None:
    path.write_text("[tags]\n" + "".join(f'{k} = "{v}"\n' for k, v in tags.items()))


def test_tags_from_config_and_flags_survive_restart_and_reload(
    cluster: Cluster, tmp_path: Path
) -> None:
    config = tmp_path / "t.toml"
    write_config(config, {"role": "web", "dc": "eu", "rack": "r1"})
    flags = ["--config", str(config), "--tag", "dc=us", "--tag", "zone=z1"]
    a = cluster.new("tags-a")
    cluster.start(a, extra=flags)
    a.wait_ready()
    b = cluster.spawn("tags-b", join=[a.addr])
    b.wait_ready()
    # The file's [tags] with the flags on top (a flag wins for its key), on
    # this node and as its peer sees it.
    configured = {"role": "web", "dc": "us", "rack": "r1", "zone": "z1"}
    assert tags_of(a, "tags-a") == configured
    wait_until(lambda: tags_of(b, "tags-a") == configured, SPREAD_S, "b sees a's tags")

    # Run-time changes: set one configured key, add one, delete one.
    r = peerd(a, "tags", "set", "role=db", "owner=ops")
    assert r.returncode == 0, r.stderr
    r = peerd(a, "tags", "delete", "rack")
    assert r.returncode == 0, r.stderr
    runtime = {"role": "db", "dc": "us", "zone": "z1", "owner": "ops"}
    assert tags_of(a, "tags-a") == runtime

    # They survive a restart (graceful stop, same state directory and flags).
    a.terminate()
    assert a.wait_exit(15) == 0
    cluster.start(a, extra=flags)
    a.wait_ready()
    assert tags_of(a, "tags-a") == runtime
    wait_until(lambda: tags_of(b, "tags-a") == runtime, SPREAD_S, "b sees the kept tags")

    # Reload: the file changes role (set at run time: the file wins now) and
    # rack (deleted at run time: the file's new value wins), adds new=1, and
    # drops nothing else; owner (run time only) stays.
    write_config(config, {"role": "api", "dc": "eu", "rack": "r2", "new": "1"})
    os.kill(a.pid, signal.SIGHUP)
    reloaded = {"role": "api", "dc": "us", "rack": "r2", "new": "1", "zone": "z1", "owner": "ops"}
    wait_until(lambda: tags_of(a, "tags-a") == reloaded, 10.0, "the reload applied")
    wait_until(lambda: tags_of(b, "tags-a") == reloaded, SPREAD_S, "b sees the reloaded tags")
    assert "reloaded changed=tags" in a.log()
    # And what the reload settled is what the next start runs with.
    a.terminate()
    assert a.wait_exit(15) == 0
    cluster.start(a, extra=flags)
    a.wait_ready()
    assert tags_of(a, "tags-a") == reloaded


def test_tags_set_at_run_time_survive_a_restart(cluster: Cluster) -> None:
    a, b = cluster.start_cluster(["keep-a", "keep-b"])
    r = peerd(a, "tags", "set", "role=db", "dc=eu")
    assert r.returncode == 0, r.stderr
    assert peerd(a, "tags", "delete", "dc").returncode == 0
    # Killed, not stopped: what was acknowledged is on disk already.
    a.kill9()
    cluster.start(a)
    a.wait_ready()
    assert tags_of(a, "keep-a") == {"role": "db"}
    wait_until(
        lambda: (
            (b.members().get("keep-a") or {}).get("generation") == 2
            and tags_of(b, "keep-a") == {"role": "db"}
        ),
        SPREAD_S,
        "b sees the restarted node with its tags",
    )


def test_config_tags_are_checked_before_start(cluster: Cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tags]\nrole = 3\n")
    r = peerd(None, "agent", "--check-config", str(bad))
    assert r.returncode == 2 and "tags.role" in r.stderr
    big = tmp_path / "big.toml"
    write_config(big, {f"k{i}": "v" for i in range(65)})
    r = peerd(None, "agent", "--check-config", str(big))
    assert r.returncode == 2 and "tags" in r.stderr
    a = cluster.new("tags-bad")
    a.expect_failure = True
    cluster.start(a, extra=["--tag", "novalue"])
    assert a.wait_exit(15) == 2
    assert "--tag" in a.log()


def test_members_filters_by_tag_and_name(cluster: Cluster) -> None:
    spec = {
        "web1": ["--tag", "role=web", "--tag", "dc=eu-1"],
        "web2": ["--tag", "role=web", "--tag", "dc=us-1"],
        "db1": ["--tag", "role=db", "--tag", "dc=eu-1"],
    }
    first = cluster.new("web1")
    cluster.start(first, extra=spec["web1"])
    first.wait_ready()
    others = []
    for name in ("web2", "db1"):
        d = cluster.new(name)
        cluster.start(d, join=[first.addr], extra=spec[name])
        others.append(d)
    for d in others:
        d.wait_ready()
    wait_until(
        lambda: all(tags_of(first, n) and "role" in (tags_of(first, n) or {}) for n in spec),
        SPREAD_S,
        "every member with its tags",
    )

    def names(*args: str) -> list[str]:
        r = peerd(first, "members", "--json", *args)
        assert r.returncode == 0, r.stderr
        return [m["name"] for m in json.loads(r.stdout)]

    assert names() == ["db1", "web1", "web2"]
    assert names("--tag", "role=web") == ["web1", "web2"]
    assert names("--tag", "role=w.b", "--tag", "dc=eu-.*") == ["web1"]  # all must match
    assert names("--tag", "role=we") == []  # in full, not a prefix
    assert names("--tag", "dc=eu") == []
    assert names("--tag", "missing=.*") == []  # no such tag: no match
    assert names("--name", "web") == []
    assert names("--name", "web[0-9]") == ["web1", "web2"]
    assert names("--name", "db1|web2", "--tag", "dc=eu-1") == ["db1"]
    # The table shows the same selection.
    r = peerd(first, "members", "--tag", "role=db")
    assert r.returncode == 0 and [ln.split()[0] for ln in r.stdout.splitlines()] == [
        "NAME",
        "db1",
    ]
