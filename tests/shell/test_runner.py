"""The runner with a fake core: timers, ordering, failures, API backend ops."""

from __future__ import annotations

import collections
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from peerd.api.protocol import STREAM_END, ApiError
from peerd.core.events import (
    EventKind,
    IncarnationChanged,
    Input,
    Join,
    JoinDone,
    Leave,
    LeaveDone,
    Log,
    LogLevel,
    MemberEvent,
    MemberInfo,
    OpenStream,
    Output,
    PacketIn,
    SendPacket,
    SetTags,
    SetTimer,
    Start,
    StreamReply,
    TimerFired,
    TimerKind,
    WatchLinks,
)
from peerd.core.timers import MembershipTimer, membership_timer
from peerd.shell.keys import KeyManager
from peerd.shell.logs import Logger
from peerd.shell.runner import Runner
from peerd.shell.serve import EXIT_BUG, EXIT_FAILURE, EXIT_OK, serve
from peerd.shell.state import StateDir
from peerd.wire.messages import Status
from peerd.wire.seal import Keyring, format_key, key_id, load_key_file

ME = MemberInfo(b"\x01" * 16, "me", ("127.0.0.1", 7950), Status.ALIVE, 1, 1, ())
PEER = MemberInfo(b"\x02" * 16, "peer", ("127.0.0.2", 7950), Status.ALIVE, 3, 1, ())
KEY1, KEY2 = bytes(range(32)), bytes(range(1, 33))

Script = Callable[[float, Input], list[Output]]


class FakeCore:
    """Records every (now, input); answers with ``script``; Leave -> LeaveDone."""

    def __init__(self, script: Script | None = None) -> None:
        self.counters: collections.Counter[str] = collections.Counter(packets_in=4)
        self.seen: list[tuple[float, Input]] = []
        self.script = script or (lambda now, inp: [])
        self.me = ME
        self.health_score = 0

    def handle(self, now: float, inp: Input) -> list[Output]:
        self.seen.append((now, inp))
        match inp:
            case Leave():
                return [LeaveDone()]
            case Start():
                return [JoinDone(0, 0), *self.script(now, inp)]
            case SetTags(tags):
                self.me = MemberInfo(
                    ME.node, ME.name, ME.addr, ME.status, ME.incarnation + 1, ME.generation, tags
                )
        return self.script(now, inp)

    def inputs(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, i) for t, i in self.seen if isinstance(i, kind)]

    def members(self) -> list[MemberInfo]:
        return [self.me, PEER]

    def local_member(self) -> MemberInfo:
        return self.me

    def peer_addrs(self) -> list[tuple[str, int]]:
        return [PEER.addr]


class FakePorts:
    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, int], bytes]] = []
        self.opened: list[tuple[int, tuple[str, int], bytes]] = []
        self.replies: list[tuple[int, bytes | None]] = []
        self.links: list[tuple[tuple[str, int], ...]] = []

    def send(self, dst: tuple[str, int], payload: bytes) -> None:
        self.sent.append((dst, payload))

    def open_stream(self, stream: int, dst: tuple[str, int], data: bytes) -> None:
        self.opened.append((stream, dst, data))

    def reply(self, stream: int, data: bytes | None) -> None:
        self.replies.append((stream, data))

    def set_watch_links(self, addrs: tuple[tuple[str, int], ...]) -> None:
        self.links.append(addrs)


def make_runner(core: FakeCore, **kw: Any) -> tuple[Runner, FakePorts, io.StringIO]:
    ports = FakePorts()
    out = io.StringIO()
    runner = Runner(core, packets=ports, streams=ports, logger=Logger(LogLevel.DEBUG, out), **kw)
    return runner, ports, out


def timer(token: int, kind: TimerKind = TimerKind.PROBE) -> MembershipTimer:
    return membership_timer(kind, token)


