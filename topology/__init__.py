"""flagcx.topology: detect hosts and devices, and plan topology-aware groups.

Pure data and planning; nothing here opens a connection (records are exchanged by
the core through the store).
"""

from .detect import RankRecord, host_identity, local_record

__all__ = ["RankRecord", "host_identity", "local_record"]
