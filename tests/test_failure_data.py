"""The heterogeneous failure chain reads errors' data (peers, cause, comm), never their text.

A rank of a 4-rank heterogeneous communicator fails in a lane with a reworded message
that names no rank; the peer it blames recorded (in a real store) a failure with another
reworded text blaming a third rank that recorded nothing. The chain must still name that
third rank, in this communicator's numbering, and take its class from the timeout.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch.distributed as dist

from flagcx import Cause, FlagcxError, FlagcxTimeout, RemoteError
from flagcx.hetero.failures import comm_peers, in_comm_text, with_peer_failures


def _hetero(store: dist.Store, rank: int) -> SimpleNamespace:
    """The parts of a HeteroAdapter the failure chain reads: communicator 'job' of global ranks 10-13, lane 'job.inter' = ranks 0 and 2."""
    lanes = [SimpleNamespace(name="job.inter", global_ranks=[10, 12]), SimpleNamespace(name="job.A", global_ranks=[10, 11])]
    ctx = SimpleNamespace(store=store, timeout=5.0, label="job", where="communicator job", global_ranks=[10, 11, 12, 13])
    return SimpleNamespace(ctx=ctx, rank=rank, size=4, lanes=SimpleNamespace(sets=lambda: lanes))


def test_the_chain_follows_data_not_words():
    store = dist.HashStore()
    store.set("failure/2", json.dumps({"cls": "FlagcxTimeout", "text": "no news from the far side", "peers": [3], "cause": "timeout"}))
    adapter = _hetero(store, 0)
    exc = RemoteError("the other side went away", peers=[1], cause=Cause.PEER_LEFT, comm="job.inter")
    peers = comm_peers(adapter, exc)
    assert peers == (2,), "lane rank 1 of job.inter is rank 2 of job"
    text, cls, blamed = with_peer_failures(adapter, exc, in_comm_text(adapter, exc), peers)
    assert blamed == (3,), f"the chain should end at rank 3, got {blamed}"
    assert cls is FlagcxTimeout, "a peer's timeout is what this rank's cascade comes from"
    assert "communicator job (inter): the other side went away [in communicator job: rank 2 (global 12)]" in text
    assert "rank 2 (global 12) was failing too: no news from the far side" in text
    assert json.loads(store.get("failure/0"))["peers"] == [2]


def test_a_dead_peer_ends_the_chain_without_waiting():
    store = dist.HashStore()
    adapter = _hetero(store, 1)
    exc = FlagcxError("gone", peers=[0], cause=Cause.DIED, comm="job.A")
    peers = comm_peers(adapter, exc)
    text, cls, blamed = with_peer_failures(adapter, exc, in_comm_text(adapter, exc), peers)
    assert peers == (0,) and blamed == (0,) and cls is FlagcxError and "[in communicator job: rank 0 (global 10)]" in text


def test_blamed_ranks_named_in_the_text_are_renamed_others_are_not():
    adapter = _hetero(dist.HashStore(), 0)
    exc = FlagcxError("communicator job.inter: waiting for rank 1 (pid 7); rank 0 is fine", peers=[1], cause=Cause.TIMEOUT, comm="job.inter")
    text = in_comm_text(adapter, exc)
    assert text == "communicator job (inter): waiting for rank 2 (global 12) (pid 7); rank 0 is fine", text
