"""The scheduler alone: add requests, schedule(), feed hand-built outputs, assert. No torch."""

from __future__ import annotations

import pytest

from shared.engine.sampling import SamplingParams
from shared.engine.scheduler import ScheduledChunk, Scheduler
from shared.errors import ContextTooLong, InvalidParameter, KVCacheFull

P = SamplingParams(max_tokens=3, temperature=0)


def make(**kw: object) -> Scheduler:
    args: dict[str, object] = dict(capacity=2, row_len=32, max_model_len=64, vocab_size=100,
                                   eos_token_ids=(99,), max_batch_tokens=16)
    args.update(kw)
    return Scheduler(**args)  # type: ignore[arg-type]


def test_prefill_then_decode_then_finish_by_length() -> None:
    s = make()
    s.add("a", [1, 2, 3], P)
    out = s.schedule()
    assert out.chunks == (ScheduledChunk("a", 0, (1, 2, 3)),)
    res = s.update(out, {"a": 7})
    assert [(r.token_id, r.finished) for r in res] == [(7, False)]
    out = s.schedule()
    assert out.chunks == (ScheduledChunk("a", 3, (7,)),)
    s.update(out, {"a": 8})
    out = s.schedule()
    assert out.chunks == (ScheduledChunk("a", 4, (8,)),)
    res = s.update(out, {"a": 9})
    assert res[0].finished and res[0].finish_reason == "length" and res[0].num_generated == 3
    assert not s.has_work() and not s.schedule()


def test_decodes_and_new_prefills_share_a_step_and_capacity_makes_requests_wait() -> None:
    s = make()
    s.add("a", [1] * 4, P)
    s.update(s.schedule(), {"a": 5})
    s.add("b", [2] * 5, P)
    s.add("c", [3] * 2, P)
    out = s.schedule()
    # a decodes; b is admitted; c waits: only two KV rows
    assert [(c.request_id, c.start, len(c.token_ids)) for c in out.chunks] == [
        ("a", 4, 1), ("b", 0, 5)]
    assert [r.request_id for r in s.waiting] == ["c"]
    res = s.update(out, {"a": 99, "b": 6})  # 99 is EOS: a finishes, its row frees
    assert [(r.request_id, r.finish_reason) for r in res] == [("a", "stop"), ("b", None)]
    out = s.schedule()
    assert [(c.request_id, c.start) for c in out.chunks] == [("b", 5), ("c", 0)]


def test_token_budget_limits_prefills_but_a_big_prompt_goes_alone() -> None:
    s = make(capacity=8, max_batch_tokens=10)
    s.add("a", [1] * 6, P)
    s.add("b", [1] * 6, P)
    s.add("big", [1] * 20, P)
    assert [c.request_id for c in s.schedule().chunks] == ["a"]
    s2 = make(capacity=8, max_batch_tokens=10)
    s2.add("big", [1] * 20, P)
    s2.add("a", [1] * 2, P)
    assert [c.request_id for c in s2.schedule().chunks] == ["big"]


def test_cancel_waiting_and_running() -> None:
    s = make(capacity=1)
    s.add("a", [1], P)
    s.add("b", [1], P)
    out = s.schedule()
    assert s.cancel("b") is not None and not s.waiting
    assert s.cancel("a") is not None
    assert s.update(out, {"a": 3}) == []  # cancelled while its step ran: no output
    assert s.cancel("zzz") is None and not s.has_work()


def test_stop_string_on_detokenized_tail() -> None:
    s = make(decode=lambda ids: "".join(chr(ord("a") + t) for t in ids))
    s.add("a", [1], SamplingParams(max_tokens=10, temperature=0, stop=("cd",)))
    out = s.schedule()
    for tok in (2, 2):  # "c", "cc"
        assert not s.update(out, {"a": tok})[0].finished
        out = s.schedule()
    res = s.update(out, {"a": 3})  # "ccd"
    assert res[0].finished and res[0].stop_string == "cd"


def test_row_full_ends_with_length() -> None:
    s = make(row_len=4)
    s.add("a", [1, 2, 3], SamplingParams(max_tokens=10, temperature=0))
    res = s.update(s.schedule(), {"a": 5})  # 4 tokens: position 3 still fits
    assert not res[0].finished
    res = s.update(s.schedule(), {"a": 6})  # 5 tokens: the next feed would not fit
    assert res[0].finished and res[0].finish_reason == "length"


def test_refusals() -> None:
    s = make()
    with pytest.raises(ContextTooLong):
        s.add("a", [1] * 65, P)
    with pytest.raises(KVCacheFull):
        s.add("a", [1] * 33, P)
    with pytest.raises(InvalidParameter):
        s.add("a", [1], SamplingParams(top_p=1.5))
    with pytest.raises(InvalidParameter):
        s.add("a", [1], SamplingParams(stop_token_ids=(100,)))
    assert not s.has_work()
