"""The mesh's part of the core vocabulary, which lives in :mod:`peerd.core.events`."""

from __future__ import annotations

from peerd.core.events import (
    PRIORITY_CONTROL as PRIORITY_CONTROL,
)
from peerd.core.events import (
    Broadcast as Broadcast,
)
from peerd.core.events import (
    BroadcastResult as BroadcastResult,
)
from peerd.core.events import (
    CloseLink as CloseLink,
)
from peerd.core.events import (
    Connect as Connect,
)
from peerd.core.events import (
    Deliver as Deliver,
)
from peerd.core.events import (  # noqa: F401
    HyParViewMessage as HyParViewMessage,
)
from peerd.core.events import (
    JoinMesh as JoinMesh,
)
from peerd.core.events import (
    LeaveMesh as LeaveMesh,
)
from peerd.core.events import (
    LinkDown as LinkDown,
)
from peerd.core.events import (
    LinkMessage as LinkMessage,
)
from peerd.core.events import (
    Log as Log,
)
from peerd.core.events import (
    MembershipHint as MembershipHint,
)
from peerd.core.events import (
    MeshInput as MeshInput,
)
from peerd.core.events import (
    MeshMessage as MeshMessage,
)
from peerd.core.events import (
    MeshOutput as MeshOutput,
)
from peerd.core.events import (
    MeshTimer as MeshTimer,
)
from peerd.core.events import (
    MeshTimerFired as MeshTimerFired,
)
from peerd.core.events import (
    MeshTimerKind as MeshTimerKind,
)
from peerd.core.events import (
    MessageIn as MessageIn,
)
from peerd.core.events import (
    NeighborDown as NeighborDown,
)
from peerd.core.events import (
    NeighborUp as NeighborUp,
)
from peerd.core.events import (
    PlumtreeMessage as PlumtreeMessage,
)
from peerd.core.events import (
    Send as Send,
)
from peerd.core.events import (
    SetMeshTimer as SetMeshTimer,
)
from peerd.core.events import (
    channel_priority as channel_priority,
)
