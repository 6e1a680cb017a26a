"""Process helpers shared by the cluster supervisor, the embedded NATS server, the scaler's
local provisioner and the tests."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def parent_death_hook(sig: int = signal.SIGTERM, *, new_session: bool = False) -> Callable[[], None]:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies (even by
    SIGKILL), so no child outlives the process that started it. ``new_session`` also gives the
    child its own session, so a terminal's Ctrl-C reaches only the parent, which orders stops."""
    parent = os.getpid()

    def hook() -> None:
        if new_session:
            os.setsid()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except (OSError, AttributeError):
            return
        # the parent may have died between fork and prctl: then nobody would signal us
        if os.getppid() != parent:
            os._exit(1)

    return hook