async def test_timers_fire_in_deadline_order(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()

    def script(now: float, inp: Input) -> list[Output]:
        match inp:
            case Start():
                return [
                    SetTimer(t0 + 5, timer(1)),
                    SetTimer(t0 + 2, timer(2)),
                    SetTimer(t0 + 2, timer(3)),
                    SetTimer(t0 + 9, timer(4)),
                ]
            case TimerFired(fired) if getattr(fired, "token", None) == 2:
                # Armed from inside a firing: one in the past, one between others.
                return [SetTimer(now - 1, timer(5)), SetTimer(t0 + 3, timer(6))]
        return []

    core = FakeCore(script)
    runner, _, _ = make_runner(core)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(20)
        fired = [(round(t - t0, 6), i.timer.token) for t, i in core.inputs(TimerFired)]
        # 5 was armed in the past (t0+1): due at once, before 3 (t0+2); 6 slots in.
        assert fired == [(2, 2), (2, 5), (2, 3), (3, 6), (5, 1), (9, 4)]
        assert runner.timers_pending == 0
        await runner.shutdown("test")
    assert runner.finished


async def test_inputs_and_timers_are_interleaved_by_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    core = FakeCore(
        lambda now, inp: [SetTimer(t0 + 10, timer(1))] if isinstance(inp, Start) else []
    )
    runner, _, _ = make_runner(core)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(4)
        await runner.send_channel.send(PacketIn(("10.0.0.1", 1), b"a"))
        await trio.sleep(10)
        await runner.send_channel.send(PacketIn(("10.0.0.1", 1), b"b"))
        await trio.sleep(1)
        await runner.shutdown("test")
    kinds = [(round(t - t0), type(i).__name__) for t, i in core.seen]
    assert kinds == [
        (0, "Start"),
        (4, "PacketIn"),
        (10, "TimerFired"),
        (14, "PacketIn"),
        (15, "Leave"),
    ]


async def test_outputs_are_carried_out(tmp_path: Path) -> None:
    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, PacketIn):
            return [
                SendPacket(("10.0.0.2", 1), b"p"),
                OpenStream(4, ("10.0.0.3", 1), b"s"),
                StreamReply(9, None),
                WatchLinks((("10.0.0.4", 1),)),
                IncarnationChanged(42),
                Log(LogLevel.WARNING, "core says hi"),
            ]
        return []

    with StateDir(tmp_path) as state:
        core = FakeCore(script)
        runner, ports, out = make_runner(core, state=state)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            await runner.send_channel.send(PacketIn(("10.0.0.1", 1), b"x"))
            await runner.shutdown("test")
        assert ports.sent == [(("10.0.0.2", 1), b"p")]
        assert ports.opened == [(4, ("10.0.0.3", 1), b"s")]
        assert ports.replies == [(9, None)]
        assert ports.links == [(("10.0.0.4", 1),)]
        assert state.incarnation() == 42
        assert "warn  core says hi" in out.getvalue()


