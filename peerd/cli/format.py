"""How results and events look: tables for people, one JSON object per line
for programs.

Pure functions from the API's wire maps to text, tested directly. Tables show
short node ids and sort members by name; ``--json`` output keeps the full
values, so a script never parses a table. Events are one line each, with a
timestamp, in both forms, so ``watch`` can be piped into ``grep`` or ``jq``.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from peerd.api.protocol import Event
from peerd.cli.common import MEMBER_STATUSES, SHORT_ID


def format_tags(tags: Mapping[str, Any]) -> str:
    """``k=v,k2=v2`` sorted by key, ``-`` when empty (keeps table columns aligned)."""
    if not tags:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers) - 1)]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _member_sort_key(m: Mapping[str, Any]) -> tuple[str, str]:
    return (str(m.get("name", "")), str(m.get("id", "")))


def format_members(members: Iterable[Mapping[str, Any]]) -> str:
    """The ``peerd members`` table: name, short id, address, status, incarnation, tags."""
    rows = [
        [
            str(m.get("name", "?")),
            str(m.get("id", "?"))[:SHORT_ID],
            str(m.get("addr", "?")),
            str(m.get("status", "?")),
            str(m.get("incarnation", "?")),
            format_tags(m.get("tags", {})),
        ]
        for m in sorted(members, key=_member_sort_key)
    ]
    return format_table(["NAME", "ID", "ADDRESS", "STATUS", "INC", "TAGS"], rows)


def format_status(status: Mapping[str, Any]) -> str:
    """The ``peerd status`` report, one ``label  value`` line per field."""
    counts = status.get("members", {})
    health = status.get("health", "?")
    health_text = (
        f"{health} (healthy)"
        if health == 0
        else f"{health} (degraded: this node may be slow or overloaded)"
        if isinstance(health, int)
        else str(health)
    )
    fields = [
        ("name", str(status.get("name", "?"))),
        ("id", str(status.get("id", "?"))),
        ("address", str(status.get("addr", "?"))),
        ("incarnation", str(status.get("incarnation", "?"))),
        ("generation", str(status.get("generation", "?"))),
        ("health", health_text),
        ("members", ", ".join(f"{counts.get(s, 0)} {s}" for s in MEMBER_STATUSES)),
        ("version", str(status.get("version", "?"))),
    ]
    if status.get("leaving"):
        fields.append(("leaving", "yes"))
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in fields)


def _member_brief(m: Mapping[str, Any]) -> str:
    return f"{m.get('name', '?')} {str(m.get('id', '?'))[:SHORT_ID]} {m.get('addr', '?')}"


def format_event(ev: Event, when: datetime.datetime | None = None) -> str:
    """One human line per watch event: time, event, member, status, incarnation, tags."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    line = (
        f"{when.strftime('%H:%M:%S')} {ev.event:<13} {_member_brief(d)} "
        f"{d.get('status', '?')} inc={d.get('incarnation', '?')} "
        f"tags={format_tags(d.get('tags', {}))}"
    )
    other = d.get("other")
    if isinstance(other, Mapping):
        line += f" other={_member_brief(other)}"
    return line


def _entry_node(e: Mapping[str, Any]) -> str:
    """``name (short id)`` of the node owning a registry entry."""
    node = str(e.get("node", "?"))[:SHORT_ID]
    name = e.get("node_name")
    return f"{name} ({node})" if name else node


def format_names(entries: Iterable[Mapping[str, Any]]) -> str:
    """The ``peerd names`` table: scope, name, owner node, pid, meta."""
    rows = [
        [
            str(e.get("scope", "?")),
            str(e.get("name", "?")),
            _entry_node(e),
            str(e.get("pid", "?")),
            format_tags(e.get("meta", {})),
        ]
        for e in entries
    ]
    return format_table(["SCOPE", "NAME", "NODE", "PID", "META"], rows)


def format_group_members(entries: Iterable[Mapping[str, Any]]) -> str:
    """The ``peerd members-of`` table: owner node, address, pid, meta."""
    rows = [
        [
            _entry_node(e),
            str(e.get("node_addr", "?")),
            str(e.get("pid", "?")),
            format_tags(e.get("meta", {})),
        ]
        for e in entries
    ]
    return format_table(["NODE", "ADDRESS", "PID", "META"], rows)


def format_groups(groups: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        [str(g.get("scope", "?")), str(g.get("group", "?")), str(g.get("members", "?"))]
        for g in groups
    ]
    return format_table(["SCOPE", "GROUP", "MEMBERS"], rows)


