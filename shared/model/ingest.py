"""Converting a Hugging Face checkpoint into the block layout, atomically.

The checkpoint is validated first (headers only), then streamed tensor by tensor into block
files, each hashed as it is written, inside a temporary directory beside the target. Only
when every block and the manifest are written and fsynced is the directory renamed into
place, so a failed or interrupted ingest never leaves a half model visible.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from io import FileIO
from pathlib import Path
from typing import IO, Any

import xxhash

from shared.errors import CheckpointError, InvalidParameter
from shared.model.blockio import DEFAULT_CHUNK_BYTES
from shared.model.checkpoint import Checkpoint, StoredTensor, open_checkpoint
from shared.model.layout import BlockEntry, ModelManifest, plan_layout

MANIFEST_FILE = "manifest.json"
HF_DIR = "hf"  # config and tokenizer files, kept so executors and the router can load them
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

OnBlock = Callable[[BlockEntry], None]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress_bar(total: int, name: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"ingest {name}", file=sys.stderr, disable=not enabled, leave=False)


class _TensorReader:
    """Copies tensors out of safetensors files in chunks through one reusable buffer."""

    def __init__(self, chunk_bytes: int) -> None:
        self._files: dict[Path, FileIO] = {}
        self._buffer = memoryview(bytearray(chunk_bytes))

    def copy(self, tensor: StoredTensor, out: IO[bytes], hasher: xxhash.xxh3_64,
             advance: Callable[[int], object]) -> None:
        f = self._files.get(tensor.path)
        if f is None:
            try:
                f = self._files[tensor.path] = tensor.path.open("rb", buffering=0)
            except OSError as exc:
                raise CheckpointError(f"{tensor.path}: cannot read ({exc})") from exc
        f.seek(tensor.file_offset)
        left = tensor.nbytes
        while left:
            got = f.readinto(self._buffer[:min(left, len(self._buffer))])
            if not got:
                raise CheckpointError(f"{tensor.path}: truncated safetensors file while "
                                      f"reading tensor {tensor.name!r}")
            chunk = self._buffer[:got]
            out.write(chunk)
            hasher.update(chunk)
            left -= got
            advance(got)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _write_block(path: Path, block: BlockEntry, manifest: ModelManifest, ckpt: Checkpoint,
                 reader: _TensorReader, advance: Callable[[int], object]) -> str:
    hasher = xxhash.xxh3_64()
    with path.open("wb") as out:
        cursor = block.offset
        for entry in manifest.tensors_in_block(block.index):
            if entry.offset < cursor:  # an alias (one-block tied head): bytes already written
                continue
            pad = bytes(entry.offset - cursor)
            out.write(pad)
            hasher.update(pad)
            reader.copy(ckpt.tensors[entry.source], out, hasher, advance)
            cursor = entry.offset + entry.nbytes
        pad = bytes(block.end - cursor)
        out.write(pad)
        hasher.update(pad)
        out.flush()
        os.fsync(out.fileno())
    return hasher.hexdigest()


def ingest_checkpoint(checkpoint_dir: str | Path, target: str | Path, name: str, *,
                      num_blocks: int | None = None, replace: bool = False,
                      progress: bool | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      on_block: OnBlock | None = None) -> ModelManifest:
    """Write ``checkpoint_dir`` as blocks + ``manifest.json`` into the directory ``target``.

    ``progress``: show a tqdm bar on stderr (None: only when stderr is a terminal).
    ``on_block`` runs after each block file is complete (tests use it to fail midway).
    Raises :class:`CheckpointError` (or :class:`UnsupportedArchitecture`) for bad input and
    :class:`InvalidParameter` when ``target`` exists and ``replace`` is false.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise InvalidParameter(f"model {name!r} already exists at {target}")
    ckpt = open_checkpoint(checkpoint_dir)
    manifest = plan_layout(name, ckpt.config, ckpt.specs, num_blocks,
                           hf_files=ckpt.side_files)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f"{TEMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
    temp.mkdir()
    reader = _TensorReader(chunk_bytes)
    bar = _progress_bar(ckpt.nbytes, name, progress)
    try:
        checksums = []
        for block in manifest.blocks:
            checksums.append(_write_block(temp / block.filename, block, manifest, ckpt, reader,
                                          bar.update))
            if on_block is not None:
                on_block(block)
        manifest = manifest.with_checksums(checksums)
        (temp / HF_DIR).mkdir()
        for side in ckpt.side_files:
            shutil.copyfile(ckpt.directory / side, temp / HF_DIR / side)
            _fsync_file(temp / HF_DIR / side)
        fsync_dir(temp / HF_DIR)
        manifest_path = temp / MANIFEST_FILE
        manifest_path.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
        _fsync_file(manifest_path)
        fsync_dir(temp)
        _publish(temp, target, replace)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        reader.close()
        bar.close()
    return manifest


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _publish(temp: Path, target: Path, replace: bool) -> None:
    """Rename the finished directory into place (moving an old version aside first)."""
    trash: Path | None = None
    if target.exists():
        if not replace:
            raise InvalidParameter(f"model already exists at {target}")
        trash = target.parent / f"{TRASH_PREFIX}{target.name}-{secrets.token_hex(4)}"
        os.rename(target, trash)
    try:
        os.rename(temp, target)
    except OSError as exc:
        if trash is not None:  # put the old version back
            os.rename(trash, target)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another ingest won the race
            raise InvalidParameter(f"model already exists at {target}") from exc
        raise
    fsync_dir(target.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