async def test_core_exception_on_start_exits_non_zero_with_one_traceback() -> None:
    # Any other input is contained (tests/shell/test_guard.py); a core that
    # cannot even start has nothing to serve.
    def script(now: float, inp: Input) -> list[Output]:
        raise KeyError("bug in the core")

    class BrokenStart(FakeCore):
        def handle(self, now: float, inp: Input) -> list[Output]:
            self.seen.append((now, inp))
            return script(now, inp)

    core = BrokenStart()
    runner, ports, out = make_runner(core)

    async def never_started(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    with trio.fail_after(10):
        code = await serve(runner, [never_started])
    assert code == EXIT_BUG
    assert out.getvalue().count("Traceback") == 1
    assert "core failed to start" in out.getvalue()
    assert [type(i).__name__ for _, i in core.seen] == ["Start"]


async def test_service_failing_at_start_exits_1() -> None:
    runner, _, out = make_runner(FakeCore())

    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise OSError("API socket /x is in use")

    assert await serve(runner, [broken]) == EXIT_FAILURE
    assert "start-up failed error=" in out.getvalue()
    assert "Traceback" not in out.getvalue()


async def test_service_crashing_later_exits_70() -> None:
    runner, _, out = make_runner(FakeCore())

    async def crashes(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep(0)
        raise RuntimeError("bug in a receiver")

    assert await serve(runner, [crashes]) == EXIT_BUG
    assert out.getvalue().count("Traceback") == 1


async def test_graceful_shutdown_saves_peers(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        core = FakeCore()
        runner, _, out = make_runner(core, state=state)

        async def stopper(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            await runner.shutdown("SIGTERM")

        assert await serve(runner, [stopper]) == EXIT_OK
        assert state.peers() == [PEER.addr]
        assert "shutting down reason=SIGTERM" in out.getvalue()


async def test_leave_without_leave_done_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    class Deaf(FakeCore):
        def handle(self, now: float, inp: Input) -> list[Output]:
            self.seen.append((now, inp))
            return []

    core = Deaf()
    runner, _, out = make_runner(core, leave_timeout_s=3)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await runner.shutdown("test")
    assert trio.current_time() - t0 == pytest.approx(3)
    assert runner.exit_reason == "leave timed out"
    assert "leave not confirmed in time" in out.getvalue()


# --- API backend ---------------------------------------------------------------------


async def run_with(runner: Runner, fn: Callable[[], Any]) -> Any:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        try:
            return await fn()
        finally:
            nursery.cancel_scope.cancel()


async def test_status_members_and_counters() -> None:
    runner, _, _ = make_runner(FakeCore())
    runner.counters["udp_drop_seal_auth_failed"] = 2

    async def go() -> tuple[Any, Any]:
        return (await runner.call(None, "status", {}), await runner.call(None, "members", {}))

    status, members = await run_with(runner, go)
    assert status["name"] == "me"
    assert status["members"] == {"alive": 2, "suspect": 0, "dead": 0, "left": 0}
    assert status["counters"] == {"packets_in": 4, "udp_drop_seal_auth_failed": 2}
    assert [m["name"] for m in members] == ["me", "peer"]


async def test_unknown_op_and_bad_args() -> None:
    runner, _, _ = make_runner(FakeCore())

    async def go() -> None:
        with pytest.raises(ApiError) as info:
            await runner.call(None, "frobnicate", {})
        assert info.value.code == "unknown_op"
        with pytest.raises(ApiError) as info:
            await runner.call(None, "set-tags", {"tags": "x"})
        assert info.value.code == "bad_args"
        with pytest.raises(ApiError) as info:
            await runner.call(None, "join", {"addrs": ["host.example:1"]})
        assert info.value.code == "bad_args"

    await run_with(runner, go)


async def test_set_tags_goes_through_the_core() -> None:
    core = FakeCore()
    runner, _, _ = make_runner(core)

    async def go() -> Any:
        return await runner.call(None, "set-tags", {"tags": {"role": "web", "x": None}})

    assert await run_with(runner, go) == {"role": "web"}
    assert core.inputs(SetTags)[0][1] == SetTags((("role", "web"),))


async def test_set_tags_respects_configured_limits() -> None:
    from peerd.core.config import SwimConfig

    runner, _, _ = make_runner(FakeCore(), config=SwimConfig(max_tags=1))

    async def go() -> None:
        with pytest.raises(ApiError, match="max_tags"):
            await runner.call(None, "set-tags", {"tags": {"a": "1", "b": "2"}})

    await run_with(runner, go)


async def test_joins_are_paired_with_their_join_done() -> None:
    """JoinDone has no id: the runner keeps one join in flight so answers cannot cross."""
    pending: list[Join] = []

    def script(now: float, inp: Input) -> list[Output]:
        match inp:
            case Join():
                pending.append(inp)
            case PacketIn(data=b"finish"):
                # Finish the most recent join: ok = how many addresses it had.
                return [JoinDone(len(pending[-1].addrs), 0)]
        return []

    runner, _, _ = make_runner(FakeCore(script))
    results: dict[str, Any] = {}

    async def join(name: str, addrs: list[str]) -> None:
        results[name] = await runner.call(None, "join", {"addrs": addrs})

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, "one", ["10.0.0.1"])
            nursery.start_soon(join, "two", ["10.0.0.2:1", "10.0.0.3:1"])
            await trio.testing.wait_all_tasks_blocked()
            assert len(pending) == 1  # the second waits for the first
            await runner.send_channel.send(PacketIn(("10.0.0.9", 1), b"finish"))
            await trio.testing.wait_all_tasks_blocked()
            assert len(pending) == 2
            await runner.send_channel.send(PacketIn(("10.0.0.9", 1), b"finish"))

    await run_with(runner, go)
    assert results == {"one": {"ok": 1, "failed": 0}, "two": {"ok": 2, "failed": 0}}
    assert ("10.0.0.1", 7950) in [a for j in pending for a in j.addrs]  # default port


async def test_join_times_out(autojump_clock: trio.testing.MockClock) -> None:
    runner, _, _ = make_runner(FakeCore(), join_timeout_s=5)

    async def go() -> None:
        with pytest.raises(ApiError) as info:
            await runner.call(None, "join", {"addrs": ["10.0.0.1:1"]})
        assert info.value.code == "unavailable"

    await run_with(runner, go)


async def test_api_leave_answers_after_leave_done_then_exits() -> None:
    core = FakeCore()
    runner, _, _ = make_runner(core)
    answers = []

    async def leaver(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        answers.append(await runner.call(None, "leave", {}))

    assert await serve(runner, [leaver]) == EXIT_OK
    assert answers == [{}]
    assert runner.exit_reason == "left"


async def test_watch_fans_out_and_drops_slow_watchers() -> None:
    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, PacketIn):
            return [MemberEvent(EventKind.SUSPECT, PEER)]
        return []

    runner, _, out = make_runner(FakeCore(script), watcher_buffer=4)
    fast = runner.watch("conn1", ["members"])
    slow = runner.watch("conn2", ["members"])
    with pytest.raises(ApiError) as info:
        runner.watch("conn3", ["messages"])  # not a topic (registry is one now)
    assert info.value.code == "bad_args"

    async def go() -> None:
        for i in range(6):
            await runner.send_channel.send(PacketIn(("10.0.0.9", 1), b"%d" % i))
            if i < 5:
                with trio.fail_after(1):
                    name, data = await fast.receive()
                assert name == "suspect" and data["name"] == "peer"
        await runner.call(None, "status", {})  # a barrier: every packet was handled

    await run_with(runner, go)
    items = [slow.receive_nowait() for _ in range(4)]
    assert [name for name, _ in items] == ["suspect"] * 3 + [STREAM_END]
    assert items[-1][1]["code"] == "unavailable"
    with pytest.raises(trio.EndOfChannel):
        slow.receive_nowait()
    assert runner.counters["watch_dropped"] == 1
    assert "API watcher dropped" in out.getvalue()


async def test_connection_closed_forgets_its_watches() -> None:
    runner, _, _ = make_runner(FakeCore())
    channel = runner.watch("conn", ["members"])
    runner.connection_closed("conn")
    with pytest.raises(trio.EndOfChannel):
        channel.receive_nowait()


async def test_keys_ops_persist_to_the_state_dir(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        keyring = Keyring([KEY1])
        keys = KeyManager(keyring, [KEY1], state, Logger(LogLevel.ERROR, io.StringIO()))
        runner, _, _ = make_runner(FakeCore(), keys=keys, state=state)

        async def go() -> None:
            assert await runner.call(None, "keys.list", {}) == [
                {"id": key_id(KEY1).hex(), "primary": True, "installed": True}
            ]
            await runner.call(None, "keys.install", {"key": format_key(KEY2)})
            await runner.call(None, "keys.use", {"key": format_key(KEY2)})
            for args, code in [
                ({"key": "junk"}, "bad_args"),
                ({"key": format_key(bytes(32))}, "not_found"),
            ]:
                with pytest.raises(ApiError) as info:
                    await runner.call(None, "keys.remove", args)
                assert info.value.code == code
            with pytest.raises(ApiError) as info:
                await runner.call(None, "keys.remove", {"key": format_key(KEY2)})
            assert info.value.code == "conflict"  # the primary
            await runner.call(None, "keys.remove", {"key": format_key(KEY1)})

        await run_with(runner, go)
        assert keyring.list() == [(key_id(KEY2).hex(), True)]
        text = state.keyring_text()
        assert text is not None
        assert load_key_file(text) == [KEY2]


async def test_timer_flood_does_not_starve_inputs(autojump_clock: trio.testing.MockClock) -> None:
    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, Start | TimerFired):
            return [SetTimer(now, timer(1))]  # a buggy core: always due again
        return []

    core = FakeCore(script)
    runner, _, _ = make_runner(core, max_timers_per_turn=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await runner.send_channel.send(PacketIn(("10.0.0.1", 1), b"still heard"))
        with trio.fail_after(1):
            while not core.inputs(PacketIn):
                await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert runner.counters["timers_deferred"] > 0


async def test_pending_join_is_answered_when_the_node_leaves() -> None:
    runner, _, _ = make_runner(FakeCore())

    async def go() -> None:
        async with trio.open_nursery() as nursery:

            async def join() -> None:
                with pytest.raises(ApiError) as info:
                    await runner.call(None, "join", {"addrs": ["10.0.0.1:1"]})
                assert info.value.code == "unavailable"

            nursery.start_soon(join)
            await trio.testing.wait_all_tasks_blocked()
            await runner.shutdown("test")

    await run_with(runner, go)


async def test_failure_carrying_out_an_output_exits_70() -> None:
    core = FakeCore(
        lambda now, inp: [SendPacket(("10.0.0.1", 1), b"x")] if isinstance(inp, Start) else []
    )
    runner, ports, out = make_runner(core)

    def broken_send(dst: tuple[str, int], payload: bytes) -> None:
        raise OverflowError("message counter exhausted")

    ports.send = broken_send  # type: ignore[method-assign]
    assert await serve(runner) == EXIT_BUG
    assert out.getvalue().count("Traceback") == 1


async def test_core_log_floods_are_summarised() -> None:
    core = FakeCore(
        lambda now, inp: (
            [Log(LogLevel.DEBUG, "drop reason=bad_packet from=x")]
            if isinstance(inp, PacketIn)
            else []
        )
    )
    runner, _, out = make_runner(core)

    async def go() -> None:
        for _ in range(100):
            await runner.send_channel.send(PacketIn(("10.0.0.1", 1), b"x"))
        await runner.call(None, "status", {})

    await run_with(runner, go)
    assert out.getvalue().count("drop reason=bad_packet") == 20


async def test_peers_are_saved_periodically(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with StateDir(tmp_path) as state:
        runner, _, _ = make_runner(FakeCore(), state=state)

        async def stop_later(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            await trio.sleep(61)
            assert state.peers() == [PEER.addr]  # saved by the timer, not at exit
            await runner.shutdown("test")

        assert await serve(runner, [stop_later], peers_save_interval_s=60) == EXIT_OK
