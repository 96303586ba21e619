"""HopeOptimizer: AdamW, Muon and M3 in one torch.optim.Optimizer, with CMS update periods.

Each param group has one `algo` ("adamw", "muon" or "m3") and one `period` (optimizer steps
between updates; gradients are summed in between). Elementwise work (moments, sums, weight decay)
runs on whatever tensors the optimizer is given -- real parameters, or the flat fp32 partitions
that DeepSpeed ZeRO hands over. Newton-Schulz needs whole matrices, so for muon/m3 groups the
state is all-gathered per group, each rank orthogonalises its share of the matrices (balanced by
cost), and the updates are exchanged with one all-reduce (every entry has exactly one non-zero
contributor, so the sum is exact). See docs/OPTIMIZER.md for the algorithms and defaults.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from train.optim.config import OptimizerConfig
from train.optim.layout import (Exchange, OptimizerSetupError, TensorLayout, gather_full, ns_cost,
                                replicated_layout, zero3_layouts, zero12_layouts)
from train.optim.newton_schulz import newton_schulz
from train.optim.param_groups import ParamInfo


def group_defaults(cfg: OptimizerConfig) -> dict:
    """Hyperparameters every param group carries (the group may override lr_scale and weight_decay)."""
    return dict(lr=cfg.lr, lr_scale=1.0, weight_decay=cfg.weight_decay, algo="adamw", period=1,
                betas=tuple(cfg.betas), eps=cfg.eps, momentum=cfg.matrix.momentum,
                nesterov=cfg.matrix.nesterov, ns_steps=cfg.matrix.ns_steps, ns_dtype=cfg.matrix.ns_dtype,
                update_rms=cfg.matrix.update_rms, beta_v=cfg.m3.beta_v, slow_beta=cfg.m3.slow_beta,
                slow_every=cfg.m3.slow_every, slow_alpha=cfg.m3.slow_alpha)


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _rms_normalised(update: torch.Tensor, target_rms: float) -> torch.Tensor:
    """Scale each [rows, cols] slice to the given RMS."""
    rms = update.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return update * (target_rms / (rms + 1e-12))


class HopeOptimizer(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict], infos: dict[int, ParamInfo], cfg: OptimizerConfig):
        super().__init__(param_groups, group_defaults(cfg))
        self._infos = infos
        self._layouts: dict[int, TensorLayout] = {}
        self._process_group = None
        self._world_size, self._rank = 1, 0
        self._attached = False
        # (tensor the optimizer steps on, index of its param group): the real parameters until
        # attach() swaps in ZeRO's partitions. Used by the portable checkpoint.
        self.stepped_tensors = [(p, i) for i, g in enumerate(self.param_groups) for p in g["params"]]

    # ----------------------------------------------------------------- DeepSpeed wiring
    def attach(self, engine) -> None:
        """Read where every matrix lives from the DeepSpeed engine built around this optimizer.

        Call once, right after deepspeed.initialize (train.optim.attach_engine does it). Raises
        OptimizerSetupError for a wrapper whose layout we do not know (CPU offload, bf16 ZeRO-0/1
        wrappers, ...): Newton-Schulz on fragments would be silently wrong.
        """
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        wrapper = engine.optimizer
        if wrapper is self:
            self._process_group = engine.data_parallel_group if dist.is_initialized() else None
            self._set_world()
            self._layouts = {id(p): replicated_layout(self._infos[id(p)], self._world_size)
                             for g in self.param_groups for p in g["params"]}
            self.stepped_tensors = [(p, i) for i, g in enumerate(self.param_groups) for p in g["params"]]
        elif isinstance(wrapper, DeepSpeedZeroOptimizer):
            if wrapper.cpu_offload:
                raise OptimizerSetupError("zero_optimization.offload_optimizer: train.optim does not support "
                                          "optimizer offload (its step would run on fragments)")
            self._process_group = wrapper.real_dp_process_group[0]
            self._set_world()
            self._layouts = zero12_layouts(wrapper, self._infos, self._world_size)
            self.stepped_tensors = list(zip(wrapper.single_partition_of_fp32_groups, range(len(self.param_groups))))
        elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
            if wrapper.offload_optimizer:
                raise OptimizerSetupError("zero_optimization.offload_optimizer: train.optim does not support "
                                          "optimizer offload (its step would run on fragments)")
            self._process_group = wrapper.dp_process_group
            self._set_world()
            self._layouts = zero3_layouts(wrapper, self._infos, self._world_size)
            self.stepped_tensors = [(flat, wrapper.sub_group_to_group_id[i])
                                    for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat)]
        else:
            raise OptimizerSetupError(
                f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, whose partition layout "
                f"train.optim does not know; use ZeRO 0 with fp32, or ZeRO 1-3 (bf16 with ZeRO 1 needs "
                f"data_types.grad_accum_dtype = bf16 or ZeRO 2)")
        self._attached = True

    def _set_world(self) -> None:
        if dist.is_initialized():
            self._world_size = dist.get_world_size(group=self._process_group)
            self._rank = dist.get_rank(group=self._process_group)

    @property
    def world(self) -> tuple[object, int, int]:
        """(process group, world size, rank) the optimizer exchanges over."""
        return self._process_group, self._world_size, self._rank

    def layout_for(self, tensor: torch.Tensor) -> TensorLayout:
        return self._layout_for(tensor)

    def _layout_for(self, tensor: torch.Tensor) -> TensorLayout:
        layout = self._layouts.get(id(tensor))
        if layout is not None:
            return layout
        info = self._infos.get(id(tensor))
        if info is None:
            raise OptimizerSetupError("the optimizer is stepping a tensor that is not a model parameter (a "
                                      "DeepSpeed ZeRO partition?): call train.optim.attach_engine(engine) after "
                                      "deepspeed.initialize so Newton-Schulz sees whole matrices")
        if not self._attached and dist.is_initialized() and dist.get_world_size() > 1:
            raise OptimizerSetupError("running on several ranks without train.optim.attach_engine(engine): "
                                      "call it after deepspeed.initialize")
        layout = replicated_layout(info, 1)
        self._layouts[id(tensor)] = layout
        return layout

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            due = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = self._due_gradient(p, group, state)
                if grad is None:
                    continue
                state["updates"] += 1
                if group["algo"] == "adamw":
                    self._adamw(p, grad, group, state)
                else:
                    due.append((p, grad, state))
            if due:
                self._matrix_step(group, due)
        return loss

    def _due_gradient(self, p, group, state):
        """The gradient to apply now, or None while a slow CMS level is still summing."""
        if "calls" not in state:
            state["calls"], state["updates"] = 0, 0
        state["calls"] += 1
        if group["period"] == 1:
            return p.grad
        if "grad_sum" not in state:
            state["grad_sum"] = torch.zeros_like(p, dtype=torch.float32)
        state["grad_sum"].add_(p.grad)
        if state["calls"] % group["period"]:
            return None
        grad = state["grad_sum"].clone()
        state["grad_sum"].zero_()
        return grad

    @staticmethod
    def _adamw(p, grad, group, state) -> None:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        t = state["updates"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))

    # ----------------------------------------------------------------- matrices
    def _matrix_step(self, group, due) -> None:
        algo = group["algo"]
        slow_flags = {state["updates"] % group["slow_every"] == 0 for _, _, state in due}
        slow = algo == "m3" and slow_flags == {True}
        if algo == "m3" and len(slow_flags) != 1:
            raise RuntimeError("m3: tensors of one group are out of step with each other")
        inputs = [self._local_inputs(algo, grad, group, state, slow) for _, grad, state in due]
        layouts = [self._layout_for(p) for p, _, _ in due]
        n_in, n_out = len(inputs[0]), (2 if slow else 1)

        # Every matrix of the group, its slot in the exchange buffer, and the rank that owns it.
        matrices = [(u, m) for u, layout in enumerate(layouts) for m in range(len(layout.infos))]
        numels = [math.prod(layouts[u].infos[m].shape) for u, m in matrices]
        slots = [0]
        for n in numels:
            slots.append(slots[-1] + n * n_out)
        slot_of = {key: k for k, key in enumerate(matrices)}
        owners = Exchange.assign([ns_cost(layouts[u].infos[m].shape) for u, m in matrices], self._world_size).owners

        device = due[0][0].device
        out = torch.zeros(slots[-1], dtype=torch.float32, device=device)
        for u, layout in enumerate(layouts):
            packed = torch.cat([t.reshape(-1) for t in inputs[u]])
            if layout.replicated or self._world_size == 1:
                gathered = [packed] * len(layout.pieces_by_rank)
            else:
                gathered = [torch.empty_like(packed) for _ in range(self._world_size)]
                dist.all_gather(gathered, packed, group=self._process_group)
            for m in range(len(layout.infos)):
                k = slot_of[(u, m)]
                if owners[k] != self._rank:
                    continue
                full = [gather_full(layout, gathered, m, n_in, j) for j in range(n_in)]
                results = self._orthogonalised(algo, full, group, slow)
                for j, r in enumerate(results):
                    out[slots[k] + j * numels[k]:slots[k] + (j + 1) * numels[k]] = r.reshape(-1)
        if self._world_size > 1:
            dist.all_reduce(out, group=self._process_group)

        for u, (p, _, state) in enumerate(due):
            local = [torch.zeros(p.numel(), dtype=torch.float32, device=device) for _ in range(n_out)]
            for pc in layouts[u].pieces_by_rank[self._rank]:
                k = slot_of[(u, pc.matrix)]
                for j in range(n_out):
                    src = slots[k] + j * numels[k] + pc.start
                    local[j][pc.offset:pc.offset + pc.length] = out[src:src + pc.length]
            if slow:
                state["slow_orth"].copy_(local[1].view_as(p))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(local[0].view_as(p), alpha=-group["lr"])

    @staticmethod
    def _local_inputs(algo, grad, group, state, slow) -> list[torch.Tensor]:
        """Elementwise state updates; returns what Newton-Schulz needs, as local tensors."""
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad, dtype=torch.float32)
        momentum = state["momentum"]
        momentum.lerp_(grad, 1 - group["momentum"])
        if algo == "muon":
            return [grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum]
        if "second_moment" not in state:
            for key in ("second_moment", "slow_sum", "slow_momentum", "slow_orth"):
                state[key] = torch.zeros_like(grad, dtype=torch.float32)
        t = state["updates"]
        state["second_moment"].mul_(group["beta_v"]).addcmul_(grad, grad, value=1 - group["beta_v"])
        denom = (state["second_moment"] / (1 - group["beta_v"]**t)).sqrt_().add_(group["eps"])
        state["slow_sum"].add_(grad)
        if not slow:
            return [momentum, denom, state["slow_orth"]]
        state["slow_momentum"].lerp_(state["slow_sum"] / group["slow_every"], 1 - group["slow_beta"])
        state["slow_sum"].zero_()
        return [momentum, denom, state["slow_orth"], state["slow_momentum"]]

    @staticmethod
    def _orthogonalised(algo, full, group, slow) -> list[torch.Tensor]:
        """On the owning rank: the update (and new O2 for m3's slow steps) of one whole matrix."""
        dtype = _ns_dtype(group["ns_dtype"], full[0].device)
        steps = group["ns_steps"]
        if algo == "muon":
            rows, cols = full[0].shape[-2:]
            return [newton_schulz(full[0], steps, dtype) * (group["update_rms"] * math.sqrt(max(rows, cols)))]
        momentum, denom, slow_orth = full[:3]
        if slow:
            slow_orth = newton_schulz(full[3], steps, dtype)
        update = (newton_schulz(momentum, steps, dtype) + group["slow_alpha"] * slow_orth) / denom
        update = _rms_normalised(update, group["update_rms"])
        return [update, slow_orth] if slow else [update]
