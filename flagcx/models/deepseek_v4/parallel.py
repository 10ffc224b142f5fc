"""DeepSeek-V4 (transformers' ``DeepseekV4ForCausalLM``) under nested tensor parallelism.

``parallelize(model, groups)`` turns a full (or meta-device) model into this rank's
shard of the layout that :func:`flagcx.topology.init_tp_groups` planned: world TP W,
o-group TP t <= o_groups inside it, R = W / t blocks.

- Attention and the grouped output projection run inside the rank's o-group block:
  the rank owns whole o-groups (their heads' rows of ``q_b_proj``, their ``sinks``, their
  ``o_a_proj`` groups and the matching columns of ``o_b_proj``). The R blocks are data
  parallel over the batch: block b runs attention for its share of the sequences
  (``TPPlan.token_shares``; shares may be uneven or empty) and holds only those
  sequences' KV cache. ``o_b_proj``'s partial output is all-reduced inside the block and
  all-gathered over the replica group, so every rank again holds every token.
- Replicated on every rank: ``q_a_proj`` / ``q_a_norm``, the single K=V head
  (``kv_proj`` / ``kv_norm``: one head cannot be split, and data-parallel attention is what
  keeps it from being stored W times: each block caches only its sequences), the CSA/HCA
  compressors and the indexer (they read the layer input and the shared q_lora
  residual, not per-head state), the norms, the hyper-connections (mixing of the hc
  streams, cheap per token), the routers (routing must agree on every rank), the
  embedding and ``lm_head``. Embedding and ``lm_head`` stay replicated: a vocab-parallel
  pair would save 2 x vocab x hidden x 2 bytes per rank (about 2 GiB for V4-Flash in BF16,
  counted by :mod:`flagcx.models.memory`) at the price of a collective per step on the
  logits path; the replicated pair keeps full logits on every rank with no extra traffic.
- MoE: routed experts are expert-parallel over the world TP group (rank k of W owns
  experts [k E/W, (k+1) E/W) and applies them to every token routed to them, hash- and
  top-k routing alike); the shared expert is tensor-parallel over the same group (its
  intermediate units split W ways). Both partial outputs are summed in one all-reduce
  over the TP group.

With ``state_dict`` (DeepSeek's published files through :func:`.checkpoint.open_checkpoint`,
which dequantizes each slice to the parameter's dtype on the target device; a mapping of
the full checkpoint's tensors; or a lazy one such as safetensors' ``safe_open``, whose
``get_slice`` is used when present) every rank reads only its shards: this is the
parameter conversion, and no rank holds the full model. A value whose dtype holds codes
or scales (FP8, FP4, int8) for a floating parameter, or whose shape is not the rank's
shard, is refused with ``InvalidArgument``.
Layouts that cannot work raise ``InvalidArgument`` (``check_layout``) before any weight
is touched. Every buffer the sharded layers allocate has a shape fixed by the batch and
sequence sizes and the layout (block shares come from ``TPPlan.token_shares``), never by
the data, as a CUDA graph capture needs; whether a whole decode step can be captured is
up to the cache implementation (transformers' dynamic cache grows).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...errors import invalid
from ...topology.tp_groups import TPGroups
from .checkpoint import Checkpoint
from .formats import QUANTIZED

OP = "deepseek_v4.parallelize"


def check_layout(config: Any, tp: int, ogroup_tp: int) -> None:
    """Raise InvalidArgument when world TP ``tp`` with o-group TP ``ogroup_tp`` cannot shard ``config``."""
    groups, heads = config.o_groups, config.num_attention_heads
    if ogroup_tp > groups or groups % ogroup_tp:
        raise invalid(
            OP,
            None,
            "ogroup_tp",
            f"{ogroup_tp} does not divide o_groups={groups} (each rank must own whole o-groups)",
            f"pick an o-group TP that divides {groups}",
        )
    if tp % ogroup_tp:
        raise invalid(OP, None, "tp", f"{tp} is not a multiple of ogroup_tp={ogroup_tp}", "make the world TP a multiple of the o-group TP")
    if heads % groups:
        raise invalid(OP, None, "config", f"num_attention_heads={heads} is not a multiple of o_groups={groups}", "fix the model config")
    if config.num_local_experts % tp:
        raise invalid(
            OP,
            None,
            "tp",
            f"{tp} does not divide num_local_experts={config.num_local_experts} (experts are split over the world TP)",
            "pick a world TP that divides the expert count",
        )
    if getattr(config, "mlp_bias", False):
        raise invalid(
            OP,
            None,
            "config",
            "mlp_bias=True: the shared expert's down_proj bias would be added once per rank",
            "use a config without MLP biases (V4 has none)",
        )
    if config.intermediate_size % tp:
        raise invalid(
            OP,
            None,
            "tp",
            f"{tp} does not divide intermediate_size={config.intermediate_size} (the shared expert is split over the world TP)",
            "pick a world TP that divides it",
        )


def _share(n: int, parts: int, k: int) -> slice:
    per = n // parts
    return slice(k * per, (k + 1) * per)


class Shards:
    """Which slice of every full parameter a rank keeps (name -> (dim, slice)); the rest is replicated.

    ``tp`` / ``tp_rank``: the world TP size and the rank's place in it (experts and the
    shared expert); ``ogroups``: the o-groups the rank owns (attention heads and the
    grouped output projection).
    """

    def __init__(self, config: Any, tp: int, tp_rank: int, ogroups: range) -> None:
        heads_per_group = config.num_attention_heads // config.o_groups
        self.heads = slice(ogroups.start * heads_per_group, ogroups.stop * heads_per_group)
        self.ogroups = slice(ogroups.start, ogroups.stop)
        self.head_dim = config.head_dim
        self.o_lora_rank = config.o_lora_rank
        self.experts = _share(config.num_local_experts, tp, tp_rank)
        self.intermediate = _share(config.intermediate_size, tp, tp_rank)

    def of(self, name: str) -> Optional[tuple[int, slice]]:
        """(dim, slice) of parameter ``name`` kept by this rank; None when it is replicated."""
        leaf = name.split(".")
        lora = slice(self.ogroups.start * self.o_lora_rank, self.ogroups.stop * self.o_lora_rank)
        if leaf[-2:] == ["self_attn", "sinks"]:
            return 0, self.heads
        if len(leaf) >= 3 and leaf[-3] == "self_attn" and leaf[-1] == "weight":
            return {
                "q_b_proj": (0, slice(self.heads.start * self.head_dim, self.heads.stop * self.head_dim)),
                "o_a_proj": (0, lora),
                "o_b_proj": (1, lora),
            }.get(leaf[-2])
        if len(leaf) >= 3 and leaf[-3:-1] == ["mlp", "experts"]:
            return 0, self.experts
        if len(leaf) >= 4 and leaf[-4:-2] == ["mlp", "shared_experts"] and leaf[-1] == "weight":
            return {"gate_proj": (0, self.intermediate), "up_proj": (0, self.intermediate), "down_proj": (1, self.intermediate)}.get(leaf[-2])
        return None


def _take(source: Any, name: str, spec: Optional[tuple[int, slice]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read ``name`` (only its shard when ``spec`` is given) from a Checkpoint, a safetensors handle or a mapping.

    A :class:`Checkpoint` dequantizes straight to ``dtype`` on ``device``; other sources
    return what they hold, and the caller casts.
    """
    index = None if spec is None else (slice(None),) * spec[0] + (spec[1],)
    if isinstance(source, Checkpoint):
        return source.read(name, index, dtype=dtype, device=device)
    if hasattr(source, "get_slice"):
        return source.get_slice(name)[index if index is not None else slice(None)]
    full = source[name]
    if spec is None:
        return full
    dim, s = spec
    return full.narrow(dim, s.start, s.stop - s.start)


