"""The names part of the core vocabulary, which lives in :mod:`peerd.core.events`."""

from __future__ import annotations

from peerd.core.events import (
    ConnClosed as ConnClosed,
)
from peerd.core.events import (
    DeadlineFired as DeadlineFired,
)
from peerd.core.events import (
    DeliverToConn as DeliverToConn,
)
from peerd.core.events import (
    Failure as Failure,
)
from peerd.core.events import (
    LinkLost as LinkLost,
)
from peerd.core.events import (
    LinkSend as LinkSend,
)
from peerd.core.events import (
    LinkSendDone as LinkSendDone,
)
from peerd.core.events import (
    MailboxTaken as MailboxTaken,
)
from peerd.core.events import (
    MarkQuiet as MarkQuiet,
)
from peerd.core.events import (
    NameMsgIn as NameMsgIn,
)
from peerd.core.events import (
    NameReplyIn as NameReplyIn,
)
from peerd.core.events import (
    NamesInput as NamesInput,
)
from peerd.core.events import (
    NamesOutput as NamesOutput,
)
from peerd.core.events import (
    Offered as Offered,
)
from peerd.core.events import (
    OfferOutcome as OfferOutcome,
)
from peerd.core.events import (
    ReplyAddr as ReplyAddr,
)
from peerd.core.events import (
    ReplyToSender as ReplyToSender,
)
from peerd.core.events import (
    SendDeadline as SendDeadline,
)
from peerd.core.events import (  # noqa: F401
    SendError as SendError,
)
from peerd.core.events import (
    SendResult as SendResult,
)
from peerd.core.events import (
    SendToName as SendToName,
)
from peerd.core.events import (
    Why as Why,
)
