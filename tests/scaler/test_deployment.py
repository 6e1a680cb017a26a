from __future__ import annotations

import msgpack
import pytest

from services.scaler.deployment import DeploymentSpec, kv_key
from shared.errors import InvalidParameter


def test_defaults_are_valid_and_scale_to_zero() -> None:
    spec = DeploymentSpec(name="tiny", model="tiny-llama")
    assert spec.min_instances == 0
    assert spec.max_instances >= 1
    assert spec.kv_key == "deployment.tiny" == kv_key("tiny")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_instances": 3, "max_instances": 2}, "min_instances"),
        ({"max_instances": 0}, "max_instances"),
        ({"min_instances": -1}, "min_instances"),
        ({"target_concurrency": 0}, "target_concurrency"),
        ({"target_concurrency": -2.5}, "target_concurrency"),
        ({"target_concurrency": float("nan")}, "target_concurrency"),
        ({"keep_alive_s": -0.1}, "keep_alive_s"),
        ({"keep_alive_s": float("inf")}, "keep_alive_s"),
        ({"min_instances": 1.5}, "min_instances"),
        ({"max_instances": True}, "max_instances"),
        ({"name": ""}, "name"),
        ({"name": "a.b"}, "name"),
        ({"name": "has space"}, "name"),
        ({"model": " "}, "model"),
    ],
)
def test_invalid_specs_name_the_field(kwargs: dict[str, object], field: str) -> None:
    base: dict[str, object] = {"name": "d", "model": "m", "max_instances": 4}
    with pytest.raises(InvalidParameter) as info:
        DeploymentSpec(**{**base, **kwargs})  # type: ignore[arg-type]
    assert info.value.details["field"] == field
    assert str(info.value).startswith(f"[invalid_parameter] {field}:")


def test_min_equal_max_and_keep_alive_zero_are_allowed() -> None:
    spec = DeploymentSpec(name="d", model="m", min_instances=2, max_instances=2, keep_alive_s=0)
    assert spec.min_instances == spec.max_instances == 2


def test_round_trip_through_msgpack_like_the_kv_bucket() -> None:
    spec = DeploymentSpec(
        name="llama-7b", model="llama-2-7b", min_instances=1, max_instances=8,
        target_concurrency=2.5, keep_alive_s=30.0,
    )
    raw = msgpack.unpackb(msgpack.packb(spec.to_dict()))
    assert DeploymentSpec.from_dict(raw) == spec


def test_from_dict_ignores_unknown_fields_and_coerces_ints() -> None:
    raw = {"name": "d", "model": "m", "max_instances": 3, "target_concurrency": 2,
           "keep_alive_s": 5, "added_in_v2": "whatever"}
    spec = DeploymentSpec.from_dict(raw)
    assert spec.target_concurrency == 2.0 and isinstance(spec.target_concurrency, float)
    assert spec.keep_alive_s == 5.0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model": "m"}, "name"),
        ({"name": "d"}, "model"),
        ([1, 2], "deployment"),
        ({"name": "d", "model": "m", "max_instances": "4"}, "max_instances"),
    ],
)
def test_from_dict_rejects_bad_maps(raw: object, field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        DeploymentSpec.from_dict(raw)
    assert info.value.details["field"] == field
