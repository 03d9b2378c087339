"""model.py and kernels/custom_ops.py: each fast path against its plain one (the fused expert path against a
plain loop over experts, the grouped GEMM, RMSNormFn, SwiGLUFn, FlexAttention against SDPA), compile, balance
loss, ALiBi, causality, counts, FLOPs."""
import math

import pytest
import torch
import torch.nn.functional as F

import flops
import model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from torch.utils.flop_counter import FlopCounterMode

from model import (GPT, MoE, GPTConfig, RMSNorm, alibi_bias, alibi_score_mod, alibi_slopes, causal_block_mask,
                   router_softmax)

from kernels.custom_ops import RMSNormFn, SwiGLUFn, gmm

# FlexAttention warns when it runs uncompiled: on CPU (no backward there) that is what the tests check
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def flat(out):
    """(y, (balance, load)) from an MoE layer's (y, MoEAux)."""
    y, aux = out
    return y, (aux.balance, aux.load)


def random_moe(seed, E, K, De, Dse, norm_topk, Dm=32, router_std=1.0):
    torch.manual_seed(seed)
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=Dm, H=2, E=E, K=K, De=De, Dse=Dse, norm_topk=norm_topk))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    torch.nn.init.normal_(moe.router.weight, 0.0, router_std)
    return moe


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = [  # (E, K, De, Dse, norm_topk, T): K = 1, K = E, shared expert on/off, renormalisation on/off
    (8, 2, 16, 0, False, 64), (8, 2, 16, 32, True, 64), (6, 1, 8, 0, False, 40), (6, 1, 24, 16, False, 40),
    (4, 4, 16, 0, True, 16), (4, 4, 8, 8, False, 16), (16, 3, 32, 48, False, 128), (32, 1, 8, 8, False, 5),
]


@pytest.mark.parametrize("E,K,De,Dse,norm_topk,T", CASES)
def test_grouped_path_matches_loop(E, K, De, Dse, norm_topk, T):
    moe = random_moe(E * 100 + K * 10 + T, E, K, De, Dse, norm_topk)
    x = torch.randn(T, 32, requires_grad=True)
    y, (balance, counts) = flat(moe(x))
    y_ref, (balance_ref, counts_ref) = flat(moe.forward_loop(x))
    assert torch.equal(counts.float(), counts_ref)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(balance, balance_ref) < 1e-5
    dy = torch.randn_like(y)
    inputs = [x] + list(moe.parameters())
    grads = torch.autograd.grad((y * dy).sum() + balance, inputs)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + balance_ref, inputs)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("sizes", [(5, 0, 3, 4), (0, 0, 7), (6,), (2, 9, 0)])
