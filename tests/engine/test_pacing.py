"""Paced forward passes: never faster than the cost model's time, never changing the tokens."""

from __future__ import annotations

import time

import pytest

from services.executor.config import ExecutorConfig
from shared.costmodel import parse_pace, step_seconds
from shared.engine import Engine, SamplingParams
from shared.engine.engine import run_to_completion
from shared.engine.pacing import StepPacer
from shared.errors import ConfigError
from tests.engine.conftest import Checkpoint, hf_greedy, random_prompt


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_pacer_waits_out_the_difference_and_counts_shortfalls() -> None:
    pace = parse_pace("h100:llama-2-7b")
    fake = FakeClock()
    pacer = StepPacer(pace, model_layers=4, clock=fake.clock, sleep=fake.sleep)
    target = step_seconds(pace, [(0, 100)])
    fake.now = 0.001  # the real compute took 1 ms
    assert pacer.finish(0.0, [(0, 100)], 0, 4) == pytest.approx(target - 0.001)
    assert fake.now == pytest.approx(target)
    fake.now = 10.0  # far slower than the target: no wait, counted as behind
    assert pacer.finish(0.0, [(0, 100)], 0, 4) == 0.0
    snap = pacer.snapshot()
    assert snap["pace"] == "h100:llama-2-7b" and snap["paced_passes"] == 2
    assert snap["paced_passes_behind"] == 1
    assert snap["paced_behind_s"] == pytest.approx(10.0 - target, rel=1e-6)


def test_a_stage_of_the_tiny_model_costs_its_share_of_the_target() -> None:
    pacer = StepPacer(parse_pace("a100:llama-2-13b"), model_layers=4)
    assert pacer.target_layers(0, 4) == (0, 40)
    assert pacer.target_layers(0, 2) == (0, 20)
    assert pacer.target_layers(2, 4) == (20, 40)
    assert pacer.target_layers(3, 4) == (30, 40)
    odd = StepPacer(parse_pace("a100:llama-2-7b"), model_layers=3)
    assert odd.target_layers(0, 1) == (0, 11) and odd.target_layers(2, 3) == (21, 32)
    whole = pacer.modelled_seconds([(10, 1)], 0, 4)
    half = pacer.modelled_seconds([(10, 1)], 2, 4)
    assert half < whole


def test_a_paced_engine_takes_the_modelled_time_and_the_same_tokens(llama: Checkpoint) -> None:
    pace = parse_pace("a100:llama-2-13b")  # ~19 ms a decode step: far above the tiny's compute
    pacer = StepPacer(pace, llama.config.num_layers)
    engine = Engine(llama.config, llama.weights, device="cpu", kv_budget_bytes=1 << 22,
                    pacer=pacer)
    prompt = random_prompt(9, 5)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add_request("r", prompt, params)
    started = time.perf_counter()
    tokens = run_to_completion(engine)["r"]
    elapsed = time.perf_counter() - started
    assert tokens == hf_greedy(llama, prompt, 12)
    modelled = step_seconds(pace, [(0, 9)]) + sum(step_seconds(pace, [(9 + i, 1)])
                                                  for i in range(11))
    snap = pacer.snapshot()
    assert snap["paced_passes"] == 12
    assert snap["paced_modelled_s"] == pytest.approx(modelled, rel=1e-4)
    assert elapsed >= modelled  # never faster than the GPU it imitates
    waited = snap["paced_waited_s"]
    assert isinstance(waited, float) and waited > 0


def test_executor_refuses_a_bad_pace_by_name() -> None:
    with pytest.raises(ConfigError, match="pace"):
        ExecutorConfig(pace="h100:llama-9000").validate()
    ExecutorConfig(pace="h100:llama-2-7b").validate()
