"""Ingest: round trips bit for bit, atomicity, and refusal of bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from shared.errors import CheckpointError, ChecksumMismatch, InvalidParameter, UnsupportedArchitecture
from shared.model.layout import EMBED_NAME, HEAD_NAME, BlockEntry
from shared.model.store_dir import ModelStoreDir
from shared.model.weights import load_model
from tests.model.conftest import MakeTiny, load_originals, same_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_is_bit_exact(make_tiny: MakeTiny, store: ModelStoreDir, arch: str,
                                 tied: bool, shards: int) -> None:
    ckpt = make_tiny(shards=shards, architecture=arch, tie_word_embeddings=tied, num_layers=4)
    originals = load_originals(ckpt.directory)
    for blocks in (1, 3):
        name = f"{arch}-{blocks}"
        manifest = store.add(name, ckpt.directory, num_blocks=blocks, progress=False)
        assert store.manifest(name) == manifest
        assert manifest.num_blocks == blocks
        _, views = load_model(manifest, store.source(name))
        for tname, tensor in originals.items():
            assert same_bytes(views[tname], tensor), tname
        # the head is always in the last block; for a tied model it holds the embeddings
        assert views.keys() == originals.keys() | {HEAD_NAME}
        assert same_bytes(views[HEAD_NAME], originals[HEAD_NAME if not tied else EMBED_NAME])
        assert manifest.tensor(HEAD_NAME).block == blocks - 1
        # the side files let transformers rebuild the model from the store alone
        assert (store.hf_dir(name) / "tokenizer.json").is_file()
        assert AutoConfig.from_pretrained(store.hf_dir(name)).model_type == arch


def test_store_weights_give_identical_logits(make_tiny: MakeTiny, store: ModelStoreDir) -> None:
    ckpt = make_tiny(architecture="qwen2", tie_word_embeddings=True, num_layers=3)
    manifest = store.add("q", ckpt.directory, num_blocks=2, progress=False)
    _, views = load_model(manifest, store.source("q"))
    reference = AutoModelForCausalLM.from_pretrained(ckpt.directory)
    rebuilt = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        AutoConfig.from_pretrained(store.hf_dir("q")))
    rebuilt.load_state_dict(views, strict=True)
    ids = torch.tensor([[0, 17, 250, 3, 99]])
    assert torch.equal(reference(ids).logits, rebuilt(ids).logits)


def test_ingest_streams_one_tensor_at_a_time(make_tiny: MakeTiny, store: ModelStoreDir,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy buffer bounds memory: a chunk smaller than any tensor still round-trips."""
    from shared.model import ingest

    ckpt = make_tiny(num_layers=2)
    manifest = ingest.ingest_checkpoint(ckpt.directory, store.root / "small", "small",
                                        chunk_bytes=1000, progress=False)
    _, views = load_model(manifest, store.source("small"))
    originals = load_originals(ckpt.directory)
    assert all(same_bytes(views[k], v) for k, v in originals.items())


def test_existing_name_is_refused_unless_replaced(make_tiny: MakeTiny,
                                                  store: ModelStoreDir) -> None:
    a, b = make_tiny(), make_tiny(seed=7)
    store.add("m", a.directory, progress=False)
    with pytest.raises(InvalidParameter):
        store.add("m", b.directory, progress=False)
    manifest = store.add("m", b.directory, replace=True, progress=False)
    _, views = load_model(manifest, store.source("m"))
    assert same_bytes(views[EMBED_NAME], load_originals(b.directory)[EMBED_NAME])
    assert store.names() == ["m"] and _hidden_entries(store) == []


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "x" * 200, "sp ace"])
def test_bad_model_names(make_tiny: MakeTiny, store: ModelStoreDir, name: str) -> None:
    with pytest.raises(InvalidParameter):
        store.add(name, make_tiny().directory, progress=False)


