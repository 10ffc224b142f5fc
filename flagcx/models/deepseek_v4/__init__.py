"""DeepSeek-V4 (transformers' ``DeepseekV4ForCausalLM``) under nested TP, loaded from DeepSeek's published checkpoints.

- :mod:`.parallel`: ``parallelize(model, groups, state_dict)`` makes a (meta-device) model
  this rank's shard of the nested-TP layout;
- :mod:`.checkpoint`: ``open_checkpoint(path)``, the published sharded FP8 / FP4 files as a
  lazy source that dequantizes each rank's slices, and ``meta_model(path)``;
- :mod:`.names` (published -> transformers names) and :mod:`.formats` (the number formats).

    groups = init_tp_groups(tp=16, ogroup_tp=8, o_groups=8)
    model = meta_model(path)                       # BF16, V4's float32 modules kept float32
    with open_checkpoint(path) as ckpt:
        parallelize(model, groups, state_dict=ckpt, device=torch.device("cuda", local_rank))
"""

from .checkpoint import Checkpoint, load_config, meta_model, open_checkpoint
from .parallel import Shards, Traffic, check_layout, parallelize, parameter_bytes, random_model, tiny_config

__all__ = [
    "Checkpoint",
    "Shards",
    "Traffic",
    "check_layout",
    "load_config",
    "meta_model",
    "open_checkpoint",
    "parallelize",
    "parameter_bytes",
    "random_model",
    "tiny_config",
]
