"""Single-process tests of train.optim: config, grouping, Newton-Schulz, CMS periods, the three algorithms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.test_optim_models import TinyHopeLike, make_batches
from train.optim import (GroupOverride, OptimizerConfig, OptimizerConfigError, OptimizerSetupError,
                         build_optimizer)
from train.optim.newton_schulz import newton_schulz
from train.optim.param_groups import build_param_groups


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a busy 2-core box run far faster on one thread than fighting over two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _names_by_algo(model, cfg, tokens_per_step=8):
    groups, infos = build_param_groups(model, cfg, tokens_per_step)
    out = {}
    for g in groups:
        for p in g["params"]:
            out.setdefault(g["algo"], set()).add(infos[id(p)].name)
    return out, groups


@pytest.mark.parametrize("key,value", [("name", "sgd"), ("lr", 0.0), ("betas", [0.9]), ("weight_decay", -1.0)])
def test_validate_names_the_field(key, value):
    cfg = OptimizerConfig(**{key: value})
    with pytest.raises(OptimizerConfigError, match=f"optimizer.{key}"):
        cfg.validate()


def test_validate_nested_fields():
    cfg = OptimizerConfig(name="m3")
    cfg.m3.slow_every = 0
    with pytest.raises(OptimizerConfigError, match="optimizer.m3.slow_every"):
        cfg.validate()
    cfg = OptimizerConfig(groups=[GroupOverride(match="", lr_scale=2.0)])
    with pytest.raises(OptimizerConfigError, match=r"optimizer.groups\[0\].match"):
        cfg.validate()


def test_grouping_rules():
    model = TinyHopeLike()
    by_algo, groups = _names_by_algo(model, OptimizerConfig(name="m3"))
    assert by_algo["m3"] == {"proj.weight", "memory_init", "cms_up.weight", "cms_down.weight"}
    assert by_algo["adamw"] == {"embed.weight", "lm_head.weight", "proj.bias", "norm.weight", "norm.bias"}
    decay = {n: g["weight_decay"] for g in groups for n in
             [k for k, p in model.named_parameters() if any(p is q for q in g["params"])]}
    assert decay["norm.weight"] == 0.0 and decay["embed.weight"] == 0.1 and decay["proj.weight"] == 0.1
    by_algo, _ = _names_by_algo(model, OptimizerConfig(name="adamw"))
    assert set(by_algo) == {"adamw"}
    for g in groups:
        assert g["lr"] == pytest.approx(3e-4 * g["lr_scale"])


def test_group_override_first_match_wins():
    cfg = OptimizerConfig(name="muon", groups=[GroupOverride(match="cms_*", lr_scale=0.5, weight_decay=0.0),
                                               GroupOverride(match="*", lr_scale=3.0)])
    _, groups = _names_by_algo(TinyHopeLike(), cfg)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.5, 3.0]


def test_period_conversion_and_error():
    model = TinyHopeLike(cms_period_tokens=32)
    _, groups = _names_by_algo(model, OptimizerConfig(name="muon"), tokens_per_step=8)
    assert sorted(g["period"] for g in groups) == [1, 1, 1, 4]  # muon, adamw x2 (decay, no decay), slow level
    with pytest.raises(OptimizerConfigError, match=r"cms_up.weight.*32.*multiple of the 12 tokens"):
        build_param_groups(TinyHopeLike(cms_period_tokens=32), OptimizerConfig(), 12)


def test_refuses_use_muon_flag_and_offload():
    model = TinyHopeLike()
    model.proj.weight.use_muon = True
    with pytest.raises(OptimizerConfigError, match="proj.weight carries use_muon"):
        build_optimizer(model, OptimizerConfig(name="muon"), {}, 8)
    with pytest.raises(OptimizerConfigError, match="offload_optimizer"):
        build_optimizer(TinyHopeLike(), OptimizerConfig(),
                        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, 8)
    with pytest.raises(OptimizerConfigError, match="bf16.enabled with zero_optimization.stage = 0"):
        build_optimizer(TinyHopeLike(), OptimizerConfig(), {"bf16": {"enabled": True}}, 8)
    ds_config = {"zero_optimization": {"stage": 1}}
    build_optimizer(TinyHopeLike(), OptimizerConfig(), ds_config, 8)
    assert ds_config["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 16, 24)])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(g, steps=5)
    assert out.shape == g.shape and out.dtype == torch.float32
    # The quintic lands singular values in about [0.7, 1.2] -- except the ones far below the
    # largest (a random square matrix has some near 0), which 5 steps cannot lift all the way.
    s_in = torch.linalg.svdvals(g)
    s_out = torch.linalg.svdvals(out)
    assert s_out.max() < 1.25
    well_conditioned = s_in > s_in.max(dim=-1, keepdim=True).values / 20
    assert s_out[well_conditioned].min() > 0.65
    # Same singular vectors as the exact polar factor U V^T: their inner product is positive.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert ((u @ vh) * out).sum(dim=(-2, -1)).min() > 0.7 * min(shape[-2:])
    for i in range(g.shape[0] if g.ndim == 3 else 0):  # stacks: every slice on its own
        torch.testing.assert_close(out[i], newton_schulz(g[i], steps=5), rtol=1e-5, atol=1e-5)


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="shape"):
        newton_schulz(torch.randn(5))


def _train(model, cfg, batches, tokens_per_step=8):
    opt = build_optimizer(model, cfg, {}, tokens_per_step)
    losses = []
    for tokens in batches:
        loss = model(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return opt, losses


@pytest.mark.parametrize("name", ["adamw", "muon", "m3"])
def test_cms_level_updates_every_period_with_summed_gradient(name):
    """A period-4 level changes only every 4th step, and only by what the summed gradient gives."""
    torch.manual_seed(0)
    model = TinyHopeLike(cms_period_tokens=4 * 8)
    batches = make_batches(8, batch=2, seq=4)
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=1e-2), {}, 8)
    w = model.cms_up.weight
    history, grad_sum = [w.detach().clone()], torch.zeros_like(w)
    for step, tokens in enumerate(batches, start=1):
        model(tokens).backward()
        grad_sum += w.grad
        opt.step()
        opt.zero_grad()
        history.append(w.detach().clone())
        if step % 4:
            assert torch.equal(history[-1], history[-2]), f"slow level moved at step {step}"
        else:
            assert not torch.equal(history[-1], history[-2])
    state = opt.state[w]
    assert state["calls"] == 8 and state["updates"] == 2


def test_slow_level_first_adamw_update_uses_the_summed_gradient():
    """Only the slow level trains, so its 4 gradients are known: the update is AdamW's first step on their sum."""
    torch.manual_seed(0)
    model = TinyHopeLike(cms_period_tokens=4 * 8)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("cms_up"))
    start = model.cms_up.weight.detach().clone()
    batches = make_batches(4, batch=2, seq=4)
    opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-2), {}, 8)
    summed = torch.zeros_like(start)
    for tokens in batches:
        model(tokens).backward()
        summed += model.cms_up.weight.grad
        opt.step()
        opt.zero_grad()
    # First AdamW step: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    expected = start * (1 - 1e-2 * 0.1) - 1e-2 * summed / (summed.abs() + 1e-8)
    torch.testing.assert_close(model.cms_up.weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_update_is_scaled_orthogonal():
    torch.manual_seed(0)
    model = nn.Linear(48, 32, bias=False)
    cfg = OptimizerConfig(name="muon", lr=0.1, weight_decay=0.0)
    opt = build_optimizer(model, cfg, {}, 8)
    before = model.weight.detach().clone()
    model(torch.randn(8, 48)).square().sum().backward()
    grad = model.weight.grad.clone()
    opt.step()
    delta = (before - model.weight.detach()) / 0.1
    # Nesterov on the first step: lerp(g, 0.05 g, 0.95) is a multiple of g.
    expected = newton_schulz(grad) * 0.2 * math.sqrt(48)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)


