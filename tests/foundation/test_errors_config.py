from __future__ import annotations

import pytest

from shared import errors
from shared.config import ServiceConfig, load_config
from shared.errors import ConfigError, ModelNotFound, RemoteError, error_from_wire


def test_every_error_code_is_unique_and_documented_in_the_tree() -> None:
    seen: dict[str, type] = {}
    doc = errors.__doc__ or ""
    for cls in errors._all_subclasses(errors.LScaleError):
        assert cls.code not in seen, f"{cls.__name__} reuses code {cls.code} of {seen[cls.code]}"
        seen[cls.code] = cls
        assert cls.__name__ in doc, f"{cls.__name__} missing from the tree in the docstring"


def test_errors_rebuild_as_the_same_class() -> None:
    err = ModelNotFound("no model 'x'", model="x")
    back = error_from_wire(err.to_wire())
    assert type(back) is ModelNotFound
    assert back.message == "no model 'x'" and back.details == {"model": "x"}
    assert str(back) == "[model_not_found] no model 'x'"


def test_unknown_code_becomes_remote_error_keeping_the_code() -> None:
    back = error_from_wire({"code": "brand_new", "message": "m"})
    assert isinstance(back, RemoteError) and back.remote_code == "brand_new"


def test_config_precedence_flag_over_env_over_default() -> None:
    env = {"LSCALE_NATS_URL": "nats://10.0.0.1:4222", "LSCALE_METRICS_INTERVAL_S": "2.5"}
    cfg = load_config(ServiceConfig, ["--nats-url", "nats://127.0.0.1:1"], env)
    assert cfg.nats_url == "nats://127.0.0.1:1"
    assert cfg.metrics_interval_s == 2.5
    assert cfg.instance_id  # generated


@pytest.mark.parametrize(
    "env, setting",
    [
        ({"LSCALE_METRICS_INTERVAL_S": "fast"}, "metrics_interval_s"),
        ({"LSCALE_METRICS_INTERVAL_S": "-1"}, "metrics_interval_s"),
        ({"LSCALE_NATS_URL": "http://x"}, "nats_url"),
        ({"LSCALE_LOG_LEVEL": "loud"}, "log_level"),
    ],
)
def test_invalid_settings_fail_naming_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ServiceConfig, [], env)
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_logging_follows_sys_stderr_when_it_is_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sys

    import structlog

    from shared.log import setup_logging

    setup_logging(service="t", fmt="json")
    first = io.StringIO()
    sys.stderr, saved = first, sys.stderr
    try:
        structlog.get_logger().warning("one")
        first.close()  # what pytest does to a capture it is finished with
        second = io.StringIO()
        sys.stderr = second
        structlog.get_logger().warning("two")  # must not raise on the closed stream
    finally:
        sys.stderr = saved
    assert '"event": "two"' in second.getvalue()
