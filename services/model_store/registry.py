"""What the store knows about its models, and the record each one gets in the KV bucket.

The store directory is the truth: :func:`scan_stamps` looks at it (one ``stat`` per model),
:func:`diff_stamps` (pure) says which entries are new or changed and which are gone, and the
service re-reads only those manifests and mirrors the result into the JetStream bucket
``subjects.KV_MODELS``, key = model name, value = :func:`registry_record`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.messages import ModelSummary
from shared.model.ingest import MANIFEST_FILE
from shared.model.layout import ModelManifest
from shared.model.store_dir import ModelStoreDir

# A manifest file's identity: (mtime_ns, size, inode). A replace renames a new directory
# into place, so the inode changes even when mtime and size happen to match.
Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class RegistryEntry:
    manifest: ModelManifest
    created: float  # unix time the manifest was written (the end of the ingest)
    stamp: Stamp


def manifest_stamp(store: ModelStoreDir, name: str) -> Stamp | None:
    try:
        st = (store.model_dir(name) / MANIFEST_FILE).stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def scan_stamps(store: ModelStoreDir) -> dict[str, Stamp]:
    stamps: dict[str, Stamp] = {}
    for name in store.names():
        stamp = manifest_stamp(store, name)
        if stamp is not None:
            stamps[name] = stamp
    return stamps


def diff_stamps(on_disk: Mapping[str, Stamp],
                known: Mapping[str, Stamp]) -> tuple[list[str], list[str]]:
    """(names to (re)load, names to forget), each sorted."""
    changed = sorted(n for n, s in on_disk.items() if known.get(n) != s)
    gone = sorted(n for n in known if n not in on_disk)
    return changed, gone


def load_entry(store: ModelStoreDir, name: str) -> RegistryEntry | None:
    """Read ``name``'s manifest (None when it vanished meanwhile)."""
    stamp = manifest_stamp(store, name)
    if stamp is None:
        return None
    manifest = store.manifest(name)
    return RegistryEntry(manifest, stamp[0] / 1e9, stamp)


def registry_record(entry: RegistryEntry) -> dict[str, Any]:
    """The KV value (and, with ``in_memory``, the ``STORE_GET`` reply): the manifest map
    plus ``created``. :meth:`ModelManifest.from_dict` reads it back, ignoring the extra key."""
    return {**entry.manifest.to_dict(), "created": entry.created}


def summary(entry: RegistryEntry, *, in_memory: bool = False) -> ModelSummary:
    m = entry.manifest
    cfg = m.config
    return ModelSummary(name=m.name, architecture=cfg.architecture, num_layers=cfg.num_layers,
                        num_blocks=m.num_blocks, total_bytes=m.total_bytes, dtype=cfg.dtype,
                        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                        created=entry.created, in_memory=in_memory)


def hf_file_path(store: ModelStoreDir, name: str, filename: str) -> Path:
    return store.hf_dir(name) / filename
