"""Write a DeepSeek-V4 checkpoint in the layout DeepSeek publishes, from a transformers state dict; and read it back in float64.

The writer is independent of ``flagcx.models.deepseek_v4``: its own name table
(transformers -> published), its own quantizers, and :func:`reference` decodes the files
it wrote with float64 arithmetic on the raw codes (no shared code with the loader).

Variants (``variant=``):
- ``flash``: dense linears FP8 e4m3 with one ue8m0 scale per 128 x 128 block
  (``F8_E8M0``, or raw ``U8`` bytes with ``scale_storage="u8"``), routed experts FP4 e2m1
  packed two per byte (``I8``, or torch's ``float4_e2m1fn_x2`` with ``fp4_storage="x2"``)
  with one ue8m0 scale per 32 columns of a row;
- ``base``: FP8 everywhere (experts too) with float32 block scales (not powers of two);
- ``bf16``: a BF16 re-export, no scales.

Always: several shard files and ``model.safetensors.index.json`` (a weight and its scale
land in different files), the F32 / I64 tensors DeepSeek stores, ``mtp.0.*`` tensors, and a
``config.json`` with the legacy fields (``compress_ratios``, ``num_hash_layers``,
``qk_rope_head_dim``) and a ``quantization_config``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
FP8_LINEARS = (
    "attn.wq_a",
    "attn.wq_b",
    "attn.wkv",
    "attn.wo_a",
    "attn.wo_b",
    "attn.indexer.wq_b",
    "ffn.shared_experts.w1",
    "ffn.shared_experts.w2",
    "ffn.shared_experts.w3",
)
FLOAT32 = ("hc_", "attn_sink", ".ape", "gate.bias")
FP4_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP8_MAX, FP4_MAX = 448.0, 6.0


def published_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    _, _, layer, rest = name.split(".", 3)
    return f"layers.{layer}.{LAYER[rest]}"


def _pow2_at_least(x: torch.Tensor) -> torch.Tensor:
    """Exponents e with 2^e >= x (x > 0), as int64."""
    return torch.ceil(torch.log2(x.double())).long()


def quantize_fp8(w: torch.Tensor, float32_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 codes and one scale per 128 x 128 block (ue8m0 exponent bytes as uint8, or float32 amax / 448)."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / 128), math.ceil(cols / 128)
    padded = torch.zeros(br * 128, bc * 128, dtype=torch.float64)
    padded[:rows, :cols] = w.double()
    amax = padded.abs().reshape(br, 128, bc, 128).amax(dim=(1, 3)).clamp(min=1e-30)
    if float32_scale:
        scale = (amax / FP8_MAX).float()
        stored = scale
    else:
        exponent = _pow2_at_least(amax / FP8_MAX)
        scale = torch.pow(2.0, exponent.double())
        stored = (exponent + 127).to(torch.uint8)
    full = scale.double()[torch.arange(rows) // 128][:, torch.arange(cols) // 128]
    return (w.double() / full).to(torch.float8_e4m3fn), stored


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 codes packed two per byte (int8, low nibble = even column) and one ue8m0 exponent byte per 32 columns of a row."""
    rows, cols = w.shape
    groups = math.ceil(cols / 32)
    padded = torch.zeros(rows, groups * 32, dtype=torch.float64)
    padded[:, :cols] = w.double()
    amax = padded.abs().reshape(rows, groups, 32).amax(dim=2).clamp(min=1e-30)
    exponent = _pow2_at_least(amax / FP4_MAX)
    x = w.double() / torch.pow(2.0, exponent.double()).repeat_interleave(32, dim=1)[:, :cols]
    table = torch.tensor(FP4_TABLE, dtype=torch.float64)
    magnitude = (x.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)
    codes = magnitude + 8 * (x < 0).long()
    if cols % 2:
        codes = torch.cat([codes, torch.zeros(rows, 1, dtype=torch.long)], dim=1)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, (exponent + 127).to(torch.uint8)


