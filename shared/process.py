"""Process helpers shared by the cluster supervisor, the embedded NATS server and the tests."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for children: SIGTERM them when their parent dies (even by SIGKILL), and
    give them their own session so a terminal's Ctrl-C reaches the parent, which orders stops."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()
