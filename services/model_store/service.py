"""The model_store service (shell: registers and answers discovery; its logic lands with its issue)."""

from __future__ import annotations

from typing import Any

from shared.config import ServiceConfig
from shared.runtime import Service


class ModelStoreService(Service[ServiceConfig]):
    kind = "model_store"
    description = "λScale model_store"

    async def setup(self) -> None:
        await self.endpoint("status", f"lscale.model_store.{self.id}.status", self._status)

    async def _status(self, body: Any, msg: Any) -> dict[str, Any]:
        return {"state": self.state, "id": self.id}
