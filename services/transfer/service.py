"""The transfer service (shell: registers and answers discovery; its logic lands with its issue)."""

from __future__ import annotations

from typing import Any

from shared.config import ServiceConfig
from shared.runtime import Service


class TransferService(Service[ServiceConfig]):
    kind = "transfer"
    description = "λScale transfer"

    async def setup(self) -> None:
        await self.endpoint("status", f"lscale.transfer.{self.id}.status", self._status)

    async def _status(self, body: Any, msg: Any) -> dict[str, Any]:
        return {"state": self.state, "id": self.id}