def _checked(source: Any, name: str, like: torch.Tensor, spec: Optional[tuple[int, slice]], target: torch.device, rank: int) -> torch.Tensor:
    """This rank's part of ``name`` from ``source``, refused when its shape is not the model's or its dtype holds codes or scales."""
    if isinstance(source, Checkpoint):
        shape = list(source.shape(name))
    elif hasattr(source, "get_slice"):
        shape = list(source.get_slice(name).get_shape())
    else:
        shape = list(source[name].shape)
    if shape != list(like.shape):
        raise invalid(OP, rank, "state_dict", f"{name!r} has shape {shape}, the model needs {list(like.shape)}", "pass the checkpoint of this model's config")
    value = _take(source, name, spec, like.dtype, target)
    if like.is_floating_point() and value.dtype in QUANTIZED:
        raise invalid(
            OP,
            rank,
            "state_dict",
            f"{name!r} is stored as {value.dtype}, which needs its scales to become {like.dtype} values",
            "load a published checkpoint through flagcx.models.deepseek_v4.open_checkpoint, which dequantizes",
        )
    return value


class Traffic:
    """Bytes this rank handed to each kind of collective (payload) and how many calls, since the last reset.

    Kinds: ``block_all_reduce`` (o_b_proj partial, o-group block), ``replica_all_gather``
    (this rank's piece of the attention output), ``tp_all_reduce`` (MoE output, world TP).
    """

    KINDS = ("block_all_reduce", "replica_all_gather", "tp_all_reduce")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.payload = dict.fromkeys(self.KINDS, 0)
        self.calls = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.payload[kind] += tensor.numel() * tensor.element_size()
        self.calls[kind] += 1


