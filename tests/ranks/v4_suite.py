"""DeepSeek-V4 (transformers' DeepseekV4ForCausalLM) sharded by flagcx.models.deepseek_v4, checked against one process.

One 16-rank job: rank 0 builds a tiny random V4 (4 layers: HCA and CSA attention with
the indexer, hash and top-k MoE) and computes the reference logits and 8 greedy tokens;
every layout (W, t) then builds the model on the meta device, converts the full
checkpoint into this rank's shards (``parallelize(..., state_dict=...)``), and compares
logits (float32: max error <= 1e-4 of max |logit|) and tokens with the reference, for
1, 2 and 4 simulated hosts. Batch 3 of 13 tokens: block shares are uneven, and with
4 blocks one is empty. One more layout reads the checkpoint from a safetensors file through
``safe_open`` (each rank reads only its slices).

From DeepSeek's published layout: rank 0 writes the same model as a sharded FP8 / FP4
checkpoint (tests/helpers/v4_checkpoint.py) and loads it whole with transformers'
``from_pretrained`` (the one-process reference); each layout (16, 8), (8, 4), (4, 2) then
runs ``meta_model`` + ``open_checkpoint`` + ``parallelize`` on every rank: each shard equals
``narrow()`` of the reference's tensors, each rank reads only its own experts' bytes, and
logits and greedy tokens match the reference. Values that need scales (FP8 codes) or have
the wrong shape are refused on every rank.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import flagcx  # noqa: F401  (registers the backend)
from flagcx import InvalidArgument
from flagcx.models.deepseek_v4 import Traffic, parameter_bytes, random_model, tiny_config
from flagcx.models.memory import traffic_per_token
from flagcx.topology import init_tp_groups

from ..helpers.matrix import Check, expect_error
from ..helpers.v4_checkpoint import write_checkpoint

LAYOUTS = [(16, 8), (16, 4), (8, 8), (8, 4), (4, 2), (2, 1)]
CHECKPOINT_LAYOUTS = [(16, 8), (8, 4), (4, 2)]
HOSTS = [1, 2, 4]
BATCH, SEQ, NEW_TOKENS = 3, 13, 8
TOLERANCE = 1e-4


def _run(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return logits, tokens[:, ids.shape[1] :]


def _sharded(config, world: int, t: int, state, hosts=None):
    """This rank's shard of a meta-device model for layout (world, t), read from ``state``; (model, groups)."""
    from transformers import DeepseekV4ForCausalLM

    from flagcx.models.deepseek_v4 import parallelize

    groups = init_tp_groups(world, t, o_groups=config.o_groups, hosts=hosts)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config).eval()
    parallelize(model, groups, state_dict=state)
    return model, groups


def _destroy(groups) -> None:
    for pg in (groups.tp, groups.ogroup_tp, groups.ogroup_replica, groups.dp):
        if pg is not None:
            dist.destroy_process_group(pg)


