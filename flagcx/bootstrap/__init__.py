"""Bootstrap: what ranks need before any transport exists, below the adapters and the topology.

- :mod:`.store`: rendezvous through a torch Store (all-gathers and broadcasts of small
  records) and agreement on settings every rank must share;
- :mod:`.rollcall`: who is missing after a failure (the roll call in the store) and pid liveness;
- :mod:`.env`: the launch environment (torchrun, mpiexec, ``flagcx.launch``) and the store built from it;
- :mod:`.network`: this host's interfaces and addresses (FLAGCX_SOCKET_IFNAME, the hostname's, the route to a peer).
"""

from __future__ import annotations

from .env import LaunchEnv, detect_launch_env, prepare_env, store_from_env
from .network import advertised_address, hostname_address, interface_addresses, route_address, select_interface
from .rollcall import ROLLCALL_WAIT, PeerReport, pid_alive, process_space
from .store import agree, require_same, store_allgather, store_broadcast, store_poll, store_wait

__all__ = [
    "LaunchEnv",
    "PeerReport",
    "ROLLCALL_WAIT",
    "advertised_address",
    "agree",
    "detect_launch_env",
    "hostname_address",
    "interface_addresses",
    "pid_alive",
    "prepare_env",
    "process_space",
    "require_same",
    "route_address",
    "select_interface",
    "store_allgather",
    "store_broadcast",
    "store_from_env",
    "store_poll",
    "store_wait",
]
