"""The registry's own anti-entropy: periodic rounds with one random peer,
bucket hashes for large registries, and the extra round after a heal."""

from __future__ import annotations

import pytest

from peerd.core.registry import service as svc
from peerd.wire import codec
from peerd.wire.codec import DecodeError
from peerd.wire.messages import RegDigestRow, RegSync
from tests.registry.test_service import cluster, holders, reg


def test_reg_sync_bucket_fields_round_trip_and_old_form_is_unchanged() -> None:
    whole = RegSync((RegDigestRow(b"\x01" * 16, 1, 5),), ())
    assert codec.decode(codec.encode(whole)) == whole
    assert len(codec.to_cbor_obj(whole)) == 3  # no new fields on the wire
    hashed = RegSync((), (), 2, (), bytes(range(16)))
    assert codec.decode(codec.encode(hashed)) == hashed
    part = RegSync((RegDigestRow(b"\x02" * 16, 1, 7),), (), 3, (0, 5), b"")
    assert codec.decode(codec.encode(part)) == part


@pytest.mark.parametrize(
    "fields, reason",
    [
        ([13, [], b""], "bits"),  # above the finest split
        ([2, [], b"\x00" * 15], "hashes"),  # not 4 bytes per bucket
        ([2, [3, 1], b""], "buckets"),  # not ascending
        ([2, [1, 1], b""], "buckets"),  # repeated
        ([2, [4], b""], "buckets"),  # beyond 2**bits
        ([2, [0], "text"], "hashes"),
    ],
)
def test_malformed_bucket_fields_are_decode_errors(fields: list, reason: str) -> None:
    import cbor2

    raw = cbor2.dumps([RegSync.TYPE, [], [], *fields])
    with pytest.raises(DecodeError):
        codec.decode(raw)


def test_a_node_that_missed_a_delta_catches_up_in_a_round_not_at_push_pull() -> None:
    c, _rec = cluster(10, seed=2)
    c.cut = {9}  # isolated for a moment: not long enough to be suspected dead
    reg(c, 3, "svc")
    c.run_until(c.now + 0.3)
    c.cut = set()
    c.run_until(c.now + 0.2)
    assert holders(c, "svc")[9] is None  # the epidemic is over: it missed it
    # Push-pull is 30 s or more apart; the registry round is every
    # SYNC_INTERVAL_S, and node 9 is in reach of everyone's rounds.
    t0 = c.now
    while holders(c, "svc")[9] is None and c.now < t0 + 2 * svc.SYNC_INTERVAL_S:
        c.run_until(c.now + 0.5)
    assert holders(c, "svc")[9] is not None
    assert c.now - t0 <= svc.SYNC_INTERVAL_S + 1.0


def test_large_registries_compare_bucket_hashes_and_equal_ones_send_no_rows() -> None:
    c, _rec = cluster(svc.FULL_DIGEST_MAX + 4, seed=3)
    for i in range(c.n):
        reg(c, i, f"n{i}", conn=1)
    c.run_until(c.now + 3)
    a, b = c.nodes[0].registry, c.nodes[1].registry
    assert a.state.digest() == b.state.digest()
    req = a.sync_request()
    assert req.digest == () and req.bits == svc.sync_bits(a.state.origins())
    assert len(req.hashes) == 4 << req.bits
    reply = b.on_sync_request(c.nodes[0].node_id, req)
    assert reply.digest == () and reply.items == () and reply.buckets == ()
    # A difference shows up as the rows of just the buckets that differ.
    reg(c, 5, "late", conn=2)
    c.run_until(c.now + 0.001)  # node 5 has it, node 1 not yet
    req = c.nodes[5].registry.sync_request()
    reply = b.on_sync_request(c.nodes[5].node_id, req)
    assert c.nodes[5].node_id in {r.origin for r in reply.digest}
    assert len(reply.buckets) == 1