class _BlockAttention:
    """Forward of a sharded DeepseekV4Attention: this block's sequences, this rank's heads, then the two collectives."""

    def __init__(self, groups: TPGroups, traffic: Traffic) -> None:
        self.groups = groups
        self.traffic = traffic
        self.plan = groups.plan
        self.index = groups.placement.replica_index
        self.order = self.plan.replica_blocks(groups.rank)

    def __call__(self, module: nn.Module, inner, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch = hidden_states.shape[0]
        shares = self.plan.token_shares(batch)
        mine = shares[self.index]
        if mine.stop > mine.start:
            local = {k: _rows(v, batch, mine) for k, v in kwargs.items()}
            out, _ = inner(hidden_states[mine], **local)
            if self.plan.ogroup_tp > 1:
                self.traffic.add("block_all_reduce", out)
                dist.all_reduce(out, group=self.groups.ogroup_tp)
        else:
            out = hidden_states.new_zeros((0, *hidden_states.shape[1:-1], module.o_b_proj.out_features))
        if self.plan.replicas == 1:
            return out, None
        pieces = [out.new_empty((shares[b].stop - shares[b].start, *out.shape[1:])) for b in self.order]
        self.traffic.add("replica_all_gather", out)
        dist.all_gather(pieces, out.contiguous(), group=self.groups.ogroup_replica)
        by_block = dict(zip(self.order, pieces))
        return torch.cat([by_block[b] for b in range(self.plan.replicas)]), None


def _rows(value: Any, batch: int, rows: slice) -> Any:
    """A forward argument cut to the block's sequences (tensors and dicts/tuples of them whose dim 0 is the batch)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, dict):
        return {k: _rows(v, batch, rows) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rows(v, batch, rows) for v in value)
    return value


class _ExpertParallelMoe:
    """Forward of a sharded DeepseekV4SparseMoeBlock: local routed experts + shared-expert slice, one all-reduce."""

    def __init__(self, groups: TPGroups, experts: slice, traffic: Traffic) -> None:
        self.groups = groups
        self.traffic = traffic
        self.first, self.count = experts.start, experts.stop - experts.start

    def __call__(self, module: nn.Module, hidden_states: torch.Tensor, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        if module.is_hash:
            _, weights, indices = module.gate(hidden_states, input_ids)
        else:
            _, weights, indices = module.gate(hidden_states)
        experts = module.experts
        out = module.shared_experts(hidden_states).reshape(-1, hidden)
        local = indices - self.first
        for e in range(self.count):
            token, slot = torch.where(local == e)
            if token.numel() == 0:
                continue
            h = experts._apply_gate(F.linear(flat[token], experts.gate_up_proj[e]))
            h = F.linear(h, experts.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        if self.groups.plan.tp > 1:
            self.traffic.add("tp_all_reduce", out)
            dist.all_reduce(out, group=self.groups.tp)
        return out.view(batch, seq, hidden)


def parallelize(model: nn.Module, groups: TPGroups, state_dict: Any = None, device: Optional[torch.device] = None) -> nn.Module:
    """Make ``model`` (a DeepseekV4ForCausalLM) this rank's shard of ``groups``' layout; see the module docstring.

    ``forward(input_ids)`` then returns the full logits on every rank and ``generate()``
    works (greedy, with the KV cache); ``model.flagcx_traffic`` counts what the rank
    hands to each collective. ``state_dict``: the full checkpoint (``open_checkpoint``,
    a mapping or a safetensors handle), read shard by shard; required when the model is
    on the meta device. ``device``: where the shards go (default: the model's parameters' device, CPU
    for a meta model).
    """
    config = model.config
    plan = groups.plan
    check_layout(config, plan.tp, plan.ogroup_tp)
    me = groups.placement
    shards = Shards(config, plan.tp, me.tp_rank, me.ogroups)
    meta = any(p.is_meta for p in model.parameters())
    if meta and state_dict is None:
        raise invalid(
            OP,
            groups.rank,
            "state_dict",
            "is required for a model on the meta device",
            "pass the checkpoint (open_checkpoint(path), a dict or safetensors' safe_open handle)",
        )
    target = device or (torch.device("cpu") if meta else next(model.parameters()).device)
    available = set(state_dict.keys()) if state_dict is not None else set()
    local_groups = config.o_groups // plan.ogroup_tp
    traffic = model.flagcx_traffic = Traffic()
    local_heads = shards.heads.stop - shards.heads.start
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.config = copy.copy(attn.config)
        attn.config.o_groups = local_groups
        attn.config.num_attention_heads = local_heads
        attn.num_heads = local_heads
        attn.num_key_value_groups = local_heads
        attn.o_a_proj.n_groups = local_groups
        # instance forwards: the class, parameters and checkpoint names stay transformers'
        attn.forward = functools.partial(_BlockAttention(groups, traffic), attn, attn.forward)
        moe = layer.mlp
        moe.experts.num_experts = shards.experts.stop - shards.experts.start
        moe.forward = functools.partial(_ExpertParallelMoe(groups, shards.experts, traffic), moe)
    for mod_name, module in model.named_modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            spec = shards.of(name)
            if name in available:
                value = _checked(state_dict, name, param, spec, target, groups.rank)
            elif meta:
                published = "embed.weight" in available
                fix = "open DeepSeek's published files with flagcx.models.deepseek_v4.open_checkpoint" if published else "pass the whole checkpoint"
                raise invalid(OP, groups.rank, "state_dict", f"has no tensor {name!r}{' (it holds DeepSeek-named tensors)' if published else ''}", fix)
            else:
                value = param.data if spec is None else param.data.narrow(spec[0], spec[1].start, spec[1].stop - spec[1].start)
            module._parameters[leaf] = nn.Parameter(value.to(device=target, dtype=param.dtype).contiguous(), requires_grad=param.requires_grad)
        for leaf, buf in list(module.named_buffers(recurse=False)):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            if name in available:
                value = _checked(state_dict, name, buf, None, target, groups.rank)
                module._buffers[leaf] = value.to(device=target, dtype=buf.dtype)
            elif buf.is_meta:
                module._buffers[leaf] = _rebuilt_buffer(module, leaf, target)
            else:
                module._buffers[leaf] = buf.to(target)
    return model


def _rebuilt_buffer(module: nn.Module, leaf: str, device: torch.device) -> torch.Tensor:
    """A computed, non-persistent buffer (RoPE frequencies) of a meta-built module, computed again on ``device``."""
    config = getattr(module, "config", None)
    if config is None:
        raise invalid(OP, None, "state_dict", f"lacks buffer {leaf!r} of {type(module).__name__}, which cannot be recomputed", "pass the whole checkpoint")
    with torch.device(device):
        fresh = type(module)(config)
    return getattr(fresh, leaf)


def tiny_config(**overrides: Any) -> Any:
    """A DeepSeek-V4 config small enough for CPU ranks, with every V4 part in it.

    4 layers (HCA, HCA, HCA, CSA attention; three hash-routed MoE layers, then top-k),
    16 heads of 32 in 8 o-groups, 16 routed experts, compression and the indexer active
    within a few tokens (compress rates 4 and 8, sliding window 8, index top-k 4).
    """
    from transformers import DeepseekV4Config

    fields = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=16,
        head_dim=32,
        q_lora_rank=32,
        o_groups=8,
        o_lora_rank=16,
        n_routed_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=4,
        sliding_window=8,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        hc_mult=2,
        max_position_embeddings=256,
        eos_token_id=None,
        pad_token_id=0,
    )
    fields.update(overrides)
    return DeepseekV4Config(**fields)


def random_model(config: Any, seed: int) -> nn.Module:
    """A DeepseekV4ForCausalLM with seeded random weights of a sensible scale (the same on every rank)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            scale = 0.3 if p.dim() == 1 else 0.5 / max(p.shape[-1], 1) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
        for _, b in sorted(model.named_buffers()):
            if b.dtype == torch.long and b.dim() == 2:  # the hash routers' token -> expert tables
                b.copy_(torch.randint(0, config.num_local_experts, b.shape, generator=g))
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters and persistent buffers (its state_dict; tied tensors once)."""
    seen: dict[tuple[int, int], int] = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())
