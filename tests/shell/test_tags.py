"""Node tags: configured, changed at run time, and how they meet (peerd.shell.tags),
with their file in the state directory and their settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from peerd.shell import agent
from peerd.shell.settings import SettingsError, resolve
from peerd.shell.state import StateDir, StateError
from peerd.shell.tags import NodeTags


def test_runtime_changes_are_kept_as_a_difference_from_the_configuration() -> None:
    t = NodeTags({"role": "web", "dc": "eu"})
    t.set_effective({"role": "db", "dc": "eu", "owner": "ops"})  # set role, add owner
    assert t.runtime == {"role": "db", "owner": "ops"}
    t.set_effective({"role": "db", "owner": "ops"})  # delete dc
    assert t.runtime == {"role": "db", "owner": "ops", "dc": None}
    assert t.effective() == {"role": "db", "owner": "ops"}
    t.set_effective({"role": "web", "owner": "ops"})  # back to the configured role
    assert t.runtime == {"owner": "ops", "dc": None}


def test_the_configuration_wins_only_for_the_keys_it_changes() -> None:
    t = NodeTags({"role": "web", "dc": "eu", "rack": "r1"}, {"role": "db", "dc": None, "x": "1"})
    # Same configuration (a restart): every run-time change stays.
    assert t.reconfigure({"role": "web", "dc": "eu", "rack": "r1"}) == []
    assert t.effective() == {"role": "db", "rack": "r1", "x": "1"}
    # The file changes role and dc: its values win; x (never configured) stays.
    assert t.reconfigure({"role": "api", "dc": "us", "rack": "r1"}) == ["dc", "role"]
    assert t.effective() == {"role": "api", "dc": "us", "rack": "r1", "x": "1"}
    # The file now configures x too: the configuration wins for x.
    assert t.reconfigure({"role": "api", "dc": "us", "rack": "r1", "x": "2"}) == ["x"]
    assert t.effective()["x"] == "2" and t.runtime == {}


def test_state_dir_keeps_tags_and_refuses_a_corrupt_file(tmp_path: Path) -> None:
    with StateDir(tmp_path / "s") as state:
        assert state.tags() is None
        tags = NodeTags({"role": "wéb"}, {"dc": None, "k": "v"})
        state.save_tags(tags)
        assert state.tags() == tags
        assert (tmp_path / "s" / "tags").read_bytes().isascii()
        (tmp_path / "s" / "tags").write_text('{"configured": [], "runtime": {}}')
        with pytest.raises(StateError, match="corrupt"):
            state.tags()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_tags_from_the_file_with_flags_on_top(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[tags]\nrole = "web"\ndc = "eu"\n')
    s = resolve(parse("--config", str(path), "--tag", "dc=us", "--tag", "eq=a=b"))
    assert dict(s.tags) == {"role": "web", "dc": "us", "eq": "a=b"}
    assert dict(resolve(parse("--tag", "empty=")).tags) == {"empty": ""}


@pytest.mark.parametrize(
    ("text", "flags", "key"),
    [
        ("[tags]\nrole = 3\n", (), "tags.role"),
        ('tags = "x"\n', (), "tags"),
        ("", ("--tag", "novalue"), "--tag"),
        ("", ("--tag", "=v"), "--tag"),
        ("[tags]\n" + "".join(f'k{i} = "v"\n' for i in range(65)), (), "tags"),
        ('[tags]\nk = "' + "v" * 600 + '"\n', (), "tags"),
    ],
)
def test_bad_tags_name_their_key(
    tmp_path: Path, text: str, flags: tuple[str, ...], key: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        resolve(parse("--config", str(path), *flags))
    assert info.value.key == key
