"""The model_store service: the model registry, checkpoint ingest, and a data-plane source.

Endpoints (request -> reply; errors are the typed errors of :mod:`shared.errors`; every
request body may be the message or a plain map with its fields; queue group ``model_store``)::

    STORE_LIST      {}                                  -> [ModelSummary, ...] (by name)
    STORE_GET       ModelRef {name}                     -> manifest map + created + in_memory
                                                           | ModelNotFound
    STORE_ADD       AddModel {name, path, blocks, replace, request_id}
                                                        -> ModelSummary
                                                           | CheckpointError (names the
                                                           problem) | InvalidParameter
                                                           | Unavailable (name busy)
    STORE_REMOVE    ModelRef {name}                     -> Ack | ModelNotFound
    STORE_HF_FILES  HfFilesRequest {name, files}        -> HfFiles {name, files: {file: bytes}}
                                                           | PayloadTooLarge | ModelNotFound
    STORE_SOURCE    SendChunks {model, target, chunks, parts}
                                                        -> Ack once every chunk has landed
                                                           | ChecksumMismatch | ModelNotFound
                                                           | TransportError | InvalidParameter

Registry: every model of the store directory (the truth) has an entry in the JetStream KV
bucket ``subjects.KV_MODELS``: key = model name (names may contain '.', which KV keys allow;
:data:`shared.model.store_dir.MODEL_NAME_RE` forbids what would break the key's subject, and
no subject is ever built from a name), value = the manifest map plus ``created``. At start the
service removes leftovers of killed ingests, publishes every model on disk and deletes keys of
models that are gone; add/remove update disk then KV; a periodic re-scan (and every list) picks
up changes made by ``lscale model ... --local`` beside a running store.

Ingest (``STORE_ADD``) runs in a worker thread; progress goes out as ``model.ingest`` events
(``Event.model`` = name, ``data`` = {request_id, state: started|running|done|failed,
bytes_done, bytes_total, blocks_done, blocks_total, error}), one per block written.

Sourcing (``STORE_SOURCE``): blocks come from the host-memory tier, or from disk in large
sequential reads with their checksum verified (read once however many requests want the same
block at the same time); the next block is read while the current one is written into the
target region (``shared.transport.open_writer``). A block whose bytes do not match the
manifest is refused with ChecksumMismatch and never written.

Metrics (``MetricsSnapshot.values``): see the ``METRIC_*`` names below.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js.kv import KeyValue

from services.model_store.registry import (
    RegistryEntry,
    Stamp,
    diff_stamps,
    hf_file_path,
    load_entry,
    registry_record,
    scan_stamps,
    summary,
)
from services.model_store.sender import WriterPool, plan_chunk_writes
from services.model_store.tiers import BlockKey, HostMemoryCache, TieredBlockStore
from shared import subjects
from shared.config import ServiceConfig
from shared.errors import (
    BadRequest,
    ChecksumMismatch,
    ConfigError,
    DecodeError,
    InvalidParameter,
    LScaleError,
    ModelNotFound,
    PayloadTooLarge,
    Unavailable,
)
from shared.kv import bucket, kv_delete, kv_put
from shared.messages import (
    Ack,
    AddModel,
    HfFiles,
    HfFilesRequest,
    ModelRef,
    ModelSummary,
    SendChunks,
    StoreManifest,
)
from shared.metrics_schema import EventKind
from shared.model.checkpoint import open_checkpoint
from shared.model.layout import BlockEntry, ModelManifest, plan_layout
from shared.model.store_dir import ModelStoreDir, check_model_name
from shared.runtime import Service

if TYPE_CHECKING:
    import torch

QUEUE = "model_store"
INGEST_EVENT = EventKind.MODEL_INGEST
REMOVED_EVENT = EventKind.MODEL_REMOVED
CORRUPT_EVENT = EventKind.MODEL_CORRUPT
# room left in a reply for the envelope and the message's own fields
_REPLY_OVERHEAD = 4096

# metrics keys (MetricsSnapshot.values)
METRIC_MODELS = "models"  # models in the store
METRIC_CACHE_BYTES = "host_cache_bytes"  # bytes held by the host-memory tier
METRIC_CACHE_CAPACITY = "host_cache_capacity"  # its capacity, bytes
METRIC_CACHE_HITS = "host_cache_hits"
METRIC_CACHE_MISSES = "host_cache_misses"
METRIC_DISK_BYTES = "disk_bytes_read"  # block bytes read from disk (verified)
METRIC_BYTES_SERVED = "bytes_served"  # bytes written into target regions
METRIC_SOURCES = "sources_in_flight"  # STORE_SOURCE requests being served now
METRIC_INGESTS = "ingests_in_flight"
METRIC_CHECKSUM_FAILURES = "checksum_failures"  # corrupted blocks refused


@dataclass(frozen=True)
class StoreConfig(ServiceConfig):
    """Settings of the model_store service."""

    store_dir: str = field(default="", metadata={"help": "model store directory "
                                                 "(default <state_dir>/models)"})
    host_cache_mb: int = field(default=1024, metadata={
        "help": "capacity of the host-memory tier of verified blocks, MiB (0: no cache)"})
    data_host: str = field(default="127.0.0.1", metadata={
        "help": "this store's data-plane address, advertised in discovery metadata"})
    ingest_blocks: int = field(default=0, metadata={
        "help": "blocks per model when an add does not say (0: min(layers, 8))"})
    write_timeout_s: float = field(default=120.0, metadata={
        "help": "limit for one block write into a target region"})
    writer_idle_s: float = field(default=60.0, metadata={
        "help": "close a connection to a target region unused this long"})
    registry_sync_s: float = field(default=10.0, metadata={
        "help": "period of the re-scan of the store directory"})

    def validate(self) -> None:
        super().validate()
        if self.host_cache_mb < 0:
            raise ConfigError("host_cache_mb", "must be >= 0")
        if self.ingest_blocks < 0:
            raise ConfigError("ingest_blocks", "must be >= 0")
        if not self.data_host:
            raise ConfigError("data_host", "must not be empty")
        for name in ("write_timeout_s", "writer_idle_s", "registry_sync_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")

    @property
    def store_path(self) -> Path:
        return Path(self.store_dir) if self.store_dir else Path(self.state_dir) / "models"


class ModelStoreService(Service[StoreConfig]):
    kind = "model_store"
    description = "λScale model_store: model registry, checkpoint ingest, block source"
    config_cls = StoreConfig

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self.store = ModelStoreDir(config.store_path)
        self.cache = HostMemoryCache(config.host_cache_mb * 1024 * 1024)
        self.tiers = TieredBlockStore(self.store, self.cache)
        self.writers = WriterPool(timeout_s=config.write_timeout_s, idle_s=config.writer_idle_s)
        self.registry: dict[str, RegistryEntry] = {}
        self.bytes_served = 0
        self.sources_in_flight = 0
        self.ingests_in_flight = 0
        self.checksum_failures = 0
        self._kv: KeyValue | None = None
        self._sync_lock = asyncio.Lock()
        self._busy: set[str] = set()  # names with an add/remove in progress
        self._loading: dict[BlockKey, asyncio.Task[torch.Tensor]] = {}

    # --- lifecycle ------------------------------------------------------------------------
    async def setup(self) -> None:
        self.store.root.mkdir(parents=True, exist_ok=True)
        removed = await asyncio.to_thread(self.store.clean_leftovers)
        if removed:
            self.log.info("removed leftovers of interrupted ingests", entries=removed)
        await self._open_kv()
        await self.sync_registry(full=True)
        for name, subject, handler, mtype in (
            ("list", subjects.STORE_LIST, self._list, None),
            ("get", subjects.STORE_GET, self._get, ModelRef),
            ("add", subjects.STORE_ADD, self._add, AddModel),
            ("remove", subjects.STORE_REMOVE, self._remove, ModelRef),
            ("hf_files", subjects.STORE_HF_FILES, self._hf_files, HfFilesRequest),
            # decoded by the handler: a bad target is the request's fault (BadRequest)
            ("source", subjects.STORE_SOURCE, self._source, None),
        ):
            await self.endpoint(name, subject, handler, message_type=mtype, queue=QUEUE)
        await self.endpoint("status", subjects.service_status("model_store", self.id), self._status)
        self.spawn(self._housekeeping(), "housekeeping")

    async def teardown(self) -> None:
        await self.writers.close()

    def metadata(self) -> dict[str, str]:
        return {"store_dir": str(self.store.root), "data_host": self.config.data_host,
                "host_cache_mb": str(self.config.host_cache_mb)}

    def metrics(self) -> dict[str, Any]:
        stats = self.cache.stats
        return {METRIC_MODELS: len(self.registry), METRIC_CACHE_BYTES: self.cache.used_bytes,
                METRIC_CACHE_CAPACITY: self.cache.capacity_bytes,
                METRIC_CACHE_HITS: stats.hits, METRIC_CACHE_MISSES: stats.misses,
                METRIC_DISK_BYTES: stats.disk_bytes, METRIC_BYTES_SERVED: self.bytes_served,
                METRIC_SOURCES: self.sources_in_flight, METRIC_INGESTS: self.ingests_in_flight,
                METRIC_CHECKSUM_FAILURES: self.checksum_failures}

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry_sync_s)
            try:
                await self.writers.sweep()
                kv_was_missing = self._kv is None
                if kv_was_missing:
                    await self._open_kv()
                # a bucket that has just become reachable gets every entry, not only changes
                await self.sync_registry(full=kv_was_missing and self._kv is not None)
            except Exception as exc:  # keep the loop alive; the next round retries
                self.log.warning("registry sync failed", error=repr(exc))

    # --- registry -------------------------------------------------------------------------
    async def _open_kv(self) -> None:
        try:
            self._kv = await bucket(self.bus, subjects.KV_MODELS)
        except LScaleError as exc:
            # the endpoints still work from the store directory; the KV copy catches up later
            self.log.warning("model registry bucket unavailable", error=exc.message)
            self._kv = None

    async def _kv_put(self, entry: RegistryEntry) -> None:
        if self._kv is None:
            return
        try:
            await kv_put(self._kv, entry.manifest.name, registry_record(entry))
        except Exception as exc:  # e.g. a manifest over max_payload: disk stays the truth
            self.log.warning("cannot publish manifest to the registry bucket",
                             model=entry.manifest.name, error=repr(exc))

    async def _kv_delete(self, name: str) -> None:
        if self._kv is None:
            return
        try:
            await kv_delete(self._kv, name)
        except Exception as exc:
            self.log.warning("cannot delete registry entry", model=name, error=repr(exc))

    async def sync_registry(self, *, full: bool = False) -> None:
        """Make the in-memory registry and the KV bucket match the store directory.

        ``full`` also republishes unchanged entries and deletes KV keys of models not on disk
        (start-up: the bucket may hold what another store instance, or an older run, wrote).
        """
        async with self._sync_lock:
            on_disk = await asyncio.to_thread(scan_stamps, self.store)
            known: dict[str, Stamp] = {n: e.stamp for n, e in self.registry.items()}
            changed, gone = diff_stamps(on_disk, known)
            for name in changed:
                try:
                    entry = await asyncio.to_thread(load_entry, self.store, name)
                except LScaleError as exc:
                    self.log.error("unreadable model in the store; skipped", model=name,
                                   error=exc.message)
                    continue
                if entry is None:
                    continue
                if name in self.registry:
                    self.tiers.forget(name)  # replaced behind our back: old blocks are stale
                self.registry[name] = entry
                await self._kv_put(entry)
            for name in gone:
                self.registry.pop(name, None)
                self.tiers.forget(name)
                await self._kv_delete(name)
            if full:
                for name, entry in self.registry.items():
                    if name not in changed:
                        await self._kv_put(entry)
                await self._delete_stray_keys()

    async def _delete_stray_keys(self) -> None:
        if self._kv is None:
            return
        try:
            keys = await self._kv.keys()
        except Exception:  # nats raises NoKeysError for an empty bucket
            return
        for key in keys:
            if key not in self.registry:
                await self._kv_delete(key)

    async def _entry(self, name: str) -> RegistryEntry:
        check_model_name(name)
        entry = self.registry.get(name)
        if entry is None:
            await self.sync_registry()  # perhaps added beside us (lscale model add --local)
            entry = self.registry.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not in the store", model=name)
        return entry

    def in_memory(self, manifest: ModelManifest) -> bool:
        return all(BlockKey(manifest.name, b.index, b.checksum) in self.cache
                   for b in manifest.blocks)

    # --- endpoints: registry ----------------------------------------------------------------
    async def _status(self, body: Any, msg: Any) -> dict[str, Any]:
        return {"state": self.state, "id": self.id, "models": sorted(self.registry)}

    async def _list(self, body: Any, msg: Any) -> list[dict[str, Any]]:
        await self.sync_registry()
        return [summary(e, in_memory=self.in_memory(e.manifest)).to_wire()
                for _, e in sorted(self.registry.items())]

    async def _get(self, req: ModelRef, msg: Any) -> StoreManifest:
        entry = await self._entry(req.name)
        return msgspec.convert({**registry_record(entry),
                                "in_memory": self.in_memory(entry.manifest)}, StoreManifest)

    async def _hf_files(self, req: HfFilesRequest, msg: Any) -> HfFiles:
        entry = await self._entry(req.name)
        kept = entry.manifest.hf_files
        wanted = list(dict.fromkeys(req.files)) if req.files else list(kept)
        unknown = [f for f in wanted if f not in kept]
        if unknown:
            raise InvalidParameter(f"model {req.name!r} has no {', '.join(unknown)} "
                                   f"(kept: {', '.join(kept) or 'none'})")
        paths = {f: hf_file_path(self.store, req.name, f) for f in wanted}
        sizes = await asyncio.to_thread(lambda: {f: p.stat().st_size for f, p in paths.items()})
        total = sum(sizes.values())
        limit = self.bus.max_payload - _REPLY_OVERHEAD
        if total > limit:
            listed = ", ".join(f"{f} {s} B" for f, s in sizes.items())
            raise PayloadTooLarge(
                f"the files of {req.name!r} ({listed}) total {total} bytes, more than a reply "
                f"can carry ({limit} bytes under the server's max_payload); ask for fewer "
                "files at once (files=[...]) or raise the NATS server's max_payload",
                size=total, limit=limit)
        files = await asyncio.to_thread(lambda: {f: p.read_bytes() for f, p in paths.items()})
        return HfFiles(name=req.name, files=files)

    # --- endpoints: add / remove -----------------------------------------------------------
    @contextlib.contextmanager
    def _claim(self, name: str, what: str) -> Iterator[None]:
        if name in self._busy:
            raise Unavailable(f"model {name!r} is being added or removed; try {what} again "
                              "when that is done")
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

    async def _add(self, req: AddModel, msg: Any) -> ModelSummary:
        name = check_model_name(req.name)
        path = Path(req.path)
        if not path.is_absolute():
            raise InvalidParameter(f"checkpoint path {req.path!r} must be absolute (the store "
                                   "reads it on its own host)")
        blocks = req.blocks if req.blocks is not None else (self.config.ingest_blocks or None)
        if blocks is not None and blocks <= 0:
            raise InvalidParameter(f"blocks must be positive, got {blocks}")
        with self._claim(name, "the add"):
            self.ingests_in_flight += 1
            try:
                entry = await self._ingest(name, path, blocks, req.replace, req.request_id)
            finally:
                self.ingests_in_flight -= 1
        return summary(entry, in_memory=False)

    async def _ingest(self, name: str, path: Path, blocks: int | None, replace: bool,
                      request_id: str) -> RegistryEntry:
        loop = asyncio.get_running_loop()
        total = nblocks = 0

        def progress(state: str, done: int, blocks_done: int, error: str = "") -> None:
            data = {"request_id": request_id, "state": state, "bytes_done": done,
                    "bytes_total": total, "blocks_done": blocks_done, "blocks_total": nblocks}
            if error:
                data["error"] = error
            self.spawn(self.emit(INGEST_EVENT, model=name, reason=state, **data),
                       "ingest-progress")

        def on_block(block: BlockEntry) -> None:  # runs in the ingest thread
            loop.call_soon_threadsafe(progress, "running", block.end, block.index + 1)

        try:
            planned = await asyncio.to_thread(_plan, name, path, blocks)
            total, nblocks = planned.total_bytes, planned.num_blocks
            progress("started", 0, 0)
            manifest = await asyncio.to_thread(self.store.add, name, path, num_blocks=blocks,
                                               replace=replace, progress=False,
                                               on_block=on_block)
        except LScaleError as exc:
            progress("failed", 0, 0, exc.message)
            raise
        except Exception as exc:
            progress("failed", 0, 0, f"{type(exc).__name__}: {exc}")
            raise
        self.tiers.forget(name)
        async with self._sync_lock:
            entry = await asyncio.to_thread(load_entry, self.store, name)
            if entry is None:  # removed in the instant since (by a local CLI)
                raise ModelNotFound(f"model {name!r} vanished right after its ingest")
            self.registry[name] = entry
            await self._kv_put(entry)
        progress("done", manifest.total_bytes, manifest.num_blocks)
        self.log.info("model added", model=name, blocks=manifest.num_blocks,
                      bytes=manifest.total_bytes, replaced=replace)
        return entry

    async def _remove(self, req: ModelRef, msg: Any) -> Ack:
        name = check_model_name(req.name)
        with self._claim(name, "the remove"):
            async with self._sync_lock:
                try:
                    await asyncio.to_thread(self.store.remove, name)
                finally:
                    # gone or never there: either way nothing of it may be served any more
                    self.registry.pop(name, None)
                    self.tiers.forget(name)
                    await self._kv_delete(name)
        await self.emit(REMOVED_EVENT, model=name)
        self.log.info("model removed", model=name)
        return Ack(ok=True, detail=f"removed {name}")

    # --- endpoint: source -----------------------------------------------------------------
    async def _source(self, body: Any, msg: Any) -> Ack:
        try:
            req = SendChunks.from_wire(body)
        except DecodeError as exc:
            if "$.target" not in exc.message:
                raise
            raise BadRequest(f"target is not a region descriptor: {exc.message}") from exc
        entry = await self._entry(req.model)
        manifest = entry.manifest
        plan = plan_chunk_writes(manifest, req.chunks, req.parts)
        target = req.target
        if target.size < manifest.total_bytes:
            raise InvalidParameter(f"target region {target.region_id!r} holds {target.size} "
                                   f"bytes; model {manifest.name!r} needs {manifest.total_bytes}")
        if not plan:
            return Ack(ok=True, detail="0 chunks")
        self.sources_in_flight += 1
        # the first read starts before waiting for the target's connection
        pending: asyncio.Future[torch.Tensor] | None = self._block_bytes(manifest,
                                                                          plan[0].block)
        try:
            async with self.writers.session(target) as session:
                for i, block_writes in enumerate(plan):
                    current = pending
                    assert current is not None
                    data = await current
                    # read the next block from disk while this one goes out
                    pending = (self._block_bytes(manifest, plan[i + 1].block)
                               if i + 1 < len(plan) else None)
                    view = data.numpy().data
                    for write in block_writes.writes:
                        await session.write(write.offset, block_writes.view_of(write, view),
                                            write.chunk)
                        self.bytes_served += write.length
        finally:
            self.sources_in_flight -= 1
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
        return Ack(ok=True, detail=f"{sum(len(b.writes) for b in plan)} chunks")

    def _block_bytes(self, manifest: ModelManifest,
                     block: BlockEntry) -> asyncio.Future[torch.Tensor]:
        """The verified bytes of ``block``: from the host tier, or one shared disk read."""
        key = BlockKey(manifest.name, block.index, block.checksum)
        loop = asyncio.get_running_loop()
        cached = self.cache.get(key) if key in self.cache else None
        if cached is not None:
            done: asyncio.Future[torch.Tensor] = loop.create_future()
            done.set_result(cached)
            return done
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._read_block(manifest, block))
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        # each caller gets its own handle: one cancelled caller does not stop the shared read
        return asyncio.ensure_future(asyncio.shield(task))

    async def _read_block(self, manifest: ModelManifest, block: BlockEntry) -> torch.Tensor:
        name = manifest.name

        def read() -> torch.Tensor:
            # the tier reads by its own copy of the manifest: it must be the one this request
            # was planned with (a replace in between would put other bytes at these offsets)
            current = self.tiers.manifest(name)
            if block.index >= current.num_blocks or current.blocks[block.index] != block:
                raise Unavailable(f"model {name!r} was replaced while being sent; ask again")
            return self.tiers.get_block(name, block.index)

        try:
            return await asyncio.to_thread(read)
        except ChecksumMismatch as exc:
            self.checksum_failures += 1
            self.log.error("corrupted block refused", model=manifest.name, block=block.index,
                           error=exc.message)
            await self.emit(CORRUPT_EVENT, model=manifest.name, reason=exc.message,
                            block=block.index)
            raise
        except FileNotFoundError as exc:
            raise ModelNotFound(f"model {manifest.name!r} was removed", model=manifest.name
                                ) from exc


@dataclass(frozen=True)
class _Planned:
    total_bytes: int
    num_blocks: int


def _plan(name: str, path: Path, blocks: int | None) -> _Planned:
    """Check the checkpoint (headers only) and size the ingest before writing anything."""
    ckpt = open_checkpoint(path)
    manifest = plan_layout(name, ckpt.config, ckpt.specs, blocks, hf_files=ckpt.side_files)
    return _Planned(manifest.total_bytes, manifest.num_blocks)


def new_request_id() -> str:
    return secrets.token_hex(6)
