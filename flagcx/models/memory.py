"""Memory and traffic per rank of DeepSeek-V4 under nested TP, computed on the meta device (nothing allocated).

For world TP W and o-group TP t, a rank holds (see :mod:`flagcx.models.deepseek_v4`):
its shards (heads and o-groups of its block: 1/t of the attention's q_b_proj, sinks,
o_a_proj, o_b_proj; 1/W of the routed experts and of the shared expert) plus every
replicated tensor, counted from the parameters of a meta-device
``DeepseekV4ForCausalLM`` in BF16 (the modules V4 keeps in float32, such as norms and
hyper-connections, stay float32).

KV cache per sequence and layer, BF16, with one K=V head of ``head_dim``: the sliding
window (``sliding_window - 1`` entries), plus the compressed entries (context / 128 for
HCA layers; context / 4 for CSA layers, plus the indexer's context / 4 keys of
``index_head_dim``). A block of t ranks serves batch / R sequences (R = W / t) and every
rank of the block stores their cache (the single KV head cannot be split); plain TP
(t = W) stores the whole batch on every rank.

A layout fits a card when parameters + KV cache <= 90% of its memory (the rest for
activations, workspace and the collective buffers).

    python -m flagcx.models.memory --model v4-flash --batch 64 --context 65536
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .deepseek_v4 import Shards, check_layout

CARDS_GB = (32, 64, 80, 96, 141)
USABLE = 0.9
"""Share of a card's memory that parameters and KV cache may take."""

PRO_SIZES = dict(
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    head_dim=512,
    q_lora_rank=1536,
    o_groups=16,
    o_lora_rank=1024,
    n_routed_experts=384,
    num_experts_per_tok=6,
    moe_intermediate_size=3072,
    index_topk=1024,
)
"""V4-Pro's published sizes (public model cards); every other field as in V4-Flash."""


def model_config(name: str) -> Any:
    """``v4-flash`` (the DeepseekV4Config defaults) or ``v4-pro``."""
    from transformers import DeepseekV4Config

    if name == "v4-flash":
        return DeepseekV4Config()
    if name == "v4-pro":
        return DeepseekV4Config(**PRO_SIZES)
    raise ValueError(f"unknown model {name!r}; choose v4-flash or v4-pro")


@dataclass(frozen=True)
class Footprint:
    tp: int
    ogroup_tp: int
    param_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.kv_bytes

    def smallest_card(self) -> Optional[int]:
        return next((gb for gb in CARDS_GB if self.total <= USABLE * gb * 1e9), None)


