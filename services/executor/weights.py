"""Bookkeeping of the weights an executor holds. Pure: no sockets, no NATS, no files.

* :class:`BlockReadiness` — which blocks of the assigned model have been verified, and so
  which layers a runner may use (``is_layer_ready`` is what the model runner asks before each
  forward pass).
* :class:`HostCopies` — whole-model copies kept in host memory after a release, bounded by a
  byte budget, least recently used evicted first. A copy is *moved* into a new assignment of
  its model (``take``) and kept again at the next release: the tier holds models that are not
  assigned, so assigned weights are never counted twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import CheckpointError, InvalidParameter
from shared.model.layout import ModelManifest, weights_digest


def parse_manifest(model: str, raw: Any) -> ModelManifest:
    """An AssignModel's manifest map as a :class:`ModelManifest` (typed errors when bad)."""
    if not isinstance(raw, Mapping):
        raise InvalidParameter("manifest must be a map (a ModelManifest.to_dict())")
    try:
        manifest = ModelManifest.from_dict(raw)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidParameter(f"manifest of {model!r} is malformed: {type(exc).__name__}: "
                               f"{exc}") from exc
    if manifest.name != model:
        raise InvalidParameter(f"manifest describes model {manifest.name!r}, not {model!r}")
    if not manifest.blocks:
        raise InvalidParameter(f"manifest of {model!r} has no blocks")
    end = 0
    for block in manifest.blocks:
        if block.offset != end or block.nbytes <= 0:
            raise InvalidParameter(f"manifest of {model!r}: blocks do not tile the buffer "
                                   f"at block {block.index}")
        end = block.end
    if end != manifest.total_bytes:
        raise InvalidParameter(f"manifest of {model!r}: blocks end at {end}, total_bytes is "
                               f"{manifest.total_bytes}")
    return manifest


def same_weights(a: ModelManifest, b: ModelManifest) -> bool:
    """Whether two manifests describe the same bytes (same blocks, same checksums)."""
    return a.total_bytes == b.total_bytes and [
        (x.offset, x.nbytes, x.checksum) for x in a.blocks
    ] == [(y.offset, y.nbytes, y.checksum) for y in b.blocks]


class BlockReadiness:
    """Verified blocks of one model, and the layers they make usable."""

    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        self.blocks: set[int] = set()
        self._layers: frozenset[int] = frozenset()

    def mark(self, block: int) -> bool:
        """Record a verified block; False when it was already known."""
        if block in self.blocks:
            return False
        if not 0 <= block < self.manifest.num_blocks:
            raise InvalidParameter(f"no block {block} in {self.manifest.name!r}")
        self.blocks.add(block)
        entry = self.manifest.blocks[block]
        # replace, never mutate: the compute thread reads this set while we update it
        self._layers = self._layers | frozenset(range(entry.layer_start, entry.layer_end))
        return True

    def mark_all(self) -> list[int]:
        return [b.index for b in self.manifest.blocks if self.mark(b.index)]

    def is_layer_ready(self, layer: int) -> bool:
        return layer in self._layers

    def has_layers(self, start: int, stop: int) -> bool:
        layers = self._layers
        return all(i in layers for i in range(start, stop))

    @property
    def ready_layers(self) -> list[int]:
        return sorted(self._layers)

    @property
    def complete(self) -> bool:
        return len(self.blocks) == self.manifest.num_blocks


@dataclass
class HostCopy:
    """A whole model's verified bytes in host memory (``data``: a buffer of ``nbytes``)."""

    model: str
    manifest: ModelManifest
    data: Any  # a uint8 torch tensor (pinned when CUDA is present) or any buffer
    nbytes: int
    last_used: float


class HostCopies:
    """Whole-model host copies within ``budget_bytes``, least recently used evicted first."""

    def __init__(self, budget_bytes: int, clock: Callable[[], float] = time.time) -> None:
        if budget_bytes < 0:
            raise InvalidParameter("host budget must be >= 0")
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._copies: OrderedDict[str, HostCopy] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(c.nbytes for c in self._copies.values())

    def __contains__(self, model: object) -> bool:
        return model in self._copies

    def names(self) -> list[str]:
        """Models held, least recently used first."""
        return list(self._copies)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.budget_bytes

    def put(self, model: str, manifest: ModelManifest, data: Any, nbytes: int) -> list[str]:
        """Keep a copy (replacing an older one of the model); returns the models evicted.

        A copy larger than the whole budget is refused (InvalidParameter): check :meth:`fits`
        first to avoid making the copy at all.
        """
        if not self.fits(nbytes):
            raise InvalidParameter(f"a {nbytes}-byte copy of {model!r} exceeds the host budget "
                                   f"of {self.budget_bytes} bytes")
        self._copies.pop(model, None)
        evicted: list[str] = []
        while self._copies and self.used_bytes + nbytes > self.budget_bytes:
            name, _ = self._copies.popitem(last=False)
            evicted.append(name)
        self._copies[model] = HostCopy(model, manifest, data, nbytes, self._clock())
        return evicted

    def get(self, model: str) -> HostCopy | None:
        """The copy (marked used), or None."""
        copy = self._copies.get(model)
        if copy is not None:
            copy.last_used = self._clock()
            self._copies.move_to_end(model)
        return copy

    def take(self, model: str) -> HostCopy | None:
        """Remove and return the copy (it moves into an assignment)."""
        return self._copies.pop(model, None)

    def drop(self, models: Iterable[str]) -> list[str]:
        """Forget these copies; returns the ones that were held."""
        return [m for m in models if self._copies.pop(m, None) is not None]

    def describe(self) -> list[dict[str, Any]]:
        """For metrics: ``{"model", "size_bytes", "last_used", "weights"}`` per copy
        (``weights``: :func:`~shared.model.layout.weights_digest` of the copy's manifest)."""
        return [{"model": c.model, "size_bytes": c.nbytes, "last_used": c.last_used,
                 "weights": weights_digest((b.offset, b.nbytes, b.checksum)
                                           for b in c.manifest.blocks)}
                for c in self._copies.values()]