def test_corrupted_block_is_refused(make_tiny: MakeTiny, store: ModelStoreDir) -> None:
    manifest = store.add("m", make_tiny(num_layers=4).directory, num_blocks=2, progress=False)
    path = store.block_path("m", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit
    path.write_bytes(data)
    with pytest.raises(ChecksumMismatch, match="block 1"):
        store.verify("m")
    with pytest.raises(ChecksumMismatch):
        load_model(manifest, store.source("m"))
    path.write_bytes(data[:-4096])  # truncated
    with pytest.raises(ChecksumMismatch, match="bytes"):
        load_model(manifest, store.source("m"))


def _hidden_entries(store: ModelStoreDir) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_ingest_leaves_nothing(make_tiny: MakeTiny, store: ModelStoreDir,
                                      interrupt: BaseException) -> None:
    seen: list[int] = []

    def fail_after_first(block: BlockEntry) -> None:
        seen.append(block.index)
        raise interrupt

    with pytest.raises(type(interrupt)):
        store.add("m", make_tiny(num_layers=4).directory, num_blocks=4, progress=False,
                  on_block=fail_after_first)
    assert seen == [0]
    assert store.names() == [] and not store.exists("m")
    assert list(store.root.iterdir()) == []  # the temporary directory is gone too


def test_failed_replace_keeps_the_old_model(make_tiny: MakeTiny, store: ModelStoreDir) -> None:
    old = store.add("m", make_tiny(num_layers=4).directory, num_blocks=2, progress=False)

    def fail(block: BlockEntry) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        store.add("m", make_tiny(num_layers=4, seed=3).directory, num_blocks=2, replace=True,
                  progress=False, on_block=fail)
    assert store.manifest("m") == old
    store.verify("m")


def test_killed_ingest_leaves_no_visible_model(make_tiny: MakeTiny,
                                               store: ModelStoreDir) -> None:
    """A process killed midway (SIGKILL: no cleanup at all) leaves only a hidden temp dir."""
    script = (
        "import os, signal, sys\n"
        "from shared.model.store_dir import ModelStoreDir\n"
        "def die(block):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ModelStoreDir(sys.argv[1]).add('m', sys.argv[2], num_blocks=4, progress=False,"
        " on_block=die)\n")
    ckpt = make_tiny(num_layers=4)
    proc = subprocess.run([sys.executable, "-c", script, str(store.root), str(ckpt.directory)],
                          timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert store.names() == [] and not store.exists("m")
    leftovers = _hidden_entries(store)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-m-")
    assert store.clean_leftovers(older_than_s=3600) == []  # too fresh: could be running
    assert store.clean_leftovers(older_than_s=0) == leftovers
    assert list(store.root.iterdir()) == []
    store.add("m", ckpt.directory, progress=False)
    store.verify("m")


# --- bad checkpoints -------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, change: dict[str, torch.Tensor | None]) -> None:
    tensors = load_file(path)
    for name, value in change.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, path)


def _patch_config(directory: Path, **fields: object) -> None:
    raw = json.loads((directory / "config.json").read_text())
    raw.update(fields)
    (directory / "config.json").write_text(json.dumps(raw))


def _assert_refused(store: ModelStoreDir, directory: Path, error: type[Exception],
                    match: str) -> None:
    with pytest.raises(error, match=match):
        store.add("bad", directory, progress=False)
    assert not store.exists("bad")
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_missing_and_invalid_config(make_tiny: MakeTiny, store: ModelStoreDir,
                                    tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    (d / "config.json").unlink()
    _assert_refused(store, d, CheckpointError, "config.json not found")
    (d / "config.json").write_text("{not json")
    _assert_refused(store, d, CheckpointError, "not valid JSON")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _assert_refused(store, d, CheckpointError, "missing required field")
    _assert_refused(store, tmp_path / "nowhere", CheckpointError, "not a directory")


def test_unsupported_architecture(make_tiny: MakeTiny, store: ModelStoreDir,
                                  tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    _patch_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    _assert_refused(store, d, UnsupportedArchitecture, "gpt2")


def test_missing_tensor(make_tiny: MakeTiny, store: ModelStoreDir, tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    _rewrite(d / "model.safetensors", {"model.layers.1.mlp.up_proj.weight": None})
    _assert_refused(store, d, CheckpointError, r"missing tensors: model\.layers\.1\.mlp\.up_proj")


def test_misshaped_tensor(make_tiny: MakeTiny, store: ModelStoreDir, tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    _rewrite(d / "model.safetensors",
             {"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    _assert_refused(store, d, CheckpointError,
                    r"model\.layers\.0\.self_attn\.k_proj\.weight.*\[64, 64\].*\[32, 64\]")


def test_config_that_does_not_match_the_weights(make_tiny: MakeTiny, store: ModelStoreDir,
                                                tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    _patch_config(d, num_hidden_layers=3)
    _assert_refused(store, d, CheckpointError, r"missing tensors: model\.layers\.2\.")
    _patch_config(d, num_hidden_layers=1)
    _assert_refused(store, d, CheckpointError, r"unexpected tensors.*model\.layers\.1\.")


def test_truncated_safetensors(make_tiny: MakeTiny, store: ModelStoreDir,
                               tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _assert_refused(store, d, CheckpointError, "truncated safetensors file")
    path.write_bytes(data[:5])
    _assert_refused(store, d, CheckpointError, "truncated safetensors file")
    path.write_bytes(struct.pack("<Q", 50) + b"{ not json at all" + bytes(100))
    _assert_refused(store, d, CheckpointError, "header is not valid JSON")


def test_missing_shard(make_tiny: MakeTiny, store: ModelStoreDir, tmp_path: Path) -> None:
    src = make_tiny(shards=3)
    d = _copy(src.directory, tmp_path / "c")
    (d / src.files[1]).unlink()
    _assert_refused(store, d, CheckpointError, f"missing shard {src.files[1]}")


def test_index_pointing_to_the_wrong_shard(make_tiny: MakeTiny, store: ModelStoreDir,
                                           tmp_path: Path) -> None:
    src = make_tiny(shards=3)
    d = _copy(src.directory, tmp_path / "c")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = src.files[0]
    index_path.write_text(json.dumps(index))
    _assert_refused(store, d, CheckpointError, r"'model\.norm\.weight' is not in shard")


def test_no_weights_and_unsupported_dtype(make_tiny: MakeTiny, store: ModelStoreDir,
                                          tmp_path: Path) -> None:
    d = _copy(make_tiny().directory, tmp_path / "c")
    os.rename(d / "model.safetensors", d / "pytorch_model.bin")
    _assert_refused(store, d, CheckpointError, "no .*safetensors files.*pytorch_model.bin")
    d2 = _copy(make_tiny().directory, tmp_path / "c2")
    _rewrite(d2 / "model.safetensors",
             {"model.norm.weight": torch.zeros(64, dtype=torch.int32)})
    _assert_refused(store, d2, CheckpointError, r"model\.norm\.weight.*dtype 'I32'")


def test_too_many_blocks(make_tiny: MakeTiny, store: ModelStoreDir) -> None:
    with pytest.raises(InvalidParameter, match="blocks"):
        store.add("m", make_tiny(num_layers=2).directory, num_blocks=3, progress=False)
    assert store.names() == []


def test_progress_bar_goes_to_stderr_when_asked(make_tiny: MakeTiny, store: ModelStoreDir,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    store.add("quiet", make_tiny().directory, progress=False)
    assert capsys.readouterr().err == ""
    store.add("shown", make_tiny().directory, progress=True)
    captured = capsys.readouterr()
    assert "ingest shown" in captured.err and captured.out == ""


def test_losing_a_publish_race_is_a_named_error(make_tiny: MakeTiny, store: ModelStoreDir) -> None:
    """Another ingest of the same name finishing first: refused, nothing half-written."""
    ckpt = make_tiny()

    def other_ingest_wins(block: BlockEntry) -> None:
        if not store.exists("m"):
            ModelStoreDir(store.root).add("m", make_tiny(seed=9).directory, progress=False)

    with pytest.raises(InvalidParameter, match="already exists"):
        store.add("m", ckpt.directory, num_blocks=2, progress=False, on_block=other_ingest_wins)
    store.verify("m")
    _, views = load_model(store.manifest("m"), store.source("m"))
    assert same_bytes(views[EMBED_NAME], load_originals(make_tiny(seed=9).directory)[EMBED_NAME])
    assert _hidden_entries(store) == []