def test_m3_slow_momentum_kicks_in_every_f_steps():
    torch.manual_seed(0)
    model = nn.Linear(16, 16, bias=False)
    cfg = OptimizerConfig(name="m3", lr=1e-2)
    cfg.m3.slow_every = 3
    opt = build_optimizer(model, cfg, {}, 8)
    w = model.weight
    for step in range(1, 7):
        model(torch.randn(4, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        slow_orth = opt.state[w]["slow_orth"]
        if step < 3:
            assert slow_orth.abs().sum() == 0
        if step in (3, 6):
            assert torch.count_nonzero(opt.state[w]["slow_sum"]) == 0
            expected = newton_schulz(opt.state[w]["slow_momentum"])
            torch.testing.assert_close(slow_orth, expected)
    # Every m3 update has the configured RMS before lr (check the last one by replaying nothing:
    # the update RMS is invariant, so compare the weight change after the decay).
    before = w.detach().clone()
    model(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    delta = (before * (1 - 1e-2 * 0.1) - w.detach()) / 1e-2
    assert delta.square().mean().sqrt().item() == pytest.approx(0.2, rel=1e-3)


@pytest.mark.parametrize("name", ["adamw", "muon", "m3"])
def test_each_optimizer_reduces_loss(name):
    torch.manual_seed(0)
    batches = make_batches(1, batch=4, seq=8) * 30
    _, losses = _train(TinyHopeLike(), OptimizerConfig(name=name, lr=1e-2), batches)
    assert losses[-1] < 0.7 * losses[0]


def test_state_dict_roundtrip_is_exact():
    torch.manual_seed(0)
    batches = make_batches(10, batch=2, seq=6)
    cfg = OptimizerConfig(name="m3", lr=1e-2)
    cfg.m3.slow_every = 2
    model = TinyHopeLike(cms_period_tokens=24)
    opt, _ = _train(model, cfg, batches[:5], tokens_per_step=12)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train_more = lambda m, o: [(m(t).backward(), o.step(), o.zero_grad()) for t in batches[5:]]
    _train_more(model, opt)
    resumed = TinyHopeLike(cms_period_tokens=24)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, cfg, {}, 12)
    opt2.load_state_dict(saved_opt)
    _train_more(resumed, opt2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_multi_rank_without_attach_is_an_error():
    opt = build_optimizer(TinyHopeLike(), OptimizerConfig(name="muon"), {}, 8)
    flat = torch.zeros(10, requires_grad=True)
    flat.grad = torch.zeros(10)
    opt.param_groups[0]["params"] = [flat]  # what a ZeRO wrapper does
    with pytest.raises(OptimizerSetupError, match="attach_engine"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_newton_schulz_runs_in_bf16_and_trains():
    g = torch.randn(256, 704, generator=torch.Generator().manual_seed(0))
    on_gpu = newton_schulz(g.cuda(), 5, torch.bfloat16).cpu()
    assert on_gpu.dtype == torch.float32
    # bf16 Newton-Schulz agrees with fp32 to bf16 precision on the update's direction.
    cosine = (on_gpu * newton_schulz(g)).sum() / (on_gpu.norm() * newton_schulz(g).norm())
    assert cosine > 0.99
    torch.manual_seed(0)
    model = TinyHopeLike(cms_period_tokens=16).cuda()
    opt = build_optimizer(model, OptimizerConfig(name="m3", lr=1e-2), {}, 8)
    assert opt.param_groups[0]["ns_dtype"] == "auto"
    tokens = make_batches(1, batch=4, seq=8)[0].cuda()
    losses = []
    for _ in range(20):
        loss = model(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