def meta_parameters(config: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, bytes per element) of every parameter and persistent buffer, from a BF16 meta-device model."""
    from transformers import DeepseekV4ForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = DeepseekV4ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    out = [(n, tuple(p.shape), p.element_size()) for n, p in model.named_parameters()]
    persistent = {n for n, _ in model.state_dict().items()}
    out += [(n, tuple(b.shape), b.element_size()) for n, b in model.named_buffers() if n in persistent]
    return out


def param_bytes_per_rank(config: Any, params: Sequence[tuple[str, tuple[int, ...], int]], tp: int, ogroup_tp: int) -> int:
    """Bytes of rank 0's shards plus the replicated tensors (every rank holds the same amount)."""
    shards = Shards(config, tp, 0, range(0, config.o_groups // ogroup_tp))
    total = 0
    for name, shape, size in params:
        spec = shards.of(name)
        numel = math.prod(shape)
        if spec is not None:
            dim, s = spec
            numel = numel // shape[dim] * (s.stop - s.start)
        total += numel * size
    return total


def kv_bytes_per_sequence(config: Any, context: int, dtype_bytes: int = 2) -> int:
    """KV cache of one sequence of ``context`` tokens over every layer (see the module docstring)."""
    rates = config.compress_rates
    total = 0
    for kind in config.layer_types:
        entries = min(context, config.sliding_window - 1) * config.head_dim
        if kind == "heavily_compressed_attention":
            entries += context // rates["heavily_compressed_attention"] * config.head_dim
        elif kind == "compressed_sparse_attention":
            n = context // rates["compressed_sparse_attention"]
            entries += n * config.head_dim + n * config.index_head_dim
        total += entries * dtype_bytes
    return total


def footprint(config: Any, params, tp: int, ogroup_tp: int, batch: int, context: int) -> Footprint:
    check_layout(config, tp, ogroup_tp)
    sequences = math.ceil(batch / (tp // ogroup_tp))
    return Footprint(tp, ogroup_tp, param_bytes_per_rank(config, params, tp, ogroup_tp), sequences * kv_bytes_per_sequence(config, context))


def table(name: str, batch: int, context: int, tps: Sequence[int] = (8, 16, 32), ogroup_tps: Sequence[int] = (1, 2, 4, 8)) -> str:
    """The README's markdown table for one model."""
    config = model_config(name)
    params = meta_parameters(config)
    total = sum(math.prod(s) for _, s, _ in params)
    lines = [
        f"{name}: {total / 1e9:.1f}B parameters (BF16), batch {batch} x {context} tokens of context; "
        f"fits = parameters + KV <= {int(USABLE * 100)}% of the card",
        "",
        "| world TP | o-group TP | blocks | params / rank | KV / rank | total / rank | smallest card |",
        "|---|---|---|---|---|---|---|",
    ]
    for tp in tps:
        for t in ogroup_tps:
            if t > tp:
                continue
            try:
                f = footprint(config, params, tp, t, batch, context)
            except ValueError as exc:
                lines.append(f"| {tp} | {t} | - | - | - | - | cannot shard ({str(exc).split(': ', 1)[-1].split(';')[0]}) |")
                continue
            card = f.smallest_card()
            lines.append(
                f"| {tp} | {t} | {tp // t} | {f.param_bytes / 2**30:.1f} GiB | {f.kv_bytes / 2**30:.1f} GiB | "
                f"{f.total / 2**30:.1f} GiB | {f'{card} GB' if card else 'none'} |"
            )
    return "\n".join(lines)


def traffic_per_token(config: Any, tp: int, ogroup_tp: int, dtype_bytes: int = 2) -> dict[str, tuple[float, float]]:
    """Per layer and per token of the batch: (payload bytes a rank hands to the collective, bytes it sends).

    Payload is what ``Traffic`` counts in a run; bytes sent assume ring algorithms: an
    all-reduce of S bytes over n ranks sends 2 (n-1)/n S per rank, an all-gather whose
    output is T bytes sends (n-1)/n T. A block handles 1/R of the tokens; the MoE output
    of every token is all-reduced over the world TP group.
    """
    check_layout(config, tp, ogroup_tp)
    h = config.hidden_size * dtype_bytes
    r = tp // ogroup_tp
    return {
        "block_all_reduce": (h / r if ogroup_tp > 1 else 0.0, 2 * (ogroup_tp - 1) / ogroup_tp * h / r),
        "replica_all_gather": (h / r if r > 1 else 0.0, (r - 1) / r * h),
        "tp_all_reduce": (float(h) if tp > 1 else 0.0, 2 * (tp - 1) / tp * h),
    }


def traffic_table(name: str, layouts: Sequence[tuple[int, int]] = ((16, 8), (8, 8))) -> str:
    """The README's communication table: bytes per layer per token, BF16 activations."""
    config = model_config(name)
    lines = [
        f"{name}: bytes per layer per token of the batch, per rank (BF16 activations, hidden {config.hidden_size}); "
        "payload = what the rank hands to the collective, sent = ring algorithm",
        "",
        "| world TP | o-group TP | block all-reduce | replica all-gather | MoE all-reduce (world TP) | sent in all |",
        "|---|---|---|---|---|---|",
    ]
    for tp, t in layouts:
        cost = traffic_per_token(config, tp, t)
        cells = [f"{cost[k][0]:.0f} payload, {cost[k][1]:.0f} sent" for k in ("block_all_reduce", "replica_all_gather", "tp_all_reduce")]
        lines.append(f"| {tp} | {t} | {' | '.join(cells)} | {sum(v[1] for v in cost.values()):.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagcx.models.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["v4-flash", "v4-pro", "all"], default="all")
    parser.add_argument("--batch", type=int, default=64, help="sequences served at once by one model copy")
    parser.add_argument("--context", type=int, default=65536, help="tokens of context per sequence")
    ns = parser.parse_args(argv)
    for name in ("v4-flash", "v4-pro") if ns.model == "all" else (ns.model,):
        print(table(name, ns.batch, ns.context))
        print()
        print(traffic_table(name))
        print()
    return 0


if __name__ == "__main__":
    try:
        import transformers  # noqa: F401  (the model configs come from it)
    except ModuleNotFoundError:
        raise SystemExit("python -m flagcx.models.memory needs transformers: pip install 'flagcx[models]'") from None
    raise SystemExit(main())
