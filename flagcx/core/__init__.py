"""The core layer: the Communicator and the steps every op goes through.

``communicator`` (the ops: check, lower, launch) over ``args`` (argument checks, flat
buffers), ``lowering`` (dtype / reduce-op emulation), ``check`` (FLAGCX_CHECK),
``launch`` (per-call stream and completion policy, groups), ``sparse`` and
``monitored`` (ops built from others or from the store), and ``selection`` (which
adapter carries which tensors).
"""
