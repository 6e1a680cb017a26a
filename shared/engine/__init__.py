"""The executor's inference engine: model runner, KV cache, scheduler, sampling."""

from __future__ import annotations

from shared.engine.engine import Engine, EngineStats, run_to_completion
from shared.engine.runner import Chunk, ModelRunner, pick_device
from shared.engine.sampling import SampledToken, SamplingParams, TokenLogprobs, TokenSampler
from shared.engine.scheduler import Scheduler, SchedulerOutput, StepOutput

__all__ = [
    "Chunk",
    "Engine",
    "EngineStats",
    "ModelRunner",
    "SampledToken",
    "SamplingParams",
    "Scheduler",
    "SchedulerOutput",
    "StepOutput",
    "TokenLogprobs",
    "TokenSampler",
    "pick_device",
    "run_to_completion",
]
