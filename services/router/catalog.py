"""What the router knows about models: names, layer counts, context lengths and tokenizers.

Pushed, not polled
    The facts live in two JetStream key-value buckets, and the catalog keeps a live mirror of
    each (:class:`~shared.kv_mirror.KvMirror`, one watcher apiece): the model store's registry
    (``KV_MODELS``: model name -> manifest with its config) and the scaler's deployments
    (``KV_DEPLOYMENTS``: ``deployment.<name>`` -> spec naming the model). Every change arrives
    as it happens; nothing is cached with a lifetime, so a removed-then-re-added name is
    served from its new entry the moment the bucket says so.

    A name missing from the mirrors may have been written a moment ago (``lscale deploy``
    returned, the watcher has not delivered it yet): the catalog then waits until both mirrors
    have applied every write their buckets hold (:meth:`KvMirror.catch_up`, bounded by
    ``fail_fast_s``) and looks again, so a model is served on the first request after the
    deploy that named it returns.

Which models are servable
    Models the store holds that are deployed (a deployment names the model). When the
    deployments bucket is empty and no scaler answers (a development cluster, tests), every
    model in the store is servable. Not servable, and the reason is a 503 with the reason
    (a model the store has but nothing deploys; a deployment whose model the store lacks), or
    a 404 for a name nobody knows.

Tokenizers
    Built once per model entry (a re-added model with new files gets a new one), from the
    store's files (``STORE_HF_FILES``), as soon as a model becomes servable rather than on
    its first request. ``transformers`` is imported once, under a lock, before any worker
    thread builds a tokenizer: its lazy module imports are not safe when several threads
    trigger them at once (seen as ``ImportError: cannot import name 'AutoTokenizer'``).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shared import subjects
from shared.bus import Bus
from shared.errors import (
    BusError,
    CheckpointError,
    LScaleError,
    ModelNotFound,
    NoResponders,
    RequestTimeout,
    Unavailable,
)
from shared.kv import bucket
from shared.kv_mirror import KvMirror
from shared.model.config import ModelConfig

log = structlog.get_logger("router.catalog")

# the files a Hugging Face tokenizer may need; anything else the store sends is ignored
TOKENIZER_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json",
)
DEPLOYMENT_PREFIX = "deployment."


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    num_layers: int
    max_context: int
    eos_token_ids: tuple[int, ...] = ()
    created: int = 0


def entry_from_manifest(name: str, manifest: Any) -> CatalogEntry:
    """A catalog entry from a registry record or a ``STORE_GET`` reply (CheckpointError)."""
    if isinstance(manifest, dict) and isinstance(manifest.get("manifest"), dict):
        manifest = manifest["manifest"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"the manifest of {name!r} has no model config")
    try:
        config = ModelConfig.from_dict(dict(manifest["config"]))
    except (TypeError, ValueError, LScaleError) as exc:
        raise CheckpointError(f"the manifest of {name!r} has a bad config: {exc}") from exc
    created = manifest.get("created", 0)
    return CatalogEntry(
        name=name,
        num_layers=config.num_layers,
        max_context=config.max_position_embeddings,
        eos_token_ids=tuple(config.eos_token_ids),
        created=int(created) if isinstance(created, int | float) else 0,
    )


class ModelCatalog:
    def __init__(
        self,
        bus: Bus,
        *,
        timeout_s: float = 5.0,
        ttl_s: float = 2.0,
        fail_fast_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._timeout = timeout_s
        self._scaler_ttl = ttl_s  # how long "no scaler answers" is trusted
        self._fail_fast = fail_fast_s
        self._clock = clock
        self._models: KvMirror | None = None
        self._deployments: KvMirror | None = None
        self._store: dict[str, CatalogEntry] = {}  # parsed registry entries
        self._tokenizers: dict[str, tuple[CatalogEntry, asyncio.Task[Any]]] = {}
        self._scaler_seen: tuple[float, bool] | None = None  # (when asked, a scaler answered)
        self._start_error = ""
        self._warm: asyncio.Task[Any] | None = None
        self._deployed_cache: tuple[KvMirror, set[str] | None] | None = None
        self._opener: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open both buckets and mirror them; a JetStream that is not there yet is retried in
        the background (requests get a 503 saying so meanwhile)."""
        self._warm = asyncio.ensure_future(asyncio.to_thread(tokenizer_class))
        try:
            await self._open()
        except LScaleError as exc:
            self._start_error = str(exc)
            log.warning("model catalog not available yet; retrying", error=str(exc))
            self._opener = asyncio.ensure_future(self._open_later())

    async def _open(self) -> None:
        models_kv = await bucket(self._bus, subjects.KV_MODELS)
        deployments_kv = await bucket(self._bus, subjects.KV_DEPLOYMENTS)
        models = KvMirror(models_kv, subjects.KV_MODELS, on_change=self._on_model)
        deployments = KvMirror(deployments_kv, subjects.KV_DEPLOYMENTS,
                               on_change=self._on_deployment)
        await models.start()
        await deployments.start()
        self._models, self._deployments = models, deployments
        self._start_error = ""
        for name, value in list(models.values.items()):
            self._on_model(name, value)
        self._prefetch_servable()

    async def _open_later(self) -> None:
        while self._models is None:
            await asyncio.sleep(0.5)
            try:
                await self._open()
            except LScaleError as exc:
                self._start_error = str(exc)

    def resync(self) -> None:
        """After a reconnect: the watchers' consumers may have died with the server."""
        for mirror in (self._models, self._deployments):
            if mirror is not None:
                mirror.resync()

    async def aclose(self) -> None:
        if self._opener is not None:
            self._opener.cancel()
        for mirror in (self._models, self._deployments):
            if mirror is not None:
                await mirror.stop()
        for _, task in self._tokenizers.values():
            if not task.done():
                task.cancel()
        if self._warm is not None and not self._warm.done():
            self._warm.cancel()

    @property
    def synced(self) -> bool:
        return bool(self._models and self._models.synced and self._deployments
                    and self._deployments.synced)

    # --- public ----------------------------------------------------------------------------

    async def models(self) -> Mapping[str, CatalogEntry]:
        """Servable models, from the mirrors (no request on this path but, with no deployment
        at all, one cached look for a scaler)."""
        self._require_mirrors()
        deployed = await self._deployed()
        return {n: e for n, e in self._store.items() if deployed is None or n in deployed}

    async def entry(self, name: str) -> CatalogEntry:
        entry = await self._servable(name)
        if entry is None:
            await self._catch_up()
            entry = await self._servable(name)
        if entry is not None:
            return entry
        raise self._why_not(name, await self._deployed() or set())

    async def _servable(self, name: str) -> CatalogEntry | None:
        """``models().get(name)`` without building the whole list (this is every request's
        path)."""
        self._require_mirrors()
        entry = self._store.get(name)
        if entry is None:
            return None
        deployed = await self._deployed()
        return entry if deployed is None or name in deployed else None

    def unservable(self, name: str) -> LScaleError | None:
        """Why ``name`` cannot be served now, from the mirrors alone (no request); None when
        it can (or when only a scaler look-up could tell). For requests queued for a model
        whose deployment or checkpoint went away meanwhile."""
        if not self.synced:
            return None
        deployed = self._deployed_names()
        if name in self._store and (deployed is None or name in deployed):
            return None
        if deployed is None:
            return None if name in self._store else self._why_not(name, set())
        return self._why_not(name, deployed)

    def _why_not(self, name: str, deployed: set[str]) -> LScaleError:
        if name in self._store:
            return Unavailable(f"the model {name!r} is in the model store but not deployed "
                               f"(`lscale deploy {name}`)")
        if name in deployed:
            return Unavailable(f"the model {name!r} is deployed but the model store does not "
                               f"hold it (`lscale model add {name} DIR`)")
        return ModelNotFound(f"the model {name!r} does not exist", param="model")

    async def tokenizer(self, name: str) -> Any:
        """The model's tokenizer, built once per entry from the store's files."""
        entry = await self.entry(name)
        known = self._tokenizers.get(name)
        if known is not None and known[0] is entry and known[1].done() \
                and not known[1].cancelled() and known[1].exception() is None:
            return known[1].result()  # built: every request but the first few
        if known is None or known[0] != entry or (known[1].done() and (
                known[1].cancelled() or known[1].exception() is not None)):
            known = (entry, asyncio.ensure_future(self._load_tokenizer(name)))
            self._tokenizers[name] = known
        # shield: one caller giving up must not cancel the load others wait for
        return await asyncio.shield(known[1])

    def readiness(self) -> dict[str, str]:
        """Problems that keep the catalog from answering (empty: ready)."""
        if self.synced:
            return {}
        return {"deployments": self._start_error or "the key-value mirrors are not in yet"}

    # --- the mirrors -----------------------------------------------------------------------

    def _require_mirrors(self) -> None:
        if self._models is None or self._deployments is None:
            raise Unavailable(f"the model catalog is not available: {self._start_error or 'starting'}")

    async def _catch_up(self) -> None:
        mirrors = [m for m in (self._models, self._deployments) if m is not None]
        await asyncio.gather(*(m.catch_up(self._fail_fast) for m in mirrors))

    def _deployed_names(self) -> set[str] | None:
        """Models named by deployments; None when there is no deployment at all. Kept until
        the deployments mirror changes (every request asks)."""
        if self._deployments is None:
            return None
        cached = self._deployed_cache
        if cached is not None and cached[0] is self._deployments:
            return cached[1]
        names = self._scan_deployments(self._deployments)
        self._deployed_cache = (self._deployments, names)
        return names

    @staticmethod
    def _scan_deployments(mirror: KvMirror) -> set[str] | None:
        models: set[str] = set()
        for key, spec in mirror.values.items():
            if key.startswith(DEPLOYMENT_PREFIX) and isinstance(spec, dict) \
                    and isinstance(spec.get("model"), str):
                models.add(spec["model"])
        return models or None

    async def _deployed(self) -> set[str] | None:
        """The deployed models; None (everything servable) only when there is no deployment
        and no scaler answers."""
        names = self._deployed_names()
        if names is not None:
            return names
        if not await self._scaler_present():
            return None
        return set()

    async def _scaler_present(self) -> bool:
        now = self._clock()
        if self._scaler_seen is not None and now - self._scaler_seen[0] <= self._scaler_ttl:
            return self._scaler_seen[1]
        try:
            await self._bus.request(subjects.SCALER_LIST, {}, timeout=self._fail_fast)
            present = True
        except (NoResponders, BusError):
            present = False
        except RequestTimeout:
            present = True  # there, but slow: deployments are the rule
        self._scaler_seen = (self._clock(), present)
        return present

    def _on_model(self, name: str, value: Any | None) -> None:
        if value is None:
            self._store.pop(name, None)
            self._drop_tokenizer(name)
            return
        try:
            entry = entry_from_manifest(name, value)
        except CheckpointError as exc:
            log.warning("skipping a model the store cannot describe", model=name, error=str(exc))
            self._store.pop(name, None)
            return
        if self._store.get(name) != entry:
            self._drop_tokenizer(name)
        self._store[name] = entry
        self._prefetch_servable()

    def _on_deployment(self, key: str, value: Any | None) -> None:
        self._scaler_seen = None
        self._deployed_cache = None
        self._prefetch_servable()

    def _drop_tokenizer(self, name: str) -> None:
        known = self._tokenizers.pop(name, None)
        if known is not None and not known[1].done():
            known[1].cancel()

    def _prefetch_servable(self) -> None:
        """Build servable models' tokenizers now, not on their first request."""
        deployed = self._deployed_names()
        for name, entry in self._store.items():
            if deployed is not None and name not in deployed:
                continue
            known = self._tokenizers.get(name)
            if known is not None and known[0] == entry:
                continue
            task = asyncio.ensure_future(self._load_tokenizer(name))
            self._tokenizers[name] = (entry, task)

            def done(t: asyncio.Task[Any], name: str = name) -> None:
                if not t.cancelled() and t.exception() is not None:
                    log.warning("tokenizer prefetch failed", model=name, error=str(t.exception()))

            task.add_done_callback(done)

    # --- the calls -------------------------------------------------------------------------

    async def _ask(self, subject: str, payload: Any, what: str) -> Any:
        try:
            return await self._bus.request(subject, payload, timeout=self._timeout)
        except NoResponders as exc:
            raise Unavailable(f"{what}: no service answers {subject}") from exc
        except RequestTimeout as exc:
            raise Unavailable(f"{what}: no reply within {self._timeout:g} s") from exc

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


