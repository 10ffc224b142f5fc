"""flagcx.models.deepseek_v4.open_checkpoint / meta_model on checkpoints written in DeepSeek's published layout (one process).

Every dequantized tensor must equal an independent float64 decoding of the stored codes
(power-of-two scales: exactly, in BF16 and float32), transformers' own loader, and any
slice must equal the same slice of the whole tensor. The multi-rank runs (W, t) = (16, 8),
(8, 4), (4, 2) from a generated checkpoint are in tests/ranks/v4_suite.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flagcx import InvalidArgument

from .helpers.v4_checkpoint import FP4_TABLE, published_name, quantize_fp4, reference, write_checkpoint

pytest.importorskip("transformers.models.deepseek_v4", reason="needs transformers >= 5.25 (the [models] extra)")

from flagcx.models.deepseek_v4 import load_config, meta_model, open_checkpoint, random_model, tiny_config  # noqa: E402

ODD = dict(hidden_size=160, q_lora_rank=192, o_lora_rank=24, moe_intermediate_size=96)
"""Sizes whose FP8 blocks do not tile the weights (160, 192, 96 are not multiples of 128) while FP4 groups of 32 do."""

VARIANTS = {
    "flash-i8-e8m0": dict(variant="flash"),
    "flash-x2-u8": dict(variant="flash", fp4_storage="x2", scale_storage="u8"),
    "base-fp8-f32": dict(variant="base"),
    "bf16-reexport": dict(variant="bf16"),
}


@pytest.fixture(scope="module")
def odd_model():
    config = tiny_config(**ODD)
    return config, {k: v.contiguous() for k, v in random_model(config, 7).state_dict().items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def written(request, odd_model, tmp_path_factory):
    config, state = odd_model
    path = tmp_path_factory.mktemp(request.param)
    tensors = write_checkpoint(path, state, config, **VARIANTS[request.param])
    return request.param, path, tensors, reference(tensors, {k: tuple(v.shape) for k, v in state.items()})


def test_every_parameter_has_a_source_and_every_key_is_used(written):
    _, path, tensors, _ = written
    ckpt = open_checkpoint(path)
    model = meta_model(path)
    assert sorted(ckpt.keys()) == sorted(model.state_dict().keys())
    used = {s for name in ckpt.keys() for s in ckpt.sources(name)}
    assert used == {n for n in tensors if not n.startswith("mtp.")}
    assert ckpt.skipped == sorted(n for n in tensors if n.startswith("mtp."))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantized_equals_float64_decoding(written, dtype):
    variant, path, _, ref = written
    ckpt = open_checkpoint(path)
    for name in ckpt.keys():
        got = ckpt.read(name, dtype=dtype)
        want = ref[name]
        if not got.is_floating_point():
            assert torch.equal(got, want), name
            continue
        if variant.startswith("flash") and got.dtype == dtype and ckpt.sources(name)[-1].endswith(".scale"):
            # power-of-two scales: the float64 product is already a BF16 / float32 value, so nothing rounds
            assert torch.equal(want.to(dtype).double(), want), f"{name}: dequantization is not exact"
        if variant.startswith("base"):
            want = want.float()  # float32 scales: the product is rounded once, in float32
        assert got.dtype == ckpt.value_dtype(name, dtype)
        assert torch.equal(got, want.to(got.dtype)), f"{variant} {name}: max difference {(got.double() - ref[name]).abs().max()}"


def test_slices_off_block_edges_equal_the_slice_of_the_whole(written):
    _, path, _, _ = written
    ckpt = open_checkpoint(path)
    rng = random.Random(5)
    for name in ckpt.keys():
        whole, whole32 = ckpt[name], ckpt.read(name, dtype=torch.float32)
        for _ in range(6):
            index = []
            for size in whole.shape:
                a = rng.randrange(0, size + 1)
                b = rng.randrange(a, size + 1)
                index.append(slice(a, b))
            index = tuple(index[: rng.randrange(1, whole.dim() + 1)])
            assert torch.equal(ckpt.get_slice(name)[index], whole[index]), f"{name}{index}"
            assert torch.equal(ckpt.read(name, index, dtype=torch.float32), whole32[index]), f"{name}{index} as float32"


def test_experts_read_only_their_own_bytes(written):
    _, path, tensors, _ = written
    ckpt = open_checkpoint(path)
    name = "model.layers.3.mlp.experts.gate_up_proj"
    ckpt.read(name, (slice(5, 9),))
    mine = {f"layers.3.ffn.experts.{e}.w{k}.{leaf}" for e in range(5, 9) for k in (1, 3) for leaf in ("weight", "scale")}
    assert set(ckpt.bytes_read) == mine & set(tensors)
    for n, count in ckpt.bytes_read.items():
        assert count == tensors[n].numel() * tensors[n].element_size(), n
    # rows across the w1 / w3 boundary of one expert
    ckpt.bytes_read.clear()
    half = ckpt.shape(name)[1] // 2
    assert torch.equal(ckpt.read(name, (slice(2, 3), slice(half - 3, half + 5))), ckpt.read(name)[2:3, half - 3 : half + 5])


def test_transformers_loads_the_same_bf16_values():
    """transformers' own loader (FP8 dequantized on CPU) on the same files: every tensor bit-identical."""
    from transformers import DeepseekV4ForCausalLM

    config = tiny_config()
    state = {k: v.contiguous() for k, v in random_model(config, 11).state_dict().items()}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        write_checkpoint(path, state, config, variant="flash")
        theirs = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).state_dict()
        ckpt = open_checkpoint(path)
        assert sorted(theirs) == sorted(ckpt.keys())
        for name, value in theirs.items():
            got = ckpt.read(name, dtype=value.dtype)
            assert torch.equal(got.to(value.dtype), value), name  # stored BF16 norms become float32 parameters in both


