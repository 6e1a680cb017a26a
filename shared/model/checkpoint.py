"""Reading a Hugging Face checkpoint directory without loading its weights.

Only the safetensors headers are parsed (an 8-byte little-endian header length, a JSON header,
then raw tensor bytes); tensor data is streamed later by whoever needs it, so a checkpoint
larger than memory can be ingested. Every problem is a :class:`CheckpointError` naming the
file and tensor at fault.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import CheckpointError
from shared.model.config import ModelConfig, expected_tensor_shapes
from shared.model.layout import DTYPE_SIZES, HEAD_NAME, TensorSpec

SAFETENSORS_DTYPES: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_TO_SAFETENSORS: dict[str, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
# files copied beside the blocks so an executor or router can rebuild config and tokenizer
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
# buffers some old checkpoints saved that carry no weights
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: ``nbytes`` at absolute ``file_offset`` in ``path``."""

    name: str
    path: Path
    file_offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str  # float32 | float16 | bfloat16

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype)


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """Parse one ``.safetensors`` file's header; check every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {header_len} bytes "
                    f"in a file of {size})")
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    out: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _parse_entry(path, name, info, data_start, data_len)
    return out


def _parse_entry(path: Path, name: str, info: Any, data_start: int,
                 data_len: int) -> StoredTensor:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry")
    st_dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if st_dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r}: dtype {st_dtype!r} not supported "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r}: malformed shape or data_offsets")
    dtype = SAFETENSORS_DTYPES[st_dtype]
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} do not match "
                              f"shape {shape} of {dtype}")
    if end > data_len:
        raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at "
                              f"byte {data_start + end}, file has {data_start + data_len}")
    return StoredTensor(name=name, path=path, file_offset=data_start + begin, nbytes=nbytes,
                        shape=tuple(shape), dtype=dtype)


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint directory: its config and where each expected tensor lives."""

    directory: Path
    config: ModelConfig
    tensors: Mapping[str, StoredTensor]  # exactly the expected tensors
    files: tuple[Path, ...]  # the safetensors files
    side_files: tuple[str, ...]  # HF_SIDE_FILES present in the directory

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {name: t.spec for name, t in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Read config and safetensors headers of ``directory`` and check them against each other.

    Refuses (with :class:`CheckpointError` or :class:`UnsupportedArchitecture`) a missing or
    invalid ``config.json``, an architecture we cannot run, a missing shard, a truncated file,
    and any missing, mis-shaped or unexpected tensor.
    """
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    config = ModelConfig.from_hf_dir(root)
    files = _safetensors_files(root)
    found: dict[str, StoredTensor] = {}
    for path in files:
        for name, tensor in read_safetensors_header(path).items():
            if name in found:
                raise CheckpointError(f"tensor {name!r} appears in both {found[name].path.name} "
                                      f"and {path.name}")
            found[name] = tensor
    index = _read_index(root)
    if index is not None:
        for name, shard in index.items():
            if name not in found or found[name].path.name != shard:
                raise CheckpointError(f"{INDEX_FILE}: tensor {name!r} is not in shard {shard}")
    tensors = _check_tensors(config, found)
    side = tuple(f for f in HF_SIDE_FILES if (root / f).is_file())
    return Checkpoint(directory=root, config=config, tensors=tensors, files=tuple(files),
                      side_files=side)


def _read_index(root: Path) -> dict[str, str] | None:
    path = root / INDEX_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: missing or malformed 'weight_map'")
    return weight_map


def _safetensors_files(root: Path) -> list[Path]:
    index = _read_index(root)
    if index is not None:
        files: list[Path] = []
        for shard in dict.fromkeys(index.values()):
            if "/" in shard or shard.startswith("."):
                raise CheckpointError(f"{INDEX_FILE}: shard name {shard!r} is not a plain file")
            path = root / shard
            if not path.is_file():
                raise CheckpointError(f"{root}: missing shard {shard} (named in {INDEX_FILE})")
            files.append(path)
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(
            p.name for p in root.glob("*.pt*"))
        hint = f" (found {', '.join(others[:3])}; only safetensors is supported)" if others else ""
        raise CheckpointError(f"{root}: no *.safetensors files{hint}")
    return files


def _check_tensors(config: ModelConfig,
                   found: Mapping[str, StoredTensor]) -> dict[str, StoredTensor]:
    expected = expected_tensor_shapes(config)
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensors: {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if found[name].shape != shape:
            raise CheckpointError(f"tensor {name!r} in {found[name].path.name} has shape "
                                  f"{list(found[name].shape)}, config.json implies {list(shape)}")
    unexpected = [n for n in found if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == HEAD_NAME and config.tie_word_embeddings)]
    if unexpected:
        raise CheckpointError(f"unexpected tensors for {config.architecture} with "
                              f"{config.num_layers} layers: {', '.join(sorted(unexpected)[:5])}")
    return {name: found[name] for name in expected}
