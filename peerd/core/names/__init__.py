"""Names messaging: messages to registered names and groups, and their replies.

A pure, sans-I/O subsystem. :class:`~peerd.core.names.core.Names` takes
inputs (:mod:`peerd.core.events`) with the time they happen and
returns outputs; it reads the registry replica and membership through a
read-only view (:mod:`peerd.core.names.view`) and keeps its own state: the
calls and sequence numbers in flight with their deadlines, the mailbox
counts, the sender-name hints (:mod:`peerd.core.names.hints`) and the
entries that take no messages. The trio shell (peerd.shell.messaging) and
the simulator carry its outputs out; neither decides anything about a
message. The theory of operation is in :mod:`peerd.core.names.core`.
"""