def _layout(config, state, ids, reference, world: int, t: int, hosts: int) -> None:
    size = dist.get_world_size()
    model, groups = _sharded(config, world, t, state, hosts=[r // (size // hosts) for r in range(size)])
    _check_bytes(model, state, world, t)
    logits, tokens = _run(model, ids)
    _check_traffic(model, groups, config, ids)
    ref_logits, ref_tokens = reference
    err = (logits - ref_logits).abs().max().item()
    bound = TOLERANCE * ref_logits.abs().max().item()
    assert err <= bound, f"W={world} t={t} hosts={hosts}: max logit error {err:.3g} > {bound:.3g}"
    assert torch.equal(tokens, ref_tokens), f"W={world} t={t} hosts={hosts}: tokens {tokens.tolist()} != {ref_tokens.tolist()}"
    _destroy(groups)


def _from_safetensors(config, path: str, ids: torch.Tensor, ref_logits: torch.Tensor) -> None:
    """The parameter conversion from a lazy checkpoint: every rank reads only its slices through get_slice."""
    from safetensors import safe_open

    with safe_open(path, "pt") as ckpt:
        model, groups = _sharded(config, 16, 8, ckpt)
    with torch.no_grad():
        logits = model(ids).logits
    err = (logits - ref_logits).abs().max().item()
    assert err <= TOLERANCE * ref_logits.abs().max().item(), f"max logit error {err:.3g} from the safetensors checkpoint"
    _destroy(groups)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.dirname(path))


def _check_traffic(model, groups, config, ids: torch.Tensor) -> None:
    """A prefill's collective payloads per layer: the block all-reduce and the replica gather carry this block's
    share of the batch, the MoE all-reduce every token (hidden x 4 bytes each)."""
    plan = groups.plan
    traffic = model.flagcx_traffic
    traffic.reset()
    with torch.no_grad():
        model(ids)
    batch, seq = ids.shape
    rows = plan.token_shares(batch)[plan.placement(dist.get_rank()).replica_index]
    token_bytes = seq * config.hidden_size * 4
    share = (rows.stop - rows.start) * token_bytes
    layers = config.num_hidden_layers
    expected = {
        "block_all_reduce": share * layers if plan.ogroup_tp > 1 else 0,
        "replica_all_gather": share * layers if plan.replicas > 1 else 0,
        "tp_all_reduce": batch * token_bytes * layers if plan.tp > 1 else 0,
    }
    assert traffic.payload == expected, f"W={plan.tp} t={plan.ogroup_tp}: payload {traffic.payload}, expected {expected}"
    # The README's per-token table (flagcx.models.memory) averages over the TP group: check it against the counters.
    model_cost = traffic_per_token(config, plan.tp, plan.ogroup_tp, dtype_bytes=4)
    counted = torch.tensor([float(traffic.payload[k]) for k in Traffic.KINDS], dtype=torch.float64)
    dist.all_reduce(counted, group=groups.tp)
    for kind, total in zip(Traffic.KINDS, counted.tolist()):
        want = model_cost[kind][0] * batch * seq * layers * plan.tp
        assert abs(total - want) < 1e-6 * max(want, 1), f"W={plan.tp} t={plan.ogroup_tp} {kind}: counted {total}, table says {want}"


def _check_bytes(model, state: dict, world: int, t: int) -> None:
    """This rank holds 1/t of the attention heads' weights, 1/W of the experts, and everything else whole."""
    per_block = ("self_attn.q_b_proj.weight", "self_attn.sinks", "self_attn.o_a_proj.weight", "self_attn.o_b_proj.weight")
    full = split_t = split_w = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        full += size
        if name.endswith(per_block):
            split_t += size
        elif ".mlp.experts." in name or ".mlp.shared_experts." in name:
            split_w += size
    expected = full - split_t + split_t // t - split_w + split_w // world
    assert parameter_bytes(model) == expected, f"W={world} t={t}: this rank holds {parameter_bytes(model)} bytes, expected {expected}"


def v4_layouts(rank: int, size: int) -> Iterable[Check]:
    torch.set_num_threads(1)  # 16 ranks on a few cores: intra-op threads only oversubscribe
    dist.init_process_group("flagcx")
    config = tiny_config()
    full = random_model(config, 1234) if rank == 0 else None
    box = [None]
    if rank == 0:
        ids = torch.randint(1, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
        path = os.path.join(tempfile.mkdtemp(prefix="flagcx-v4-"), "model.safetensors")
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, path)
        box = [(full.state_dict(), ids, _run(full, ids), path)]
    dist.broadcast_object_list(box, src=0)
    state, ids, reference, path = box[0]
    yield "W=16,t=8 read shard by shard from safetensors", lambda: _from_safetensors(config, path, ids, reference[0])
    for world, t in LAYOUTS:
        for hosts in HOSTS:
            yield f"W={world},t={t},hosts={hosts}", lambda w=world, tt=t, h=hosts: _layout(config, state, ids, reference, w, tt, h)
    yield "invalid layouts", lambda: _invalid(config)
    box = [None]
    if rank == 0:
        box = [_published_reference(full, config, ids)]
    dist.broadcast_object_list(box, src=0)
    published, ref_state, ref_run = box[0]
    for world, t in CHECKPOINT_LAYOUTS:
        yield f"published checkpoint W={world},t={t}", lambda w=world, tt=t: _from_published(published, ref_state, ids, ref_run, w, tt)
    yield "parallelize refuses codes and wrong shapes", lambda: _guard(config, ref_state, published)
    yield "remove the published checkpoint", lambda: _remove(published)
    yield "destroy", dist.destroy_process_group


def _published_reference(full, config, ids: torch.Tensor) -> tuple[str, dict, tuple]:
    """Rank 0: ``full`` written in DeepSeek's published layout (FP8 / FP4, 3 shard files) and loaded back by transformers."""
    from transformers import DeepseekV4ForCausalLM

    path = tempfile.mkdtemp(prefix="flagcx-v4-published-")
    write_checkpoint(Path(path), {k: v.contiguous() for k, v in full.state_dict().items()}, config, variant="flash")
    reference = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, reference.state_dict(), _run(reference, ids)


def _from_published(path: str, ref_state: dict, ids: torch.Tensor, ref_run, world: int, t: int) -> None:
    from flagcx.models.deepseek_v4 import Shards, meta_model, open_checkpoint, parallelize

    groups = init_tp_groups(world, t, o_groups=8)
    model = meta_model(path, dtype=torch.float32)
    config = model.config
    with open_checkpoint(path) as ckpt:
        parallelize(model, groups, state_dict=ckpt)
        read = dict(ckpt.bytes_read)
    me = groups.placement
    shards = Shards(config, world, me.tp_rank, me.ogroups)
    for name, value in model.state_dict().items():
        spec = shards.of(name)
        want = ref_state[name] if spec is None else ref_state[name].narrow(spec[0], spec[1].start, spec[1].stop - spec[1].start)
        assert torch.equal(value, want), f"W={world} t={t}: {name} differs from the reference's shard"
    experts = {n.split(".")[4] for n in read if ".ffn.experts." in n}
    assert experts == {str(e) for e in range(shards.experts.start, shards.experts.stop)}, f"rank read experts {sorted(experts)}"
    assert not any(n.startswith("mtp.") for n in read)
    logits, tokens = _run(model, ids)
    ref_logits, ref_tokens = ref_run
    err = (logits - ref_logits).abs().max().item()
    assert err <= TOLERANCE * ref_logits.abs().max().item(), f"W={world} t={t}: max logit error {err:.3g}"
    assert torch.equal(tokens, ref_tokens), f"W={world} t={t}: tokens {tokens.tolist()} != {ref_tokens.tolist()}"
    _destroy(groups)


def _guard(config, ref_state: dict, path: str) -> None:
    """A rename-only source (FP8 codes without their scales) and a wrong shape are refused, naming the tensor."""
    from safetensors import safe_open

    from flagcx.models.deepseek_v4 import meta_model, parallelize

    groups = init_tp_groups(16, 8, o_groups=8)
    codes = dict(ref_state)
    codes["model.layers.1.self_attn.q_b_proj.weight"] = ref_state["model.layers.1.self_attn.q_b_proj.weight"].to(torch.float8_e4m3fn)
    expect_error(
        InvalidArgument,
        lambda: parallelize(meta_model(path), groups, state_dict=codes),
        "model.layers.1.self_attn.q_b_proj.weight",
        "float8_e4m3fn",
        "open_checkpoint",
    )
    shaped = dict(ref_state)
    shaped["model.layers.0.self_attn.o_a_proj.weight"] = ref_state["model.layers.0.self_attn.o_a_proj.weight"].t()
    expect_error(InvalidArgument, lambda: parallelize(meta_model(path), groups, state_dict=shaped), "model.layers.0.self_attn.o_a_proj.weight", "shape")
    first = sorted(Path(path).glob("*.safetensors"))[0]
    with safe_open(str(first), "pt") as raw:
        expect_error(InvalidArgument, lambda: parallelize(meta_model(path), groups, state_dict=raw), "DeepSeek-named", "open_checkpoint")
    _destroy(groups)


def _remove(path: str) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path)


def _invalid(config) -> None:
    from flagcx.models.deepseek_v4 import check_layout

    expect_error(InvalidArgument, lambda: check_layout(config, 16, 16), "ogroup_tp", "o_groups=8")
    expect_error(InvalidArgument, lambda: check_layout(config, 12, 3), "ogroup_tp")
    expect_error(InvalidArgument, lambda: check_layout(config, 32, 8), "num_local_experts=16")
    odd = copy.copy(config)
    odd.num_attention_heads = 12
    expect_error(InvalidArgument, lambda: check_layout(odd, 8, 8), "num_attention_heads=12")
    expect_error(InvalidArgument, lambda: init_tp_groups(16, 8, o_groups=config.o_groups, hosts=[0] * dist.get_world_size(), max_ogroup_tp=4), "ogroup_tp")
