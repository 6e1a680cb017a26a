"""``lscale model ...`` end to end, in process, against a store directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from services.cli.main import main
from shared.model.store_dir import ModelStoreDir, default_store_dir
from tests.model.conftest import load_originals, same_bytes


def test_create_add_ls_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    store_dir = tmp_path / "store"
    assert main(["model", "create-tiny", str(ckpt), "--arch", "mistral", "--layers", "3",
                 "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
                 "--vocab", "300", "--tied", "--dtype", "float16", "--seed", "5",
                 "--shards", "2"]) == 0
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert (model.config.num_hidden_layers, model.config.hidden_size,
            model.config.vocab_size, model.config.tie_word_embeddings) == (3, 32, 300, True)
    assert (ckpt / "model.safetensors.index.json").is_file()

    assert main(["model", "add", "tiny-m", str(ckpt), "--blocks", "2",
                 "--store", str(store_dir)]) == 0
    out = capsys.readouterr()
    assert "added tiny-m: 2 blocks" in out.out
    assert "ingest" not in out.err  # stderr is not a terminal: no progress bar

    assert main(["model", "ls", "--json", "--store", str(store_dir)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["architecture"], r["layers"], r["blocks"], r["dtype"])
            for r in rows] == [("tiny-m", "mistral", 3, 2, "float16")]
    assert main(["model", "ls", "--store", str(store_dir)]) == 0
    assert "tiny-m" in capsys.readouterr().out
    assert main(["model", "verify", "tiny-m", "--store", str(store_dir)]) == 0

    manifest = ModelStoreDir(store_dir).manifest("tiny-m")
    assert manifest.total_bytes == rows[0]["bytes"]
    from shared.model.weights import load_model

    _, views = load_model(manifest, ModelStoreDir(store_dir).source("tiny-m"))
    assert all(same_bytes(views[k], v) for k, v in load_originals(ckpt).items())

    assert main(["model", "rm", "tiny-m", "--store", str(store_dir)]) == 0
    capsys.readouterr()
    assert main(["model", "ls", "--json", "--store", str(store_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["model", "rm", "tiny-m", "--store", str(store_dir)]) == 1
    assert "model_not_found" in capsys.readouterr().err


def test_default_store_follows_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LSCALE_STATE_DIR", raising=False)
    assert default_store_dir() == Path(".lscale") / "models"
    monkeypatch.setenv("LSCALE_STATE_DIR", str(tmp_path / "state"))
    assert main(["model", "create-tiny", "ck"]) == 0
    assert main(["model", "add", "a", "ck", "--no-progress"]) == 0
    assert (tmp_path / "state" / "models" / "a" / "manifest.json").is_file()


def test_size_preset_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "create-tiny", str(tmp_path / "s"), "--size-mb", "2"]) == 0
    size = sum(p.stat().st_size for p in (tmp_path / "s").glob("*.safetensors"))
    assert abs(size / 1e6 - 2) < 0.1
    assert main(["model", "create-tiny", str(tmp_path / "x"), "--size-mb", "2",
                 "--layers", "3"]) == 1
    assert "--size-mb picks the shape" in capsys.readouterr().err
    assert main(["model", "create-tiny", str(tmp_path / "y"), "--heads", "3"]) == 1
    assert main(["model", "add", "m", str(tmp_path / "missing"),
                 "--store", str(tmp_path / "st")]) == 1
    assert "[checkpoint]" in capsys.readouterr().err
