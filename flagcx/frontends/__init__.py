"""The frontends: the torch.distributed backend (:mod:`.process_group`).

The engine-facing :class:`flagcx.Communicator` is the core's own API, and the
``flagcx-bench`` CLI lives in :mod:`flagcx.bench`.
"""
