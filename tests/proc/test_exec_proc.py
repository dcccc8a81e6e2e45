"""``peerd exec`` safe by default (issue 13), through real daemons.

- Names held by ``peerd exec`` take no messages: a send gets ``no_receiver``
  (through the API and the CLI), never ``delivered``.
- 50 trials, each two ``peerd exec --name leader-N`` claiming at the same
  instant on two nodes: never do both commands run on past the conflict
  window. The claims are made truly concurrent: both daemons are frozen
  (SIGSTOP) while both execs connect and send their ``register``, then
  resumed together, so each daemon takes its local claim before the other
  claim can reach it (without this, loopback is so fast that the second
  exec nearly always sees the first claim and is refused at once). Each
  trial records when each command started and when the loser
  was stopped; the figures (trials where the settle wait kept the second
  command from starting at all, and the overlap where it did not) are
  printed and recorded in README with the command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.api.client import BlockingClient
from peerd.api.protocol import ApiError

from .harness import Cluster, Daemon, kill_and_reap, wait_until

pytestmark = pytest.mark.proc

# The settle mode is the promise (50 trials always); the --no-settle mode
# measures the window, 20 trials in the suite (PEERD_EXEC_TRIALS=50 for the
# figures in README; each trial starts two CLI processes).
TRIALS = int(os.environ.get("PEERD_EXEC_TRIALS", "50"))
NO_SETTLE_TRIALS = int(os.environ.get("PEERD_EXEC_TRIALS", "20"))
BATCH = int(os.environ.get("PEERD_EXEC_BATCH", "1"))  # trials per freeze
EXIT_S = 20.0  # a loser exits within this (settle timeout 5 s, plus a loaded box)
# Overlap allowed between two commands: the settle wait's bound (5 s). The
# measured figure is far below; see README "peerd exec".
WINDOW_BOUND_S = 5.0

# Imports the CLI, says "ready", waits for "go" on stdin, then runs peerd
# with its arguments (the command inherits stdin: it runs until it closes).
LAUNCHER = """
import sys
from peerd import cli
print("ready", flush=True)
sys.stdin.readline()
sys.exit(cli.main(sys.argv[1:]))
"""

# The command (sh, which starts in about a millisecond): notes when it
# started and when it was told to stop (SIGTERM: the trap), and otherwise
# runs until its standard input (the launcher's) closes.
COMMAND = """
trap 'echo stop $(date +%s.%N) >> "$0"; exit 0' TERM
echo start $(date +%s.%N) >> "$0"
read x
exit 0
"""


class Launched:
    def __init__(self, d: Daemon, name: str, log: Path, *extra: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                "exec",
                "--api-socket",
                str(d.sock),
                "--name",
                name,
                *extra,
                "--",
                "sh",
                "-c",
                COMMAND,
                str(log),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the launcher only imports
        assert line.strip() == "ready", self.proc.stderr.read() if self.proc.stderr else ""

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def waiting(self) -> bool:
        """The launcher connected to its daemon and sleeps (waits for an
        answer): its register was sent."""
        pid = self.proc.pid
        try:
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state == "S" and any(f.startswith("socket:") for f in fds)

    def events(self) -> dict[str, float]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return {}
        return {k: float(v) for k, v in (line.split() for line in lines if line)}


class Procs:
    def __init__(self) -> None:
        self.launched: list[Launched] = []

    def launch(self, d: Daemon, name: str, log: Path, *extra: str) -> Launched:
        p = Launched(d, name, log, *extra)
        self.launched.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.launched:
            kill_and_reap(p.proc)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop_all()


def test_a_name_held_by_exec_answers_no_receiver(
    cluster: Cluster, procs: Procs, tmp_path: Path
) -> None:
    a, b, _ = cluster.start_cluster(["xa", "xb", "xc"])
    job = procs.launch(a, "quiet-job", tmp_path / "quiet.log", "--group", "quiet-workers")
    job.ready()
    job.go()
    with BlockingClient(b.sock, timeout=10) as c:
        wait_until(lambda: c.lookup("quiet-job"), 10.0, "quiet-job visible at xb")
        with pytest.raises(ApiError) as e:
            c.send("quiet-job", b"hello")
        assert e.value.code == "no_receiver", e.value.message
        wait_until(
            lambda: c.group_members("quiet-workers"), 10.0, "the exec in quiet-workers at xb"
        )
        with pytest.raises(ApiError) as e:
            c.send(group="quiet-workers", payload=b"job")
        assert e.value.code == "no_receiver"
    # On the owner's own daemon too, and through the CLI (exit 1, the code named).
    with BlockingClient(a.sock, timeout=10) as c:
        with pytest.raises(ApiError) as e:
            c.send("quiet-job", b"hello")
        assert e.value.code == "no_receiver"
    cli = subprocess.run(
        [sys.executable, "-m", "peerd", "send", "--api-socket", str(b.sock), "quiet-job", "hi"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 1 and "no_receiver" in cli.stderr and "delivered" not in cli.stdout
    assert job.proc.stdin is not None
    job.proc.stdin.close()  # the command ends
    assert job.proc.wait(20) == 0


def lookup_pid(d: Daemon, name: str) -> int | None:
    try:
        return int(d.api("lookup", name=name)["pid"])
    except ApiError as e:
        if e.code == "not_found":
            return None
        raise


@pytest.mark.parametrize("mode", ["settle", "no-settle"])
def test_simultaneous_exec_claims_never_run_two_commands_past_the_window(
    cluster: Cluster, procs: Procs, tmp_path: Path, mode: str
) -> None:
    extra = ("--no-settle",) if mode == "no-settle" else ()
    total = NO_SETTLE_TRIALS if mode == "no-settle" else TRIALS
    daemons = cluster.start_cluster(["ea", "eb", "ec"])
    a, b = daemons[0], daemons[1]
    prevented = 0  # trials where the second command's code never ran
    windows: list[float] = []  # overlap of the two commands where both started
    codes: dict[int, int] = {}
    for first in range(0, total, BATCH):
        trials = []
        for i in range(first, min(total, first + BATCH)):
            name = f"leader-{i}"
            pair = (
                procs.launch(a, name, tmp_path / f"{i}-a.log", *extra),
                procs.launch(b, name, tmp_path / f"{i}-b.log", *extra),
            )
            trials.append((i, name, pair))
        for _, _, pair in trials:
            for p in pair:
                p.ready()
        os.kill(a.pid, signal.SIGSTOP)
        os.kill(b.pid, signal.SIGSTOP)
        try:
            for _, _, pair in trials:
                pair[0].go()
                pair[1].go()
            wait_until(
                lambda trials=trials: all(p.waiting() for _, _, pair in trials for p in pair),
                EXIT_S,
                "every exec to send its claim",
            )
        finally:
            os.kill(a.pid, signal.SIGCONT)
            os.kill(b.pid, signal.SIGCONT)
        for _i, name, pair in trials:
            # One of the two exits (refused, or stopped after it lost)...
            loser = wait_until(
                lambda pair=pair: next((p for p in pair if p.proc.poll() is not None), None),
                EXIT_S,
                f"one exec of {name} to exit",
            )
            winner = pair[1] if loser is pair[0] else pair[0]
            code = loser.proc.returncode
            codes[code] = codes.get(code, 0) + 1
            err = loser.proc.stderr.read() if loser.proc.stderr else ""
            assert code in (1, 4), f"{name}: the loser exited {code}: {err}"
            # ... and the other holds the name everywhere, its command running.
            assert winner.proc.poll() is None, f"{name}: both execs exited"
            try:
                wait_until(
                    lambda name=name, winner=winner: all(
                        lookup_pid(d, name) == winner.proc.pid for d in daemons
                    ),
                    30.0,  # a daemon suspected while frozen may need a sync round
                    f"{name} held by the survivor ({winner.proc.pid}) everywhere",
                )
            except AssertionError as e:
                seen = {d.name: lookup_pid(d, name) for d in daemons}
                raise AssertionError(f"{e}; holders now {seen}; loser {code} {err}") from None
            wait_until(lambda w=winner: "start" in w.events(), 10.0, f"{name}'s command started")
            lost = loser.events()
            if "start" not in lost:
                # Refused (1), or stopped (4) before the command's own code ran.
                prevented += 1
            else:
                assert code == 4 and "stop" in lost, f"{name}: {lost} {err}"
                both = max(lost["start"], winner.events()["start"])
                windows.append(max(0.0, lost["stop"] - both))
            assert winner.proc.stdin is not None
            winner.proc.stdin.close()  # the command ends
            end = winner.proc.wait(20)
            assert end == 0, (
                f"{name}: winner exited {end}: {winner.events()} "
                f"{winner.proc.stderr.read() if winner.proc.stderr else ''}; loser {lost} {err}"
            )
    assert prevented + len(windows) == total
    print(
        f"\n{mode}: {total} trials: the loser's command never ran in {prevented}; "
        f"both ran in {len(windows)}"
        + (
            f", overlap (ms) max {max(windows) * 1000:.1f}, "
            f"median {sorted(windows)[len(windows) // 2] * 1000:.1f}"
            if windows
            else ""
        )
        + f"; loser exit codes {codes}"
    )
    assert all(w <= WINDOW_BOUND_S for w in windows), windows
