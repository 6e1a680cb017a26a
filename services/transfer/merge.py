"""Whether a new multicast request may join one that is already running (pure; no I/O).

Under a burst the scaler scales out in waves a few hundred milliseconds apart, and each wave
asks for its own multicast of the same model. Run side by side, the waves share the store's
one link and every copy slows down by the number of waves. Joined instead, the newcomers are
added to the running multicast, which re-plans its remaining chunks over all receivers: the
first wave's receivers relay what they already hold, so the store sends about one copy.

A join is safe only when the running transfer can serve the newcomers from what it already
uses: same model, same chunking, the λPipe strategy in both (the baselines must stay what
they are for benchmarks), sources that are a subset of the running transfer's sources (a
request naming other holders, e.g. GPU copies, has reasons of its own), receivers that are
not already part of it, and no caller-chosen transfer id (its caller listens on that id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.messages import StartTransfer

JOINABLE_STRATEGY = "lambdapipe"


@dataclass(frozen=True)
class RunningMulticast:
    """What the decision needs to know of one running transfer."""

    transfer_id: str
    model: str
    sources: frozenset[str]
    nodes: frozenset[str]  # its sources and every receiver it has (had)
    strategy: str
    num_blocks: int
    parts: int


def why_not_join(running: RunningMulticast, request: StartTransfer) -> str | None:
    """None when ``request`` may join ``running``; otherwise why not."""
    if request.transfer_id:
        return "the request names its own transfer id"
    if request.model != running.model:
        return "another model"
    if request.strategy != JOINABLE_STRATEGY or running.strategy != JOINABLE_STRATEGY:
        return f"only {JOINABLE_STRATEGY} transfers are joined"
    if (request.num_blocks, request.parts) != (running.num_blocks, running.parts):
        return "different chunking"
    if not request.sources or not set(request.sources) <= running.sources:
        return "sources the running transfer does not use"
    if set(request.receivers) & running.nodes:
        return "a receiver is already part of the running transfer"
    if not request.receivers:
        return "no receivers"
    return None


def transfer_to_join(running: Iterable[RunningMulticast], request: StartTransfer) -> str | None:
    """The id of the running transfer ``request`` should join, or None to start its own.

    Of several candidates the one with the most sources wins (ties: the smallest id), so the
    choice does not depend on dict order.
    """
    fits = [r for r in running if why_not_join(r, request) is None]
    if not fits:
        return None
    return min(fits, key=lambda r: (-len(r.sources), r.transfer_id)).transfer_id
