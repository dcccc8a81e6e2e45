"""A core exception on one input is contained: counted, logged, the runner goes on."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from peerd.api.protocol import ApiError, ErrorCode
from peerd.core.events import (
    Input,
    Output,
    PacketIn,
    SendPacket,
    SetTags,
    SetTimer,
    Start,
    TimerFired,
)
from peerd.shell.guard import input_kind
from peerd.shell.metrics import render
from tests.shell.test_runner import FakeCore, make_runner, run_with, timer

POISON = b"poison"


async def test_poison_packet_is_counted_logged_and_the_runner_goes_on() -> None:
    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, PacketIn):
            if inp.data == POISON:
                raise ValueError("bug in the core")
            return [SendPacket(inp.src, b"ack:" + inp.data)]
        return []

    core = FakeCore(script)
    runner, ports, out = make_runner(core)

    async def go() -> None:
        for data in (b"a", POISON, b"b", POISON, POISON):
            await runner.send_channel.send(PacketIn(("10.0.0.9", 1), data))
        status = await runner.call(None, "status", {})
        assert status["counters"]["core_errors_packet_in"] == 3
        text = render(status)
        assert 'peerd_core_errors_total{kind="packet_in"} 3' in text
        # Still answering after the poison: the API and the core.
        members = await runner.call(None, "members", {})
        assert [m["name"] for m in members] == ["me", "peer"]

    await run_with(runner, go)
    # The good packets around the poison were handled and answered.
    assert ports.sent == [(("10.0.0.9", 1), b"ack:a"), (("10.0.0.9", 1), b"ack:b")]
    log = out.getvalue()
    assert log.count("core raised on one input") == 3
    assert "kind=packet_in src=10.0.0.9:1" in log
    # The traceback once per distinct bug, not per input.
    assert log.count("Traceback") == 1


async def test_a_timer_that_raised_is_fed_again_with_a_back_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    failures = 3

    def script(now: float, inp: Input) -> list[Output]:
        nonlocal failures
        if isinstance(inp, Start):
            return [SetTimer(t0 + 1, timer(1))]
        if isinstance(inp, TimerFired):
            if failures:
                failures -= 1
                raise RuntimeError("transient bug")
            return [SetTimer(now + 100, timer(2))]  # the loop turns again
        return []

    core = FakeCore(script)
    runner, _, out = make_runner(core)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(30)
        fired = [(round(t - t0, 6), i.timer.token) for t, i in core.inputs(TimerFired)]
        # Raised at 1, again 1 s later, then 2 s later; handled at 4 s later still.
        assert fired == [(1, 1), (2, 1), (4, 1), (8, 1)]
        assert runner.counters["core_errors_timer_fired"] == 3
        assert runner.timers_pending == 1  # the re-armed loop, not the failed timer
        await runner.shutdown("test")
    assert "kind=timer_fired timer=ProbeTick" in out.getvalue()


def test_input_kinds_are_metric_labels() -> None:
    assert input_kind(PacketIn(("10.0.0.1", 1), b"")) == "packet_in"
    assert input_kind(TimerFired(timer(1))) == "timer_fired"
    assert input_kind(Start(())) == "start"


async def test_an_api_call_whose_input_raised_fails_at_once_and_the_next_one_works() -> None:
    calls = 0

    def script(now: float, inp: Input) -> list[Output]:
        nonlocal calls
        if isinstance(inp, SetTags):
            calls += 1
            if calls == 1:
                raise KeyError("bug in the core")
        return []

    core = FakeCore(script)
    runner, _, out = make_runner(core)

    async def go() -> None:
        with trio.fail_after(5), pytest.raises(ApiError) as info:
            await runner.call(None, "set-tags", {"tags": {"role": "web"}})
        assert info.value.code == ErrorCode.INTERNAL
        assert "set_tags" in str(info.value)
        assert await runner.call(None, "set-tags", {"tags": {"role": "db"}}) == {"role": "db"}
        status = await runner.call(None, "status", {})
        assert status["counters"]["core_errors_set_tags"] == 1

    await run_with(runner, go)
    assert "kind=set_tags" in out.getvalue()
