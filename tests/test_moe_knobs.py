"""The router z-loss, loss-free balancing's expert bias and the routing diagnostics, each against a
direct computation; resume and 1 against 2 ranks with both knobs on."""
import math

import pytest
import torch

import train
from model import GPT, GPTConfig, MoE

from harness import logbook
from tests.test_train import records, run_ddp, weights

KNOBS = ["--router_z_coef=0.01", "--expert_bias_rate=0.01"]


def moe_layer(seed, **kw):
    torch.manual_seed(seed)
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=32, H=2, E=8, K=2, De=16, Dse=16, **kw))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return moe


def test_z_loss_and_its_gradient_follow_the_direct_formula():
    moe = moe_layer(0, router_z_coef=0.1)
    x = torch.randn(64, 32)
    _, aux = moe(x)
    z_loss = aux.z_loss
    direct = torch.logsumexp(x @ moe.router.weight.T, dim=-1).square().mean()
    assert z_loss.item() == pytest.approx(direct.item(), rel=1e-6)
    g, = torch.autograd.grad(z_loss, moe.router.weight)
    g_direct, = torch.autograd.grad(direct, moe.router.weight)
    assert torch.allclose(g, g_direct, rtol=1e-5, atol=1e-7)
    assert aux.logit_ms.item() == pytest.approx((x @ moe.router.weight.T).square().mean().item(), rel=1e-6)


def test_z_loss_enters_the_loss_only_with_its_coefficient():
    cfg = dict(scheme="full", L=2, Dm=32, H=2, E=4, K=2, De=16, Dse=0, S=16, vocab_size=30)
    idx = torch.randint(0, 30, (2, 16))
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg, router_z_coef=coef))
        _, loss, stats = model(idx, idx)
        expected = stats["ce"] + 0.01 * stats["balance"] + coef * stats["z_loss"]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and stats["z_loss"].item() > 0
        assert stats["logit_ms"].shape == (2,)
    off = moe_layer(1)
    assert off(torch.randn(8, 32))[1].z_loss.grad_fn is None  # only logged: no gradient is built for it


def test_the_bias_moves_the_selection_and_never_the_gates():
    moe = moe_layer(2, expert_bias_rate=0.01)
    x = torch.randn(50, 32)
    s_TE, g_TK, e_TK, _ = moe.route(x)
    assert torch.equal(g_TK, s_TE.gather(-1, e_TK))  # zero bias: the plain top K
    assert torch.equal(e_TK, s_TE.topk(2, dim=-1).indices)
    moe.expert_bias[5] = 10.0  # larger than any score: expert 5 is everyone's choice
    s2, g2, e2, _ = moe.route(x)
    assert torch.equal(s2, s_TE) and (e2 == 5).any(-1).all()
    assert torch.equal(g2, s_TE.gather(-1, e2))  # the gates: the unbiased scores of the chosen experts
    y, _ = moe(x)
    y.square().sum().backward()  # the router still learns through the unbiased gates
    assert moe.router.weight.grad.abs().max() > 0 and moe.expert_bias.grad is None


def test_the_bias_update_by_hand():
    cfg = dict(scheme="full", L=2, Dm=32, H=2, E=4, K=1, De=16, Dse=0, S=16, vocab_size=30)
    model = GPT(GPTConfig(**cfg, expert_bias_rate=0.25))
    load = torch.tensor([[6.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]])  # mean 3: [−, +, +, +] and a tie
    model.update_expert_bias(load)
    first, second = (m.expert_bias.tolist() for m in model.modules() if isinstance(m, MoE))
    # +0.25·sign(3 − load) = [−0.25, 0.25, 0.25, 0.25], then its mean 0.125 taken off; all ties stay at 0
    assert first == [-0.375, 0.125, 0.125, 0.125] and second == [0.0] * 4
    model.update_expert_bias(load)
    assert [m.expert_bias.tolist() for m in model.modules() if isinstance(m, MoE)][0] == [-0.75, 0.25, 0.25, 0.25]


def test_the_bias_is_a_buffer_outside_N_and_saved_with_the_model():
    cfg = dict(scheme="1dense", L=2, Dm=32, H=2, Dffn=64, E=4, K=2, De=16, Dse=16, S=16, vocab_size=30)
    on, off = GPT(GPTConfig(**cfg, expert_bias_rate=0.1)), GPT(GPTConfig(**cfg))
    assert on.param_counts() == off.param_counts()
    assert "blocks.1.ffn.expert_bias" in on.state_dict() and "blocks.1.ffn.expert_bias" not in off.state_dict()
    assert "blocks.1.ffn.expert_bias" not in dict(on.named_parameters())


def test_routing_diagnostics_by_hand():
    load = torch.tensor([[4.0, 4.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    got = logbook.routing(load, torch.tensor([4.0, 0.25]))
    assert got["load_max_over_mean"] == [2.0, 1.0] and got["dead_experts"] == [2, 0]
    assert got["load_entropy"] == pytest.approx([math.log(2) / math.log(4), 1.0])
    assert got["router_logit_rms"] == [2.0, 0.5]
    assert logbook.routing(torch.zeros(0, 0), torch.zeros(0)) == {k: [] for k in logbook.ROUTING}


def test_resume_is_bit_exact_with_both_knobs(tiny_run, tmp_path):
    whole = train.train(tiny_run("whole", *KNOBS))
    train.train(tiny_run("parts", *KNOBS, "--stop_at=5"))
    rest = train.train(tiny_run("parts", *KNOBS) + ["--resume"])
    assert rest["final"] == whole["final"] and records(tmp_path / "parts") == records(tmp_path / "whole")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a) and a["blocks.1.ffn.expert_bias"].abs().sum() > 0


@pytest.mark.slow
def test_one_and_two_ranks_alike_with_both_knobs(tiny_run, tmp_path):
    # the bias moves by the load of the whole step over both ranks, so the two runs route alike
    train.train(tiny_run("one", *KNOBS))
    run_ddp(tiny_run("two", *KNOBS), nproc=2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(one) == len(two) == 12
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(one, two))
    bias1, bias2 = (weights(tmp_path / d)["blocks.1.ffn.expert_bias"] for d in ("one", "two"))
    assert bias1.abs().sum() > 0 and torch.equal(bias1, bias2)
