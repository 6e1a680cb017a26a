from __future__ import annotations

import dataclasses

from services.transfer.merge import RunningMulticast, transfer_to_join, why_not_join
from shared.messages import StartTransfer, replace

RUNNING = RunningMulticast(transfer_id="t1", model="m", sources=frozenset({"store"}),
                           nodes=frozenset({"store", "e0"}), strategy="lambdapipe",
                           num_blocks=4, parts=2)


def _req(**kw: object) -> StartTransfer:
    base = StartTransfer(model="m", sources=["store"], receivers=["e1", "e2"],
                         # merge never reads a region: empty maps stand in for descriptors
                         regions={"e1": {}, "e2": {}},  # type: ignore[dict-item]
                         num_blocks=4, parts=2)
    return replace(base, **kw)


def test_same_model_same_store_source_joins() -> None:
    assert why_not_join(RUNNING, _req()) is None
    assert transfer_to_join([RUNNING], _req()) == "t1"


def test_a_subset_of_the_running_sources_joins() -> None:
    two = dataclasses.replace(RUNNING, sources=frozenset({"store", "g0"}),
                              nodes=frozenset({"store", "g0", "e0"}))
    assert why_not_join(two, _req(sources=["g0"])) is None


def test_unsafe_requests_start_their_own() -> None:
    cases = {
        "another model": _req(model="other"),
        "sources the running transfer does not use": _req(sources=["g0"]),
        "more sources": _req(sources=["store", "g0"]),
        "different chunking": _req(parts=4),
        "a baseline strategy": _req(strategy="pull_from_store"),
        "its own transfer id": _req(transfer_id="mine"),
        "a receiver already in it": _req(receivers=["e0", "e1"]),
        "a receiver that is its source": _req(receivers=["store"]),
    }
    for name, req in cases.items():
        assert why_not_join(RUNNING, req) is not None, name
        assert transfer_to_join([RUNNING], req) is None, name


def test_a_running_baseline_is_not_joined() -> None:
    pull = dataclasses.replace(RUNNING, strategy="pull_from_store")
    assert transfer_to_join([pull], _req(strategy="pull_from_store")) is None


def test_choice_among_several_is_deterministic() -> None:
    other = dataclasses.replace(RUNNING, transfer_id="t0")
    wider = dataclasses.replace(RUNNING, transfer_id="t9", sources=frozenset({"store", "g0"}))
    assert transfer_to_join([RUNNING, other], _req()) == "t0"
    assert transfer_to_join([other, RUNNING, wider], _req()) == "t9"
    assert transfer_to_join([], _req()) is None
