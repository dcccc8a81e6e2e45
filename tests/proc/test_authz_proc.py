"""API authorization against a real daemon: a process of another uid that
can open the socket is no longer cluster admin.

The daemon runs as root (the test's user); clients that are neither root nor
the daemon's user are forked children that switch to uid/gid 65534 (nobody)
before they connect, so the kernel's SO_PEERCRED/SO_PEERGROUPS of their
connections are really theirs. That needs root: without it the test is
skipped (the policy itself is covered by tests/shell/test_authz.py).
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.api.client import BlockingClient
from peerd.api.protocol import ApiError
from peerd.cli import main as cli
from peerd.wire.seal import generate_key

from .harness import API_TIMEOUT_S, Cluster, Daemon, wait_until

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the clients must connect as another uid (os.setuid) than the daemon's",
)

Call = tuple[str, dict[str, Any]]


def as_user(
    sock: Path,
    calls: list[Call],
    *,
    uid: int = NOBODY,
    gid: int = NOBODY,
    groups: tuple[int, ...] = (),
) -> list[tuple[str, Any]]:
    """Run ``calls`` on one connection from a child process with these ids;
    each answer as ("ok", result) or (error code, message)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the ids, connect, call, report, exit
        code = 1
        try:
            os.close(read_fd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out: list[tuple[str, Any]] = []
            with BlockingClient(sock, timeout=API_TIMEOUT_S) as client:
                for op, args in calls:
                    if op == "watch":  # a snapshot of the topics: [scope, name] of each entry
                        seen = []
                        for ev in client.watch(args["topics"], snapshot=True):
                            if ev.event == "snapshot_end":
                                break
                            seen.append([ev.data.get("scope"), ev.data.get("name")])
                        out.append(("ok", seen))
                        continue
                    try:
                        out.append(("ok", client.call(op, **args)))
                    except ApiError as e:
                        out.append((e.code, e.message))
            os.write(write_fd, json.dumps(out, default=repr).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, json.dumps([("child failed", repr(e))]).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    answers: list[tuple[str, Any]] = [tuple(a) for a in json.loads(b"".join(chunks))]  # type: ignore[misc]
    assert os.waitstatus_to_exitcode(status) == 0, answers
    assert len(answers) == len(calls)
    return answers


def other_group() -> grp.struct_group | None:
    """A group of this host that is neither root's nor nobody's."""
    for g in grp.getgrall():
        if g.gr_gid not in (0, NOBODY) and g.gr_name and ":" not in g.gr_name:
            return g
    return None


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged children can reach a socket in."""
    path = Path(tempfile.mkdtemp(prefix="peerd-authz-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(cluster: Cluster, tmp_path: Path, sock_dir: Path, admin_group: str) -> Daemon:
    key_file = tmp_path / "cluster.keys"
    key_file.write_text(generate_key() + "\n")
    config = tmp_path / "peerd.toml"
    config.write_text(
        f'[api]\nadmin_group = "{admin_group}"\n'
        '[api.scopes.ops]\nregister = ["uid:4242"]\nread = ["uid:4242"]\n'
    )
    d = cluster.new("a", key_file=key_file)
    d.sock = sock_dir / "a.sock"
    cluster.start(d, extra=["--config", str(config)])
    d.wait_ready()
    os.chmod(d.sock, 0o666)  # the file mode no longer decides what a client may do
    return d


def test_an_api_client_of_another_uid_is_not_cluster_admin(
    cluster: Cluster, tmp_path: Path, open_dir: Path
) -> None:
    admins = other_group()
    d = start(cluster, tmp_path, open_dir, admins.gr_name if admins else "peerd-admins")
    new_key = generate_key()
    with BlockingClient(d.sock, timeout=API_TIMEOUT_S) as root:
        # root's registrations, bound to this open connection
        root.call("register", name="svc")
        root.call("register", name="secret-svc", scope="ops")
        tags_before = d.members()["a"].get("tags")
        nobody = as_user(
            d.sock,
            [
                ("status", {}),
                ("keys.list", {}),
                ("keys.install", {"key": new_key}),
                ("keys.use", {"key": new_key}),
                ("keys.remove", {"key": new_key}),
                ("set-tags", {"tags": {"role": "evil"}}),
                ("join", {"addrs": ["127.0.0.1:9"]}),
                ("leave", {}),
                ("register", {"name": "mine"}),
                ("register", {"name": "mine", "scope": "ops"}),
                ("lookup", {"name": "secret-svc", "scope": "ops"}),
                ("list", {}),
                ("watch", {"topics": ["registry"]}),
                ("unregister", {"name": "svc"}),  # root's name: ownership still holds
                ("lookup", {"name": "svc"}),
            ],
        )
        codes = [a[0] for a in nobody]
        assert codes == [
            "ok",
            "ok",
            *["forbidden"] * 6,
            "ok",
            "forbidden",
            "forbidden",
            "ok",
            "ok",
            "not_found",
            "ok",
        ], nobody
        assert nobody[2][1].startswith("keys.install needs root, the daemon's user root")
        assert "uid 65534" in nobody[2][1]
        assert "(api.scopes.ops.register)" in nobody[9][1]
        listed = {(e["scope"], e["name"]) for e in nobody[11][1]["entries"]}
        assert ("default", "svc") in listed and ("ops", "secret-svc") not in listed
        watched = {tuple(e) for e in nobody[12][1]}  # a registry watch's snapshot
        assert ("default", "svc") in watched and ("ops", "secret-svc") not in watched
        assert nobody[14][1]["pid"] == os.getpid()  # still root's

        # Nothing changed: the daemon is up, one key, the same tags, root's
        # names in place; every refusal counted and logged.
        status = d.status()
        assert d.running() and not status["leaving"]
        assert status["gauges"]["keys"] == 1
        assert d.members()["a"].get("tags") == tags_before
        counters = status["counters"]
        for op in ("keys.install", "keys.use", "keys.remove", "set-tags", "join", "leave"):
            assert counters.get(f"api_forbidden.admin.{op}") == 1, (op, counters)
        assert counters.get("api_forbidden.register.register") == 1
        assert counters.get("api_forbidden.read.lookup") == 1
        assert "API call forbidden" in d.log()
        assert root.call("lookup", name="secret-svc", scope="ops")["pid"] == os.getpid()

        if admins is not None:
            # A member of the admin group (a supplementary group, read with
            # SO_PEERGROUPS) may do admin ops, and enter every scope.
            member = as_user(
                d.sock,
                [
                    ("set-tags", {"tags": {"role": "web"}}),
                    ("register", {"name": "mine", "scope": "ops"}),
                ],
                groups=(admins.gr_gid,),
            )
            assert [a[0] for a in member] == ["ok", "ok"], member

        # The policy is re-read on SIGHUP: open the ops scope to everyone.
        config = tmp_path / "peerd.toml"
        config.write_text(config.read_text().replace('register = ["uid:4242"]', 'register = ["*"]'))
        os.kill(d.pid, signal.SIGHUP)
        wait_until(lambda: "changed=api_policy" in d.log(), 10, "the reload")
        again = as_user(d.sock, [("register", {"name": "mine", "scope": "ops"})])
        assert again[0][0] == "ok", again

        # root (the daemon's user here) still may do everything.
        assert root.call("set-tags", tags={"role": "db"})["role"] == "db"
        root.call("keys.install", key=new_key)
        assert d.status()["gauges"]["keys"] == 2
        root.call("keys.remove", key=new_key)
        assert d.status()["gauges"]["keys"] == 1
        root.call("leave")
    assert d.wait_exit(15) == 0


def test_forbidden_counts_in_peerd_metrics(
    cluster: Cluster, tmp_path: Path, open_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start(cluster, tmp_path, open_dir, "peerd-admins")
    as_user(d.sock, [("keys.install", {"key": generate_key()})])

    def metrics() -> str:
        capsys.readouterr()
        assert cli(["metrics", "--api-socket", str(d.sock)]) == 0
        return capsys.readouterr().out

    wait_until(
        lambda: 'peerd_api_forbidden_total{op="keys.install",reason="admin"} 1' in metrics(),
        10,
        "the refusal in peerd metrics",
    )
