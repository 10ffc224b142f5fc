"""DeepSeek's published V4 checkpoints as a lazy, per-slice dequantizing source for :func:`parallelize`.

``open_checkpoint(path)`` reads only the headers of the shard files (a checkpoint folder
with ``model.safetensors.index.json``, a folder of ``*.safetensors`` or one file) and
answers under transformers' ``DeepseekV4ForCausalLM`` names (:mod:`.names`). A read of a
slice touches only the bytes that slice needs:

- FP8 block weights: the 128-aligned window of weight and scale that covers the slice,
  dequantized in float32 a chunk of rows at a time and cast once to the requested dtype
  (slices need not fall on block edges);
- FP4 routed experts: the rows and 32-column groups of the slice; ``gate_up_proj[e0:e1]``
  and ``down_proj[e0:e1]`` are built from experts e0..e1-1 only (``cat(w1, w3)``, ``w2``),
  one expert at a time into the result, so a rank never reads another rank's experts;
- everything else (BF16, F32, I64; BF16 re-exports without scales) passes through in its
  stored dtype.

``meta_model(path)`` builds the meta-device model from the checkpoint's ``config.json`` in
BF16 (the modules V4 keeps in float32 stay float32). The ``mtp.*`` block has no module in
``DeepseekV4ForCausalLM`` and is skipped; a checkpoint of another architecture (V4.1:
``text_config``, engram or vision tensors) is refused with ``InvalidArgument``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any, Optional, TypeAlias, Union

import torch

from ...errors import invalid
from . import formats
from .names import SCALE_SUFFIX, SKIPPED_PREFIXES, expert_part, scale_of, target_name

OP = "deepseek_v4.open_checkpoint"
ARCHITECTURE = "DeepseekV4ForCausalLM"
INDEX = "model.safetensors.index.json"
CHUNK_ROWS = 8 * formats.FP8_BLOCK
"""Rows dequantized at once (float32 window: CHUNK_ROWS x the slice's columns)."""

log = logging.getLogger("flagcx.models")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
if hasattr(torch, "float4_e2m1fn_x2"):
    _DTYPES["F4"] = torch.float4_e2m1fn_x2
_SLICEABLE_FP4 = (torch.int8, torch.uint8)
"""Packed FP4 storage that safetensors slices by rows (its F4 dtype it reads only whole)."""


@dataclass
class _Stored:
    """One published weight: where it lives, its stored dtype and logical shape, its scale and format."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale: Optional[str] = None
    fmt: Optional[str] = None  # None (as stored), "fp8" or "fp4"


@dataclass
class _Experts:
    """A fused routed-expert tensor: per expert, the published w1 / w3 (gate_up_proj) or w2 (down_proj)."""

    parts: dict[int, dict[int, _Stored]] = field(default_factory=dict)


Index: TypeAlias = Union[slice, Sequence[slice], EllipsisType, None]


class Checkpoint:
    """A published V4 checkpoint under transformers' names; see the module docstring.

    ``keys()``, ``source[name]`` (the whole tensor) and ``get_slice(name)[...]`` behave
    like safetensors' own handles; :meth:`read` takes the dtype and device the
    dequantized values should have. ``bytes_read`` counts the bytes read from the files
    per published tensor; ``skipped`` lists the published tensors no parameter takes.
    """

    def __init__(self, files: dict[str, Path], dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None) -> None:
        from safetensors import safe_open

        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._handles = {path: safe_open(str(path), framework="pt") for path in sorted(set(files.values()))}
        self._file = files
        self.bytes_read: dict[str, int] = {}
        self.skipped = sorted(n for n in files if n.startswith(SKIPPED_PREFIXES))
        self._entries: dict[str, Union[_Stored, _Experts]] = {}
        self._resolve([n for n in files if not n.startswith(SKIPPED_PREFIXES)])
        if self.skipped:
            log.info(
                "open_checkpoint: skipping %d tensors of the MTP block (%s...): DeepseekV4ForCausalLM has no module for them",
                len(self.skipped),
                self.skipped[0],
            )

    # ---- the published names, resolved once ----------------------------------------------------------

    def _stored(self, name: str, scale: Optional[str]) -> _Stored:
        sl = self._handles[self._file[name]].get_slice(name)
        kind = sl.get_dtype()
        if kind not in _DTYPES:
            raise invalid(OP, None, "path", f"tensor {name!r} has dtype {kind}, which this loader does not know", "report the checkpoint")
        dtype, shape = _DTYPES[kind], tuple(sl.get_shape())
        if dtype in (torch.int8, torch.uint8) and scale is not None:  # packed FP4: the header holds bytes
            shape = (*shape[:-1], 2 * shape[-1])
        entry = _Stored(name, dtype, shape, scale)
        if scale is None:
            if dtype in formats.FP8_STORAGE:
                raise invalid(OP, None, "path", f"FP8 weight {name!r} has no block scale {scale_of(name)!r}", "pass the complete checkpoint")
            return entry
        scale_slice = self._handles[self._file[scale]].get_slice(scale)
        sdt, sshape = _DTYPES[scale_slice.get_dtype()], tuple(scale_slice.get_shape())
        if len(shape) != 2 or sdt not in formats.SCALE_STORAGE:
            raise invalid(
                OP,
                None,
                "path",
                f"{name!r} ({dtype}, {list(shape)}) has a {sdt} scale {scale!r}",
                "expected a 2-D FP8 or FP4 weight with an e8m0 or float32 scale",
            )
        if dtype in formats.FP8_STORAGE:
            entry.fmt, grid = "fp8", formats.fp8_grid(*shape)
        elif dtype in formats.FP4_STORAGE:
            entry.fmt, grid = "fp4", formats.fp4_grid(*shape)
        else:
            raise invalid(OP, None, "path", f"{name!r} is stored as {dtype} but has a scale {scale!r}", "only FP8 and FP4 weights carry scales")
        if sshape != grid:
            raise invalid(
                OP,
                None,
                "path",
                f"scale {scale!r} has shape {list(sshape)}; a {entry.fmt} weight of {list(shape)} needs {list(grid)}",
                "the checkpoint is damaged",
            )
        return entry

    def _resolve(self, names: list[str]) -> None:
        present = set(names)
        unknown: list[str] = []
        orphans: list[str] = []
        for name in sorted(names):
            if name.endswith(SCALE_SUFFIX):
                if name.removesuffix(SCALE_SUFFIX) + ".weight" not in present:
                    orphans.append(name)
                continue
            scale: Optional[str] = scale_of(name) if name.endswith(".weight") else None
            scale = scale if scale in present else None
            part = expert_part(name)
            if part is not None:
                experts = self._entries.setdefault(part.target, _Experts())
                assert isinstance(experts, _Experts)
                experts.parts.setdefault(part.expert, {})[part.part] = self._stored(name, scale)
                continue
            target = target_name(name)
            if target is None:
                unknown.append(name)
            else:
                self._entries[target] = self._stored(name, scale)
        if unknown:
            hint = (
                " (engram / vision tensors: a DeepSeek-V4.1 checkpoint, another architecture)" if any("engram" in n or "vision" in n for n in unknown) else ""
            )
            raise invalid(
                OP,
                None,
                "path",
                f"{len(unknown)} tensors are not part of DeepSeek-V4{hint}: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
                "open a DeepSeek-V4 checkpoint (V4-Flash, V4-Pro, their -Base, or a BF16 re-export)",
            )
        if orphans:
            raise invalid(OP, None, "path", f"scales without their weights: {', '.join(orphans[:5])}", "pass the complete checkpoint (every shard file)")
        for target, entry in self._entries.items():
            if isinstance(entry, _Experts):
                self._check_experts(target, entry)

    def _check_experts(self, target: str, entry: _Experts) -> None:
        wanted = (2,) if target.endswith("down_proj") else (1, 3)
        ids = sorted(entry.parts)
        missing = [f"{e}.w{k}" for e in range(ids[-1] + 1) for k in wanted if k not in entry.parts.get(e, {})]
        if missing:
            raise invalid(OP, None, "path", f"{target} lacks routed experts {', '.join(missing[:5])}", "pass the complete checkpoint (every shard file)")
        shapes = {tuple(p.shape) for parts in entry.parts.values() for p in parts.values()}
        if len(shapes) != 1:
            raise invalid(OP, None, "path", f"the routed experts of {target} differ in shape: {sorted(shapes)}", "the checkpoint is damaged")

    # ---- the mapping a loader sees --------------------------------------------------------------------

    def keys(self) -> list[str]:
        """transformers names of every tensor the checkpoint provides."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def get_slice(self, name: str) -> _Slice:
        """A lazy handle whose ``[index]`` reads only that slice (like safetensors' ``get_slice``)."""
        self._entry(name)
        return _Slice(self, name)

    def sources(self, name: str) -> list[str]:
        """The published tensors (weights and scales) that transformers' ``name`` is built from."""
        entry = self._entry(name)
        stored = [s for parts in entry.parts.values() for s in parts.values()] if isinstance(entry, _Experts) else [entry]
        return [n for s in stored for n in (s.name, s.scale) if n is not None]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of transformers' tensor ``name``."""
        entry = self._entry(name)
        if isinstance(entry, _Stored):
            return entry.shape
        first = entry.parts[0]
        rows = sum(first[k].shape[0] for k in sorted(first))
        return (len(entry.parts), rows, first[min(first)].shape[1])

    def value_dtype(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.dtype:
        """The dtype :meth:`read` returns for ``name``: ``dtype`` (default: the source's) for quantized weights, else the stored one."""
        entry = self._entry(name)
        stored = next(iter(entry.parts[0].values())) if isinstance(entry, _Experts) else entry
        return (dtype or self.dtype) if stored.fmt else stored.dtype

    def _entry(self, name: str) -> Union[_Stored, _Experts]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this DeepSeek-V4 checkpoint") from None

    # ---- reads ----------------------------------------------------------------------------------------

    def read(self, name: str, index: Index = None, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> torch.Tensor:
        """Transformers' tensor ``name`` (or its ``index``: a slice or tuple of slices, step 1), dequantized to ``dtype`` on ``device``."""
        shape = self.shape(name)
        ranges = _ranges(name, index, shape)
        out_dtype = self.value_dtype(name, dtype)
        dev = torch.device(device) if device is not None else self.device
        entry = self._entry(name)
        if isinstance(entry, _Stored):
            return self._read_stored(entry, ranges, out_dtype, dev)
        (e0, e1), rows, cols = ranges
        out = torch.empty((e1 - e0, rows[1] - rows[0], cols[1] - cols[0]), dtype=out_dtype, device=dev)
        for i, e in enumerate(range(e0, e1)):
            at = 0
            for k in sorted(entry.parts[e]):  # w1 then w3 (gate_up_proj), or w2 alone
                part = entry.parts[e][k]
                lo, hi = max(rows[0], at), min(rows[1], at + part.shape[0])
                if lo < hi:
                    out[i, lo - rows[0] : hi - rows[0]] = self._read_stored(part, [(lo - at, hi - at), cols], out_dtype, dev)
                at += part.shape[0]
        return out

    def _raw(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Stored bytes of ``name[index]``, counted in ``bytes_read``."""
        handle = self._handles[self._file[name]]
        sl = handle.get_slice(name)
        if sl.get_dtype() == "F4":  # safetensors cannot slice F4 (its header holds the unpacked shape): read it whole
            whole = handle.get_tensor(name)
            self.bytes_read[name] = self.bytes_read.get(name, 0) + whole.numel() * whole.element_size()
            return whole[index]
        raw = sl[index]
        self.bytes_read[name] = self.bytes_read.get(name, 0) + raw.numel() * raw.element_size()
        return raw

    def _read_stored(self, entry: _Stored, ranges: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        index = tuple(slice(a, b) for a, b in ranges)
        if entry.fmt is None:
            return self._raw(entry.name, index).to(device)
        assert entry.scale is not None
        (r0, r1), (c0, c1) = ranges
        out = torch.empty((r1 - r0, c1 - c0), dtype=dtype, device=device)
        if r0 == r1 or c0 == c1:
            return out
        if entry.fmt == "fp8":
            a0, a1 = formats.block_window(r0, r1, formats.FP8_BLOCK, entry.shape[0])
            b0, b1 = formats.block_window(c0, c1, formats.FP8_BLOCK, entry.shape[1])
            for s0 in range(a0, a1, CHUNK_ROWS):
                s1 = min(s0 + CHUNK_ROWS, a1)
                w = self._raw(entry.name, (slice(s0, s1), slice(b0, b1))).to(device)
                sc = self._raw(entry.scale, _blocks(s0, s1, b0, b1)).to(device)
                values = formats.dequant_fp8(w, sc, s0, b0)
                lo, hi = max(r0, s0), min(r1, s1)
                out[lo - r0 : hi - r0] = values[lo - s0 : hi - s0, c0 - b0 : c1 - b0]
            return out
        b0, b1 = formats.block_window(c0, c1, formats.FP4_GROUP, entry.shape[1])
        rows = CHUNK_ROWS if entry.dtype in _SLICEABLE_FP4 else r1 - r0  # an F4 tensor is read whole: once
        for s0 in range(r0, r1, rows):
            s1 = min(s0 + rows, r1)
            w = self._raw(entry.name, (slice(s0, s1), slice(b0 // 2, b1 // 2))).to(device)
            sc = self._raw(entry.scale, (slice(s0, s1), slice(b0 // formats.FP4_GROUP, -(-b1 // formats.FP4_GROUP)))).to(device)
            out[s0 - r0 : s1 - r0] = formats.dequant_fp4(w, sc, b0)[:, c0 - b0 : c1 - b0]
        return out

    def close(self) -> None:
        """Drop the file handles (reads after this fail)."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Slice:
    """``checkpoint.get_slice(name)``: indexing reads that slice only."""

    def __init__(self, checkpoint: Checkpoint, name: str) -> None:
        self._checkpoint, self._name = checkpoint, name

    def get_shape(self) -> list[int]:
        return list(self._checkpoint.shape(self._name))

    def __getitem__(self, index: Index) -> torch.Tensor:
        return self._checkpoint.read(self._name, index)


def _blocks(r0: int, r1: int, c0: int, c1: int) -> tuple[slice, slice]:
    """The scale-grid slice of a block-aligned FP8 window."""
    b = formats.FP8_BLOCK
    return slice(r0 // b, -(-r1 // b)), slice(c0 // b, -(-c1 // b))


def _ranges(name: str, index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``index`` as one (start, stop) per dimension; only step-1 slices (and ``...`` / ``None`` for everything)."""
    if index is None or index is Ellipsis:
        parts: tuple[Any, ...] = ()
    elif isinstance(index, slice):
        parts = (index,)
    else:
        parts = tuple(index)
    if len(parts) > len(shape) or not all(isinstance(p, slice) for p in parts):
        raise invalid(
            "deepseek_v4.Checkpoint.read", None, "index", f"{index!r} for {name!r} of shape {list(shape)}", "index with at most one slice per dimension"
        )
    out = []
    for size, part in zip(shape, parts + (slice(None),) * (len(shape) - len(parts))):
        start, stop, step = part.indices(size)
        if step != 1:
            raise invalid("deepseek_v4.Checkpoint.read", None, "index", f"step {step} in {index!r} for {name!r}", "read contiguous slices")
        out.append((start, max(start, stop)))
    return out


def _files(path: Path) -> dict[str, Path]:
    """Published tensor name -> the shard file holding it."""
    if path.is_file():
        shards = [path]
    elif (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise invalid(OP, None, "path", f"{str(path)!r} holds no {INDEX} and no .safetensors file", "pass a checkpoint folder or one .safetensors file")
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), shard))
    return files


def open_checkpoint(path: Union[str, os.PathLike], dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None) -> Checkpoint:
    """A lazy source over a published DeepSeek-V4 checkpoint (folder or ``.safetensors`` file) for ``parallelize``.

    ``dtype`` / ``device``: what dequantized weights become unless a read asks otherwise
    (``parallelize`` asks for each parameter's dtype and its target device).
    """
    root = Path(path)
    if not root.exists():
        raise invalid(OP, None, "path", f"{str(root)!r} does not exist", "pass a checkpoint folder or one .safetensors file")
    config = (root if root.is_dir() else root.parent) / "config.json"
    if config.is_file():
        _check_architecture(json.loads(config.read_text()), str(config))
    return Checkpoint(_files(root), dtype=dtype, device=device)


def _check_architecture(cfg: dict, where: str) -> None:
    """Refuse a config.json that is not DeepSeek-V4's, naming what differs."""
    differs = []
    if cfg.get("model_type") != "deepseek_v4":
        differs.append(f"model_type {cfg.get('model_type')!r} (not 'deepseek_v4')")
    if "architectures" in cfg and ARCHITECTURE not in cfg["architectures"]:
        differs.append(f"architectures {cfg['architectures']} (not {ARCHITECTURE})")
    differs += [f"key {k!r}" for k in cfg if k in ("text_config", "vision_config") or "engram" in k]
    if differs:
        raise invalid(
            OP, None, "path", f"{where} is not a DeepSeek-V4 config: {'; '.join(differs)}", "use a DeepSeek-V4 checkpoint (V4.1 is another architecture)"
        )


def load_config(path_or_config: Any) -> Any:
    """A ``DeepseekV4Config`` from a checkpoint folder, its ``config.json``, a dict, or a config (returned as is).

    transformers folds the legacy fields (``compress_ratios``, ``num_hash_layers``,
    ``qk_rope_head_dim``); ``quantization_config`` and ``expert_dtype`` are dropped, since
    :class:`Checkpoint` dequantizes.
    """
    from transformers import DeepseekV4Config

    if isinstance(path_or_config, DeepseekV4Config):
        return path_or_config
    if isinstance(path_or_config, dict):
        cfg, where = dict(path_or_config), "config"
    else:
        file = Path(path_or_config)
        file = file / "config.json" if file.is_dir() else file
        if not file.is_file():
            raise invalid(
                "deepseek_v4.meta_model",
                None,
                "path_or_config",
                f"{str(file)!r} does not exist",
                "pass a checkpoint folder, its config.json or a DeepseekV4Config",
            )
        cfg, where = json.loads(file.read_text()), str(file)
    _check_architecture(cfg, where)
    for key in ("quantization_config", "expert_dtype"):
        cfg.pop(key, None)
    return DeepseekV4Config.from_dict(cfg)


def meta_model(path_or_config: Any, dtype: torch.dtype = torch.bfloat16) -> Any:
    """The meta-device ``DeepseekV4ForCausalLM`` of a checkpoint (see :func:`load_config`) in ``dtype``, V4's float32 modules kept float32."""
    from transformers import DeepseekV4ForCausalLM

    config = load_config(path_or_config)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM._from_config(config, dtype=dtype)
    return model.eval()
