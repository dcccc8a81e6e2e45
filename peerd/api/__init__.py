"""The local API: how applications and the CLI talk to their peerd.

* :mod:`peerd.api.protocol`: framing and message rules, no I/O (spec:
  ``proto/api.cddl``).
* :mod:`peerd.api.client`: :class:`Client` (trio) and :class:`BlockingClient`.

The clients are imported lazily, so ``import peerd.api`` (and the protocol)
does not pull in trio for code that only needs the sans-I/O part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peerd.api.protocol import (
    DEFAULT_MAX_FRAME,
    ApiError,
    ErrorCode,
    Event,
    FrameDecoder,
    FrameError,
    Op,
    Request,
    Response,
    Topic,
    encode_frame,
    format_addr,
    parse_addr,
)

if TYPE_CHECKING:
    from peerd.api.client import (
        BlockingClient,
        Client,
        ConnectionLost,
        DaemonUnavailable,
        MessagesNotRead,
        default_socket_path,
    )

_CLIENT_NAMES = {
    "BlockingClient",
    "Client",
    "ConnectionLost",
    "DaemonUnavailable",
    "MessagesNotRead",
    "default_socket_path",
}

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ApiError",
    "BlockingClient",
    "Client",
    "ConnectionLost",
    "DaemonUnavailable",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "FrameError",
    "MessagesNotRead",
    "Op",
    "Request",
    "Response",
    "Topic",
    "default_socket_path",
    "encode_frame",
    "format_addr",
    "parse_addr",
]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from peerd.api import client

        return getattr(client, name)
    raise AttributeError(f"module 'peerd.api' has no attribute {name!r}")
