"""The executor service (shell: registers and answers discovery; its logic lands with its issue)."""

from __future__ import annotations

from typing import Any

from shared.config import ServiceConfig
from shared.runtime import Service


class ExecutorService(Service[ServiceConfig]):
    kind = "executor"
    description = "λScale executor"

    async def setup(self) -> None:
        await self.endpoint("status", f"lscale.executor.{self.id}.status", self._status)

    async def _status(self, body: Any, msg: Any) -> dict[str, Any]:
        return {"state": self.state, "id": self.id}
