"""The command line: every subcommand, its flags and its help text.

The agent's flags live with the agent (:mod:`peerd.shell.agent`) and are added
only when ``peerd agent`` is what runs, so client commands never import the
daemon. Under ``--json`` a usage error is raised rather than printed, so
:func:`peerd.cli.main` can print it as JSON.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from peerd import __version__
from peerd.cli.cluster import (
    cmd_join,
    cmd_leave,
    cmd_members,
    cmd_metrics,
    cmd_status,
    cmd_tags_delete,
    cmd_tags_set,
    parse_tag_assignment,
)
from peerd.cli.common import MEMBER_STATUSES, CliError
from peerd.cli.keys import _key_command, cmd_keys_generate, cmd_keys_list
from peerd.cli.messages import cmd_event, cmd_exec, cmd_send, cmd_watch
from peerd.cli.registry import cmd_groups, cmd_lookup, cmd_members_of, cmd_names


def cmd_agent(args: argparse.Namespace) -> int:
    agent = _import_agent()
    if agent is None:
        raise CliError("the agent is not available in this installation (peerd.shell.agent)")
    code: int = agent.run(args)
    return code


def _import_agent() -> Any:
    try:
        import peerd.shell.agent as agent
    except ModuleNotFoundError as exc:
        if exc.name not in ("peerd.shell.agent", "peerd.shell"):
            raise
        return None
    return agent


DESCRIPTION = """\
peerd: a masterless peer-to-peer membership and registry daemon.

`peerd agent` runs the daemon on this host. The other commands talk to the
local daemon through its API socket."""

EPILOG = """\
API socket: --api-socket PATH, else $PEERD_API_SOCKET, else /run/peerd/peerd.sock
for root, else $XDG_RUNTIME_DIR/peerd/peerd.sock, else /tmp/peerd-UID/peerd.sock.