def _fp4_as_fp8(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's lossless FP4 -> FP8 route (convert.py's cast_e2m1fn_to_e4m3fn), written from its description:
    per 128 x 128 block the scale is the largest of its FP4 scales / 2^6, and each value carries its own
    scale's ratio to it (a power of two <= 2^6, so 6 x 2^6 = 384 fits e4m3)."""
    raw = packed.view(torch.uint8).long()
    codes = torch.stack([raw & 0xF, raw >> 4], dim=-1).flatten(1)
    table = torch.tensor(FP4_TABLE + [-v for v in FP4_TABLE], dtype=torch.float32)
    values = table[codes]
    rows, cols = values.shape
    s = scale.view(torch.float8_e8m0fnu).float()
    block = s.view(rows // 128, 128, cols // 128, 4).amax(dim=(1, 3)) / 2**6
    ratio = s / block.repeat_interleave(128, 0).repeat_interleave(4, 1)
    fp8 = (values * ratio.repeat_interleave(32, 1)).to(torch.float8_e4m3fn)
    return fp8, block.to(torch.float8_e8m0fnu)


def test_fp4_to_fp8_route_dequantizes_to_the_same_values(tmp_path):
    g = torch.Generator().manual_seed(3)
    direct, routed = {}, {}
    for k in (1, 3):
        w = torch.randn(256, 384, generator=g) * torch.logspace(-2, 0, 384).unsqueeze(0)  # scales differ across groups
        packed, exponent = quantize_fp4(w)
        name = f"layers.0.ffn.experts.0.w{k}"
        direct[f"{name}.weight"], direct[f"{name}.scale"] = packed, exponent.view(torch.float8_e8m0fnu)
        routed[f"{name}.weight"], routed[f"{name}.scale"] = _fp4_as_fp8(packed, exponent)
    for folder, tensors in (("fp4", direct), ("fp8", routed)):
        (tmp_path / folder).mkdir()
        save_file(tensors, str(tmp_path / folder / "model.safetensors"))
    a = open_checkpoint(tmp_path / "fp4").read("model.layers.0.mlp.experts.gate_up_proj", dtype=torch.float32)
    b = open_checkpoint(tmp_path / "fp8").read("model.layers.0.mlp.experts.gate_up_proj", dtype=torch.float32)
    assert a.abs().max() > 0 and torch.equal(a, b)


def test_meta_model_from_config_json(written):
    _, path, _, _ = written
    config = tiny_config(**ODD)
    loaded = load_config(path)
    assert loaded.layer_types == config.layer_types and loaded.mlp_layer_types == config.mlp_layer_types
    assert loaded.partial_rotary_factor == config.partial_rotary_factor
    assert getattr(loaded, "quantization_config", None) is None
    model = meta_model(path)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(p.is_meta for p in model.parameters())
    assert dtypes["model.layers.0.self_attn.q_b_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.experts.gate_up_proj"] == torch.bfloat16
    for kept in ("model.layers.0.attn_hc.fn", "model.layers.0.self_attn.sinks", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert dtypes[kept] == torch.float32, kept
    assert meta_model(path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_other_architectures_and_damaged_checkpoints_are_refused(written, tmp_path):
    variant, path, tensors, _ = written
    if variant != "flash-i8-e8m0":
        pytest.skip("one variant is enough")
    v41 = _copy(path, tmp_path / "v41")
    cfg = json.loads((v41 / "config.json").read_text())
    (v41 / "config.json").write_text(json.dumps({**cfg, "architectures": ["DeepseekV41ForCausalLM"], "text_config": {}}))
    with pytest.raises(InvalidArgument, match="architectures.*DeepseekV41ForCausalLM.*text_config"):
        open_checkpoint(v41)
    with pytest.raises(InvalidArgument, match="text_config"):
        meta_model(v41)
    (v41 / "config.json").write_text(json.dumps(cfg))
    save_file({"engram.table.0": torch.zeros(4)}, str(v41 / "extra.safetensors"))
    index = json.loads((v41 / "model.safetensors.index.json").read_text())
    index["weight_map"]["engram.table.0"] = "extra.safetensors"
    (v41 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="engram.*V4.1.*engram.table.0"):
        open_checkpoint(v41)
    cases = (
        (["layers.1.ffn.experts.3.w3.weight", "layers.1.ffn.experts.3.w3.scale"], "lacks routed experts 3.w3"),
        (["layers.1.ffn.experts.3.w3.weight"], "scales without their weights: layers.1.ffn.experts.3.w3.scale"),
        (["layers.0.attn.wq_b.scale"], "FP8 weight 'layers.0.attn.wq_b.weight' has no block scale"),
    )
    for drop, match in cases:
        damaged = _copy(path, tmp_path / f"drop-{len(drop)}-{drop[-1]}")
        index = json.loads((damaged / "model.safetensors.index.json").read_text())
        for name in drop:
            del index["weight_map"][name]
        (damaged / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(InvalidArgument, match=match):
            open_checkpoint(damaged)
    with pytest.raises(InvalidArgument, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_one_file_checkpoint_and_published_names(tmp_path):
    config = tiny_config()
    state = random_model(config, 2).state_dict()
    tensors = write_checkpoint(tmp_path / "sharded", state, config, shards=1)
    single = tmp_path / "one.safetensors"
    (tmp_path / "sharded" / "model-00001-of-00001.safetensors").rename(single)
    ckpt = open_checkpoint(single)
    assert sorted(ckpt.keys()) == sorted(state.keys())
    assert published_name("model.layers.2.self_attn.compressor.indexer.position_bias") == "layers.2.attn.indexer.compressor.ape"
    assert math.prod(ckpt.shape("model.layers.0.mlp.experts.down_proj")) == state["model.layers.0.mlp.experts.down_proj"].numel()
    assert len(tensors) > len(state)


def test_meta_model_of_v4_flash_fits_the_memory_table():
    """meta_model's BF16 model holds what flagcx.models.memory counts (37.0 GiB a rank at W=16, t=8), not float32's double."""
    from transformers import DeepseekV4Config

    from flagcx.models.memory import meta_parameters, param_bytes_per_rank

    config = DeepseekV4Config()
    model = meta_model(config)
    ours = [(n, tuple(t.shape), t.element_size()) for n, t in model.state_dict().items()]
    assert param_bytes_per_rank(config, ours, 16, 8) == param_bytes_per_rank(config, meta_parameters(config), 16, 8)
    assert round(param_bytes_per_rank(config, ours, 16, 8) / 2**30, 1) == 37.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dequantizing_on_cuda_equals_the_host(written):
    """device=cuda moves the raw windows and dequantizes there: the same bits as on the host."""
    _, path, _, _ = written
    ckpt = open_checkpoint(path)
    for name in ckpt.keys():
        for dtype in (torch.bfloat16, torch.float32):
            on_gpu = ckpt.read(name, dtype=dtype, device=torch.device("cuda"))
            assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), ckpt.read(name, dtype=dtype)), f"{name} {dtype}"
