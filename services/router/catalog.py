"""What the router knows about models: names, layer counts, context lengths and tokenizers.

The facts come from the model store (``STORE_LIST``, ``STORE_GET``, ``STORE_HF_FILES``) and the
scaler's deployments (``SCALER_LIST``); each call sits behind one small method so that a change
in those services' replies touches one place. Every request has a timeout, and a store that
does not answer is a :class:`~shared.errors.Unavailable` (503), never a hang.

Caching
    The model list is served from a cache and refreshed in the background once it is older than
    ``ttl_s`` (stale-while-revalidate), because the HTTP app looks the model up on every request
    and a store round trip there would be pure router overhead. Only the very first call (no
    cache yet) waits for the store, and a name missing from a list older than
    ``MISS_RECHECK_S`` (a model deployed a moment ago) waits for one refresh before its 404.
    A store that stops answering leaves the last good list in place. Manifests are fetched
    once per model name; tokenizers are built once per model.

Which models are servable
    Models the store holds that are deployed (a deployment names the model). When no scaler
    answers (a development cluster, tests), every model in the store is servable.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shared import subjects
from shared.bus import Bus
from shared.errors import (
    CheckpointError,
    ModelNotFound,
    NoResponders,
    RequestTimeout,
    Unavailable,
)
from shared.model.config import ModelConfig

log = structlog.get_logger("router.catalog")

# the files a Hugging Face tokenizer may need; anything else the store sends is ignored
TOKENIZER_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json",
)


MISS_RECHECK_S = 0.1  # a name missing from a list older than this triggers one refresh


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    num_layers: int
    max_context: int
    eos_token_ids: tuple[int, ...] = ()
    created: int = 0


class ModelCatalog:
    def __init__(
        self,
        bus: Bus,
        *,
        timeout_s: float = 5.0,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._timeout = timeout_s
        self._ttl = ttl_s
        self._clock = clock
        self._entries: dict[str, CatalogEntry] | None = None
        self._fetched_at = 0.0
        self._manifests: dict[str, CatalogEntry] = {}
        self._refresh: asyncio.Task[dict[str, CatalogEntry]] | None = None
        self._tokenizers: dict[str, asyncio.Task[Any]] = {}

    # --- public --------------------------------------------------------------------------

    async def models(self) -> Mapping[str, CatalogEntry]:
        """Servable models (see the module docstring for caching)."""
        if self._entries is None:
            return await self._refreshed()
        if self._clock() - self._fetched_at > self._ttl and self._refresh is None:
            self._start_refresh()
        return self._entries

    async def entry(self, name: str) -> CatalogEntry:
        entry = (await self.models()).get(name)
        if entry is None and self._clock() - self._fetched_at > MISS_RECHECK_S:
            # A model deployed since the list was fetched is not in the cached list yet: one
            # fresh look before a 404 (shared by concurrent misses, and at most once per
            # MISS_RECHECK_S, so requests for unknown names cannot flood the store).
            try:
                entry = (await self._refreshed()).get(name)
            except Unavailable:
                entry = None
        if entry is None:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        return entry

    async def tokenizer(self, name: str) -> Any:
        """The model's tokenizer, built once from the store's files (ModelNotFound)."""
        await self.entry(name)
        task = self._tokenizers.get(name)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(self._load_tokenizer(name))
            self._tokenizers[name] = task
        # shield: one caller giving up must not cancel the load others wait for
        return await asyncio.shield(task)

    def close(self) -> None:
        for task in (self._refresh, *self._tokenizers.values()):
            if task is not None and not task.done():
                task.cancel()

    # --- refresh -------------------------------------------------------------------------

    def _start_refresh(self) -> asyncio.Task[dict[str, CatalogEntry]]:
        task = asyncio.ensure_future(self._fetch())
        self._refresh = task

        def done(t: asyncio.Task[dict[str, CatalogEntry]]) -> None:
            self._refresh = None
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.warning("model list refresh failed; keeping the last one", error=str(exc))
                self._fetched_at = self._clock()  # retry after another ttl, not at once

        task.add_done_callback(done)
        return task

    async def _refreshed(self) -> dict[str, CatalogEntry]:
        task = self._refresh or self._start_refresh()
        return await asyncio.shield(task)

    async def _fetch(self) -> dict[str, CatalogEntry]:
        names = await self._store_model_names()
        deployed = await self._deployed_models()
        if deployed is not None:
            names = [n for n in names if n in deployed]
        entries: dict[str, CatalogEntry] = {}
        for name in names:
            entry = self._manifests.get(name)
            if entry is None:
                try:
                    entry = await self._manifest_entry(name)
                except (ModelNotFound, CheckpointError) as exc:
                    log.warning("skipping a model the store cannot describe", model=name,
                                error=str(exc))
                    continue
                self._manifests[name] = entry
            entries[name] = entry
        for gone in set(self._manifests) - set(names):
            del self._manifests[gone]
            self._tokenizers.pop(gone, None)
        self._entries = entries
        self._fetched_at = self._clock()
        for name in entries:
            if name not in self._tokenizers:
                self._prefetch_tokenizer(name)
        return entries

    def _prefetch_tokenizer(self, name: str) -> None:
        """Build a servable model's tokenizer now, not on its first request: building one
        imports transformers (seconds on a busy CPU), which a cold start must not add to the
        first requests' latency. A failure is logged; :meth:`tokenizer` tries again."""
        task = asyncio.ensure_future(self._load_tokenizer(name))
        self._tokenizers[name] = task

        def done(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.warning("tokenizer prefetch failed", model=name, error=str(t.exception()))

        task.add_done_callback(done)

    # --- the calls -----------------------------------------------------------------------

    async def _ask(self, subject: str, payload: Any, what: str) -> Any:
        try:
            return await self._bus.request(subject, payload, timeout=self._timeout)
        except NoResponders as exc:
            raise Unavailable(f"{what}: no service answers {subject}") from exc
        except RequestTimeout as exc:
            raise Unavailable(f"{what}: no reply within {self._timeout:g} s") from exc

    async def _store_model_names(self) -> list[str]:
        reply = await self._ask(subjects.STORE_LIST, {}, "the model store cannot list models")
        items = reply.get("models", []) if isinstance(reply, dict) else reply
        if not isinstance(items, list):
            raise Unavailable(f"the model store's list is not a list: {type(items).__name__}")
        names: list[str] = []
        for item in items:
            name = item.get("name") if isinstance(item, dict) else item
            if isinstance(name, str) and name:
                names.append(name)
        return names

    async def _deployed_models(self) -> set[str] | None:
        """Models named by deployments; None when no scaler answers."""
        try:
            reply = await self._bus.request(subjects.SCALER_LIST, {}, timeout=self._timeout)
        except (NoResponders, RequestTimeout):
            return None
        items = reply.get("deployments", []) if isinstance(reply, dict) else reply
        if not isinstance(items, list):
            return None
        models: set[str] = set()
        for item in items:
            # DeploymentStatus rows carry the DeploymentSpec under "spec"
            spec = item.get("spec", item) if isinstance(item, dict) else None
            if isinstance(spec, dict) and isinstance(spec.get("model"), str):
                models.add(spec["model"])
        return models

    async def _manifest_entry(self, name: str) -> CatalogEntry:
        reply = await self._ask(subjects.STORE_GET, {"name": name},
                                f"the model store cannot describe {name!r}")
        manifest = reply.get("manifest", reply) if isinstance(reply, dict) else None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise CheckpointError(f"the manifest of {name!r} has no model config")
        try:
            config = ModelConfig.from_dict(dict(manifest["config"]))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the manifest of {name!r} has a bad config: {exc}") from exc
        created = manifest.get("created", 0)
        return CatalogEntry(
            name=name,
            num_layers=config.num_layers,
            max_context=config.max_position_embeddings,
            eos_token_ids=tuple(config.eos_token_ids),
            created=int(created) if isinstance(created, int | float) else 0,
        )

    async def _load_tokenizer(self, name: str) -> Any:
        reply = await self._ask(subjects.STORE_HF_FILES, {"name": name},
                                f"the model store cannot send the tokenizer of {name!r}")
        files = reply.get("files") if isinstance(reply, dict) else None
        if not isinstance(files, dict) or "tokenizer.json" not in files:
            raise CheckpointError(f"the model store has no tokenizer.json for {name!r}")
        wanted = {k: v for k, v in files.items() if k in TOKENIZER_FILES}
        for key, data in wanted.items():
            if not isinstance(data, bytes | str):
                raise CheckpointError(f"{name!r}: {key} is not file content")
        return await asyncio.to_thread(_build_tokenizer, name, wanted)


def _build_tokenizer(name: str, files: Mapping[str, bytes | str]) -> Any:
    # with a tokenizer.json, the fast tokenizer class directly: AutoTokenizer gives the same
    # tokenizer but imports torch first (seconds of CPU and hundreds of MB in the router)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory(prefix="lscale-tok-") as tmp:
        for filename, data in files.items():
            path = Path(tmp) / filename
            if isinstance(data, str):
                path.write_text(data, encoding="utf-8")
            else:
                path.write_bytes(data)
        try:
            if "tokenizer.json" in files:
                return PreTrainedTokenizerFast.from_pretrained(tmp)
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:  # transformers raises many unrelated types for bad files
            raise CheckpointError(f"cannot build the tokenizer of {name!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
