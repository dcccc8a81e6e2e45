"""The per-connection mailbox for messages to names (api_server.Connection.offer)."""

from __future__ import annotations

import trio
import trio.testing

from peerd.api.protocol import FrameDecoder, parse_server_frame
from peerd.shell.api_server import Connection, _write_loop


def conn(queue: int = 4, **limits: int) -> tuple[Connection, trio.MemoryReceiveChannel[bytes]]:
    send, receive = trio.open_memory_channel[bytes](queue)
    return Connection(1, None, send, 1 << 20, 8, **limits), receive


async def test_mailbox_bounds_and_order() -> None:
    c, receive = conn(mailbox_messages=5)
    assert [c.offer(0, "message", {"i": i}) for i in range(6)] == ["ok"] * 5 + ["full"]
    c.mailbox_messages, c.mailbox_bytes = 100, c._mailbox_bytes + 10
    assert c.offer(0, "message", {"i": 99, "pad": "x" * 20}) == "full"  # by bytes
    # The writer drains the mailbox in order, even with its queue full of
    # other frames (responses interleave; messages keep their order).
    for _ in range(3):
        c._outgoing.send_nowait(b"")
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_loop, server, receive, nursery.cancel_scope, c)
        dec = FrameDecoder()
        got: list[int] = []
        with trio.fail_after(5):
            while len(got) < 5:
                dec.feed(await client.receive_some(65536))
                while (f := dec.next_frame()) is not None:
                    got.append(parse_server_frame(f).data["i"])  # type: ignore[union-attr]
        assert got == [0, 1, 2, 3, 4]
        assert c._mailbox_bytes == 0 and not c._mailbox
        nursery.cancel_scope.cancel()


async def test_closed_connection_is_closed_not_full() -> None:
    c, receive = conn()
    await receive.aclose()
    assert c.offer(0, "message", {}) == "closed"
    c2, _ = conn()
    c2._closed = True
    assert c2.offer(0, "message", {}) == "closed"
