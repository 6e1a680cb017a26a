"""Routing table and request queues of the router (pure: no I/O, time passed in as ``now``).

Per model the table knows

* the model's readiness (which executor holds which layers) and the :class:`PipelinePlan`
  built from it — local instances and execution pipelines;
* which request runs on which route, and so the *outstanding work* of every executor
  (the number of requests that use it; a request on a pipeline counts on every stage);
* a bounded FIFO queue of requests waiting for a route.

Choosing a route
    Power of two choices: sample two candidate routes with the (injectable, seedable) RNG and
    take the one with less outstanding work (a pipeline's work is that of its busiest stage).
    Local instances are preferred: pipelines become candidates only when there are **too few
    local instances**, defined as *local capacity below outstanding demand*:

        outstanding on local instances + 1 (this request)  >  len(local) * local_target_concurrency

    i.e. every local instance is, on average, at its target concurrency already. Then locals and
    pipelines compete on outstanding work. A route whose work has reached
    ``max_outstanding_per_route`` takes no more requests; with no route left the request waits
    in its model's queue.

Queueing
    ``submit`` places a request at once when its model's queue is empty and a route has room;
    otherwise it joins the queue (FIFO; a full queue refuses with :class:`NoCapacity`). The shell
    calls :meth:`RoutingTable.tick` whenever something changed (a request finished, readiness
    changed) or :meth:`RoutingTable.next_deadline` passed: it returns the requests to dispatch
    now and the ones whose bounded wait ran out (to be failed with ``NoCapacity``).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from services.router.pipeline import (
    LayerSpec,
    Pipeline,
    PipelinePlan,
    PlanDiff,
    build_plan,
    diff_plans,
    normalize_layers,
)
from shared.errors import InvalidParameter, ModelNotFound, NoCapacity


class RouteKind(StrEnum):
    LOCAL = "local"
    PIPELINE = "pipeline"


@dataclass(frozen=True)
class Route:
    """Where a request runs: one local executor, or a pipeline of executors."""

    kind: RouteKind
    executors: tuple[str, ...]
    pipeline: Pipeline | None = None

    @property
    def route_id(self) -> str:
        if self.pipeline is not None:
            return f"pipeline:{self.pipeline.pipeline_id}"
        return f"local:{self.executors[0]}"

    @staticmethod
    def local(executor_id: str) -> Route:
        return Route(RouteKind.LOCAL, (executor_id,))

    @staticmethod
    def of_pipeline(pipeline: Pipeline) -> Route:
        return Route(RouteKind.PIPELINE, pipeline.executors, pipeline)


@dataclass(frozen=True)
class Assignment:
    request_id: str
    model: str
    route: Route


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    model: str
    enqueued_at: float
    deadline: float

    def expiry_error(self) -> NoCapacity:
        return NoCapacity(
            f"no instance of model {self.model!r} became available within "
            f"{self.deadline - self.enqueued_at:.1f} s",
            model=self.model,
            request_id=self.request_id,
        )


@dataclass(frozen=True)
class RoutingPolicy:
    local_target_concurrency: int = 8
    max_outstanding_per_route: int = 64
    queue_limit: int = 256
    queue_wait_s: float = 30.0
    # False: local instances only, no execution pipelines (no execute-while-load); baselines
    pipelines: bool = True

    def __post_init__(self) -> None:
        if self.local_target_concurrency < 1:
            raise InvalidParameter("local_target_concurrency must be at least 1")
        if self.max_outstanding_per_route < 1:
            raise InvalidParameter("max_outstanding_per_route must be at least 1")
        if self.queue_limit < 0:
            raise InvalidParameter("queue_limit must not be negative")
        if self.queue_wait_s < 0:
            raise InvalidParameter("queue_wait_s must not be negative")


@dataclass(frozen=True)
class RouteChange:
    """A readiness change of one model and the requests it touches.

    ``reroute`` requests ran on routes that can no longer run (broken pipelines, executors that
    lost layers); they have been released from the table and must be dispatched again.
    ``draining`` requests run on routes that still work but take no new requests; they may finish.
    """

    model: str
    diff: PlanDiff
    reroute: tuple[Assignment, ...] = ()
    draining: tuple[Assignment, ...] = ()


@dataclass(frozen=True)
class Dispatch:
    dispatched: tuple[Assignment, ...] = ()
    expired: tuple[QueuedRequest, ...] = ()


class ModelQueue:
    """Bounded FIFO of requests waiting for a route, each with a deadline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[QueuedRequest] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: QueuedRequest) -> None:
        if len(self._items) >= self.limit:
            raise NoCapacity(
                f"the queue of model {item.model!r} is full ({self.limit} waiting)",
                model=item.model,
            )
        self._items.append(item)

    def pop(self) -> QueuedRequest:
        return self._items.popleft()

    def remove(self, request_id: str) -> QueuedRequest | None:
        for item in self._items:
            if item.request_id == request_id:
                self._items.remove(item)
                return item
        return None

    def expire(self, now: float) -> list[QueuedRequest]:
        gone = [item for item in self._items if item.deadline <= now]
        if gone:
            self._items = deque(item for item in self._items if item.deadline > now)
        return gone

    def next_deadline(self) -> float | None:
        return min((item.deadline for item in self._items), default=None)


