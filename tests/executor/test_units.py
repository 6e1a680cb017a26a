"""The executor's pure parts: readiness, host copies, request checks, stage messages."""

from __future__ import annotations

import pytest
import torch

from services.executor.activations import (
    Reassembler,
    split_message,
    tensor_from_wire,
    tensor_to_wire,
)
from services.executor.requests import (
    check_fits,
    parse_stages,
    sampling_from_wire,
)
from services.executor.weights import BlockReadiness, HostCopies, parse_manifest, same_weights
from shared.bus import encode
from shared.engine import SamplingParams
from shared.errors import (
    ContextTooLong,
    InvalidParameter,
    KVCacheFull,
    PayloadTooLarge,
)
from shared.messages import StageActivations, StageChunk
from shared.sampling import finish_reason  # the one finish rule
from tests.executor.conftest import NUM_LAYERS, TinyModel


def test_readiness_follows_blocks(tiny: TinyModel) -> None:
    readiness = BlockReadiness(tiny.manifest)
    assert readiness.ready_layers == [] and not readiness.complete
    assert readiness.mark(2) and not readiness.mark(2)
    assert readiness.ready_layers == [2] and readiness.is_layer_ready(2)
    assert not readiness.has_layers(1, 3)
    assert sorted(readiness.mark_all()) == [0, 1, 3] and readiness.complete
    with pytest.raises(InvalidParameter):
        readiness.mark(NUM_LAYERS)


def test_manifest_checks(tiny: TinyModel) -> None:
    raw = tiny.manifest.to_dict()
    assert same_weights(parse_manifest(tiny.name, raw), tiny.manifest)
    with pytest.raises(InvalidParameter, match="describes model"):
        parse_manifest("other", raw)
    broken = {**raw, "total_bytes": raw["total_bytes"] + 4096}
    with pytest.raises(InvalidParameter, match="total_bytes"):
        parse_manifest(tiny.name, broken)
    with pytest.raises(InvalidParameter):
        parse_manifest(tiny.name, [1, 2])


def test_host_copies_evict_least_recently_used(tiny: TinyModel) -> None:
    now = [0.0]
    copies = HostCopies(250, clock=lambda: now[0])
    assert copies.put("a", tiny.manifest, b"", 100) == []
    now[0] = 1
    assert copies.put("b", tiny.manifest, b"", 100) == []
    now[0] = 2
    assert copies.get("a") is not None  # a is now the most recently used
    assert copies.put("c", tiny.manifest, b"", 100) == ["b"]
    assert copies.names() == ["a", "c"] and copies.used_bytes == 200
    with pytest.raises(InvalidParameter):
        copies.put("huge", tiny.manifest, b"", 251)
    taken = copies.take("a")
    assert taken is not None and "a" not in copies
    assert copies.drop(["c", "zzz"]) == ["c"] and copies.describe() == []


def test_sampling_and_prompt_checks() -> None:
    params = sampling_from_wire({"max_tokens": 5, "temperature": 0, "seed": None, "top_p": None,
                                 "presence_penalty": 0.0, "stop_token_ids": [3], "new": 1})
    assert params == SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(3,))
    # penalties are implemented now: a valid one is taken, an out-of-range one refused
    assert sampling_from_wire({"frequency_penalty": 1, "repetition_penalty": 1.2}, 512) == \
        SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2)
    for bad in ({"temperature": "hot"}, {"frequency_penalty": 2.5}, {"ignore_eos": 1},
                {"stop_token_ids": {"a": 1}}, {"seed": -1}, {"repetition_penalty": 0},
                {"logprobs": 21}, {"n": 2, "best_of": 1}, {"min_tokens": 9, "max_tokens": 4}):
        with pytest.raises(InvalidParameter):
            sampling_from_wire(bad, 512)
    with pytest.raises(ContextTooLong):
        check_fits(300, 256, 256)
    with pytest.raises(KVCacheFull):
        check_fits(200, 256, 128)
    check_fits(128, 256, 128)