def test_gmm_matches_a_loop_over_groups(sizes):
    # the grouped GEMM custom op (forward, and its autograd rule) against one matmul per group; empty groups included
    torch.manual_seed(sum(sizes) + len(sizes))
    E, D, Dout = len(sizes), 16, 24
    x = torch.randn(sum(sizes), D, requires_grad=True)
    w = torch.randn(E, D, Dout, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    dy = torch.randn(sum(sizes), Dout)
    y = gmm(x, w, offs)
    starts = [0] + offs[:-1].tolist()
    y_ref = torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip(starts, offs.tolist()))])
    assert rel_err(y, y_ref) < 1e-6
    grads = torch.autograd.grad(y, (x, w), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert all(rel_err(g, g_ref) < 1e-6 for g, g_ref in zip(grads, grads_ref))
    assert torch.equal(grads[1][torch.tensor(sizes) == 0], torch.zeros_like(grads[1][torch.tensor(sizes) == 0]))


def test_experts_without_tokens_get_zero_gradient():
    moe = random_moe(0, E=32, K=1, De=8, Dse=0, norm_topk=False)
    x = torch.randn(5, 32)
    _, (_, counts) = flat(moe(x))
    assert (counts == 0).sum() >= 27  # 5 tokens, 32 experts
    y, _ = moe(x)
    y.square().sum().backward()
    empty = counts == 0
    assert moe.w13.grad[empty].abs().max() == 0 and moe.w2.grad[empty].abs().max() == 0
    assert moe.w13.grad[~empty].abs().min(dim=-1).values.max() > 0


def test_zero_stride_gradient_is_accepted():
    # y.sum() hands grouped_mm an expanded (zero-stride) gradient, which its kernels reject
    moe = random_moe(1, E=4, K=2, De=8, Dse=0, norm_topk=False)
    y, _ = moe(torch.randn(12, 32))
    y.sum().backward()
    assert torch.isfinite(moe.w13.grad).all()


@pytest.mark.slow
def test_compiled_matches_eager_and_never_recompiles():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    moe = random_moe(2, E=8, K=2, De=16, Dse=16, norm_topk=False)
    compiled = torch.compile(moe, fullgraph=True)
    for step in range(3):
        x = torch.randn(64, 32, requires_grad=True) * (step + 1)  # a different routing every batch
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            y, (balance, counts) = flat(compiled(x))
            g = torch.autograd.grad((y.square().sum() + balance), [x, moe.w13, moe.router.weight])
        y_e, (balance_e, counts_e) = flat(moe(x))
        g_e = torch.autograd.grad((y_e.square().sum() + balance_e), [x, moe.w13, moe.router.weight])
        assert torch.equal(counts, counts_e)
        assert rel_err(y, y_e) < 1e-5 and rel_err(balance, balance_e) < 1e-5
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(g, g_e))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.slow
def test_compiled_gpt_matches_eager():
    torch._dynamo.reset()
    for scheme in ("dense", "1dense"):
        torch.manual_seed(6)
        model = GPT(GPTConfig(scheme=scheme, L=2, Dm=32, H=2, Dffn=64, E=4, K=2, De=16, Dse=16, S=16, vocab_size=40))
        idx = torch.randint(0, 40, (2, 16))
        results = []
        for m in (model, torch.compile(model, fullgraph=True)):
            _, loss, stats = m(idx, idx)
            results.append((loss, stats["balance"], torch.autograd.grad(loss, list(model.parameters()))))
        (loss_e, bal_e, g_e), (loss_c, bal_c, g_c) = results
        assert loss_c.requires_grad and rel_err(loss_c, loss_e) < 1e-5 and rel_err(bal_c, bal_e) < 1e-5
        assert all(rel_err(a, b) < 1e-4 for a, b in zip(g_c, g_e))


def test_autocast_bf16_follows_fp32():
    moe = random_moe(3, E=8, K=2, De=16, Dse=16, norm_topk=False)
    x = torch.randn(64, 32)
    y32, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = moe(x)
    assert y16.dtype == torch.float32 and rel_err(y16, y32) < 3e-2


def hand_moe(probs):
    """An MoE whose router gives token t exactly the gate scores probs[t] (x_t is the t-th unit vector)."""
    T, E = probs.shape
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=8, H=1, E=E, K=1, De=8, Dse=0))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :T] = probs.log().T
    return moe, torch.eye(T, 8)


def test_balance_loss_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    moe, x = hand_moe(probs)
    # K = 1: token 0 -> expert 0, token 1 -> expert 3; f = (1/2, 0, 0, 1/2), p = (.3, .25, .2, .25)
    _, (balance, counts) = flat(moe(x))
    assert counts.tolist() == [1, 0, 0, 1]
    assert balance.item() == pytest.approx(4 * (0.5 * 0.3 + 0.5 * 0.25))  # = 1.1
    # K = 2 on two tokens that both prefer experts 0 and 1: f = (1/2, 1/2, 0, 0), p = (.45, .3, .15, .1)
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    moe, x = hand_moe(probs)
    moe.K = 2
    _, (balance, counts) = flat(moe(x))
    assert counts.tolist() == [2, 2, 0, 0]
    assert balance.item() == pytest.approx(4 * (0.5 * 0.45 + 0.5 * 0.3))  # = 1.5


