"""Loading one rank's shards of DeepSeek-V4-Flash from the published FP8 / FP4 layout: time, bytes read, host memory.

``--write DIR``: a checkpoint with V4-Flash's real shapes (hidden 4096, 64 heads x 512,
256 experts x 2048, vocab 129280) and ``--layers`` decoder layers, filled with random codes
(FP8 e4m3 without NaNs, FP4 nibbles, ue8m0 scales near 1), one shard file per layer plus
one for the rest, with ``model.safetensors.index.json`` and ``config.json``.

``--load DIR``: each variant runs in a fresh process as rank ``--rank`` of world TP
``--tp`` / o-group TP ``--ogroup-tp`` (no other ranks are needed: the read is the one
``parallelize`` makes, parameter by parameter through ``Checkpoint.read``) and reports the
seconds, the bytes read from the files, the bytes of parameters it holds, and the peak of
anonymous host memory (``RssAnon`` sampled every 2 ms) above what it holds once loaded; the time per decoder layer
and for the rest (embedding, head, norms) give the 43-layer extrapolation.
Variants: ``cpu`` (dequantize on the host), ``cuda`` (raw windows moved to the GPU and
dequantized there), ``cpu+copy`` (dequantize on the host, then copy to the GPU). Passes
are interleaved; medians and spreads are printed and written to ``--out``.

    python benchmarks/v4_load_bench.py --write /tmp/v4flash --layers 2
    python benchmarks/v4_load_bench.py --load /tmp/v4flash --variants cpu --passes 3 --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.v4_checkpoint import FLOAT32, FP8_LINEARS, config_json, published_name  # noqa: E402


def _fp8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0  # e4m3fn's NaNs
    return codes.view(torch.float8_e4m3fn)


def _scale(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(120, 128, shape, dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)


def write(path: Path, layers: int) -> None:
    """The synthetic V4-Flash-shaped checkpoint described in the module docstring."""
    from transformers import DeepseekV4Config

    from flagcx.models.deepseek_v4 import meta_model

    config = DeepseekV4Config(num_hidden_layers=layers)
    shapes = {n: tuple(t.shape) for n, t in meta_model(config).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    from safetensors.torch import save_file

    part_of = lambda n: n.split(".")[2] if n.startswith("model.layers.") else "rest"
    for part in ["rest", *map(str, range(layers))]:
        mine = {n: s for n, s in shapes.items() if part_of(n) == part}
        out: dict[str, torch.Tensor] = {}
        for name, shape in mine.items():
            if ".mlp.experts." in name:
                layer, rows = name.split(".")[2], shape[1] // 2 if name.endswith("gate_up_proj") else shape[1]
                for e in range(shape[0]):
                    for k in (1, 3) if name.endswith("gate_up_proj") else (2,):
                        key = f"layers.{layer}.ffn.experts.{e}.w{k}"
                        out[key + ".weight"] = torch.randint(-128, 128, (rows, shape[2] // 2), dtype=torch.int8, generator=g)
                        out[key + ".scale"] = _scale((rows, shape[2] // 32), g)
                continue
            pub = published_name(name)
            if pub.removesuffix(".weight").endswith(FP8_LINEARS):
                out[pub] = _fp8(shape, g)
                out[pub.removesuffix(".weight") + ".scale"] = _scale((-(-shape[0] // 128), -(-shape[1] // 128)), g)
            elif "tid2eid" in pub:
                out[pub] = torch.randint(0, config.n_routed_experts, shape, generator=g)
            else:
                dtype = torch.float32 if any(tag in pub for tag in FLOAT32) else torch.bfloat16
                out[pub] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        file = f"model-{part}.safetensors"
        save_file(out, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file))
        print(f"wrote {file}: {sum(t.numel() * t.element_size() for t in out.values()) / 2**30:.2f} GiB", flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config_json(config)))


def _anon_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def _one(path: Path, variant: str, tp: int, ogroup_tp: int, rank: int) -> dict:
    """In the child: load rank ``rank``'s shards once; one JSON line."""
    from flagcx.models.deepseek_v4 import Shards, meta_model, open_checkpoint
    from flagcx.topology import plan_tp_groups

    model = meta_model(path)
    me = plan_tp_groups(tp, tp, ogroup_tp, o_groups=model.config.o_groups).placement(rank)
    shards = Shards(model.config, tp, me.tp_rank, me.ogroups)
    device = torch.device("cuda" if variant == "cuda" else "cpu")
    if variant != "cpu":
        torch.zeros(1, device="cuda")
    peak, done = [_anon_kib()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(max(peak[-1], _anon_kib()))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    held = []
    layer_seconds: dict[str, float] = {}
    with open_checkpoint(path) as ckpt:
        for name, like in model.state_dict().items():
            t0 = time.perf_counter()
            spec = shards.of(name)
            index = None if spec is None else (slice(None),) * spec[0] + (spec[1],)
            value = ckpt.read(name, index, dtype=like.dtype, device=device)
            held.append(value.to("cuda") if variant == "cpu+copy" else value)
            if variant != "cpu":
                torch.cuda.synchronize()
            part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
            layer_seconds[part] = layer_seconds.get(part, 0.0) + time.perf_counter() - t0
        read = ckpt.bytes_read
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    layers = [k for k in layer_seconds if k != "rest"]
    per_layer_read = [sum(b for n, b in read.items() if n.startswith(f"layers.{k}.")) for k in layers]
    return {
        "variant": variant,
        "seconds": seconds,
        "rest_seconds": layer_seconds["rest"],
        "layer_seconds": statistics.mean(layer_seconds[k] for k in layers),
        "read_bytes": sum(read.values()),
        "layer_read_bytes": statistics.mean(per_layer_read),
        "param_bytes": sum(t.numel() * t.element_size() for t in held),
        "transient_anon_bytes": (max(peak) - _anon_kib()) * 1024,
    }


def load(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for p in range(args.passes):
        for v in args.variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(args.load),
                "--variants",
                v,
                "--tp",
                str(args.tp),
                "--ogroup-tp",
                str(args.ogroup_tp),
                "--rank",
                str(args.rank),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"{v} failed:\n{proc.stderr[-3000:]}")
            runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"pass {p} {v}: {runs[v][-1]}", flush=True)
    lines = [f"# V4-Flash-shaped checkpoint {args.load}: rank {args.rank} of W={args.tp}, t={args.ogroup_tp}; {args.passes} interleaved passes", ""]
    lines += [
        "| variant | seconds (median, min - max) | per layer s | embed/head/norms s | read GiB (per layer) | params GiB | transient host GiB (max) | 43 layers, extrapolated s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, rs in runs.items():
        secs, per_layer, rest = ([r[k] for r in rs] for k in ("seconds", "layer_seconds", "rest_seconds"))
        r0 = rs[0]
        lines.append(
            f"| {v} | {statistics.median(secs):.2f} ({min(secs):.2f} - {max(secs):.2f}) | {statistics.median(per_layer):.2f} | {statistics.median(rest):.2f} | "
            f"{r0['read_bytes'] / 2**30:.3f} ({r0['layer_read_bytes'] / 2**30:.3f}) | {r0['param_bytes'] / 2**30:.3f} | "
            f"{max(r['transient_anon_bytes'] for r in rs) / 2**30:.3f} | {statistics.median(rest) + 43 * statistics.median(per_layer):.0f} |"
        )
    lines += ["", "transient host: peak RssAnon (sampled every 2 ms) minus RssAnon once loaded, with the parameters still held."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(runs, indent=1))
        Path(f"{args.out}.md").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--load", type=Path)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", default=["cpu"], choices=["cpu", "cuda", "cpu+copy"])
    p.add_argument("--tp", type=int, default=16)
    p.add_argument("--ogroup-tp", type=int, default=8)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_one(args.child, args.variants[0], args.tp, args.ogroup_tp, args.rank)))
    elif args.write:
        write(args.write, args.layers)
    elif args.load:
        load(args)
    else:
        p.error("pass --write DIR or --load DIR")


if __name__ == "__main__":
    main()
