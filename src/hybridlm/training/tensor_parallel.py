"""Tensor parallelism (Megatron's split) on PyTorch's DTensor: `check_tensor_parallel`, `apply_tensor_parallel`,
the segmented Mamba-2 projections and the canonical <-> segmented parameter-name translation.

Every split is a DTensor placement on the ``tp`` mesh, applied with
``torch.distributed.tensor.parallel.parallelize_module``; the collectives are DTensor's own:

* attention: q/k/v_proj ``ColwiseParallel`` (whole heads per rank, the GQA grouping kept),
  o_proj ``RowwiseParallel`` (all-reduce of the partial outputs); the module's ``n_heads`` /
  ``n_kv_heads`` become the local counts. ``qk_norm`` (per head) is replicated and fed its
  local heads as a ``Shard(1)`` DTensor, so its weight gradient is summed over all heads.
* MLP: up_proj column-, down_proj row-parallel.
* Mamba-2: a plain ``ColwiseParallel`` on in_proj would give rank 0 the first rows (all of z and
  part of x), so `segment_mamba` first gives ``in_proj`` / ``conv1d`` one parameter per segment
  (in_proj: z, x, B, C, dt; conv1d: x, B, C; `segment_module`: their ``weight`` / ``bias`` become
  the concatenation of the segments, so the modules' own forward runs unchanged), each
  ``Shard(0)`` on the mesh; rank r's in_proj output is then ``[z_r, x_r, B_r, C_r, dt_r]``:
  its own heads' z, x and dt and its own groups' B and C (heads split with their groups). dt_bias,
  A_log, D and the gated norm weight are ``Shard(0)`` (per head; the norm is per group, so it
  stays local); out_proj is row-parallel. The mixer's per-process sizes (``n_heads``,
  ``n_groups``, ``d_inner``, ``conv_dim``) become the local ones; it reads its parameters through
  `hybridlm.model.rowwise.local`. The input of in_proj enters as a ``Replicate`` DTensor whose
  gradient is declared ``Partial`` (``to_local(grad_placements=...)``): DTensor all-reduces it in
  backward, Megatron's "f" operator (what ``ColwiseParallel`` does for a plain linear).
* replicated (`ReplicateParallel`: parameters ``Replicate`` DTensors, inputs/outputs converted at
  the module boundary): embeddings, lm_head (tied or not), the block norms, norm_f and the
  post-projection stability norms. Every parameter is thus a DTensor on the one mesh, which
  gradient clipping (one global norm) and FSDP2 on top (``fully_shard`` on the ``dp`` mesh) need.

Not split: ``qkv_norm`` normalises over the concatenated Q/K/V output of all heads (a reduction
across ranks the layer does not express), so `check_tensor_parallel` refuses it. The FP8 / NVFP4
recipes are refused too (`TrainConfig`). TP is for training: the inference caches and decoding
use the gathered model (``full_state``). Under TP, `OutputMonitor` (rank 0) sees rank 0's shard
of column-parallel outputs and attention logits. FSDP2 models are segmented too (tp = 1), so that
sharded checkpoints have the same keys in every layout (`hybridlm.training.dcp_checkpoint`).

Parameter names: a segmented model has ``...mixer.in_proj.weight_z`` (``_x``, ``_B``, ``_C``,
``_dt``; ``bias_*`` with ``mamba_proj_bias``) and ``...mixer.conv1d.weight_x`` (``_B``, ``_C``;
``bias_*``) instead of the canonical ``...mixer.in_proj.weight`` / ``conv1d.weight``;
`state_to_canonical` / `state_to_segmented` (and the ``optim_`` pair for FQN-keyed optimizer
state dicts) translate, so full exports stay canonical.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..config import HybridConfig
from ..model.attention import Attention
from ..model.lm import HybridLM
from ..model.mamba2 import Mamba2Mixer
from ..model.mlp import MLP
from ..model.rowwise import local

IN_PROJ_SEGMENTS = ("z", "x", "B", "C", "dt")
CONV_SEGMENTS = ("x", "B", "C")


# ---- checks ------------------------------------------------------------------------------------
def check_tensor_parallel(cfg: HybridConfig, tp: int) -> None:
    """ValueError (one message listing every problem) unless `cfg` splits into `tp` ranks."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp (tensor-parallel degree) must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    kinds = set(cfg.layer_kinds())
    sizes: list[tuple[str, int]] = []
    if "attention" in kinds:
        sizes += [("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads)]
    if "mamba" in kinds:
        sizes += [("mamba_heads", cfg.mamba_heads), ("n_groups", cfg.n_groups)]
    if "mlp" in kinds:
        sizes += [("ffn_dim", cfg.ffn_dim)]
    problems = [f"{name}={value} is not divisible by tp={tp}" for name, value in sizes if value % tp]
    if "attention" in kinds and cfg.qkv_norm != "none":
        problems.append(f"qkv_norm={cfg.qkv_norm!r} normalises over the whole concatenated Q/K/V output (all heads), "
                        "which tensor parallelism splits across ranks: turn qkv_norm off or use tp=1")
    if problems:
        raise ValueError(f"tensor parallelism with tp={tp} does not fit this model: " + "; ".join(problems)
                         + " (Mamba heads split with their groups)")


# ---- segmented Mamba-2 projections -----------------------------------------------------------
def mamba_segments(cfg: HybridConfig) -> dict[str, list[tuple[str, int]]]:
    """Rows of each segment of the Mamba-2 in_proj (z, x, B, C, dt) and conv1d (x, B, C), in order."""
    gn = cfg.n_groups * cfg.ssm_state
    return {"in_proj": list(zip(IN_PROJ_SEGMENTS, (cfg.d_inner, cfg.d_inner, gn, gn, cfg.mamba_heads))),
            "conv1d": list(zip(CONV_SEGMENTS, (cfg.d_inner, gn, gn)))}


class _SegmentedParameters:
    """Mixed into a module's class by `segment_module`: ``weight`` / ``bias`` become the concatenation of
    their row segments ``weight_z``, ``weight_x``, ... (this rank's shards under TP), differentiably, so
    the module's own forward (nn.Linear's, a low-precision linear's) and the mixer's reads see them."""

    segment_names: tuple[str, ...]
    has_bias: bool

    def _cat(self, pname: str) -> Tensor | None:
        if pname == "bias" and not self.has_bias:
            return None
        return torch.cat([local(getattr(self, f"{pname}_{seg}")) for seg in self.segment_names])

    @property
    def weight(self) -> Tensor:
        return self._cat("weight")

    @property
    def bias(self) -> Tensor | None:
        return self._cat("bias")


_SEGMENTED: dict[type, type] = {}  # module class -> its segmented subclass


def segment_module(module: nn.Module, segments: list[tuple[str, int]]) -> None:
    """Replace `module`'s weight (and bias) by one parameter per row segment, in place (same values).

    The module keeps its class's behaviour: it becomes an instance of a subclass of it (``Segmented<Class>``)
    whose ``weight`` / ``bias`` concatenate the segments.
    """
    names, rows = tuple(name for name, _ in segments), [n for _, n in segments]
    has_bias = module._parameters.get("bias") is not None
    for pname in ("weight", "bias"):
        p = module._parameters.pop(pname, None)
        if p is None:
            continue
        for seg, part in zip(names, p.detach().split(rows, dim=0)):
            module.register_parameter(f"{pname}_{seg}", nn.Parameter(part.clone(), requires_grad=p.requires_grad))
    cls = type(module)
    if cls not in _SEGMENTED:
        _SEGMENTED[cls] = type(f"Segmented{cls.__name__}", (_SegmentedParameters, cls), {})
    module.__class__ = _SEGMENTED[cls]
    module.segment_names, module.has_bias = names, has_bias


def segment_mamba(model: HybridLM) -> None:
    """Segment every Mamba-2 in_proj (z, x, B, C, dt) and conv1d (x, B, C), in place (idempotent; same values,
    same math: one linear / conv with the concatenated segments; a low-precision in_proj keeps its recipe)."""
    segs = mamba_segments(model.cfg)
    for module in model.modules():
        if isinstance(module, Mamba2Mixer) and not isinstance(module.in_proj, _SegmentedParameters):
            segment_module(module.in_proj, segs["in_proj"])
            segment_module(module.conv1d, segs["conv1d"])


def is_segmented(model: nn.Module) -> bool:
    """Whether `model`'s Mamba-2 projections are segmented (its state dict has segment FQNs)."""
    return any(isinstance(m, _SegmentedParameters) for m in model.modules())


# ---- parallel styles ---------------------------------------------------------------------------
def _styles():
    """The ParallelStyle classes, built on first use (importing DTensor takes a while)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class ShardOwnParameters(ParallelStyle):
        """``Shard(0)`` every parameter of the module itself (not its children); the module computes on
        ``local(param)``. `column`: its input (the same on every rank) enters with its gradient declared
        ``Partial`` (this rank's rows only), which DTensor all-reduces in backward: Megatron's "f"
        (identity forward, all-reduce backward), as ``ColwiseParallel`` does for an nn.Linear."""

        def __init__(self, column: bool = False) -> None:
            super().__init__()
            self.column = column

        def _apply(self, module: nn.Module, mesh) -> nn.Module:
            def partition(name: str, mod: nn.Module, mesh) -> None:
                if name == "":
                    for pname, p in list(mod.named_parameters(recurse=False)):
                        mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)]),
                                                                   requires_grad=p.requires_grad))

            def inputs(mod: nn.Module, args: tuple, mesh) -> tuple:
                u = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False)
                return (u.to_local(grad_placements=[Partial()]), *args[1:])
            return distribute_module(module, mesh, partition, inputs if self.column else None)

    class ReplicateParallel(ParallelStyle):
        """Parameters as ``Replicate`` DTensors; tensor inputs enter as DTensors of `input_layout`
        (``Replicate``, or ``Shard(1)`` for per-head norms fed this rank's heads), outputs leave local."""

        def __init__(self, input_layout=None) -> None:
            super().__init__()
            self.input_layout = input_layout or Replicate()

        def _apply(self, module: nn.Module, mesh) -> nn.Module:
            def partition(name: str, mod: nn.Module, mesh) -> None:
                for pname, p in list(mod.named_parameters(recurse=False)):
                    if not isinstance(p, DTensor):  # (a tied weight is distributed once)
                        mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]),
                                                                   requires_grad=p.requires_grad))

            def inputs(mod: nn.Module, args: tuple, mesh) -> tuple:
                return tuple(DTensor.from_local(a, mesh, [self.input_layout], run_check=False)
                             if isinstance(a, Tensor) and not isinstance(a, DTensor) else a for a in args)

            def outputs(mod: nn.Module, out: Any, mesh) -> Any:
                return out.to_local() if isinstance(out, DTensor) else out
            return distribute_module(module, mesh, partition, inputs, outputs)

    return ShardOwnParameters, ReplicateParallel


