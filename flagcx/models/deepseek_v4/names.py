"""DeepSeek's published V4 tensor names -> transformers' ``DeepseekV4ForCausalLM`` names (one pinned table).

The published files use DeepSeek's reference names (``embed.weight``,
``layers.N.attn.wq_b.weight``, ``layers.N.ffn.experts.E.w1.weight``, ...) with the block
scales beside their weights as ``<module>.scale``. transformers renames them through its
``conversion_mapping`` for ``deepseek_v4``; this table gives the same result as a list of
whole-name patterns, so a name either matches exactly one rule or is reported, and the
tests check it against transformers' own loader.

Routed experts are stored one tensor per expert; transformers fuses them:
``gate_up_proj[e] = cat(w1, w3)`` and ``down_proj[e] = w2``. :func:`expert_part` names the
piece a published expert tensor contributes.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

_L = r"layers\.(\d+)\."
_M = r"model.layers.\1."

RULES: tuple[tuple[str, str], ...] = (
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"head\.weight", "lm_head.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"hc_head_(fn|base|scale)", r"model.hc_head.hc_\1"),
    (_L + r"attn_norm\.weight", _M + "input_layernorm.weight"),
    (_L + r"ffn_norm\.weight", _M + "post_attention_layernorm.weight"),
    (_L + r"hc_(attn|ffn)_(fn|base|scale)", _M + r"\2_hc.\3"),
    (_L + r"attn\.attn_sink", _M + "self_attn.sinks"),
    (_L + r"attn\.wq_a\.weight", _M + "self_attn.q_a_proj.weight"),
    (_L + r"attn\.q_norm\.weight", _M + "self_attn.q_a_norm.weight"),
    (_L + r"attn\.wq_b\.weight", _M + "self_attn.q_b_proj.weight"),
    (_L + r"attn\.wkv\.weight", _M + "self_attn.kv_proj.weight"),
    (_L + r"attn\.kv_norm\.weight", _M + "self_attn.kv_norm.weight"),
    (_L + r"attn\.wo_a\.weight", _M + "self_attn.o_a_proj.weight"),
    (_L + r"attn\.wo_b\.weight", _M + "self_attn.o_b_proj.weight"),
    (_L + r"attn\.compressor\.wkv\.weight", _M + "self_attn.compressor.kv_proj.weight"),
    (_L + r"attn\.compressor\.wgate\.weight", _M + "self_attn.compressor.gate_proj.weight"),
    (_L + r"attn\.compressor\.ape", _M + "self_attn.compressor.position_bias"),
    (_L + r"attn\.compressor\.norm\.weight", _M + "self_attn.compressor.kv_norm.weight"),
    (_L + r"attn\.indexer\.wq_b\.weight", _M + "self_attn.compressor.indexer.q_b_proj.weight"),
    (_L + r"attn\.indexer\.weights_proj\.weight", _M + "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    (_L + r"attn\.indexer\.compressor\.wkv\.weight", _M + "self_attn.compressor.indexer.kv_proj.weight"),
    (_L + r"attn\.indexer\.compressor\.wgate\.weight", _M + "self_attn.compressor.indexer.gate_proj.weight"),
    (_L + r"attn\.indexer\.compressor\.ape", _M + "self_attn.compressor.indexer.position_bias"),
    (_L + r"attn\.indexer\.compressor\.norm\.weight", _M + "self_attn.compressor.indexer.kv_norm.weight"),
    (_L + r"ffn\.gate\.weight", _M + "mlp.gate.weight"),
    (_L + r"ffn\.gate\.bias", _M + "mlp.gate.e_score_correction_bias"),
    (_L + r"ffn\.gate\.tid2eid", _M + "mlp.gate.tid2eid"),
    (_L + r"ffn\.shared_experts\.w1\.weight", _M + "mlp.shared_experts.gate_proj.weight"),
    (_L + r"ffn\.shared_experts\.w2\.weight", _M + "mlp.shared_experts.down_proj.weight"),
    (_L + r"ffn\.shared_experts\.w3\.weight", _M + "mlp.shared_experts.up_proj.weight"),
)
"""(published name pattern, transformers name) for every tensor but the routed experts and the scales."""

_COMPILED = tuple((re.compile(p), r) for p, r in RULES)
_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.w([123])\.weight")

SKIPPED_PREFIXES = ("mtp.",)
"""Published tensors ``DeepseekV4ForCausalLM`` has no module for (the multi-token-prediction block)."""

SCALE_SUFFIX = ".scale"


class ExpertPart(NamedTuple):
    """Where a published routed-expert tensor goes: ``target[expert]``, rows from ``part`` (w1 / w3) or the whole (w2)."""

    target: str
    expert: int
    part: int


def expert_part(name: str) -> Optional[ExpertPart]:
    """The fused expert tensor a published ``layers.N.ffn.experts.E.wK.weight`` belongs to (None for other names)."""
    m = _EXPERT.fullmatch(name)
    if m is None:
        return None
    layer, expert, k = m.group(1), int(m.group(2)), int(m.group(3))
    fused = "down_proj" if k == 2 else "gate_up_proj"
    return ExpertPart(f"model.layers.{layer}.mlp.experts.{fused}", expert, k)


def target_name(name: str) -> Optional[str]:
    """The transformers name of a published non-expert, non-scale tensor (None when no rule matches)."""
    for pattern, replacement in _COMPILED:
        m = pattern.fullmatch(name)
        if m:
            return m.expand(replacement)
    return None


def scale_of(weight_name: str) -> str:
    """The published name of a weight's block scale (``<module>.scale``, beside ``<module>.weight``)."""
    return weight_name.removesuffix(".weight") + SCALE_SUFFIX
