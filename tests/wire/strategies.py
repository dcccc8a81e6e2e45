"""Hypothesis strategies for wire messages, kept within the codec's limits."""

from __future__ import annotations

from hypothesis import strategies as st

from peerd.wire import codec
from peerd.wire.messages import (
    NODE_ID_BYTES,
    Ack,
    Addr,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
    Tags,
    tags_from_mapping,
)

u64 = st.integers(min_value=0, max_value=codec.MAX_U64)
node_ids = st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES)


def _utf8_at_most(n: int) -> st.SearchStrategy[str]:
    return st.text(max_size=n).filter(lambda s: len(s.encode("utf-8")) <= n)


names = st.one_of(_utf8_at_most(codec.MAX_NAME_BYTES),
                  st.text(alphabet="abc-", min_size=250, max_size=codec.MAX_NAME_BYTES))
addrs: st.SearchStrategy[Addr] = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(min_value=0, max_value=65535),
)
tags: st.SearchStrategy[Tags] = st.dictionaries(
    _utf8_at_most(codec.MAX_TAG_KEY_BYTES),
    st.text(max_size=40),
    max_size=6,
).map(tags_from_mapping)
statuses = st.sampled_from(Status)
members = st.builds(MemberState, node_ids, names, addrs, u64, u64, tags, statuses)

pings = st.builds(Ping, u64, node_ids)
ping_reqs = st.builds(PingReq, u64, node_ids, addrs, st.booleans())
acks = st.builds(Ack, u64)
nacks = st.builds(Nack, u64)
alives = st.builds(Alive, node_ids, names, addrs, u64, u64, tags)
suspects = st.builds(Suspect, node_ids, u64, node_ids)
deads = st.builds(Dead, node_ids, u64, node_ids)
lefts = st.builds(Left, node_ids, u64)
push_pulls = st.builds(PushPull, st.booleans(), st.lists(members, max_size=4).map(tuple))

BY_TYPE: dict[int, st.SearchStrategy[Message]] = {
    Ping.TYPE: pings,
    PingReq.TYPE: ping_reqs,
    Ack.TYPE: acks,
    Nack.TYPE: nacks,
    Alive.TYPE: alives,
    Suspect.TYPE: suspects,
    Dead.TYPE: deads,
    Left.TYPE: lefts,
    PushPull.TYPE: push_pulls,
}
messages: st.SearchStrategy[Message] = st.one_of(*BY_TYPE.values())
