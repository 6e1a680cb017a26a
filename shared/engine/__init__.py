"""The executor's inference engine: model runner, KV cache, scheduler, sampling, stages."""

from __future__ import annotations

from shared.engine.engine import Engine, EngineStats, run_to_completion
from shared.engine.runner import Chunk, ModelRunner, pick_device
from shared.engine.sampling import SamplingParams, TokenSampler
from shared.engine.scheduler import Scheduler, SchedulerOutput, StepOutput
from shared.engine.stage import LastStage, Stage

__all__ = [
    "Chunk",
    "Engine",
    "EngineStats",
    "LastStage",
    "ModelRunner",
    "SamplingParams",
    "Scheduler",
    "SchedulerOutput",
    "Stage",
    "StepOutput",
    "TokenSampler",
    "pick_device",
    "run_to_completion",
]
