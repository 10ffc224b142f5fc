"""DeepSeek-V4 (transformers' DeepseekV4ForCausalLM) generating under nested TP, checked against one process.

Builds a tiny random V4 (every V4 part: CSA/HCA attention with the indexer, one K=V
head, sinks, the grouped output projection, hyper-connections, hash and top-k MoE)
from a seed on every rank, shards it with ``flagcx.models.deepseek_v4.parallelize``
(world TP ``--tp``, o-group TP ``--ogroup-tp``; the checkpoint is read shard by shard
into a meta-device model), runs a forward and greedy generation, and compares logits
and tokens with the same model in one process. Exits non-zero on a mismatch.

    python -m flagcx.launch --nproc 16 examples/deepseek_v4_generate.py --tp 16 --ogroup-tp 8 --hosts 2
    python -m flagcx.launch --nproc 4 examples/deepseek_v4_generate.py --tp 4 --ogroup-tp 2

``--hosts N`` simulates N hosts by giving each rank FLAGCX_HOST_ID (contiguous ranks).
``--cuda-ranks N`` puts the first N ranks on CUDA and the others on CPU, in one
``init_process_group("flagcx")`` (heterogeneous mode):

    python -m flagcx.launch --nproc 4 examples/deepseek_v4_generate.py --tp 4 --ogroup-tp 2 --cuda-ranks 1

``--checkpoint DIR`` runs a checkpoint in DeepSeek's published layout instead (V4-Flash,
V4-Pro, their -Base, a BF16 re-export): ``meta_model(DIR)`` + ``open_checkpoint(DIR)`` +
``parallelize``, each rank dequantizing only its slices; it reports the load time and the
bytes each rank read, encodes ``--text`` with the checkpoint's tokenizer when it has one,
and with ``--check`` also loads the whole model in one process (transformers'
``from_pretrained``; small checkpoints only) and compares:

    python -m flagcx.launch --nproc 16 examples/deepseek_v4_generate.py --checkpoint /data/DeepSeek-V4-Flash --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import flagcx
from flagcx.models.deepseek_v4 import meta_model, open_checkpoint, parallelize, parameter_bytes, random_model, tiny_config
from flagcx.topology import init_tp_groups

TOLERANCE = 1e-4
"""float32: max logit error relative to max |logit| (summation order only); greedy tokens must be equal.