def test_balance_loss_is_one_at_perfect_balance():
    probs = torch.full((4, 4), 0.25) + torch.eye(4) * 1e-3
    moe, x = hand_moe(probs / probs.sum(-1, keepdim=True))
    for K in (1, 2):
        moe.K = K
        assert moe(x)[1].balance.item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("H,expected", [
    (8, [2 ** -h for h in range(1, 9)]),
    (11, [2 ** -h for h in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5]),
    (12, [2 ** -h for h in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
])
def test_alibi_slopes(H, expected):
    assert alibi_slopes(H) == pytest.approx(expected)


@pytest.mark.parametrize("H", [1, 2, 3, 5, 8, 11, 12, 16, 24, 40, 64, 96, 128])
def test_flex_score_mod_slopes_are_alibi_slopes(H):
    # the closed form in alibi_score_mod against alibi_slopes, head by head (powers of two and not): equal to
    # within one fp32 rounding (the kernel's exp2 against Python's powers; equal bits below H = 64 here)
    slopes = torch.tensor(alibi_slopes(H))
    from_score_mod = -alibi_score_mod(H)(torch.zeros(H), 0, torch.arange(H), 1, 0)
    assert from_score_mod.dtype == torch.float32 and from_score_mod.shape == (H,)
    assert ((from_score_mod - slopes).abs() / slopes).max() <= 2 ** -23


def test_alibi_bias_penalises_distance_and_masks_the_future():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 4, torch.float32)
    assert bias.shape == (1, 2, 4, 4)
    assert bias[0, 0, 3].tolist() == [-1.5, -1.0, -0.5, 0.0]
    assert bias[0, 1, 2, :3].tolist() == [-0.5, -0.25, 0.0] and bias[0, 1, 2, 3] == float("-inf")


def test_router_runs_in_fp32_under_bf16_autocast():
    # bf16 router logits gave 2.3 % of these tokens another top-6 set than fp32 logits
    moe = random_moe(9, E=64, K=6, De=32, Dse=0, norm_topk=False, Dm=256, router_std=0.02)
    x = torch.randn(4096, 256)
    s32, g32, e32, _ = moe.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16, g16, e16, _ = moe.route(x)
        _, (_, counts16) = flat(moe(x))
    assert s16.dtype == torch.float32 and torch.equal(e16, e32) and torch.equal(s16, s32) and torch.equal(g16, g32)
    assert torch.equal(counts16, moe(x)[1].load)


def test_empty_experts_get_exactly_zero_gradient_whatever_grouped_mm_leaves(monkeypatch):
    # upstream reports unwritten weight gradients for empty groups on some GPUs: play that bug here
    from kernels import custom_ops

    def leaves_garbage(a, b, offs):
        out = torch._grouped_mm(a, b, offs=offs)
        if out.dim() == 3:  # the weight gradient: poison the slots of empty groups
            out[torch.diff(offs, prepend=offs.new_zeros(1)) == 0] = float("nan")
        return out
    monkeypatch.setattr(custom_ops, "_grouped_mm", leaves_garbage)
    moe = random_moe(0, E=32, K=1, De=8, Dse=0, norm_topk=False)
    y, (_, counts) = flat(moe(torch.randn(5, 32)))
    y.square().sum().backward()
    empty = counts == 0
    assert empty.sum() >= 27 and moe.w13.grad[empty].eq(0).all() and moe.w2.grad[empty].eq(0).all()
    assert torch.isfinite(moe.w13.grad).all()


def test_sdpa_bias_is_built_once_in_fp32_and_keeps_every_distance_apart(monkeypatch):
    # cast to bf16, the smallest slope's 2048 distances fell on 641 values
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = GPT(GPTConfig(scheme="dense", L=2, Dm=32, H=8, Dffn=64, S=2048, vocab_size=16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.zeros(1, 2048, dtype=torch.long))
    assert len(masks) == 2 and masks[0].data_ptr() == masks[1].data_ptr() and masks[0].dtype == torch.float32
    assert masks[0].reshape(8, 2048, 2048)[-1, -1].unique().numel() == 2048  # head 8, slope 2^-8: 2048 distances


def test_sdpa_bias_is_kept_for_its_length_only():
    model = GPT(GPTConfig(scheme="dense", L=1, Dm=32, H=4, Dffn=64, S=64, vocab_size=16))
    b64 = model.alibi_bias_for(64)
    assert model.alibi_bias_for(64) is b64 and torch.equal(b64, alibi_bias(model.slopes, 64, torch.float32))
    model(torch.zeros(2, 48, dtype=torch.long))  # another length: a bias of that length replaces it
    b48 = model.alibi_bias_for(48)
    assert b48 is not b64 and torch.equal(b48, alibi_bias(model.slopes, 48, torch.float32))
    assert not any("alibi" in k or "slopes" in k for k in model.state_dict())
    idx = torch.zeros(2, 32, dtype=torch.long)
    with torch.inference_mode():  # an evaluation under inference_mode, then training at the same length
        model(idx, idx)
    model(idx, idx)[1].backward()  # SDPA refuses to save an inference tensor for the backward


@pytest.mark.parametrize("shape", [(3, 50, 24), (7, 40)])
def test_rms_norm_by_hand_matches_torch(shape):
    # RMSNormFn (the CPU path) against F.rms_norm and its autograd: the same forward bits, the gradients to rounding
    torch.manual_seed(len(shape))
    x = torch.randn(*shape, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    dy = torch.randn(*shape)
    ref = F.rms_norm(x, (shape[-1],), w, 1e-6)
    g_ref = torch.autograd.grad(ref, (x, w), dy)
    y = RMSNormFn.apply(x, w, 1e-6)
    g = torch.autograd.grad(y, (x, w), dy)
    assert torch.equal(y, ref)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g, g_ref))
    assert torch.equal(RMSNorm(shape[-1]).forward(x), F.rms_norm(x, (shape[-1],), torch.ones(shape[-1]), 1e-6))


@pytest.mark.parametrize("shape,gated", [((3, 5, 2 * 7), False), ((40, 2 * 16), True), ((2, 3, 2 * 33), True)])
def test_swiglu_by_hand_is_autograds_expression(shape, gated):
    # SwiGLUFn against silu(h1) * h3 (* g) through autograd: the same bits forward and backward, dg included
    torch.manual_seed(shape[-1])
    h = torch.randn(*shape, requires_grad=True)
    g = torch.rand(*shape[:-1], 1, requires_grad=True) if gated else None
    da = torch.randn(*shape[:-1], shape[-1] // 2)
    h1, h3 = h.chunk(2, dim=-1)
    ref = F.silu(h1) * h3 * (g if gated else 1.0)
    leaves = (h, g) if gated else (h,)
    a = SwiGLUFn.apply(h, g)
    assert torch.equal(a, ref)
    assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(a, leaves, da), torch.autograd.grad(ref, leaves, da)))