@dataclass
class _ModelState:
    num_layers: int | None = None
    ready: dict[str, frozenset[int]] = field(default_factory=dict)
    plan: PipelinePlan | None = None


class RoutingTable:
    """Routes, outstanding work, and queues of all models. Not thread-safe; no I/O."""

    def __init__(
        self, policy: RoutingPolicy | None = None, rng: random.Random | None = None
    ) -> None:
        self.policy = policy or RoutingPolicy()
        self._rng = rng or random.Random()
        self._models: dict[str, _ModelState] = {}
        self._queues: dict[str, ModelQueue] = {}
        self._assignments: dict[str, Assignment] = {}
        self._work: dict[str, int] = {}  # executor id -> requests using it

    # --- readiness -------------------------------------------------------------------------

    def set_model(self, model: str, num_layers: int) -> RouteChange:
        """Declare (or re-declare) a model's layer count; keeps known readiness."""
        state = self._models.setdefault(model, _ModelState())
        state.num_layers = num_layers
        return self._replan(model)

    def update_readiness(self, model: str, executor_id: str, layers: LayerSpec) -> RouteChange:
        """An executor now holds exactly ``layers`` of ``model`` (empty: none any more)."""
        state = self._models.get(model)
        if state is None or state.num_layers is None:
            raise ModelNotFound(f"model {model!r} has no layer count; call set_model first")
        held = normalize_layers(layers, state.num_layers)
        if held:
            state.ready[executor_id] = held
        else:
            state.ready.pop(executor_id, None)
        return self._replan(model)

    def remove_executor(self, executor_id: str) -> list[RouteChange]:
        """An executor is gone: drop its readiness everywhere."""
        changes = []
        for model, state in self._models.items():
            if executor_id in state.ready:
                del state.ready[executor_id]
                changes.append(self._replan(model))
        return changes

    def plan(self, model: str) -> PipelinePlan | None:
        state = self._models.get(model)
        return state.plan if state else None

    def models(self) -> list[str]:
        return sorted(self._models)

    def _replan(self, model: str) -> RouteChange:
        state = self._models[model]
        assert state.num_layers is not None
        old = state.plan or PipelinePlan(num_layers=state.num_layers)
        new = build_plan(state.num_layers, state.ready, self._work)
        state.plan = new
        diff = diff_plans(old, new, state.ready)
        reroute: list[Assignment] = []
        draining: list[Assignment] = []
        for assignment in list(self._assignments.values()):
            if assignment.model != model:
                continue
            route = assignment.route
            if _route_runs(route, state.ready, state.num_layers):
                if not self._route_in_plan(route, new):
                    draining.append(assignment)
            else:
                self._release(assignment.request_id)
                reroute.append(assignment)
        return RouteChange(model, diff, tuple(reroute), tuple(draining))

    @staticmethod
    def _route_in_plan(route: Route, plan: PipelinePlan) -> bool:
        if route.pipeline is not None:
            return route.pipeline.pipeline_id in plan.pipeline_ids
        return route.executors[0] in plan.local

    # --- choosing and bookkeeping ----------------------------------------------------------

    def route_work(self, route: Route) -> int:
        """Outstanding work of a route: that of its busiest executor."""
        return max(self._work.get(e, 0) for e in route.executors)

    def executor_work(self, executor_id: str) -> int:
        return self._work.get(executor_id, 0)

    def candidates(self, model: str) -> list[Route]:
        """Routes that may take the next request, in a deterministic order."""
        plan = self.plan(model)
        if plan is None:
            return []
        cap = self.policy.max_outstanding_per_route
        locals_ = [Route.local(e) for e in plan.local]
        open_locals = [r for r in locals_ if self.route_work(r) < cap]
        local_work = sum(self._work.get(e, 0) for e in plan.local)
        too_few = local_work + 1 > len(plan.local) * self.policy.local_target_concurrency
        if (not too_few and open_locals) or not self.policy.pipelines:
            return open_locals
        pipelines = [Route.of_pipeline(p) for p in plan.pipelines]
        return open_locals + [r for r in pipelines if self.route_work(r) < cap]

    def choose(self, model: str) -> Route | None:
        """Power of two choices on outstanding work among :meth:`candidates`."""
        options = self.candidates(model)
        if not options:
            return None
        if len(options) == 1:
            return options[0]
        first, second = self._rng.sample(options, 2)
        return second if self.route_work(second) < self.route_work(first) else first

    def assign(self, model: str, request_id: str) -> Assignment:
        """Place a request on a route now, or raise :class:`NoCapacity`."""
        if request_id in self._assignments:
            raise InvalidParameter(f"request {request_id!r} is already assigned")
        route = self.choose(model)
        if route is None:
            raise NoCapacity(f"no instance of model {model!r} can take a request", model=model)
        assignment = Assignment(request_id, model, route)
        self._assignments[request_id] = assignment
        for e in route.executors:
            self._work[e] = self._work.get(e, 0) + 1
        return assignment

    def complete(self, request_id: str) -> Assignment | None:
        """A request finished; frees its route. Unknown ids are ignored (idempotent)."""
        return self._release(request_id)

    def cancel(self, request_id: str) -> Assignment | QueuedRequest | None:
        """Cancel a queued or running request; returns what it was, or None if unknown."""
        for queue in self._queues.values():
            queued = queue.remove(request_id)
            if queued is not None:
                return queued
        return self._release(request_id)

    def assignment(self, request_id: str) -> Assignment | None:
        return self._assignments.get(request_id)

    def requests_on(self, route_id: str) -> list[str]:
        return sorted(r for r, a in self._assignments.items() if a.route.route_id == route_id)

    def outstanding(self, model: str) -> int:
        return sum(1 for a in self._assignments.values() if a.model == model)

    def _release(self, request_id: str) -> Assignment | None:
        assignment = self._assignments.pop(request_id, None)
        if assignment is None:
            return None
        for e in assignment.route.executors:
            left = self._work.get(e, 0) - 1
            if left > 0:
                self._work[e] = left
            else:
                self._work.pop(e, None)
        return assignment

    # --- queue -----------------------------------------------------------------------------

    def submit(
        self, model: str, request_id: str, now: float, wait_s: float | None = None
    ) -> Assignment | None:
        """Assign at once if possible, else queue (returns None). Full queue: NoCapacity."""
        queue = self._queue(model)
        if not queue and self.choose(model) is not None:
            return self.assign(model, request_id)
        wait = self.policy.queue_wait_s if wait_s is None else wait_s
        queue.push(QueuedRequest(request_id, model, now, now + wait))
        return None

    def tick(self, now: float) -> Dispatch:
        """Expire overdue queued requests, then dispatch waiting ones in FIFO order."""
        expired: list[QueuedRequest] = []
        dispatched: list[Assignment] = []
        for model in sorted(self._queues):
            queue = self._queues[model]
            expired.extend(queue.expire(now))
            while queue and self.choose(model) is not None:
                item = queue.pop()
                dispatched.append(self.assign(model, item.request_id))
        return Dispatch(tuple(dispatched), tuple(expired))

    def next_deadline(self) -> float | None:
        deadlines = [d for q in self._queues.values() if (d := q.next_deadline()) is not None]
        return min(deadlines, default=None)

    def queue_depth(self, model: str) -> int:
        queue = self._queues.get(model)
        return len(queue) if queue else 0

    def queued_models(self) -> Iterable[str]:
        return (m for m, q in self._queues.items() if q)

    def _queue(self, model: str) -> ModelQueue:
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = ModelQueue(self.policy.queue_limit)
        return queue


def _route_runs(route: Route, ready: Mapping[str, frozenset[int]], num_layers: int) -> bool:
    if route.pipeline is not None:
        return all(
            (held := ready.get(s.executor_id)) is not None
            and all(layer in held for layer in range(s.start, s.stop))
            for s in route.pipeline.stages
        )
    return len(ready.get(route.executors[0], ())) == num_layers
