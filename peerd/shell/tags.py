"""This node's tags: configured ones, changes made at run time, and the rule
that combines them.

Tags come from two places:

* **configured**: the ``[tags]`` table of the config file, with ``--tag
  K=V`` flags on top (a flag wins over the file for its key). They are
  applied at start and again on reload (SIGHUP);
* **run time**: ``peerd tags set`` / ``delete`` (the API ``set-tags``). A
  change is kept in the state directory (``<state-dir>/tags``) as a
  difference from the configured tags it was made against, so it survives a
  restart.

Precedence: a run-time change of a key stands (over restarts and reloads)
until the configuration changes that same key; then the configuration's new
value (or its removal) wins and the run-time change of that key is dropped
(logged). Keys the configuration does not touch keep their run-time value.
So ``peerd tags set role=db`` lasts until an operator edits ``role`` in the
file (or passes another ``--tag role=...``), and editing ``role`` in the file
always takes effect at the next reload or start.

The state file is JSON (ASCII)::

    {"configured": {"role": "web"}, "runtime": {"dc": "eu", "old": null}}

``configured``: the configured tags when the run-time changes were last
reconciled with them; ``runtime``: the run-time changes (``null``: deleted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class NodeTags:
    """Configured tags and the run-time changes on top of them."""

    configured: dict[str, str] = field(default_factory=dict)
    runtime: dict[str, str | None] = field(default_factory=dict)

    def effective(self) -> dict[str, str]:
        """The tags the node runs with: configured, then the run-time changes."""
        out = dict(self.configured)
        for key, value in self.runtime.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    def reconfigure(self, configured: Mapping[str, str]) -> list[str]:
        """Take a new configuration (start, reload). Run-time changes of keys
        whose configured value changed are dropped (the configuration wins);
        returns those keys, sorted."""
        new = dict(configured)
        dropped = sorted(k for k in self.runtime if self.configured.get(k) != new.get(k))
        for key in dropped:
            del self.runtime[key]
        self.configured = new
        return dropped

    def set_effective(self, tags: Mapping[str, str]) -> None:
        """A run-time change made the tags ``tags``: keep it as the
        difference from the configured tags."""
        runtime: dict[str, str | None] = {
            k: v for k, v in tags.items() if self.configured.get(k) != v
        }
        runtime.update({k: None for k in self.configured if k not in tags})
        self.runtime = runtime

    def copy(self) -> NodeTags:
        return NodeTags(dict(self.configured), dict(self.runtime))
