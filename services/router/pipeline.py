"""Pipeline builder: execution pipelines from partial copies of a model (pure, no I/O).

During a multicast every executor holds some of a model's layers — not necessarily contiguous
ones, because blocks arrive in rotated order. Together the executors often hold the whole
model long before any one of them does. This module turns a readiness snapshot into a
:class:`PipelinePlan`:

* **local instances** — executors holding every layer; they serve requests alone;
* **pipelines** — sequences of distinct (non-local) executors, each *stage* serving one
  contiguous half-open layer range ``[start, stop)`` inside one run of that executor's ready
  layers, the stages covering ``0 .. num_layers-1`` exactly once and in order. Pipelines of
  one plan share no executor, so each can run its own requests.

How a pipeline is found
    A stage that starts at layer ``p`` on executor ``e`` can always be stretched to the end of
    ``e``'s ready run containing ``p`` (the next stages just start later), so a search only
    needs to consider "jump from ``p`` to the end of ``e``'s run". With one run per executor,
    taking the farthest jump each time (max-prefix greedy) is optimal. An executor with several
    runs can be used only once per pipeline, and there greedy can fail (it spends the executor
    early where it was needed later), so the search is a breadth-first search over
    ``(position, executors already spent that could still matter)`` with candidates ordered
    farthest-first, then least loaded, then by id. It finds a fewest-stage pipeline whenever
    one exists; it is bounded by ``max_search_states`` (never a hang), which only large,
    adversarial layouts reach.

Balancing
    The chosen stages fix which executor serves which part; cut points between consecutive
    stages can move anywhere inside their overlap. The cuts are then chosen to minimise the
    largest stage (a pipeline runs at the pace of its slowest stage) with the smallest such
    maximum found by binary search and a left-to-right feasibility sweep; among equal maxima
    the sweep is deterministic. Load does not move cut points: load changes every few
    milliseconds and re-cutting pipelines that often would only churn them.

Several pipelines
    After one pipeline is found its executors are removed and the search repeats on the rest,
    until no pipeline can be formed. Fewest-stage pipelines use the fewest executors, which
    leaves the most for further pipelines (a heuristic, not a maximum packing).

:func:`diff_plans` says what a readiness change means for pipelines already in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shared.errors import InvalidParameter
from shared.messages import Stage

__all__ = ["Pipeline", "PipelinePlan", "PlanDiff", "Stage", "build_plan", "diff_plans"]

LayerSpec = Iterable[int | range | tuple[int, int]]
"""Ready layers of one executor: layer indices, ``range`` objects, or ``(start, stop)`` pairs."""

DEFAULT_MAX_SEARCH_STATES = 50_000


@dataclass(frozen=True)
class Pipeline:
    """Stages in execution order; stage ``i`` feeds stage ``i+1``."""

    stages: tuple[Stage, ...]

    @property
    def pipeline_id(self) -> str:
        """Stable identity: the same stages give the same id in every plan."""
        return "+".join(str(s) for s in self.stages)

    @property
    def executors(self) -> tuple[str, ...]:
        return tuple(s.executor_id for s in self.stages)

    @property
    def max_stage_layers(self) -> int:
        return max(s.num_layers for s in self.stages)

    def __len__(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class PipelinePlan:
    """Everything one readiness snapshot of one model allows."""

    num_layers: int
    local: tuple[str, ...] = ()
    pipelines: tuple[Pipeline, ...] = ()

    @property
    def pipeline_ids(self) -> frozenset[str]:
        return frozenset(p.pipeline_id for p in self.pipelines)

    def pipeline(self, pipeline_id: str) -> Pipeline | None:
        for p in self.pipelines:
            if p.pipeline_id == pipeline_id:
                return p
        return None


@dataclass(frozen=True)
class PlanDiff:
    """What changed between two plans of one model.

    ``broken`` pipelines can no longer run (a stage's layers are gone, e.g. its executor
    failed or released the model): requests on them must be re-dispatched. ``retired``
    pipelines still run but are not in the new plan (typically an executor became local):
    requests on them may finish there, new requests go elsewhere.
    """

    added: frozenset[str] = frozenset()
    kept: frozenset[str] = frozenset()
    retired: frozenset[str] = frozenset()
    broken: frozenset[str] = frozenset()
    local_added: frozenset[str] = frozenset()
    local_removed: frozenset[str] = frozenset()

    @property
    def affected(self) -> frozenset[str]:
        """Ids of previous routes (pipelines and local instances) that changed."""
        return self.retired | self.broken | self.local_removed


def normalize_layers(spec: LayerSpec, num_layers: int) -> frozenset[int]:
    """Turn indices / ranges / (start, stop) pairs into a set, rejecting out-of-range layers."""
    out: set[int] = set()
    for item in spec:
        if isinstance(item, range):
            layers: Iterable[int] = item
        elif isinstance(item, tuple):
            if len(item) != 2:
                raise InvalidParameter(f"a layer range must be (start, stop), got {item!r}")
            layers = range(item[0], item[1])
        else:
            layers = (item,)
        for layer in layers:
            if not 0 <= layer < num_layers:
                raise InvalidParameter(
                    f"layer {layer} outside the model's layers 0..{num_layers - 1}"
                )
            out.add(layer)
    return frozenset(out)


def runs_of(layers: Iterable[int]) -> tuple[range, ...]:
    """Maximal runs of consecutive layers, in order: {0,1,2,5,6} -> (range(0,3), range(5,7))."""
    runs: list[range] = []
    start: int | None = None
    prev = -2
    for layer in sorted(set(layers)):
        if layer != prev + 1:
            if start is not None:
                runs.append(range(start, prev + 1))
            start = layer
        prev = layer
    if start is not None:
        runs.append(range(start, prev + 1))
    return tuple(runs)


@dataclass
class _Candidate:
    executor_id: str
    runs: tuple[range, ...]
    load: float
    multi_run: bool = field(init=False)

    def __post_init__(self) -> None:
        self.multi_run = len(self.runs) > 1

    def reach_from(self, position: int) -> int | None:
        """End of this executor's run containing ``position``, or None."""
        for run in self.runs:
            if run.start <= position < run.stop:
                return run.stop
        return None

    def run_at(self, position: int) -> range:
        for run in self.runs:
            if run.start <= position < run.stop:
                return run
        raise AssertionError(f"{self.executor_id} holds no layer {position}")

    def matters_after(self, position: int) -> bool:
        return any(run.stop > position for run in self.runs)


