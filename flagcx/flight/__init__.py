"""The flight recorder: the last calls of every communicator, dumped in the format torch's ``torchfrtrace`` reads.

Shared vocabulary below the core: :mod:`.ring` (the per-communicator ring the core
writes), :mod:`.dump` (torch's pickle format, file naming), :mod:`.requests` (dumps asked
for by a peer that timed out, through the store, or by SIGUSR1). Nothing here knows a
transport: the Communicator writes calls, the core and the watchdog report timeouts.
"""

from __future__ import annotations

from .dump import DEFAULT_PREFIX, default_path, dump_on_abort, dump_trace, snapshot
from .requests import close, failed, on_timeout, watch
from .ring import Recorder, live_recorders, next_record_id

__all__ = [
    "DEFAULT_PREFIX",
    "Recorder",
    "close",
    "default_path",
    "dump_on_abort",
    "dump_trace",
    "failed",
    "live_recorders",
    "next_record_id",
    "on_timeout",
    "snapshot",
    "watch",
]