def _published_tensors(state: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Published name -> stored tensor (codes, scales, or values in DeepSeek's dtypes)."""
    out: dict[str, torch.Tensor] = {}

    def put_linear(name: str, w: torch.Tensor, kind: str) -> None:
        module = name.removesuffix(".weight")
        if variant == "bf16" or kind == "bf16":
            out[name] = w.to(torch.bfloat16)
        elif kind == "fp4":
            out[name], out[module + ".scale"] = quantize_fp4(w)
        else:
            out[name], out[module + ".scale"] = quantize_fp8(w, float32_scale=variant == "base")

    for name, value in state.items():
        if ".mlp.experts." in name:
            layer = name.split(".")[2]
            kind = "fp4" if variant == "flash" else "fp8"
            for e in range(value.shape[0]):
                prefix = f"layers.{layer}.ffn.experts.{e}."
                if name.endswith("gate_up_proj"):
                    w1, w3 = value[e].chunk(2, dim=0)
                    put_linear(prefix + "w1.weight", w1, kind)
                    put_linear(prefix + "w3.weight", w3, kind)
                else:
                    put_linear(prefix + "w2.weight", value[e], kind)
            continue
        pub = published_name(name)
        if pub.removesuffix(".weight").endswith(FP8_LINEARS):
            put_linear(pub, value, "fp8")
        elif value.dtype == torch.int64:
            out[pub] = value
        elif any(tag in pub for tag in FLOAT32):
            out[pub] = value.float()
        else:
            out[pub] = value.to(torch.bfloat16)
    hidden = state["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(99)
    out["mtp.0.enorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    put_linear("mtp.0.e_proj.weight", torch.randn(hidden, hidden, generator=g) * 0.1, "fp8")
    put_linear("mtp.0.ffn.experts.0.w1.weight", torch.randn(hidden, hidden, generator=g) * 0.1, "fp4" if variant == "flash" else "fp8")
    return out


def config_json(config: Any) -> dict:
    """The config as published: legacy fields instead of transformers' folded ones, plus a quantization_config."""
    cfg = config.to_dict()
    ratio = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    cfg["compress_ratios"] = [ratio[t] for t in config.layer_types] + [0]  # one more for the MTP layer
    cfg["num_hash_layers"] = config.mlp_layer_types.count("hash_moe")
    cfg["qk_rope_head_dim"] = config.qk_rope_head_dim
    for key in ("layer_types", "mlp_layer_types", "partial_rotary_factor", "transformers_version"):
        cfg.pop(key, None)
    cfg["architectures"] = ["DeepseekV4ForCausalLM"]
    cfg["expert_dtype"] = "fp4"
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    return cfg


def write_checkpoint(
    path: Path,
    state: dict[str, torch.Tensor],
    config: Any,
    variant: str = "flash",
    shards: int = 3,
    scale_storage: str = "e8m0",
    fp4_storage: str = "i8",
) -> dict[str, torch.Tensor]:
    """Write the checkpoint into folder ``path``; returns the published tensors as stored."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = _published_tensors(state, variant)
    for name, t in tensors.items():
        if t.dtype == torch.uint8 and name.endswith(".scale") and scale_storage == "e8m0":
            tensors[name] = t.view(torch.float8_e8m0fnu)
        if t.dtype == torch.int8 and fp4_storage == "x2":
            tensors[name] = t.view(torch.uint8).view(torch.float4_e2m1fn_x2)
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(names)}  # x.scale and x.weight sort next to each other
    for file in files:
        save_file({n: tensors[n].contiguous() for n in names if weight_map[n] == file}, str(path / file), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(config_json(config), indent=1))
    return tensors


def _scale64(stored: torch.Tensor) -> torch.Tensor:
    """Scales in float64: e8m0 bytes as 2.0 ** (byte - 127), element by element; float32 as is."""
    if stored.dtype == torch.float32:
        return stored.double()
    raw = stored.view(torch.uint8).flatten().tolist()
    return torch.tensor([2.0 ** (b - 127) for b in raw], dtype=torch.float64).reshape(stored.shape)


def _fp4_64(packed: torch.Tensor, cols: int) -> torch.Tensor:
    raw = packed.view(torch.uint8).long()
    codes = torch.stack([raw % 16, raw // 16], dim=-1).reshape(raw.shape[0], -1)[:, :cols]
    magnitude = torch.tensor(FP4_TABLE, dtype=torch.float64)[codes % 8]
    return torch.where(codes >= 8, -magnitude, magnitude)


def reference(tensors: dict[str, torch.Tensor], state_names: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """transformers name -> float64 values decoded from the stored tensors (experts fused as transformers does)."""

    def decode(pub: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = tensors[pub]
        scale = tensors.get(pub.removesuffix(".weight") + ".scale")
        if scale is None:
            return w.double() if w.is_floating_point() else w
        rows, cols = shape[-2:]
        s = _scale64(scale)
        if w.dtype == torch.float8_e4m3fn:
            return w.double() * s[torch.arange(rows) // 128][:, torch.arange(cols) // 128]
        values = _fp4_64(w.view(torch.uint8), cols)
        return values * s[:, torch.arange(cols) // 32]

    out = {}
    for name, shape in state_names.items():
        if ".mlp.experts." in name:
            layer = name.split(".")[2]
            experts = []
            for e in range(shape[0]):
                prefix = f"layers.{layer}.ffn.experts.{e}."
                if name.endswith("gate_up_proj"):
                    half = (shape[1] // 2, shape[2])
                    experts.append(torch.cat([decode(prefix + "w1.weight", half), decode(prefix + "w3.weight", half)]))
                else:
                    experts.append(decode(prefix + "w2.weight", shape[1:]))
            out[name] = torch.stack(experts)
        else:
            out[name] = decode(published_name(name), shape)
    return out
