"""The executor's inference engine: model runner, KV cache, scheduler, sampling, stages."""

from __future__ import annotations

from shared.engine.engine import Engine, EngineStats, run_to_completion
from shared.engine.runner import Chunk, ModelRunner, pick_device
from shared.engine.sampling import SampledToken, SamplingParams, TokenLogprobs, TokenSampler
from shared.engine.scheduler import Scheduler, SchedulerOutput, StepOutput
from shared.engine.stage import LastStage, Stage

__all__ = [
    "Chunk",
    "Engine",
    "EngineStats",
    "LastStage",
    "ModelRunner",
    "SampledToken",
    "SamplingParams",
    "Scheduler",
    "SchedulerOutput",
    "Stage",
    "StepOutput",
    "TokenLogprobs",
    "TokenSampler",
    "pick_device",
    "run_to_completion",
]