bfloat16 rounds every op (8-bit mantissa), and the sharded model adds its partial sums in another order, so its
logits cannot equal the one-process bfloat16 logits; the bound is bfloat16's own: the sharded model may be at
most BF16_FACTOR times as far from the float32 logits as the one-process bfloat16 model is. Two logits within
rounding of each other make greedy argmax depend on that order, so bfloat16 reports how many tokens match."""
BF16_FACTOR = 2.0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=16, help="world TP size (default 16)")
    p.add_argument("--ogroup-tp", type=int, default=8, help="o-group TP size, dividing o_groups=8 (default 8)")
    p.add_argument("--hosts", type=int, default=0, help="simulate this many hosts (FLAGCX_HOST_ID per rank)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--prompt", type=int, default=13, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of every rank")
    p.add_argument("--cuda-ranks", type=int, default=0, help="put the first N ranks on CUDA and the rest on CPU (heterogeneous mode)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder in DeepSeek's published layout (instead of the tiny random model)")
    p.add_argument("--text", default="The capital of France is", help="prompt for --checkpoint when it has a tokenizer")
    p.add_argument("--check", action="store_true", help="with --checkpoint: compare with the whole model in one process")
    return p.parse_args(argv)


def run(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt and the greedy continuation."""
    with torch.no_grad():
        logits = model(ids).logits.float()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return logits, out[:, ids.shape[1] :]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.hosts:
        os.environ["FLAGCX_HOST_ID"] = f"sim-host-{rank * args.hosts // world}"
        flagcx.config.reload()
    if args.cuda_ranks and rank >= args.cuda_ranks:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: this rank is a CPU rank, of the CPU cluster
    device = torch.device("cpu")
    if args.device == "cuda" or rank < args.cuda_ranks:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    dist.init_process_group("flagcx")
    if args.checkpoint:
        try:
            return from_checkpoint(args, rank, world, device, dtype)
        finally:
            dist.destroy_process_group()
    try:
        config = tiny_config()
        full = random_model(config, args.seed)
        ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(args.seed))
        exact = None
        if dtype != torch.float32:
            with torch.no_grad():
                exact = full(ids).logits
        full = full.to(dtype)
        ref_logits, ref_tokens = run(full, ids, args.new_tokens)
        groups = init_tp_groups(args.tp, args.ogroup_tp, o_groups=config.o_groups)
        with torch.device("meta"):
            model = type(full)(config).eval().to(dtype)
        parallelize(model, groups, state_dict=full.state_dict(), device=device)
        full_bytes = parameter_bytes(full)
        del full
        logits, tokens = run(model, ids.to(device), args.new_tokens)
        base = ref_logits if exact is None else exact
        err = (logits.cpu() - base).abs().max().item() / base.abs().max().item()
        tol = TOLERANCE if exact is None else BF16_FACTOR * (ref_logits - exact).abs().max().item() / exact.abs().max().item()
        same = torch.equal(tokens.cpu(), ref_tokens)
        verdict = torch.tensor([err, 0.0 if same else 1.0], dtype=torch.float64, device=device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        worst, mismatched = verdict.tolist()
        ok = worst <= tol and (not mismatched or exact is not None)
        if rank == 0:
            print(groups.plan.describe())
            print(f"one process : tokens {ref_tokens.tolist()}")
            print(f"{world} ranks    : tokens {tokens.cpu().tolist()} ({int((tokens.cpu() == ref_tokens).sum())} of {ref_tokens.numel()} equal)")
            print(f"parameters per rank {parameter_bytes(model) / 1024:.1f} KiB of {full_bytes / 1024:.1f} KiB")
            print(
                f"world {world} tp {args.tp} ogroup_tp {args.ogroup_tp} {args.dtype} on "
                f"{f'{args.cuda_ranks} cuda + {world - args.cuda_ranks} cpu ranks' if args.cuda_ranks else args.device}: max logit error "
                f"{worst:.3e} of max |logit|{' (against float32)' if exact is not None else ''} (tolerance {tol:.3g}), "
                f"tokens {'equal' if not mismatched else 'differ'}: {'OK' if ok else 'MISMATCH'}",
                flush=True,
            )
        dist.barrier()  # every rank returns after rank 0 reported, pass or fail
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


def prompt(args: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, object]:
    """Token ids of ``--text`` (the checkpoint's tokenizer) or seeded random ids; and the tokenizer (or None)."""
    if (args.checkpoint / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        return tokenizer([args.text] * args.batch, return_tensors="pt").input_ids, tokenizer
    return torch.randint(1, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(args.seed)), None


def from_checkpoint(args: argparse.Namespace, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> int:
    """The published checkpoint under nested TP; with --check, against the whole model in one process."""
    model = meta_model(args.checkpoint, dtype=dtype)
    groups = init_tp_groups(args.tp, args.ogroup_tp, o_groups=model.config.o_groups)
    start = time.perf_counter()
    with open_checkpoint(args.checkpoint) as ckpt:
        parallelize(model, groups, state_dict=ckpt, device=device)
        read = sum(ckpt.bytes_read.values())
    if device.type == "cuda":
        torch.cuda.synchronize()
    load = torch.tensor([time.perf_counter() - start, float(read)], dtype=torch.float64, device=device)
    dist.all_reduce(load, op=dist.ReduceOp.MAX)
    ids, tokenizer = prompt(args, model.config.vocab_size)
    logits, tokens = run(model, ids.to(device), args.new_tokens)
    ok = True
    if args.check:
        from transformers import DeepseekV4ForCausalLM

        whole = DeepseekV4ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        ref_logits, ref_tokens = run(whole, ids, args.new_tokens)
        err = (logits.cpu() - ref_logits).abs().max().item() / ref_logits.abs().max().item()
        same = torch.equal(tokens.cpu(), ref_tokens)
        verdict = torch.tensor([err, 0.0 if same else 1.0], dtype=torch.float64, device=device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        worst, mismatched = verdict.tolist()
        ok = worst <= TOLERANCE and not mismatched if dtype == torch.float32 else True
    if rank == 0:
        print(groups.plan.describe())
        print(f"loaded {args.checkpoint} in {load[0].item():.2f} s (slowest rank), at most {load[1].item() / 2**20:.1f} MiB read by one rank")
        print(f"parameters per rank {parameter_bytes(model) / 2**20:.1f} MiB ({args.dtype}, on {device.type})")
        shown = tokenizer.batch_decode(tokens.cpu()) if tokenizer is not None else tokens.cpu().tolist()
        print(f"{world} ranks    : {shown}")
        if args.check:
            print(
                f"one process : tokens {ref_tokens.tolist()}\nmax logit error {worst:.3e} of max |logit|, "
                f"tokens {'equal' if not mismatched else 'differ'}: {'OK' if ok else 'MISMATCH'}",
                flush=True,
            )
    dist.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
