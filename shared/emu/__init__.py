"""The emulated cluster: network namespaces joined by shaped veth links (see :mod:`.netns`)."""

from __future__ import annotations

from shared.emu.netns import (
    EmuCluster,
    EmuError,
    EmuNode,
    cleanup_stale,
    netns_unavailable_reason,
)

__all__ = ["EmuCluster", "EmuError", "EmuNode", "cleanup_stale", "netns_unavailable_reason"]
