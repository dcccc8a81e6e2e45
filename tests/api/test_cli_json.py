"""The CLI's JSON: payload encoding, the topic of watch lines, errors; members filters."""

from __future__ import annotations

import datetime
import json

import pytest

from peerd import cli
from peerd.api.protocol import ApiError, Event, parse_watch_snapshot


def test_payloads_are_utf8_text_else_base64() -> None:
    assert cli.payload_json({"payload": "é".encode()}) == {
        "payload": "é",
        "payload_encoding": "utf-8",
    }
    assert cli.payload_json({"payload": b"\xff\x00"}) == {
        "payload": "/wA=",
        "payload_encoding": "base64",
    }
    # Not printable but valid UTF-8 is still text (JSON escapes it).
    assert cli.payload_json({"payload": b"\x00\n"})["payload_encoding"] == "utf-8"
    assert cli.payload_json({"name": "x"}) == {"name": "x"}


def test_event_json_has_the_topic() -> None:
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    ev = Event(1, "user", {"topic": "events", "name": "n", "payload": b"\xfe"})
    line = json.loads(cli.event_json(ev, when))
    assert line["topic"] == "events" and line["event"] == "user"
    assert line["data"]["payload"] == "/g==" and line["data"]["payload_encoding"] == "base64"


def test_error_json_shape() -> None:
    assert json.loads(cli.error_json("not_found", "no name 'x'")) == {
        "error": {"code": "not_found", "message": "no name 'x'"}
    }


def test_usage_errors_under_json_are_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["members", "--json", "--bogus"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "usage" and err == ""
    # Without --json argparse's text, as before.
    assert cli.main(["members", "--bogus"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and "unrecognized arguments" in err


def test_member_filter_matches_in_full_and_all_tags() -> None:
    web = {"name": "web1", "tags": {"role": "web", "dc": "eu-1"}}
    db = {"name": "db1", "tags": {"role": "db"}}
    keep = cli.member_filter(None, [("role", "web|db"), ("dc", "eu-.*")])
    assert [keep(m) for m in (web, db)] == [True, False]
    assert not cli.member_filter("web", [])(web)
    assert cli.member_filter("w.b\\d", [])(web)
    with pytest.raises(cli.CliError) as info:
        cli.member_filter("(", [])
    assert info.value.exit_code == cli.EXIT_USAGE


def test_watch_snapshot_arg() -> None:
    assert parse_watch_snapshot({"topics": ["members"]}) is False
    assert parse_watch_snapshot({"snapshot": True}) is True
    with pytest.raises(ApiError) as info:
        parse_watch_snapshot({"snapshot": 1})
    assert info.value.code == "bad_args"