def test_stages_must_cover_the_model_in_order() -> None:
    stages = parse_stages([{"executor_id": "a", "start": 0, "stop": 1},
                           {"executor_id": "b", "start": 1, "stop": 4}], 4)
    assert [(s.executor_id, s.start, s.stop) for s in stages] == [("a", 0, 1), ("b", 1, 4)]
    for bad in ([], [{"executor_id": "a", "start": 0, "stop": 3}],
                [{"executor_id": "a", "start": 0, "stop": 2}, {"executor_id": "b", "start": 3,
                                                               "stop": 4}],
                [{"executor_id": "a", "start": 0, "stop": 2}, {"executor_id": "a", "start": 2,
                                                               "stop": 4}],
                [{"executor_id": "a", "start": True, "stop": 4}], ["a"]):
        with pytest.raises(InvalidParameter):
            parse_stages(bad, 4)


def test_finish_rule_matches_the_scheduler() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    common = {"params": params, "eos_token_ids": {2}, "prompt_len": 4, "row_len": 64,
              "max_model_len": 64}
    assert finish_reason(generated=[5], **common) is None  # type: ignore[arg-type]
    assert finish_reason(generated=[5, 9], **common) == "stop"  # type: ignore[arg-type]
    assert finish_reason(generated=[2], **common) == "stop"  # type: ignore[arg-type]
    assert finish_reason(generated=[5, 6, 7], **common) == "length"  # type: ignore[arg-type]
    full = {**common, "row_len": 5}
    assert finish_reason(generated=[5, 6], **full) == "length"  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hidden_states_round_trip(dtype: torch.dtype) -> None:
    hidden = torch.randn(7, 64).to(dtype)
    data, name, shape = tensor_to_wire(hidden)
    assert torch.equal(tensor_from_wire(data, name, shape, 64), hidden)
    with pytest.raises(InvalidParameter):
        tensor_from_wire(data[:-2], name, shape, 64)
    with pytest.raises(InvalidParameter):
        tensor_from_wire(data, name, shape, 32)


def test_large_stage_messages_split_and_reassemble() -> None:
    data = bytes(range(256)) * 40  # 10 KiB
    message = StageActivations(model="m", origin="a", batch_id="a.1", stage=1, stages=[],
                               chunks=[StageChunk(request_id="r", flow="r@a.0", start=0,
                                                  length=40)],
                               hidden=b"", dtype="float32", shape=[40, 64])
    parts = split_message(message, data, 3000)
    assert len(parts) > 3 and all(len(encode(p)) <= 3000 for p in parts)
    reassembler = Reassembler()
    results = [reassembler.add(p, now=0.0) for p in reversed(parts)]
    assert results[:-1] == [None] * (len(parts) - 1)
    whole = results[-1]
    assert whole is not None and whole[1] == data and len(reassembler) == 0
    assert reassembler.add(parts[0], now=0.0) is None
    assert reassembler.expire(now=100.0, max_age_s=10.0) == 1
    with pytest.raises(PayloadTooLarge):
        split_message(message, data, 100)


def test_advertised_data_host_is_reachable_when_bound_on_every_interface() -> None:
    import socket

    from services.executor.config import ExecutorConfig, advertised_data_host

    assert advertised_data_host(ExecutorConfig()) == "127.0.0.1"
    assert advertised_data_host(ExecutorConfig(data_host="10.1.2.3")) == "10.1.2.3"
    assert advertised_data_host(ExecutorConfig(data_host="0.0.0.0",
                                               data_advertise_host="node-7")) == "node-7"
    # bound on every interface (a container): peers get this host's own address, never 0.0.0.0
    own = socket.gethostbyname(socket.gethostname())
    for wildcard in ("0.0.0.0", "::"):
        assert advertised_data_host(ExecutorConfig(data_host=wildcard)) == own != wildcard