def test_bucket_hashes_and_bucket_rows_match_the_digest_after_churn_and_deaths() -> None:
    from peerd.core.digest import FINE_BITS, Digest
    from peerd.core.registry.state import Partition, part_key

    c, _rec = cluster(12, seed=5)
    for i in range(c.n):
        reg(c, i, f"a{i}", conn=1)
        reg(c, i, f"b{i}", conn=2)
    c.run_until(c.now + 2)
    c.crash(4)
    from peerd.core.events import ConnClosed

    c.feed(7, ConnClosed(2))
    c.run_until(c.now + 20)
    for i in range(c.n):
        if i in c.down:
            continue
        st = c.nodes[i].registry.state
        fresh = Digest()
        for origin, (gen, version) in st.digest().items():
            fresh.toggle(origin, part_key(Partition(gen, version)), 0)
        assert fresh.fine == st.bucket_hashes().fine
        for bits in (0, 1, 3, FINE_BITS):
            assert st.digest_in(bits, range(1 << bits)) == st.digest()
        assert c.nodes[4].node_id not in st.digest()


def _spy_pulls(c: object, i: int) -> list[tuple[bytes, list[bytes] | None]]:
    """Record node i's registry pulls: (target, origins asked)."""
    r = c.nodes[i].registry  # type: ignore[attr-defined]
    seen: list[tuple[bytes, list[bytes] | None]] = []
    asked: list[list[bytes] | None] = []
    orig_req = r.sync_request

    def req(origins: list[bytes] | None = None) -> RegSync:
        asked.append(origins)
        return orig_req(origins)

    def pull(node: bytes, msg: RegSync) -> None:
        seen.append((node, asked[-1] if asked else None))

    r.sync_request = req
    r._pull = pull
    return seen


def test_a_reply_naming_several_newer_origins_pulls_them_in_one_request() -> None:
    c, _rec = cluster(6, seed=4)
    a = c.nodes[0].registry
    pulls = _spy_pulls(c, 0)
    src = c.nodes[1].node_id
    origins = [c.nodes[k].node_id for k in (2, 3, 4)]
    rows = tuple(
        RegDigestRow(o, c.nodes[k].local_member().generation, 5)
        for o, k in zip(origins, (2, 3, 4), strict=True)
    )
    a.on_sync_reply(src, RegSync(rows, (), 0, (0,)))
    assert pulls == [(src, sorted(origins))]


def test_a_rounds_reply_does_not_let_a_second_pull_start_while_one_is_out() -> None:
    c, _rec = cluster(6, seed=4)
    a = c.nodes[0].registry
    pulls = _spy_pulls(c, 0)
    src = c.nodes[1].node_id
    o2, o3 = c.nodes[2].node_id, c.nodes[3].node_id
    gen = c.nodes[2].local_member().generation
    a.on_sync_reply(src, RegSync((RegDigestRow(o2, gen, 5),), (), 0, (0,)))
    assert pulls == [(src, [o2])]
    # A periodic round's reply from another peer names o3 as newer: wanted,
    # but the pull to src is still out, so no second pull starts.
    other = c.nodes[4].node_id
    gen3 = c.nodes[3].local_member().generation
    a.on_sync_reply(other, RegSync((RegDigestRow(o3, gen3, 5),), (), 0, (0,)))
    assert pulls == [(src, [o2])]
    # src's answer ends that pull, and the next starts: o2 is still behind
    # (src sent nothing), so src is asked again, and then o3 from the other.
    a.on_sync_reply(src, RegSync((), (), 0, (0,)))
    assert pulls[1] == (src, [o2])
    a.on_sync_reply(
        src, RegSync((RegDigestRow(o2, c.nodes[2].local_member().generation, 5),), (), -1, ())
    )
    assert len(pulls) == 3


def test_a_pull_to_a_peer_that_is_gone_does_not_block_the_next() -> None:
    c, _rec = cluster(6, seed=4)
    a = c.nodes[0].registry
    pulls = _spy_pulls(c, 0)
    src = c.nodes[1].node_id
    o2 = c.nodes[2].node_id
    a.on_sync_reply(
        src, RegSync((RegDigestRow(o2, c.nodes[2].local_member().generation, 5),), (), 0, (0,))
    )
    assert pulls == [(src, [o2])]
    # src's stream fails: the pull is over and o2 is asked again
    a.sync_failed(src)
    assert len(pulls) == 2
    # a failure with another peer does not end the pull in flight
    a.sync_failed(c.nodes[4].node_id)
    assert len(pulls) == 2