def build_plan(
    num_layers: int,
    ready: Mapping[str, LayerSpec],
    load: Mapping[str, float] | None = None,
    *,
    max_search_states: int = DEFAULT_MAX_SEARCH_STATES,
) -> PipelinePlan:
    """Local instances and disjoint pipelines for one model, deterministically.

    ``ready`` maps executor id to its ready layers; ``load`` (optional) breaks ties between
    equally good executors in favour of the less loaded one.
    """
    if num_layers <= 0:
        raise InvalidParameter(f"num_layers must be positive, got {num_layers}")
    loads = load or {}
    sets = {eid: normalize_layers(spec, num_layers) for eid, spec in ready.items()}
    local = tuple(sorted(eid for eid, s in sets.items() if len(s) == num_layers))
    candidates = {
        eid: _Candidate(eid, runs_of(s), float(loads.get(eid, 0.0)))
        for eid, s in sets.items()
        if s and len(s) < num_layers
    }
    pipelines: list[Pipeline] = []
    while candidates:
        found = _fewest_stage_route(num_layers, candidates, max_search_states)
        if found is None:
            break
        pipeline = _balance(num_layers, [(c.executor_id, c.run_at(p)) for c, p in found])
        pipelines.append(pipeline)
        for eid in pipeline.executors:
            del candidates[eid]
    return PipelinePlan(num_layers=num_layers, local=local, pipelines=tuple(pipelines))