def test_cpu_attention_takes_the_flash_kernel_not_the_math_path():
    # with a 3-D bias SDPA fell back to the math path on CPU: every B·H·T·T score written out, 1.5× the time
    model = GPT(GPTConfig(scheme="dense", L=1, Dm=32, H=4, Dffn=64, S=64, vocab_size=16))
    idx = torch.zeros(2, 64, dtype=torch.long)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(idx, idx)[1].backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not any("attention_math" in n for n in names)


def test_router_softmax_gradient_does_not_depend_on_the_thread_count():
    # torch's CPU softmax backward did (E = 40, no multiple of 16), so the toy's BPC moved with OMP_NUM_THREADS;
    # the written-out softmax gives the same bits on 1 and 2 threads, and equals torch's to rounding
    torch.manual_seed(0)
    z0, G = torch.randn(2560, 40), torch.randn(2560, 40)
    threads, grads = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            z = z0.clone().requires_grad_()
            s_TE, lse_T = router_softmax(z)
            grads.append(torch.autograd.grad((s_TE * G).sum() + lse_T.square().sum(), z)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*grads)
    s_TE, lse_T = router_softmax(z0)
    assert rel_err(s_TE, F.softmax(z0, -1)) < 1e-6 and rel_err(lse_T, torch.logsumexp(z0, -1)) < 1e-6


@pytest.mark.parametrize("H,T", [(8, 256), (11, 200), (12, 77)])
def test_flex_score_mod_and_block_mask_match_the_bias(H, T):
    # FlexAttention's ALiBi (closed-form slopes in the score_mod, causality in the block mask) against SDPA
    # with the materialised bias; T off the 128-wide blocks and H off the powers of two included
    torch.manual_seed(H * T)
    q, k, v = (torch.randn(2, H, T, 16) for _ in range(3))
    y_flex = flex_attention(q, k, v, score_mod=alibi_score_mod(H), block_mask=causal_block_mask(T, "cpu"))
    y_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias(torch.tensor(alibi_slopes(H)), T, torch.float32))
    assert rel_err(y_flex, y_ref) < 1e-5


