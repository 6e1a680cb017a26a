"""The autoscaling policy: a pure function from load to a desired instance count.

In the Ray Serve style, :func:`decide` takes the deployment spec, a load snapshot, the
policy's own state and the time, and returns a :class:`Decision` and the next state. It does
no I/O and keeps no hidden state, so tests and the simulator drive it directly.

The rule:

* demand ``wanted = ceil(outstanding / target_concurrency)``, where outstanding counts the
  requests queued at the router for the model plus those queued or running on its instances;
  any queued request therefore wants at least one instance (scale from zero);
* scale **out** at once: desired rises to ``min(wanted, max_instances)`` in one step;
* scale **in** only after keep-alive: desired is the largest demand that held during the
  last ``keep_alive_s`` seconds (a sample's demand holds until the next sample), so an
  instance is removed only once demand has stayed below the current count for that long
  (``min_instances = 0`` lets it reach zero);
* always within ``[min_instances, max_instances]``, including right after the spec changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction

from services.scaler.deployment import DeploymentSpec
from shared.errors import InvalidParameter
from shared.messages import LoadReport


@dataclass(frozen=True)
class InstanceLoad:
    """Requests on one instance (one executor serving the model)."""

    instance_id: str
    running: int = 0
    queued: int = 0

    def __post_init__(self) -> None:
        if self.running < 0 or self.queued < 0:
            raise InvalidParameter(
                f"instance {self.instance_id}: request counts must be >= 0", field="load"
            )

    @property
    def outstanding(self) -> int:
        return self.running + self.queued


@dataclass(frozen=True)
class ModelLoad:
    """Requests for one model: queued at the router (no instance yet) and per instance."""

    queued: int = 0
    instances: tuple[InstanceLoad, ...] = ()
    # Requests running, each counted once (None: the sum over instances). A request in a
    # pipeline is outstanding on every stage's executor, but it is one request of demand.
    requests_running: int | None = None

    def __post_init__(self) -> None:
        if self.queued < 0:
            raise InvalidParameter(f"queued must be >= 0, got {self.queued}", field="queued")
        if self.requests_running is not None and self.requests_running < 0:
            raise InvalidParameter(f"requests_running must be >= 0, got "
                                   f"{self.requests_running}", field="requests_running")

    @property
    def running(self) -> int:
        if self.requests_running is not None:
            return self.requests_running
        return sum(i.running for i in self.instances)

    @property
    def outstanding(self) -> int:
        return self.queued + self.running + sum(i.queued for i in self.instances)


@dataclass(frozen=True)
class LoadSnapshot:
    """The router's view of load at ``time``: per model (keyed by model name)."""

    time: float = 0.0
    models: Mapping[str, ModelLoad] = field(default_factory=dict)

    def for_model(self, model: str) -> ModelLoad:
        # A model the router has not reported has no requests anywhere.
        return self.models.get(model, ModelLoad())


UNATTRIBUTED = ""  # instance id for running requests a router counted but did not attribute


def snapshot_from_reports(
    reports: Sequence[LoadReport], now: float, max_age_s: float = 5.0
) -> LoadSnapshot:
    """Merge the routers' latest :class:`~shared.messages.LoadReport` s (one per router) into
    one snapshot, skipping reports older than ``max_age_s``: a router that went silent must
    not hold instances up forever. Several routers' counts for one model add up."""
    queued: dict[str, int] = {}
    running: dict[str, int] = {}
    per_instance: dict[str, dict[str, int]] = {}
    for report in reports:
        if now - report.time > max_age_s:
            continue
        for model, n in report.queued.items():
            queued[model] = queued.get(model, 0) + max(0, int(n))
        for model, n in report.running.items():
            running[model] = running.get(model, 0) + max(0, int(n))
        for model, loads in report.per_instance.items():
            slot = per_instance.setdefault(model, {})
            for instance_id, n in loads.items():
                slot[instance_id] = slot.get(instance_id, 0) + max(0, int(n))
    models: dict[str, ModelLoad] = {}
    for model in sorted(set(queued) | set(running) | set(per_instance)):
        loads = per_instance.get(model, {})
        instances = [InstanceLoad(i, running=n) for i, n in sorted(loads.items())]
        # Running requests not attributed to an instance still count as outstanding work.
        remainder = running.get(model, 0) - sum(loads.values())
        if remainder > 0:
            instances.append(InstanceLoad(UNATTRIBUTED, running=remainder))
        # The routers' running counts are requests; per-instance figures count a pipeline's
        # request once per stage, so they only attribute load, never add demand.
        models[model] = ModelLoad(queued=queued.get(model, 0), instances=tuple(instances),
                                  requests_running=running.get(model))
    return LoadSnapshot(time=now, models=models)


