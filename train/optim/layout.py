"""Where the pieces of each matrix live, so Newton-Schulz can see whole matrices under ZeRO.

Under ZeRO 1-3 DeepSpeed hands the client optimizer flat fp32 partitions instead of parameters.
A TensorLayout records, for one tensor the optimizer steps on, which slice of which matrix each
rank holds at which offset. With it a group's state can be all-gathered, each rank can
orthogonalise its share of whole matrices, and the results can be handed back to the ranks that
hold their pieces. The layouts are read off the DeepSpeed wrapper once, in `attach`:
  * ZeRO 0 (no wrapper): every rank holds every parameter whole ("replicated").
  * ZeRO 1/2 (DeepSpeedZeroOptimizer): each group is one flat buffer cut into equal partitions;
    a parameter's place in it is read from its data pointer (robust to padding and reordering).
  * ZeRO 3 (DeepSpeedZeroOptimizer_Stage3): every parameter is cut into equal shards (rank r holds
    elements [r*s, (r+1)*s)); a sub-group's flat partition is its shards end to end.
Any other wrapper is an error: we never fall back to orthogonalising partition fragments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from train.optim.param_groups import ParamInfo


class OptimizerSetupError(ValueError):
    """The optimizer cannot see whole matrices in this DeepSpeed setup."""


@dataclass(frozen=True)
class Piece:
    matrix: int  # index into TensorLayout.infos
    start: int  # first element of the (flattened) matrix held here
    length: int
    offset: int  # where those elements sit in the rank's local tensor


@dataclass
class TensorLayout:
    infos: list[ParamInfo]  # the parameters (matrices or not) inside the tensor, in order
    pieces_by_rank: list[list[Piece]]  # what every rank of the group holds
    replicated: bool  # every rank holds every matrix whole: nothing to gather
    local_numel: int  # size of the tensor on each rank (equal on all ranks)

    def pieces_of(self, matrix: int) -> list[tuple[int, Piece]]:
        return [(rank, pc) for rank, pieces in enumerate(self.pieces_by_rank) for pc in pieces
                if pc.matrix == matrix]


def replicated_layout(info: ParamInfo, world_size: int) -> TensorLayout:
    numel = _numel(info.shape)
    whole = [Piece(0, 0, numel, 0)]
    return TensorLayout([info], [whole] * world_size, True, numel)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _intersect(param_lo: int, numel: int, part_lo: int, part_size: int):
    lo = max(param_lo, part_lo)
    hi = min(param_lo + numel, part_lo + part_size)
    return (lo, hi) if hi > lo else None


def zero12_layouts(wrapper, infos: dict[int, ParamInfo], world_size: int) -> dict[int, TensorLayout]:
    """Layouts of DeepSpeedZeroOptimizer's fp32 partitions, keyed by id(partition)."""
    layouts = {}
    for i, params in enumerate(wrapper.bit16_groups):
        flat = wrapper.bit16_groups_flat[i]
        part_size = int(wrapper.partition_size[i])
        partition = wrapper.single_partition_of_fp32_groups[i]
        group_infos, pieces_by_rank = [], [[] for _ in range(world_size)]
        for param in params:
            info = infos[id(param)]
            offset = (param.data_ptr() - flat.data_ptr()) // flat.element_size()
            numel = param.numel()
            for rank in range(world_size):
                span = _intersect(offset, numel, rank * part_size, part_size)
                if span is not None:
                    lo, hi = span
                    pieces_by_rank[rank].append(Piece(len(group_infos), lo - offset, hi - lo, lo - rank * part_size))
            group_infos.append(info)
        layouts[id(partition)] = TensorLayout(group_infos, pieces_by_rank, False, part_size)
    return layouts


def zero3_layouts(wrapper, infos: dict[int, ParamInfo], world_size: int) -> dict[int, TensorLayout]:
    """Layouts of DeepSpeedZeroOptimizer_Stage3's per-sub-group fp32 partitions."""
    layouts = {}
    for i, params in enumerate(wrapper.fp16_groups):
        partition = wrapper.fp32_partitioned_groups_flat[i]
        group_infos, pieces_by_rank = [], [[] for _ in range(world_size)]
        local_offset = 0
        for param in params:
            info = infos[id(param)]
            shard = int(param.partition_numel())
            numel = int(param.ds_numel)
            for rank in range(world_size):
                length = max(0, min(shard, numel - rank * shard))
                if length > 0:
                    pieces_by_rank[rank].append(Piece(len(group_infos), rank * shard, length, local_offset))
            group_infos.append(info)
            local_offset += shard
        if local_offset != partition.numel():
            raise OptimizerSetupError(f"ZeRO-3 sub-group {i}: shards add up to {local_offset} elements but the "
                                      f"fp32 partition has {partition.numel()}; unsupported DeepSpeed layout")
        layouts[id(partition)] = TensorLayout(group_infos, pieces_by_rank, False, local_offset)
    return layouts


@dataclass
class Exchange:
    """Who orthogonalises which matrices of one group step, balanced by Newton-Schulz cost."""

    owners: list[int] = field(default_factory=list)

    @staticmethod
    def assign(costs: list[int], world_size: int) -> "Exchange":
        load = [0] * world_size
        owners = [0] * len(costs)
        for idx in sorted(range(len(costs)), key=lambda k: -costs[k]):
            rank = min(range(world_size), key=lambda r: load[r])
            owners[idx] = rank
            load[rank] += costs[idx]
        return Exchange(owners)


def ns_cost(shape: tuple[int, ...]) -> int:
    """Flops of Newton-Schulz on a [.., rows, cols] stack, up to a constant."""
    rows, cols = shape[-2], shape[-1]
    return _numel(shape) * min(rows, cols)


def gather_full(layout: TensorLayout, gathered: list[torch.Tensor], matrix: int, inputs: int,
                which: int) -> torch.Tensor:
    """Assemble input `which` of `matrix` from every rank's packed local tensors."""
    info = layout.infos[matrix]
    full = torch.empty(_numel(info.shape), dtype=gathered[0].dtype, device=gathered[0].device)
    base = which * layout.local_numel
    for rank, pc in layout.pieces_of(matrix):
        full[pc.start:pc.start + pc.length] = gathered[rank][base + pc.offset:base + pc.offset + pc.length]
    return full.view(info.shape)