def test_block_mask_skips_the_blocks_above_the_diagonal():
    mask = causal_block_mask(300, "cpu")  # 3 blocks of 128: the last one partial
    blocks = mask.to_dense()[0, 0]
    assert blocks.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    q, kv = torch.arange(300)[:, None], torch.arange(300)[None, :]
    assert torch.equal(mask.mask_mod(0, 0, q, kv), q >= kv)


def test_flex_attention_runs_only_at_multiples_of_its_block(monkeypatch):
    # FlexAttention with a block mask and a score_mod has NaN gradients at lengths off 128 upstream: the
    # model pads S = 150 to 256 for the kernel and returns S rows, equal to SDPA's
    seen = []
    monkeypatch.setattr(model, "flex_attention", lambda q, *a, **kw: seen.append(q.shape[2]) or flex_attention(q, *a, **kw))
    torch.manual_seed(3)
    cfg = GPTConfig(scheme="dense", L=1, Dm=32, H=4, Dh=8, Dffn=64, S=150, vocab_size=40)
    sdpa, flex = GPT(cfg), GPT(cfg, attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 40, (2, 150))
    with torch.no_grad():
        (logits_s, _, _), (logits_f, _, _) = sdpa(idx, idx), flex(idx, idx)
    assert seen == [256] and logits_f.shape == logits_s.shape and rel_err(logits_f, logits_s) < 1e-5


@pytest.mark.parametrize("scheme", ["dense", "1dense"])
def test_gpt_with_flex_attention_matches_sdpa(scheme):
    torch.manual_seed(7)
    cfg = GPTConfig(scheme=scheme, L=2, Dm=32, H=3, Dh=8, Dffn=64, E=4, K=2, De=16, Dse=16, S=150, vocab_size=40)
    sdpa = GPT(cfg)
    flex = GPT(cfg, attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 40, (2, 150))
    with torch.no_grad():
        (logits_s, loss_s, _), (logits_f, loss_f, _) = sdpa(idx, idx), flex(idx, idx)
    assert rel_err(logits_f, logits_s) < 1e-5 and rel_err(loss_f, loss_s) < 1e-6
    with pytest.raises(ValueError, match="attention='flash'"):
        GPT(cfg, attention="flash")


@pytest.mark.slow
def test_regional_compile_matches_eager_and_shares_graphs_across_blocks():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(8)
    model = GPT(GPTConfig(scheme="1dense", L=5, Dm=32, H=2, Dffn=64, E=4, K=2, De=16, Dse=16, S=16, vocab_size=40))
    idx = torch.randint(0, 40, (2, 16))
    _, loss_e, _ = model(idx, idx)
    g_e = torch.autograd.grad(loss_e, list(model.parameters()))
    model.compile_regions()
    for _ in range(2):
        _, loss_c, _ = model(idx, idx)
        g_c = torch.autograd.grad(loss_c, list(model.parameters()))
        assert rel_err(loss_c, loss_e) < 1e-5 and all(rel_err(a, b) < 1e-4 for a, b in zip(g_c, g_e))
    # one graph for the dense block, one for the four MoE blocks, one for the head: none per layer
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]


@pytest.mark.parametrize("scheme", ["dense", "full", "1dense", "interleave"])
def test_executed_flops_are_what_torch_counts(scheme):
    # flops.M_exec against torch's FlopCounterMode over one forward + backward. The counter has no formula
    # for the CPU flash kernel, so SDPA runs its math path here: the whole S×S square, where M_exec counts
    # the causal triangle; the square's share is added back.
    cfg = GPTConfig(scheme=scheme, L=3, Dm=32, H=2, Dh=24, Dffn=64, E=5, K=2, De=16, Dse=16, S=16, vocab_size=40)
    model = GPT(cfg)
    idx = torch.randint(0, 40, (3, 16))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx)[1].backward()
    square_minus_triangle = 3 * 4 * cfg.H * cfg.Dh * (cfg.S - (cfg.S + 1) / 2) * cfg.L
    assert counter.get_total_flops() == pytest.approx(3 * 16 * (flops.M_exec(cfg, 40) + square_minus_triangle), rel=1e-12)