def format_claimed(ms: Any) -> str:
    if not isinstance(ms, int):
        return "?"
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_entry(e: Mapping[str, Any]) -> str:
    """``peerd lookup``: the owner of a name, one ``label  value`` line each."""
    fields = [
        ("name", str(e.get("name", "?"))),
        ("scope", str(e.get("scope", "?"))),
        ("node", str(e.get("node_name", "?"))),
        ("node id", str(e.get("node", "?"))),
        ("address", str(e.get("node_addr", "?"))),
        ("pid", str(e.get("pid", "?"))),
        ("uid", str(e.get("uid", "?"))),
        ("meta", format_tags(e.get("meta", {}))),
        ("claimed", format_claimed(e.get("claimed_ms"))),
    ]
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in fields)


REGISTRY_EVENTS = frozenset({"registered", "unregistered", "updated", "joined", "left", "conflict"})


def format_registry_event(ev: Event, when: datetime.datetime | None = None) -> str:
    """One line per registry event: time, event, kind, scope/name, owner, pid, meta."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    line = (
        f"{when.strftime('%H:%M:%S')} {ev.event:<13} {d.get('kind', '?')} "
        f"{d.get('scope', '?')}/{d.get('name', '?')} node={_entry_node(d)} "
        f"pid={d.get('pid', '?')} meta={format_tags(d.get('meta', {}))}"
    )
    winner = d.get("winner")
    if isinstance(winner, Mapping):
        line += f" winner={_entry_node(winner)} pid={winner.get('pid', '?')}"
    return line


def conflict_warning(ev: Event) -> str:
    """What ``peerd exec`` prints when the daemon reports a lost name."""
    d = ev.data
    w = d.get("winner") if isinstance(d.get("winner"), Mapping) else {}
    assert isinstance(w, Mapping)
    return (
        f"warning: lost the name {d.get('scope', '?')}/{d.get('name', '?')} to an older "
        f"claim by pid {w.get('pid', '?')} on node {_entry_node(w)}; this process no "
        "longer holds it"
    )


def show_payload(data: Any) -> str:
    """A payload for humans: its text if it is printable UTF-8, else hex."""
    if isinstance(data, str):
        return data
    if not isinstance(data, bytes):
        return repr(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + data.hex()
    return text if text.isprintable() else "0x" + data.hex()


def format_user_event(ev: Event, when: datetime.datetime | None = None) -> str:
    """One line per user event: time, name, origin node, payload."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    origin = d.get("origin_name") or str(d.get("origin", "?"))[:SHORT_ID]
    return (
        f"{when.strftime('%H:%M:%S')} event {d.get('name', '?')} from={origin} "
        f"payload={show_payload(d.get('payload', b''))}"
    )


def format_snapshot_end(ev: Event, when: datetime.datetime | None = None) -> str:
    """The line closing the snapshot of one topic (``watch --snapshot``)."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    return (
        f"{when.strftime('%H:%M:%S')} {ev.event:<13} topic={d.get('topic', '?')} "
        f"count={d.get('count', '?')}"
    )


def payload_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its bytes ``payload`` (user events, messages) made JSON:
    the text when it is valid UTF-8 (``"payload_encoding": "utf-8"``), else
    base64 (``"payload_encoding": "base64"``)."""
    out = dict(data)
    payload = out.get("payload")
    if isinstance(payload, bytes | bytearray):
        try:
            out["payload"] = bytes(payload).decode("utf-8")
            out["payload_encoding"] = "utf-8"
        except UnicodeDecodeError:
            out["payload"] = base64.b64encode(payload).decode("ascii")
            out["payload_encoding"] = "base64"
    return out


def event_json(ev: Event, when: datetime.datetime | None = None) -> str:
    """One JSON object per line: ``{"time", "topic", "event", "data"}``; a
    payload as :func:`payload_json` makes it."""
    when = when or datetime.datetime.now(datetime.UTC)
    return json.dumps(
        {
            "time": when.isoformat(timespec="milliseconds"),
            "topic": ev.data.get("topic"),
            "event": ev.event,
            "data": payload_json(ev.data),
        },
        sort_keys=True,
        default=_json_default,
        ensure_ascii=False,
    )


def error_json(code: str, message: str) -> str:
    """What a command run with ``--json`` prints on stdout when it fails:
    ``{"error": {"code", "message"}}`` on one line (the exit code is unchanged)."""
    return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False)


def _json_default(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False))