class Reason(StrEnum):
    """Why the desired count is what it is (also the ``reason`` of the scale event)."""

    SCALE_FROM_ZERO = "scale_from_zero"  # 0 -> n because requests are queued
    SCALE_OUT = "scale_out"  # demand per instance exceeded the target
    SCALE_IN = "scale_in"  # demand stayed lower for keep-alive seconds
    SCALE_TO_ZERO = "scale_to_zero"  # idle for keep-alive seconds, min_instances = 0
    MAX_CAP = "max_cap"  # demand wants more than max_instances
    MIN_FLOOR = "min_floor"  # demand wants fewer than min_instances
    KEEP_ALIVE = "keep_alive"  # demand is lower, but not for long enough yet
    HOLD = "hold"  # demand matches the current count


@dataclass(frozen=True)
class PolicyState:
    """What :func:`decide` remembers between calls (one per deployment).

    ``window`` holds (until, demand) pairs: each demand seen and the last time it was known
    to hold, for the last keep-alive seconds. It is a monotone queue: demands strictly
    decrease from front to back, so the front is the window's maximum and the queue never
    holds more than ``max_instances + 1`` entries.
    """

    desired: int = 0
    last_busy: float | None = None  # last time any request was outstanding
    window: tuple[tuple[float, int], ...] = ()
    last_time: float | None = None

    def idle_for(self, now: float) -> float | None:
        """Seconds since the model last had outstanding work (None: never had any)."""
        return None if self.last_busy is None else max(0.0, now - self.last_busy)


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one deployment at one time."""

    deployment: str
    model: str
    desired: int
    previous: int
    reason: Reason
    outstanding: int
    wanted: int  # ceil(outstanding / target), before the min/max bounds
    time: float

    @property
    def delta(self) -> int:
        return self.desired - self.previous

    @property
    def changed(self) -> bool:
        return self.desired != self.previous


def instances_wanted(outstanding: int, target_concurrency: float) -> int:
    """ceil(outstanding / target), computed exactly: ``7 / 0.7`` must give 10, not 11."""
    if outstanding <= 0:
        return 0
    # repr() of a float is its shortest decimal form, which is what the operator typed.
    target = Fraction(repr(float(target_concurrency)))
    return math.ceil(Fraction(outstanding) / target)


def decide(
    spec: DeploymentSpec, load: LoadSnapshot, state: PolicyState, now: float
) -> tuple[Decision, PolicyState]:
    """Compute the desired instance count for ``spec`` from ``load`` at time ``now``."""
    # A clock that steps back must not resurrect expired samples or expire fresh ones early.
    if state.last_time is not None and now < state.last_time:
        now = state.last_time
    model_load = load.for_model(spec.model)
    outstanding = model_load.outstanding
    wanted = instances_wanted(outstanding, spec.target_concurrency)
    # Demand is capped at max before it enters the window: it bounds the window's size, and
    # demand above max cannot be served anyway.
    sample = min(wanted, spec.max_instances)

    # A sample's demand holds until the next sample shows otherwise, so the latest entry's
    # demand is known to have lasted until now: that, not when it was first seen, is what
    # keep-alive counts from.
    window = list(state.window)
    if window:
        window[-1] = (now, window[-1][1])
    horizon = now - spec.keep_alive_s
    window = [(until, d) for (until, d) in window if until > horizon]
    while window and window[-1][1] <= sample:
        window.pop()
    window.append((now, sample))
    peak = window[0][1]
    desired = min(max(peak, spec.min_instances), spec.max_instances)

    previous = state.desired
    reason = _reason(spec, previous, desired, wanted)
    last_busy = now if outstanding > 0 else state.last_busy
    new_state = PolicyState(
        desired=desired, last_busy=last_busy, window=tuple(window), last_time=now
    )
    decision = Decision(
        deployment=spec.name,
        model=spec.model,
        desired=desired,
        previous=previous,
        reason=reason,
        outstanding=outstanding,
        wanted=wanted,
        time=now,
    )
    return decision, new_state


def _reason(spec: DeploymentSpec, previous: int, desired: int, wanted: int) -> Reason:
    if desired > previous:
        if wanted > spec.max_instances:
            return Reason.MAX_CAP
        if wanted < desired and desired == spec.min_instances:
            return Reason.MIN_FLOOR  # raised to a new (or newly applied) floor
        return Reason.SCALE_FROM_ZERO if previous == 0 else Reason.SCALE_OUT
    if desired < previous:
        if previous > spec.max_instances and desired == spec.max_instances:
            return Reason.MAX_CAP  # the spec's max was lowered below the current count
        return Reason.SCALE_TO_ZERO if desired == 0 else Reason.SCALE_IN
    if wanted > spec.max_instances:
        return Reason.MAX_CAP
    if wanted < desired:
        return Reason.MIN_FLOOR if desired == spec.min_instances else Reason.KEEP_ALIVE
    return Reason.HOLD
