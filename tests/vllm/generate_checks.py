"""vLLM's LLM on flagcx: greedy tokens of a tiny random Llama at tensor_parallel_size=2 equal those at 1.

Run by .ci/vllm. Builds the model and a word-level tokenizer locally (no downloads), then
runs ``LLM.generate`` in two fresh processes (TP=1 with vLLM alone, TP=2 with
FLAGCX_VLLM=1) and compares the token ids of 4 prompts x 16 tokens; the TP=2 workers must
log vLLM's "backend=flagcx" and flagcx's choice of its shm transport. Exits 1 on any difference.

    python tests/vllm/generate_checks.py            # build, run both, compare
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["the quick brown fox", "one two three four", "flagcx runs vllm on", "a b c d e f"]
WORDS = sorted({w for p in PROMPTS for w in p.split()} | {f"w{i}" for i in range(200)})


def build(folder: Path) -> None:
    """A 2-layer random Llama (4 heads of 64, 2 KV heads: vLLM's CPU attention needs head_dim 32 or more; float32) and a word-level tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def run(folder: Path, tp: int, out: Path) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), tensor_parallel_size=tp, dtype="float32", enforce_eager=True, max_model_len=128, seed=0, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    out.write_text(json.dumps([list(t) for t in tokens]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run", type=Path)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", type=Path)
    ns = p.parse_args()
    if ns.run:
        run(ns.run, ns.tp, ns.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-llama"
        build(folder)
        results = {}
        for tp in (1, 2):
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0"}
            env.pop("FLAGCX_VLLM", None)
            if tp == 2:
                env.update(FLAGCX_VLLM="1", FLAGCX_DEBUG="INFO")
            out = Path(tmp) / f"tp{tp}.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--run", str(folder), "--tp", str(tp), "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
            )
            log = proc.stdout + proc.stderr
            if proc.returncode != 0 or not out.exists():
                print(f"TP={tp} failed (exit {proc.returncode}):\n{log[-6000:]}")
                return 1
            if tp == 2 and ("backend=flagcx" not in log or "uses adapter shm" not in log):
                print(f"TP=2 did not run on the flagcx platform:\n{log[-4000:]}")
                return 1
            results[tp] = json.loads(out.read_text())
            print(f"TP={tp}: {results[tp]}")
        same = results[1] == results[2]
        print(f"tokens equal: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
