"""Attacks on one daemon's local API socket: slots, stalled frames, mailboxes.

Starts one ``python -m peerd agent`` per attack (the code on PYTHONPATH:
run it once with the code before a change and once after) and runs three
attacks one after the other, each as an ordinary local user (when run as root, a forked
child drops to uid 65534; otherwise the attacker is the daemon's own user,
whom the per-uid share does not limit, and the table says so):

* ``idle``: N connections that send nothing;
* ``partial``: N connections that each send 1 MiB - 1 byte of a frame and stall;
* ``mailbox``: M processes register a name and never read; one sender floods
  each with 64 KiB messages until it is refused.

For each it prints the daemon's RSS before, at the peak and after the attack
ended (the attacker's connections closed, or for the stalled frames the
daemon's read timeout passed), and whether ``peerd status`` answers during
the attack, as root (the script's user) and as another user (uid 65533).

    PYTHONPATH=/work/wt-base python benchmarks/attacks/api_exhaust.py
    python benchmarks/attacks/api_exhaust.py            # the work tree

Each daemon and attacker started here is stopped by pid when its attack
ends, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOBODY = 65534
OTHER_USER = 65533
PAYLOAD = 64 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class AsUser:
    """A forked child, as ``uid`` when we are root, running ``fn(report)``;
    ended by pid (SIGKILL) and reaped."""

    def __init__(self, uid: int | None, fn: Callable[[Callable[[str], None]], None]) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_fd)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                fn(lambda line: os.write(write_fd, line.encode() + b"\n") and None)
            except BaseException as e:
                os.write(write_fd, f"error {e!r}\n".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        self.out = os.fdopen(read_fd)

    def line(self) -> str:
        return self.out.readline().strip()

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.out.close()


def status_as(sock: Path, uid: int | None) -> str:
    """ "yes" if `status` answers for ``uid`` (None: this process), else why not."""

    def run(report: Callable[[str], None]) -> None:
        from peerd.api.client import BlockingClient
        from peerd.api.protocol import ApiError

        try:
            with BlockingClient(sock, timeout=5) as c:
                report("yes" if c.call("status").get("name") else "no name")
        except ApiError as e:
            report(f"no ({e.code}: {e.message})")
        except OSError as e:
            report(f"no ({e})")

    child = AsUser(uid, run)
    try:
        return child.line()
    finally:
        child.end()


class Daemon:
    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "run" / "a.sock"
        self.sock.parent.mkdir(mode=0o755)
        self.sock.parent.chmod(0o755)
        port = free_port()
        self.log = open(workdir / "daemon.stderr", "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "peerd", "agent", "--name", "atk"]
        argv += ["--bind", f"127.0.0.1:{port}", "--api-socket", str(self.sock)]
        argv += ["--state-dir", str(workdir / "state"), "--preset", "local"]
        # cwd is the scratch dir: `-m peerd` then comes from PYTHONPATH only.
        self.proc = subprocess.Popen(
            argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited {self.proc.returncode}")
            with contextlib.suppress(Exception):
                self.status()
                break
            time.sleep(0.1)
        else:
            raise SystemExit("daemon did not answer in 30 s")
        self.sock.chmod(0o666)  # stands in for the peerd-clients group

    def status(self) -> dict[str, Any]:
        from peerd.api.client import BlockingClient

        with BlockingClient(self.sock, timeout=5) as c:
            result: dict[str, Any] = c.call("status")
            return result

    def connections(self) -> int:
        try:
            return int(self.status().get("gauges", {}).get("api_connections", -1)) - 1
        except Exception:
            return -1  # status refused

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def hold(sock: Path, n: int, partial: bool) -> Callable[[Callable[[str], None]], None]:
    def run(report: Callable[[str], None]) -> None:
        held = []
        refused = 0
        body = (1 << 20) - 1
        stall = struct.pack(">I", body) + b"\xa0" + b"x" * (body - 2)
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            if partial:
                s.settimeout(5)
                try:
                    s.sendall(stall)
                except OSError:  # refused: the daemon closed it
                    refused += 1
            held.append(s)
        time.sleep(0.5)  # refusals arrive as an error frame, then EOF
        readable, _, _ = select.select(held, [], [], 0)
        report(f"{len(held) - max(refused, len(readable))}")
        signal.pause()

    return run


def attack_slots(d: Daemon, n: int, uid: int | None, partial: bool) -> dict[str, Any]:
    before = d.rss()
    base = d.connections()
    child = AsUser(uid, hold(d.sock, n, partial))
    try:
        held = child.line()  # as the attacker sees it: connections not refused
        peak = d.rss()
        root = status_as(d.sock, None)
        other = status_as(d.sock, OTHER_USER) if uid is not None else "n/a (not root)"
        closed_by_daemon = False
        if partial:
            # The stalled frames: does the daemon let them go while the attacker stays?
            closed_by_daemon = wait_for(lambda: 0 <= d.connections() <= base, 20)
            after = d.rss()
    finally:
        child.end()
    if not partial:
        wait_for(lambda: 0 <= d.connections() <= base, 10)
        after = d.rss()
    return {
        "held": held,
        "closed_by_daemon": closed_by_daemon,
        "root": root,
        "other": other,
        "rss": (before, peak, after),
    }


def attack_mailbox(d: Daemon, owners: int, uid: int | None) -> dict[str, Any]:
    from peerd.api.client import BlockingClient
    from peerd.api.protocol import ApiError

    before = d.rss()

    def owner(i: int) -> Callable[[Callable[[str], None]], None]:
        def run(report: Callable[[str], None]) -> None:
            c = BlockingClient(d.sock, timeout=10)
            c.register(f"sink-{i}")
            report("registered")
            signal.pause()  # never reads again

        return run

    children = [AsUser(uid, owner(i)) for i in range(owners)]
    accepted = 0
    codes: dict[str, int] = {}
    try:
        for ch in children:
            line = ch.line()
            if line != "registered":
                raise SystemExit(f"owner: {line}")
        with BlockingClient(d.sock, timeout=30) as sender:
            for i in range(owners):
                for _ in range(2000):
                    try:
                        sender.send(f"sink-{i}", b"p" * PAYLOAD)
                        accepted += 1
                    except ApiError as e:
                        codes[e.code] = codes.get(e.code, 0) + 1
                        break
        peak = d.rss()
        root = status_as(d.sock, None)
        other = status_as(d.sock, OTHER_USER) if uid is not None else "n/a (not root)"
    finally:
        for ch in children:
            ch.end()
    wait_for(lambda: d.connections() == 0, 10)
    after = d.rss()
    return {
        "accepted_mib": accepted * PAYLOAD / (1 << 20),
        "codes": codes,
        "root": root,
        "other": other,
        "rss": (before, peak, after),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--partial", type=int, default=250)
    parser.add_argument("--owners", type=int, default=16)
    args = parser.parse_args()
    import peerd

    uid = NOBODY if os.getuid() == 0 else None
    who = "uid 65534" if uid is not None else f"uid {os.getuid()} (the daemon's own)"
    print(f"code: {Path(peerd.__file__).parent.parent}; attacker: {who}", flush=True)
    rows = []

    def fresh(attack: Callable[[Daemon], Any]) -> Any:
        """Each attack gets a daemon of its own, stopped by pid afterwards."""
        workdir = Path(tempfile.mkdtemp(prefix="peerd-attack-"))
        workdir.chmod(0o755)
        try:
            d = Daemon(workdir)
            try:
                return attack(d)
            finally:
                d.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    r = fresh(lambda d: attack_slots(d, args.connections, uid, partial=False))
    rows.append(
        (
            f"{args.connections} idle connections",
            "the user's share (64) held; root and another user served",
            f"{r['held']} held; status as root: {r['root']}; as another user: {r['other']}",
            r["rss"],
        )
    )
    r = fresh(lambda d: attack_slots(d, args.partial, uid, partial=True))
    rows.append(
        (
            f"{args.partial} stalled frames of 1 MiB - 1",
            "at most 64 held, closed after read_timeout_s (10 s), memory freed",
            f"{r['held']} held; closed by the daemon while the attacker waits: "
            f"{'yes' if r['closed_by_daemon'] else 'no (20 s)'}; status as root: "
            f"{r['root']}; as another user: {r['other']}",
            r["rss"],
        )
    )
    r = fresh(lambda d: attack_mailbox(d, args.owners, uid))
    rows.append(
        (
            f"{args.owners} non-reading owners flooded with 64 KiB messages",
            "at most 64 MiB queued in all (mailbox_total_bytes), then mailbox_full",
            f"{r['accepted_mib']:.0f} MiB accepted; refusals {r['codes']}; status as root: "
            f"{r['root']}; as another user: {r['other']}",
            r["rss"],
        )
    )
    print()
    print("| attack | expected | observed | RSS MiB before / peak / after |")
    print("|---|---|---|---|")
    for attack, expected, observed, (b, p, a) in rows:
        print(f"| {attack} | {expected} | {observed} | {b:.0f} / {p:.0f} / {a:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