@pytest.mark.parametrize("scheme", ["dense", "1dense"])
def test_causality(scheme):
    torch.manual_seed(4)
    model = GPT(GPTConfig(scheme=scheme, L=2, Dm=32, H=4, Dffn=64, E=4, K=2, De=16, Dse=16, S=16, vocab_size=50))
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 50
    logits, _, _ = model(idx, idx)
    logits2, _, _ = model(changed, changed)
    assert torch.allclose(logits[:, :9], logits2[:, :9], atol=1e-6)
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:], atol=1e-3)


SCHEMES = [("dense", 0), ("full", 0), ("full", 48), ("1dense", 0), ("1dense", 48), ("interleave", 0), ("interleave", 48)]


@pytest.mark.parametrize("scheme,Dse", SCHEMES)
@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_equal_flops(scheme, Dse, tie):
    cfg = GPTConfig(scheme=scheme, L=4, Dm=64, H=4, Dh=24, Dffn=176, E=6, K=2, De=32, Dse=Dse, vocab_size=97,
                    tie_embeddings=tie)
    model = GPT(cfg)
    c = flops.count(cfg, include_router=True)
    assert model.param_counts() == (c.N, c.Na)
    embeddings_and_norms = 97 * 64 * (1 if tie else 2) + (2 * 4 + 1) * 64
    assert sum(p.numel() for p in model.parameters()) == c.N + embeddings_and_norms


def test_loss_adds_the_weighted_balance_loss():
    torch.manual_seed(5)
    model = GPT(GPTConfig(scheme="full", L=2, Dm=32, H=2, E=4, K=2, De=16, Dse=0, S=8, vocab_size=30,
                          balance_coef=0.5))
    idx = torch.randint(0, 30, (3, 8))
    logits, loss, stats = model(idx, idx)
    assert loss.item() == pytest.approx(stats["ce"].item() + 0.5 * stats["balance"].item(), rel=1e-6)
    assert stats["ce"].item() == pytest.approx(F.cross_entropy(logits.view(-1, 30), idx.view(-1)).item(), rel=1e-6)
    assert stats["load"].shape == (2, 4) and stats["load"].sum(-1).tolist() == [3 * 8 * 2] * 2
    assert math.log(30) * 0.8 < stats["ce"].item() < math.log(30) * 1.2  # near uniform at init


def test_generate_is_reproducible():
    model = GPT(GPTConfig(scheme="1dense", L=2, Dm=32, H=2, Dffn=64, E=4, K=2, De=16, S=8, vocab_size=30))
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(idx, 12, top_k=5, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 12, top_k=5, generator=torch.Generator().manual_seed(0))
    c = model.generate(idx, 12, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 13) and torch.equal(a, b) and not torch.equal(a, c)  # the generator decides, and only it
    assert torch.equal(a[:, :1], idx)


def test_generate_samples_only_the_real_vocabulary_and_sees_at_most_S_tokens():
    # vocab_size is rounded up past the tokenizer's vocabulary: the ids above it are no tokens, and must never be
    # sampled however likely the model makes them; a prompt longer than S is cut to its last S tokens
    torch.manual_seed(9)
    model = GPT(GPTConfig(scheme="1dense", L=2, Dm=32, H=2, Dffn=64, E=4, K=2, De=16, S=8, vocab_size=64))
    seen = []
    forward = model.forward

    def padded_ids_win(idx, targets=None):
        seen.append(idx.clone())
        logits, loss, stats = forward(idx, targets)
        return logits + torch.where(torch.arange(64) >= 40, 1e4, 0.0), loss, stats  # ids 40..63 all but certain
    model.forward = padded_ids_win
    prompt = torch.arange(20).repeat(2, 1)  # 20 tokens: longer than S = 8
    out = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0), vocab=40)
    assert out.shape == (2, 30) and torch.equal(out[:, :20], prompt)
    assert int(out[:, 20:].max()) < 40 and len(set(out[:, 20:].flatten().tolist())) > 1  # the cut, not a fixed id
    assert [tuple(x.shape) for x in seen] == [(2, 8)] * 10  # every step sees the last S tokens, never more
    assert all(torch.equal(x, out[:, 20 + i - 8:20 + i]) for i, x in enumerate(seen))
    assert int(model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))[:, 20:].min()) >= 40  # uncut
    for top_k in (1, 5, 100):  # top-k among the real vocabulary only
        out = model.generate(prompt, 6, top_k=top_k, generator=torch.Generator().manual_seed(0), vocab=40)
        assert int(out[:, 20:].max()) < 40


