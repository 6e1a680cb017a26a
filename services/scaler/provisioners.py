"""Provisioners: how the scaler gets (and gives back) executor processes.

A provisioner is anything with the three coroutines of :class:`Provisioner`. Two ship here:

* :class:`LocalProcessProvisioner` (the default) starts ``python -m services.executor --id
  <id>`` child processes on this machine;
* :class:`DockerProvisioner` starts one container per executor through the Docker Engine API
  (the ``docker`` SDK), as the compose setup does.

An existing orchestrator plugs in the same way. For Kubernetes, say, ``start(n)`` creates ``n``
pods (or scales a StatefulSet by ``n``) from an executor pod template whose container runs
``python -m services.executor --id $(POD_NAME)``, labelled so that ``list()`` can select them,
and returns the pod names as executor ids; ``stop(id)`` deletes that pod with a grace period
(the orchestrator's SIGTERM-then-SIGKILL); ``list()`` lists the labelled pods that are
running. The scaler needs nothing else: an executor announces itself on NATS once it is up,
so ``start`` must not wait for readiness, only for the request to be accepted.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from shared.errors import ConfigError, ExecutorNotFound, InvalidParameter, Unavailable
from shared.process import parent_death_hook

EXECUTOR_ID_ENV = "LSCALE_EXECUTOR_ID"

DEFAULT_LOCAL_COMMAND: tuple[str, ...] = (
    "{python}",
    "-m",
    "services.executor",
    "--instance-id",
    "{executor_id}",
)

LABEL_ROLE = "lscale.role"
LABEL_OWNER = "lscale.owner"
LABEL_EXECUTOR_ID = "lscale.executor-id"


@runtime_checkable
class Provisioner(Protocol):
    """Starts and stops executors. Ids are strings the executor also uses on NATS."""

    async def start(self, n: int) -> builtins.list[str]:
        """Start ``n`` executors; return their ids (without waiting for them to be ready)."""
        ...

    async def stop(self, executor_id: str) -> None:
        """Stop one executor: ask it to exit, force it after a timeout."""
        ...

    async def list(self) -> builtins.list[str]:
        """The ids of the executors this provisioner started that are still running."""
        ...


def new_executor_id(prefix: str) -> str:
    # Random, not a counter: ids must not repeat across scaler restarts.
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def parse_pairs(setting: str, text: str) -> dict[str, str]:
    """``NAME=VALUE,NAME=VALUE`` (a setting's value) as a map; ConfigError on a bad item."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(setting, f"{item!r} is not NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def parse_volumes(setting: str, text: str) -> dict[str, dict[str, str]]:
    """``SOURCE:TARGET[:ro|rw],...`` as the docker SDK's ``volumes`` map."""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        mode = parts.pop() if len(parts) == 3 else "rw"
        if len(parts) != 2 or not all(parts) or not parts[1].startswith("/") \
                or mode not in ("ro", "rw"):
            raise ConfigError(setting, f"{item!r} is not SOURCE:/TARGET[:ro|rw]")
        out[parts[0]] = {"bind": parts[1], "mode": mode}
    return out


def _fill(template: Sequence[str], values: Mapping[str, str]) -> builtins.list[str]:
    # Plain replacement, not str.format: a literal brace in an argument stays as it is.
    out = []
    for part in template:
        for name, value in values.items():
            part = part.replace("{" + name + "}", value)
        out.append(part)
    return out


# ------------------------------------------------------------------------------------------
# local processes
# ------------------------------------------------------------------------------------------

@dataclass
class _Child:
    executor_id: str
    process: asyncio.subprocess.Process
    log: IO[bytes] | None


class LocalProcessProvisioner:
    """Executors as child processes of this one.

    ``command`` is a template: ``{python}`` becomes this interpreter, ``{executor_id}`` the
    new id and ``{index}`` its position in the ``start`` call; ``args`` are appended. Each
    child gets ``env`` on top of this process's environment, plus ``LSCALE_EXECUTOR_ID``.
    Each child leads its own process group, and ``stop`` signals the group, so an executor's
    own helpers go with it. On Linux the children also die with this process.
    """

    def __init__(
        self,
        *,
        command: Sequence[str] = DEFAULT_LOCAL_COMMAND,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        id_prefix: str = "exec",
        stop_timeout_s: float = 10.0,
        kill_timeout_s: float = 5.0,
        log_dir: Path | None = None,
        cwd: Path | None = None,
        parent_death_signal: int | None = signal.SIGTERM,
    ) -> None:
        if not command:
            raise ConfigError("provisioner.command", "must not be empty")
        if stop_timeout_s <= 0 or kill_timeout_s <= 0:
            raise ConfigError("provisioner.stop_timeout_s", "timeouts must be > 0")
        self._command = tuple(command)
        self._args = tuple(args)
        self._env = dict(env or {})
        self._id_prefix = id_prefix
        self._stop_timeout_s = stop_timeout_s
        self._kill_timeout_s = kill_timeout_s
        self._log_dir = log_dir
        self._cwd = cwd
        self._parent_death_signal = parent_death_signal
        self._children: dict[str, _Child] = {}

    async def start(self, n: int) -> builtins.list[str]:
        if n < 0:
            raise InvalidParameter(f"n: must be >= 0, got {n}", field="n")
        started: builtins.list[str] = []
        try:
            for index in range(n):
                started.append(await self._start_one(index))
        except BaseException:
            # All or nothing: a half-started batch is stopped, not leaked.
            for executor_id in started:
                with contextlib.suppress(Exception):
                    await self.stop(executor_id)
            raise
        return started

    async def _start_one(self, index: int) -> str:
        executor_id = new_executor_id(self._id_prefix)
        argv = _fill(
            self._command,
            {"python": sys.executable, "executor_id": executor_id, "index": str(index)},
        )
        argv += _fill(self._args, {"executor_id": executor_id, "index": str(index)})
        env = {**os.environ, **self._env, EXECUTOR_ID_ENV: executor_id}
        log: IO[bytes] | None = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self._log_dir / f"{executor_id}.log", "ab")  # noqa: SIM115 (kept open)
        preexec = (
            parent_death_hook(self._parent_death_signal)
            if self._parent_death_signal is not None and sys.platform.startswith("linux")
            else None
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=self._cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as exc:
            if log is not None:
                log.close()
            raise ConfigError("provisioner.command", f"cannot start {argv[0]!r}: {exc}") from exc
        self._children[executor_id] = _Child(executor_id, process, log)
        return executor_id

    async def stop(self, executor_id: str) -> None:
        child = self._children.get(executor_id)
        if child is None:
            raise ExecutorNotFound(f"no local executor {executor_id!r}", executor_id=executor_id)
        process = child.process
        try:
            if process.returncode is None:
                self._signal_group(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), self._stop_timeout_s)
                except TimeoutError:
                    self._signal_group(process.pid, signal.SIGKILL)
                    try:
                        await asyncio.wait_for(process.wait(), self._kill_timeout_s)
                    except TimeoutError as exc:
                        raise Unavailable(
                            f"executor {executor_id} (pid {process.pid}) survived SIGKILL "
                            f"for {self._kill_timeout_s}s",
                            executor_id=executor_id,
                        ) from exc
            else:
                # The leader is gone; helpers it left in its group still get their notice.
                self._signal_group(process.pid, signal.SIGKILL)
        finally:
            if process.returncode is not None:
                self._forget(executor_id)

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def _forget(self, executor_id: str) -> None:
        child = self._children.pop(executor_id, None)
        if child is not None and child.log is not None:
            child.log.close()

    async def list(self) -> builtins.list[str]:
        for executor_id, child in builtins.list(self._children.items()):
            if child.process.returncode is not None:
                self._forget(executor_id)
        return sorted(self._children)

    def pid(self, executor_id: str) -> int:
        child = self._children.get(executor_id)
        if child is None:
            raise ExecutorNotFound(f"no local executor {executor_id!r}", executor_id=executor_id)
        return child.process.pid

    async def aclose(self) -> None:
        """Stop every child (concurrently); call on shutdown."""
        ids = builtins.list(self._children)
        results = await asyncio.gather(*(self.stop(e) for e in ids), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------------------
# Docker
# ------------------------------------------------------------------------------------------


class DockerProvisioner:
    """Executors as Docker containers, one per executor, named by the executor id.

    ``client`` is a ``docker.DockerClient`` (``docker.from_env()`` when None). Containers get
    ``env`` plus ``LSCALE_EXECUTOR_ID``, join ``network`` and carry ``labels`` plus the
    λScale labels (role, owner, executor id) by which :meth:`list` finds them; ``command`` is
    a template like the local one (``{executor_id}``). Docker calls block, so they run in a
    worker thread under ``call_timeout_s``.
    """

    def __init__(
        self,
        *,
        image: str,
        client: Any | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        network: str | None = None,
        labels: Mapping[str, str] | None = None,
        owner: str = "lscale",
        id_prefix: str = "exec",
        stop_timeout_s: int = 10,
        call_timeout_s: float = 60.0,
        run_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not image:
            raise ConfigError("provisioner.image", "must not be empty")
        self._client = client
        self._image = image
        self._command = tuple(command) if command is not None else None
        self._env = dict(env or {})
        self._network = network
        self._labels = dict(labels or {})
        self._owner = owner
        self._id_prefix = id_prefix
        self._stop_timeout_s = stop_timeout_s
        self._call_timeout_s = call_timeout_s
        self._run_kwargs = dict(run_kwargs or {})

    def _docker(self) -> Any:
        if self._client is None:
            import docker  # heavy and optional at import time

            try:
                self._client = docker.from_env()
            except docker.errors.DockerException as exc:
                raise Unavailable(f"no Docker engine: {exc}") from exc
        return self._client

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import docker
        import requests  # the docker SDK's HTTP layer; its errors surface unwrapped

        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), self._call_timeout_s)
        except TimeoutError as exc:
            raise Unavailable(f"docker {what}: no answer in {self._call_timeout_s}s") from exc
        except docker.errors.NotFound as exc:
            raise ExecutorNotFound(f"docker {what}: {exc.explanation or exc}") from exc
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            raise Unavailable(f"docker {what}: {exc}") from exc

    def _executor_labels(self, executor_id: str) -> dict[str, str]:
        return {
            **self._labels,
            LABEL_ROLE: "executor",
            LABEL_OWNER: self._owner,
            LABEL_EXECUTOR_ID: executor_id,
        }

    async def start(self, n: int) -> builtins.list[str]:
        if n < 0:
            raise InvalidParameter(f"n: must be >= 0, got {n}", field="n")
        client = self._docker()
        started: builtins.list[str] = []
        try:
            for index in range(n):
                executor_id = new_executor_id(self._id_prefix)
                command = (
                    _fill(self._command, {"executor_id": executor_id, "index": str(index)})
                    if self._command is not None
                    else None
                )
                kwargs: dict[str, Any] = {
                    **self._run_kwargs,
                    "detach": True,
                    "name": executor_id,
                    "environment": {**self._env, EXECUTOR_ID_ENV: executor_id},
                    "labels": self._executor_labels(executor_id),
                }
                if self._network is not None:
                    kwargs["network"] = self._network

                def run(command: Any = command, kwargs: dict[str, Any] = kwargs) -> Any:
                    return client.containers.run(self._image, command, **kwargs)

                await self._call("run", run)
                started.append(executor_id)
        except BaseException:
            for executor_id in started:
                with contextlib.suppress(Exception):
                    await self.stop(executor_id)
            raise
        return started

    async def stop(self, executor_id: str) -> None:
        client = self._docker()
        # The engine sends SIGTERM, then SIGKILL after the timeout; then the container goes.
        await self._call(
            "stop", lambda: client.api.stop(executor_id, timeout=self._stop_timeout_s)
        )
        await self._call("remove", lambda: client.api.remove_container(executor_id, force=True))

    async def list(self) -> builtins.list[str]:
        client = self._docker()
        filters = {"label": [f"{LABEL_ROLE}=executor", f"{LABEL_OWNER}={self._owner}"]}
        rows = await self._call("list", lambda: client.api.containers(filters=filters))
        ids = []
        for row in rows:
            labels = row.get("Labels") or {}
            if LABEL_EXECUTOR_ID in labels:
                ids.append(str(labels[LABEL_EXECUTOR_ID]))
        return sorted(ids)