_IMPORT_LOCK = threading.Lock()
_CLASSES: dict[str, Any] = {}


def tokenizer_class(name: str = "PreTrainedTokenizerFast") -> Any:
    """A class of ``transformers``, imported once under a lock: transformers resolves its
    names lazily, and threads doing that at once can see a half-initialised module. The fast
    class alone by default: ``AutoTokenizer`` costs seconds more (it imports the auto
    machinery), and a router start must not wait for it."""
    with _IMPORT_LOCK:
        if name not in _CLASSES:
            import transformers

            _CLASSES[name] = getattr(transformers, name)
        return _CLASSES[name]


def _build_tokenizer(name: str, files: Mapping[str, bytes | str]) -> Any:
    # with a tokenizer.json, the fast tokenizer class directly: AutoTokenizer gives the same
    # tokenizer but imports torch first (seconds of CPU and hundreds of MB in the router)
    with tempfile.TemporaryDirectory(prefix="lscale-tok-") as tmp:
        for filename, data in files.items():
            path = Path(tmp) / filename
            if isinstance(data, str):
                path.write_text(data, encoding="utf-8")
            else:
                path.write_bytes(data)
        try:
            if "tokenizer.json" in files:
                return tokenizer_class().from_pretrained(tmp)
            return tokenizer_class("AutoTokenizer").from_pretrained(tmp)
        except Exception as exc:  # transformers raises many unrelated types for bad files
            raise CheckpointError(f"cannot build the tokenizer of {name!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
