"""The local model registry: one directory per model under a store directory.

    <store>/<NAME>/manifest.json
    <store>/<NAME>/block-0000.bin ...
    <store>/<NAME>/hf/{config.json, tokenizer.json, tokenizer_config.json, ...}

The store directory defaults to ``$LSCALE_STATE_DIR/models`` (``LSCALE_STATE_DIR`` defaults
to ``.lscale`` in the working directory). Entries whose name starts with a dot are work in
progress (an ingest's temporary directory, an old version being deleted) and are invisible.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from shared.errors import CheckpointError, InvalidParameter, ModelNotFound
from shared.model.blockio import BlockFileSource, read_block_file, verify_block_files
from shared.model.ingest import (
    HF_DIR,
    MANIFEST_FILE,
    TEMP_PREFIX,
    TRASH_PREFIX,
    OnBlock,
    fsync_dir,
    ingest_checkpoint,
)
from shared.model.layout import BlockEntry, ModelManifest, block_filename

STATE_DIR_ENV = "LSCALE_STATE_DIR"
DEFAULT_STATE_DIR = ".lscale"
# A name is a directory name and the key of the model's entry in the JetStream KV bucket
# (services.model_store). A KV key becomes part of a subject ($KV.<bucket>.<key>), where '.'
# separates tokens: so no empty token ('..', or a trailing '.'), or the put never reaches the
# stream. Names are never used as a subject token themselves (a '.' would split it).
MODEL_NAME_RE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(?<!\.)\Z")


def default_store_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR) / "models"


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise InvalidParameter(f"model name {name!r}: use 1-128 letters, digits, '.', '_' or "
                               "'-', starting with a letter or digit, with no '..' and not "
                               "ending with '.'")
    return name


class ModelStoreDir:
    """Add, list, read and remove models in one store directory."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_dir()

    def model_dir(self, name: str) -> Path:
        return self.root / check_model_name(name)

    def hf_dir(self, name: str) -> Path:
        return self.model_dir(name) / HF_DIR

    def block_path(self, name: str, index: int) -> Path:
        return self.model_dir(name) / block_filename(index)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / MANIFEST_FILE).is_file())

    def exists(self, name: str) -> bool:
        return (self.model_dir(name) / MANIFEST_FILE).is_file()

    def manifest(self, name: str) -> ModelManifest:
        path = self.model_dir(name) / MANIFEST_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelNotFound(f"model {name!r} not in store {self.root}", model=name) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable manifest ({exc})") from exc
        return ModelManifest.from_dict(raw)

    def manifests(self) -> list[ModelManifest]:
        out = []
        for name in self.names():
            try:
                out.append(self.manifest(name))
            except ModelNotFound:
                continue  # removed while we listed
        return out

    def add(self, name: str, checkpoint_dir: str | Path, *, num_blocks: int | None = None,
            replace: bool = False, progress: bool | None = None,
            on_block: OnBlock | None = None) -> ModelManifest:
        """Ingest a HF checkpoint directory as model ``name`` (atomically)."""
        target = self.model_dir(name)
        self.root.mkdir(parents=True, exist_ok=True)
        return ingest_checkpoint(checkpoint_dir, target, name, num_blocks=num_blocks,
                                 replace=replace, progress=progress, on_block=on_block)

    def remove(self, name: str) -> None:
        """Delete a model; it disappears at once (renamed aside), then its files are removed."""
        target = self.model_dir(name)
        if not target.is_dir():
            raise ModelNotFound(f"model {name!r} not in store {self.root}", model=name)
        trash = self.root / f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
        os.rename(target, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_leftovers(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove temporary and trash directories left by killed processes; return names.

        Only entries untouched for ``older_than_s`` go, so a running ingest keeps its own.
        """
        if not self.root.is_dir():
            return []
        removed = []
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith((TEMP_PREFIX, TRASH_PREFIX)) \
                    and now - p.stat().st_mtime >= older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def source(self, name: str, *, verify: bool = True) -> BlockFileSource:
        return BlockFileSource(self.model_dir(name), verify=verify)

    def read_block_into(self, name: str, block: BlockEntry, dest: memoryview, *,
                        verify: bool = True) -> None:
        read_block_file(self.model_dir(name) / block.filename, block, dest, verify=verify)

    def verify(self, name: str) -> None:
        """Check every block of ``name`` against its checksum (:class:`ChecksumMismatch`)."""
        verify_block_files(self.model_dir(name), self.manifest(name))
