"""A discrete-event simulation of the whole platform, deciding with the services' own cores.

``python -m loadgen sim`` replays a trace against a simulated cluster of any size. Every
decision is made by the function the services run (imported, never copied): the router's
routing table and pipeline builder (:mod:`services.router.routing`,
:mod:`services.router.pipeline`), the executor's batch scheduler (:mod:`shared.engine.scheduler`),
the scaler's policy, reconcile and placement (:mod:`services.scaler.policy`, ``reconcile``,
``placement``), the multicast planner and its driver's edge rule
(:mod:`services.transfer.planner`), the store's block layout (:func:`shared.model.layout.split_layers`).
Time comes from models: engine steps from :mod:`shared.costmodel` (what paces the emulated
cluster's executors), bytes from the link, disk and host-memory rates of the cluster profile.

Modules: :mod:`.events` (the event heap), :mod:`.config` (cluster, models, modes),
:mod:`.engine` (an executor's batched engine), :mod:`.platform` (router, executors, loading,
scaler), :mod:`.report` (the bench-e2e fields, CSV and plots), :mod:`.validate` (against
measured bench-e2e JSON), :mod:`.cli` (the command). Nothing here does I/O but the CLI and
the report writer; no asyncio, no NATS, no service shell.
"""
