"""A scenario file with an error: exit 2, the line and the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peerd.sim.scenario import ScenarioError, loads

GOOD = """name = "x"
nodes = 10
duration_s = 10
[[fault]]
at_s = 1
kind = "crash"
nodes = 1
[[expect]]
check = "converged"
within_s = 5
"""


def test_good_file_loads() -> None:
    sc = loads(GOOD)
    assert sc.nodes == 10 and sc.faults[0].kind == "crash" and sc.expects[0].within_s == 5


@pytest.mark.parametrize(
    ("old", "new", "line", "reason"),
    [
        ('kind = "crash"', 'kind = "explode"', 6, "fault 'kind' must be one of"),
        ("nodes = 1\n[[expect]]", "nodes = 1.5\n[[expect]]", 7, "fraction must be in (0, 1]"),
        ("at_s = 1", "at_s = 1\nduraton_s = 3", 6, "did you mean 'duration_s'"),
        ("at_s = 1", "at_s = 1\ngroups = [0.5, 0.5]", 6, "'groups' is not used there"),
        ('check = "converged"', 'check = "happy"', 9, "unknown check 'happy'"),
        ("within_s = 5", "", 8, "check 'converged' needs 'within_s'"),
        ("within_s = 5", "within_s = 5\nuntil_s = 9", 11, "check 'converged' takes no 'until_s'"),
        ("nodes = 10", "nodes = 0", 2, "'nodes' must be an integer >= 1"),
        ("duration_s = 10", "duration_s = 10\n[network]\nloss = 2", 5, "'loss' must be <= 1"),
        ("duration_s = 10", "duration_s = [", 4, "TOML syntax"),  # where tomllib notices
    ],
)
def test_errors_name_line_and_reason(old: str, new: str, line: int, reason: str) -> None:
    text = GOOD.replace(old, new, 1)
    with pytest.raises(ScenarioError) as err:
        loads(text, "bad.toml")
    assert err.value.line == line, str(err.value)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"bad.toml:{line}: ")


def test_partition_groups_must_add_up() -> None:
    text = GOOD.replace('kind = "crash"\nnodes = 1', 'kind = "partition"\ngroups = [0.5, 0.2]')
    with pytest.raises(ScenarioError, match="add up to 1"):
        loads(text)


def test_cli_exit_2_with_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('kind = "crash"', 'kind = "explode"'))
    out = subprocess.run(
        [sys.executable, "-m", "peerd", "sim", str(bad), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    # Under --json the error is JSON on stdout (as for every --json command).
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "usage"
    assert f"{bad}:6:" in error["message"] and "explode" in error["message"]
    assert out.stderr == ""
    # Without --json: the line on stderr.
    out = subprocess.run(
        [sys.executable, "-m", "peerd", "sim", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert f"{bad}:6:" in out.stderr and "explode" in out.stderr
    assert out.stdout == ""


def test_cli_missing_file_exit_2(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "peerd", "sim", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_until_s_must_follow_after_s() -> None:
    text = GOOD + '[[expect]]\ncheck = "broadcast_reliability"\nafter_s = 5\nuntil_s = 5\n'
    with pytest.raises(ScenarioError, match="'until_s' .5. must be after 'after_s' .5."):
        loads(text)
    sc = loads(text.replace("until_s = 5", "until_s = 8"))
    assert (sc.expects[1].after_s, sc.expects[1].until_s) == (5, 8)