def _plan(model: HybridLM) -> dict[str, Any]:
    """The parallelize_module plan of every block (FQN -> ParallelStyle); embeddings/lm_head aside."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    ShardOwn, Rep = _styles()
    plan: dict[str, Any] = {"backbone.embeddings": Rep(), "backbone.norm_f": Rep()}
    for i, block in enumerate(model.backbone.layers):
        pre, mixer = f"backbone.layers.{i}", block.mixer
        if block.norm is not None:
            plan[f"{pre}.norm"] = Rep()
        subs: dict[str, Any] = {}
        if isinstance(mixer, Attention):
            subs = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                    "o_proj": RowwiseParallel(), "q_norm": Rep(Shard(1)), "k_norm": Rep(Shard(1)),
                    "post_proj_norm": Rep()}
        elif isinstance(mixer, MLP):
            subs = {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel(), "post_fc2_norm": Rep()}
        elif isinstance(mixer, Mamba2Mixer):
            # the mixer's own dt_bias / A_log / D last: distribute_module replicates what is left below it
            subs = {"in_proj": ShardOwn(column=True), "conv1d": ShardOwn(), "norm": ShardOwn(),
                    "out_proj": RowwiseParallel(), "out_norm": Rep(), "": ShardOwn()}
        for sub, style in subs.items():
            if sub == "" or getattr(mixer, sub) is not None:
                plan[f"{pre}.mixer" + (f".{sub}" if sub else "")] = style
    return plan


def _set_local_sizes(model: HybridLM, tp: int) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.n_heads, module.n_kv_heads = module.n_heads // tp, module.n_kv_heads // tp
        elif isinstance(module, Mamba2Mixer):
            module.n_heads, module.n_groups, module.d_inner = (module.n_heads // tp, module.n_groups // tp,
                                                               module.d_inner // tp)
            module.conv_dim = module.d_inner + 2 * module.n_groups * module.d_state


def apply_tensor_parallel(model: HybridLM, tp_mesh) -> HybridLM:
    """Split `model` in place across the 1-D DeviceMesh `tp_mesh` (see the module docstring); returns it.

    Every rank must hold the same weights (rank 0's are broadcast); build the optimizer afterwards.
    """
    from torch.distributed.tensor.parallel import parallelize_module
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    if tp == 1:
        return model
    segment_mamba(model)
    parallelize_module(model, tp_mesh, _plan(model))
    if model.cfg.tie_embeddings:  # re-tie to the distributed embedding table before lm_head's hooks go on
        model.lm_head.weight = model.backbone.embeddings.weight
    parallelize_module(model, tp_mesh, {"lm_head": _styles()[1]()})
    _set_local_sizes(model, tp)
    return model


# ---- parameter names: canonical <-> segmented ---------------------------------------------------
def segment_layout(cfg: HybridConfig) -> dict[str, list[tuple[str, int]]]:
    """Canonical FQN -> [(segment FQN, rows)] for every Mamba-2 in_proj / conv1d weight and bias."""
    layout: dict[str, list[tuple[str, int]]] = {}
    for i, kind in enumerate(cfg.layer_kinds()):
        if kind != "mamba":
            continue
        for module, segs in mamba_segments(cfg).items():
            for pname in ("weight", "bias"):
                key = f"backbone.layers.{i}.mixer.{module}.{pname}"
                layout[key] = [(f"{key}_{seg}", rows) for seg, rows in segs]
    return layout


def _split(value: Any, rows: list[int]) -> list[Any]:
    if isinstance(value, Tensor):
        return list(value.split(rows, dim=0))
    # one parameter's optimizer state: tensors of the parameter's shape split, scalars ("step") copied
    # (a step tensor shared by several parameters would be incremented once for each of them)
    parts = [dict() for _ in rows]
    for k, v in value.items():
        if isinstance(v, Tensor) and v.dim() > 0:
            pieces = _split(v, rows)
        else:
            pieces = [v.clone() if isinstance(v, Tensor) else v for _ in rows]
        for part, piece in zip(parts, pieces):
            part[k] = piece
    return parts


def _join(values: list[Any]) -> Any:
    if isinstance(values[0], Tensor):
        return torch.cat(values, dim=0)
    return {k: _join([v[k] for v in values]) if isinstance(v0, Tensor) and v0.dim() > 0 else v0
            for k, v0 in values[0].items()}


def state_to_segmented(sd: dict[str, Any], cfg: HybridConfig) -> dict[str, Any]:
    """FQN-keyed dict (tensors, or per-parameter optimizer states) with canonical Mamba-2 projection keys
    split into their segments (row views, no copies); other keys unchanged, order kept."""
    layout, out = segment_layout(cfg), {}
    for key, value in sd.items():
        if key in layout:
            names, rows = zip(*layout[key])
            out.update(zip(names, _split(value, list(rows))))
        else:
            out[key] = value
    return out


def state_to_canonical(sd: dict[str, Any], cfg: HybridConfig) -> dict[str, Any]:
    """Inverse of `state_to_segmented` (concatenates); a dict without segment keys comes back unchanged.
    ValueError when only some segments of a parameter are present."""
    out: dict[str, Any] = {}
    first = {segs[0][0]: (key, [name for name, _ in segs]) for key, segs in segment_layout(cfg).items()}
    parts = {name for _, names in first.values() for name in names}
    for key, value in sd.items():
        if key in first:
            canonical, names = first[key]
            missing = [n for n in names if n not in sd]
            if missing:
                raise ValueError(f"state dict has {key} but not {missing}: not a segmented state of this model")
            out[canonical] = _join([sd[n] for n in names])
        elif key not in parts:
            out[key] = value
    return out


def _rename_params(params: Iterable[str], mapping: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for name in params:
        for new in mapping.get(name, [name]):
            if new not in out:
                out.append(new)
    return out


def optim_to_segmented(osd: dict[str, Any], cfg: HybridConfig) -> dict[str, Any]:
    """An FQN-keyed optimizer state dict (``get_optimizer_state_dict``) with segment keys."""
    if not osd:
        return osd
    mapping = {key: [n for n, _ in segs] for key, segs in segment_layout(cfg).items()}
    return {**osd, "state": state_to_segmented(osd["state"], cfg),
            "param_groups": [{**g, "params": _rename_params(g["params"], mapping)} for g in osd["param_groups"]]}


def optim_to_canonical(osd: dict[str, Any], cfg: HybridConfig) -> dict[str, Any]:
    """Inverse of `optim_to_segmented`."""
    if not osd:
        return osd
    mapping = {n: [key] for key, segs in segment_layout(cfg).items() for n, _ in segs}
    return {**osd, "state": state_to_canonical(osd["state"], cfg),
            "param_groups": [{**g, "params": _rename_params(g["params"], mapping)} for g in osd["param_groups"]]}