def _fewest_stage_route(
    num_layers: int, candidates: Mapping[str, _Candidate], max_states: int
) -> list[tuple[_Candidate, int]] | None:
    """Breadth-first search for a fewest-stage chain; returns (executor, start) per stage."""
    # Who can continue from each position, best first: farthest reach, then load, then id.
    by_position: dict[int, list[tuple[_Candidate, int]]] = {}
    for position in range(num_layers):
        options = []
        for cand in candidates.values():
            reach = cand.reach_from(position)
            if reach is not None:
                options.append((cand, reach))
        options.sort(key=lambda o: (-o[1], o[0].load, o[0].executor_id))
        by_position[position] = options

    State = tuple[int, frozenset[str]]
    start: State = (0, frozenset())
    parent: dict[State, tuple[State, _Candidate] | None] = {start: None}
    frontier: list[State] = [start]
    while frontier:
        next_frontier: list[State] = []
        for state in frontier:
            position, spent = state
            for cand, reach in by_position[position]:
                if cand.executor_id in spent:
                    continue
                # Only multi-run executors can be wanted again later; remembering just those
                # keeps the state space small (one-run executors are behind us for good).
                now_spent = frozenset(
                    e for e in (*spent, cand.executor_id)
                    if candidates[e].multi_run and candidates[e].matters_after(reach)
                )
                nxt: State = (reach, now_spent)
                if nxt in parent:
                    continue
                parent[nxt] = (state, cand)
                if reach == num_layers:
                    return _unwind(parent, nxt)
                if len(parent) >= max_states:
                    return None
                next_frontier.append(nxt)
        frontier = next_frontier
    return None


_State = tuple[int, frozenset[str]]


def _unwind(
    parent: Mapping[_State, tuple[_State, _Candidate] | None], end: _State
) -> list[tuple[_Candidate, int]]:
    chain: list[tuple[_Candidate, int]] = []
    state = end
    link = parent[state]
    while link is not None:
        prev, cand = link
        chain.append((cand, prev[0]))
        state = prev
        link = parent[state]
    chain.reverse()
    return chain


def _balance(num_layers: int, stages: list[tuple[str, range]]) -> Pipeline:
    """Place the cut points so that the largest stage is as small as possible.

    ``stages[i] = (executor, run)``: stage ``i`` must lie inside ``run``. Stage ``i`` covers
    ``[cut[i], cut[i+1])`` with ``cut[0] = 0`` and ``cut[k] = num_layers``.
    """

    def cuts_for(limit: int) -> list[int] | None:
        cuts = [0]
        for i, (_, run) in enumerate(stages):
            lo = cuts[-1]
            if i == len(stages) - 1:
                hi = num_layers
                if hi > run.stop or hi - lo > limit or hi <= lo:
                    return None
            else:
                hi = min(run.stop, lo + limit)
                next_run = stages[i + 1][1]
                # The next stage must start inside its own run, and every stage is non-empty.
                if hi < next_run.start or hi <= lo:
                    return None
            cuts.append(hi)
        return cuts

    low, high = 1, num_layers
    best = cuts_for(high)
    if best is None:
        raise AssertionError(f"stages {stages} do not cover {num_layers} layers")
    while low < high:
        mid = (low + high) // 2
        attempt = cuts_for(mid)
        if attempt is None:
            low = mid + 1
        else:
            best, high = attempt, mid
    return Pipeline(
        tuple(Stage(eid, best[i], best[i + 1]) for i, (eid, _) in enumerate(stages))
    )


def pipeline_still_runs(
    pipeline: Pipeline, ready: Mapping[str, LayerSpec], num_layers: int
) -> bool:
    """True while every stage's layers are still ready on its executor."""
    for stage in pipeline.stages:
        spec = ready.get(stage.executor_id)
        if spec is None:
            return False
        held = normalize_layers(spec, num_layers)
        if not all(layer in held for layer in range(stage.start, stage.stop)):
            return False
    return True


def diff_plans(
    old: PipelinePlan, new: PipelinePlan, ready: Mapping[str, LayerSpec]
) -> PlanDiff:
    """Classify the old plan's routes against the new plan and the current readiness."""
    old_ids = {p.pipeline_id: p for p in old.pipelines}
    new_ids = new.pipeline_ids
    retired: set[str] = set()
    broken: set[str] = set()
    for pid, pipeline in old_ids.items():
        if pid in new_ids:
            continue
        if pipeline_still_runs(pipeline, ready, new.num_layers):
            retired.add(pid)
        else:
            broken.add(pid)
    return PlanDiff(
        added=frozenset(new_ids - old_ids.keys()),
        kept=frozenset(new_ids & old_ids.keys()),
        retired=frozenset(retired),
        broken=frozenset(broken),
        local_added=frozenset(set(new.local) - set(old.local)),
        local_removed=frozenset(set(old.local) - set(new.local)),
    )