exit codes: 0 ok, 1 operation failed (the daemon said no), 2 usage error,
3 daemon not reachable. Run `peerd COMMAND --help` for details."""


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api-socket", metavar="PATH", help="the daemon's API socket (default: see `peerd --help`)"
    )
    return common


class _UsageError(Exception):
    """A command-line usage error while ``--json`` was given."""


class _Parser(argparse.ArgumentParser):
    """argparse, but under ``--json`` a usage error is raised (and printed as
    JSON by :func:`main`) instead of printed as text. Subcommand parsers are
    of the same class (argparse makes them with ``type(parent)``)."""

    json_errors = False  # set by main() for the duration of one parse

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            raise _UsageError(f"{self.prog}: {message}")
        super().error(message)


def build_parser(with_agent_flags: bool = False) -> argparse.ArgumentParser:
    """The whole command line. ``with_agent_flags`` imports the agent to add its
    flags; only done when the agent subcommand is what runs."""
    # The top level keeps its hand-made line breaks; subcommands' prose is rewrapped.
    parser: argparse.ArgumentParser = _Parser(
        prog="peerd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    client = _client_options()

    def add(
        name: str,
        summary: str,
        description: str,
        parents: Sequence[argparse.ArgumentParser] = (client,),
    ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, parents=list(parents))

    agent = add(
        "agent",
        "run the daemon (see `peerd agent --help`)",
        "Run the peerd daemon in the foreground (systemd runs it as a service).",
        parents=(),
    )
    agent.set_defaults(func=cmd_agent)
    if with_agent_flags:
        module = _import_agent()
        if module is not None:
            module.add_arguments(agent)

    p = add(
        "status",
        "show this node's identity, health and member counts",
        "Show this node's name, id, address, incarnation, generation, Lifeguard health "
        "(0 = healthy) and how many members are alive, suspect, dead or left.",
    )
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=cmd_status)

    p = add(
        "members",
        "list the members of the cluster",
        "List every member this node knows (itself included): name, short id, address, "
        "status, incarnation, tags. Sorted by name. --tag and --name select by "
        "regular expressions matched in full (Serf's members -tag, -name).",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON list (full ids, tags as objects)"
    )
    p.add_argument(
        "--status",
        choices=MEMBER_STATUSES,
        action="append",
        help="only members with this status (repeatable)",
    )
    p.add_argument(
        "--name",
        metavar="REGEX",
        help="only members whose name matches REGEX in full (Python re syntax)",
    )
    p.add_argument(
        "--tag",
        action="append",
        type=parse_tag_assignment,
        metavar="KEY=REGEX",
        help="only members with tag KEY whose value matches REGEX in full "
        "(repeatable: all must match)",
    )
    p.set_defaults(func=cmd_members)

    p = add(
        "watch",
        "print membership (or registry) events as they happen",
        "Print one line per membership event (joined, updated, suspect, alive, dead, "
        "left, name_conflict, reaped), or with --topic registry per registry event "
        "(registered, unregistered, updated, joined, left, conflict), or with --topic "
        "events per user event, until interrupted with Ctrl-C.",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"time", "topic", "event", "data"}; a payload is '
        'its text when it is valid UTF-8, else base64, as "payload_encoding" says',
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="first the current state (members: a `member` line each; registry: an "
        "`entry` line each), a `snapshot_end` line per topic, then the changes, with "
        "no gap between them",
    )
    p.add_argument(
        "--topic",
        choices=("members", "registry", "events"),
        action="append",
        help="what to watch (repeatable; default: members; events: user events "
        "sent with `peerd event`)",
    )
    p.set_defaults(func=cmd_watch)

    p = add(
        "event",
        "broadcast a user event to every node",
        "Broadcast user event NAME with an optional PAYLOAD (text) to every node of the "
        "cluster; `peerd watch --topic events` shows them (on this node too). Name and "
        "payload together may take at most 8 KiB; larger is refused (exit 1). User "
        "events are rate limited and travel behind the daemon's own traffic.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("payload", metavar="PAYLOAD", nargs="?", default="")
    p.add_argument("--json", action="store_true", help='print {"id": ...} of the broadcast')
    p.set_defaults(func=cmd_event)

    p = add(
        "send",
        "send a message to the process holding a name",
        "Send PAYLOAD (text) to the process holding NAME anywhere in the cluster (with "
        "--group, to one member of group NAME; with --all, to every member). The "
        "receiving process gets it as a `message` event on its API connection. Exit 0 "
        "once the owner's daemon queued it; 1 with the reason if nobody holds NAME, the "
        "owner vanished, its mailbox is full or its daemon could not be reached (a "
        "message is never delivered twice), or its holder takes no messages "
        "(no_receiver: a name held by peerd exec). With --reply-to TOKEN (and no NAME), "
        "answer the connection that sent a message (its event's reply_to).",
    )
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("payload", metavar="PAYLOAD")
    p.add_argument(
        "--reply-to",
        metavar="TOKEN",
        help="answer the connection that sent a message: the reply_to of its event",
    )
    p.add_argument("--group", action="store_true", help="NAME is a process group")
    p.add_argument("--all", action="store_true", help="with --group: every member")
    p.add_argument("--scope", default="default", help="the scope (default: default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_send)

    scope_help = "the scope (default: default)"
    p = add(
        "names",
        "list registered names",
        "List the unique names registered anywhere in the cluster (this node's "
        "replica): scope, name, owner node, pid, metadata. Sorted by scope and name.",
    )
    p.add_argument("--scope", help="only this scope (default: every scope)")
    p.add_argument("--prefix", default="", help="only names starting with this")
    p.add_argument("--json", action="store_true", help="print a JSON list of entries")
    p.set_defaults(func=cmd_names)

    p = add(
        "lookup",
        "show who holds a name",
        "Print the owner of NAME: node name, node id and address, pid, uid, metadata, "
        "claim time. Exit 1 if nobody holds it.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--scope", default="default", help=scope_help)
    p.add_argument("--json", action="store_true", help="print the entry as JSON")
    p.set_defaults(func=cmd_lookup)

    p = add(
        "groups",
        "list process groups and their sizes",
        "List the process groups of the cluster with how many members each has.",
    )
    p.add_argument("--scope", help="only this scope (default: every scope)")
    p.add_argument("--prefix", default="", help="only groups starting with this")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_groups)

    p = add(
        "members-of",
        "list the members of a process group",
        "List the processes in GROUP: owner node, address, pid, metadata.",
    )
    p.add_argument("group", metavar="GROUP")
    p.add_argument("--scope", default="default", help=scope_help)
    p.add_argument("--json", action="store_true", help="print a JSON list of entries")
    p.set_defaults(func=cmd_members_of)

    p = add(
        "exec",
        "run a command holding names and group memberships",
        "Register each --name and join each --group, then run COMMAND; the "
        "registrations last exactly as long as it runs (they are removed cluster-wide "
        "when it exits, or if this process is killed). Fails with exit 1 if a name is "
        "taken. SIGTERM, SIGHUP, SIGUSR1/2 (and SIGINT/SIGQUIT not from the terminal) "
        "are passed to COMMAND. Each name is first acknowledged by every live member "
        "(--no-settle skips that) and COMMAND does not start if an older claim wins. If a "
        "name is lost while COMMAND runs, COMMAND is stopped (--on-lose). The entries take "
        "no messages: a send to them fails with no_receiver. Exits with COMMAND's status "
        "(128+N if killed by signal N); 1 if a name is taken; 4 if COMMAND was stopped "
        "because a name was lost, 5 because the connection to the daemon was lost.",
    )
    p.add_argument(
        "--name",
        dest="names",
        action="append",
        default=[],
        metavar="NAME",
        help="a unique name to hold (repeatable)",
    )
    p.add_argument(
        "--group",
        dest="groups",
        action="append",
        default=[],
        metavar="GROUP",
        help="a process group to be in (repeatable)",
    )
    p.add_argument("--scope", default="default", help=scope_help)
    p.add_argument(
        "--meta",
        action="append",
        type=parse_tag_assignment,
        metavar="KEY=VALUE",
        help="metadata for every entry (repeatable)",
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="start COMMAND as soon as the local daemon took each name, without waiting "
        "for every live member to acknowledge it (a concurrent claim elsewhere may then "
        "win after COMMAND started)",
    )
    p.add_argument(
        "--settled",
        action="store_true",
        help="accepted for compatibility: waiting for the claim to settle is the default",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="bound on the settle wait (default 5 s; past it COMMAND starts with a warning)",
    )
    p.add_argument(
        "--on-lose",
        choices=("term", "warn"),
        default="term",
        help="when a name is lost to an older claim elsewhere (or the connection to the "
        "daemon, and with it the names) while COMMAND runs: term (default) stops it, "
        "SIGTERM then SIGKILL after --grace, and exits 4 (5 for the connection); warn "
        "only prints a warning",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL with --on-lose term (default 10)",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS")
    p.set_defaults(func=cmd_exec)

    tags = add(
        "tags",
        "change this node's tags",
        "Tags are key=value labels gossiped with this node's membership. Changes "
        "made here are kept in the state directory over restarts, until the config "
        "file's [tags] (or a --tag flag) changes the same key.",
        parents=(),
    )
    tags_sub = tags.add_subparsers(dest="tags_command", metavar="ACTION", required=True)
    p = tags_sub.add_parser(
        "set",
        parents=[client],
        help="set tags (KEY=VALUE ...)",
        description="Set tags; others are kept unless --replace. "
        "Prints the node's tags afterwards.",
    )
    p.add_argument("assignments", nargs="+", type=parse_tag_assignment, metavar="KEY=VALUE")
    p.add_argument("--replace", action="store_true", help="drop every tag not given here")
    p.set_defaults(func=cmd_tags_set)
    p = tags_sub.add_parser(
        "delete",
        parents=[client],
        help="delete tags by key",
        description="Delete tags (missing keys are ignored). Prints the node's tags afterwards.",
    )
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.set_defaults(func=cmd_tags_delete)

    p = add(
        "join",
        "contact more peers and merge their view of the cluster",
        "Ask the daemon to join peers. HOST may be an IP address or a name (resolved "
        "here; every address it resolves to is tried). Without :PORT the daemon's "
        "default port is used. IPv6 with a port: [ADDR]:PORT. Fails (exit 1) if no "
        "address answered.",
    )
    p.add_argument("addrs", nargs="+", metavar="HOST[:PORT]")
    p.set_defaults(func=cmd_join)

    p = add(
        "metrics",
        "print the daemon's counters and gauges (Prometheus text format)",
        "Print the daemon's metrics in the Prometheus text exposition format: members "
        "by status, probes, suspicions, refutations, messages and bytes in/out by type, "
        "drops by reason, API connections. `peerd agent --metrics-addr HOST:PORT` serves "
        "the same text over HTTP at /metrics.",
    )
    p.set_defaults(func=cmd_metrics)

    p = add(
        "sim",
        "run a scenario in the deterministic simulator (no daemon needed)",
        "Run SCENARIO.toml (see scenarios/) in the simulator: many cores, a virtual "
        "clock, a fake network, injected faults. Exit 0 if every expectation held, 1 if "
        "one failed, 2 for a bad scenario file.",
        parents=(),
    )
    import peerd.cli.sim as sim_cli

    sim_cli.add_arguments(p)
    p.set_defaults(func=sim_cli.cmd_sim)

    p = add(
        "leave",
        "leave the cluster gracefully; the daemon then stops",
        "Announce that this node leaves, wait until the announcement had time to "
        "spread, then let the daemon stop. Peers see it as 'left', not 'dead'.",
    )
    p.set_defaults(func=cmd_leave)

    keys = add(
        "keys",
        "manage the keys that encrypt gossip",
        "Gossip is sealed with the primary key; every installed key is accepted. "
        "To rotate: generate, install on every node, use on every node, then remove "
        "the old key. KEY may be - to read it from standard input (keeps it out of "
        "the process list).",
        parents=(),
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_sub.add_parser(
        "generate",
        help="print a new random key (no daemon needed)",
        description="Print a new random key as one line.",
    )
    p.set_defaults(func=cmd_keys_generate)
    p = keys_sub.add_parser(
        "list",
        parents=[client],
        help="list installed keys",
        description="List the ids of the installed keys; the primary one seals outgoing gossip.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_keys_list)
    for action, op, text, done in [
        (
            "install",
            "keys.install",
            "add a key to the keyring (accepted for opening)",
            "key installed",
        ),
        (
            "use",
            "keys.use",
            "make an installed key the primary (used for sealing)",
            "key is now primary",
        ),
        ("remove", "keys.remove", "remove a key that is not the primary", "key removed"),
    ]:
        p = keys_sub.add_parser(action, parents=[client], help=text, description=text + ".")
        if action == "install":
            p.add_argument("key", metavar="KEY", help="the key, or - to read it from stdin")
            p.add_argument(
                "--force",
                action="store_true",
                help="install even on a node without keys (it then seals with KEY and "
                "is cut off from peers without keys)",
            )
        else:
            p.add_argument(
                "key",
                metavar="KEY",
                help="the key, its id as `keys list` shows it (or a unique prefix of "
                "it), or - to read it from stdin",
            )
        p.add_argument(
            "--cluster",
            action="store_true",
            help="on every live member, with a report per node; refused, with nothing "
            "changed, if it would cut a member off",
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=_key_command(op, done))
    return parser
