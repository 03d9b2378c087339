"""A dense or Mixture-of-Experts GPT, as in docs/method.md §3; tags (M1)–(M15) are that file's equations.

Pre-norm decoder: RMSNorm, causal attention with ALiBi, SwiGLU. An MoE layer is a softmax router,
top-K, an optional shared expert and a load-balancing loss (M1–M6). The routed experts run as two
grouped GEMMs over tokens sorted by expert: dropless, no host synchronisation, no data-dependent
shapes, so torch.compile(fullgraph=True) makes one graph that survives any routing.

Shape suffixes in the hot code, with the paper's letters: T tokens, D model width (Dm), E experts,
K experts per token, F expert width (De), V vocabulary; R = T·K routing slots (S stays the
sequence length, as in docs/method.md §2).
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import register_flop_formula

import flops
from harness.config import GPTConfig  # [model] of a run's config


# ----------------------------------------------------------------------------- grouped GEMM
# torch's grouped_mm multiplies each group of rows of x by its own matrix. We wrap it in a custom
# op because its built-in fake kernel (what torch.compile traces with) accepts only bf16; the
# wrapper gives fp32 on CPU a fake and an autograd rule of its own, and works for every dtype.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


@torch.library.custom_op("moe_equal::gmm", mutates_args=())
def gmm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """out[r] = x[r] @ w[e] for the rows r of group e; group e ends at row offs[e].
    Rows past offs[-1] would be left unwritten: callers make offs[-1] == len(x) (dropless routing)."""
    return _grouped_mm(x, w, offs=offs)


@gmm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_equal::gmm_wgrad", mutates_args=())
def gmm_wgrad(x: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    """dw[e] = x_eᵀ @ dy_e over the rows of group e (zero for an empty group)."""
    return _grouped_mm(x.t(), dy, offs=offs)


@gmm_wgrad.register_fake
def _(x, dy, offs):
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _gmm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gmm_backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dy = dy.contiguous()  # grouped_mm's kernels reject zero-stride gradients such as that of out.sum()
    # an expert without rows gets exactly zero, not whatever grouped_mm leaves in its slot (upstream
    # reports unwritten weight gradients for empty groups on some GPUs)
    empty_E = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
    dw = gmm_wgrad(x, dy, offs).masked_fill_(empty_E[:, None, None], 0.0)
    return gmm(dy, w.transpose(1, 2), offs), dw, None


gmm.register_autograd(_gmm_backward, setup_context=_gmm_setup)


# so that torch.utils.flop_counter.FlopCounterMode counts the experts: 2 FLOPs per multiply-add, as mm
@register_flop_formula([torch.ops.moe_equal.gmm, torch.ops.moe_equal.gmm_wgrad])
def _gmm_flops(x_shape, w_shape, offs_shape, out_shape=None, **kwargs):
    return 2 * x_shape[0] * x_shape[1] * out_shape[-1]


# ----------------------------------------------------------------------------- dispatch / combine
# Dispatch copies each token to its K slots in expert order; combine sums the K slots back into the
# token. Each is the other's adjoint, so both directions are plain gathers: deterministic, no atomics.
# index_select, not x[idx]: on CPU it copies whole rows where x[idx] runs the general indexing kernel
# (2.4–2.9× faster at the CPU toy's sizes, docs/results.md).
def _dispatch(x_TD, tok_R):
    return x_TD.index_select(0, tok_R)


def _combine(o_RD, inv_R, K):
    return o_RD.index_select(0, inv_R).view(-1, K, o_RD.shape[-1]).sum(1)


class Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, tok_R, inv_R, K):
        ctx.save_for_backward(inv_R)
        ctx.K = K
        return _dispatch(x_TD, tok_R)

    @staticmethod
    def backward(ctx, dxs_RD):
        (inv_R,) = ctx.saved_tensors
        return _combine(dxs_RD, inv_R, ctx.K), None, None, None


class Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_RD, tok_R, inv_R, K):
        ctx.save_for_backward(tok_R)
        return _combine(o_RD, inv_R, K)

    @staticmethod
    def backward(ctx, dy_TD):
        (tok_R,) = ctx.saved_tensors
        return _dispatch(dy_TD, tok_R), None, None, None


def routed_experts(x_TD, g_TK, e_TK, w13_EDF2, w2_EFD):
    """Σ_k g_k · SwiGLU_{e_k}(x) for every token (the routed part of M5), dropless.
    The R routing slots are sorted by expert; expert e owns the slots offs[e-1]:offs[e].

    Measured with bench.py expert (2 CPU cores, fp32, compiled; dense/MoE time at equal expert FLOPs,
    0.87 for this path) and dropped: gathering each expert's rows inside the grouped GEMM just before
    its mm, still in cache (10 ms faster alone, 0.3 % in the whole step); the gate on the output
    instead of the hidden; index_add dispatch (0.78); both W2 layouts; single-threaded experts two at a
    time. A loop over experts reaches about 0.6, an eager grouped GEMM about 0.8. Going further needs a
    kernel that never materialises the T·K-row tensors, which grouped_mm cannot do (docs/results.md)."""
    T, K = e_TK.shape
    E = w13_EDF2.shape[0]
    e_R, order_R = e_TK.flatten().sort(stable=True)      # the R = T·K slots, grouped by expert
    tok_R = order_R // K                                  # the token behind each slot
    inv_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(T * K, device=e_TK.device))
    # group e ends where ids > e begin; the last group ends at R by construction, so no row of the
    # grouped GEMMs is ever left unwritten (grouped_mm skips rows past the last offset)
    ends = torch.searchsorted(e_R, torch.arange(E - 1, device=e_TK.device), right=True, out_int32=True)
    offs_E = torch.cat([ends, ends.new_full((1,), T * K)])
    xs_RD = Dispatch.apply(x_TD, tok_R, inv_R, K)
    h_RF2 = gmm(xs_RD, w13_EDF2, offs_E)
    # each slot's gate g (M5) scales the narrow hidden (F wide) rather than the output (D wide): same
    # result, less memory traffic; swiglu applies it with the activation
    g_R1 = g_TK.flatten()[order_R].unsqueeze(-1).to(h_RF2.dtype)
    a_RF = swiglu(h_RF2, g_R1)
    o_RD = gmm(a_RF, w2_EFD, offs_E)
    counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    return Combine.apply(o_RD, tok_R, inv_R, K), counts_E


# ----------------------------------------------------------------------------- layers
class RMSNormFn(torch.autograd.Function):
    """y = x̂ ⊙ w with x̂ = x / rms(x), rms(x) = sqrt(mean(x²) + eps), and its gradient in closed form:
    dx = (g − x̂ · mean(g ⊙ x̂)) / rms(x) with g = dy ⊙ w, and dw = Σ_rows dy ⊙ x̂. On CPU, F.rms_norm is
    a chain of small ops whose autograd backward is longer still: this takes 1.25 against 2.3 ms forward
    and backward at [10, 256, 256] (the forward is the same bits; the gradient agrees to rounding)."""
    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, w)
        return x_hat * w

    @staticmethod
    def backward(ctx, dy):
        x_hat, rstd, w = ctx.saved_tensors
        g = dy * w
        dx = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd
        return dx, (dy * x_hat).flatten(0, -2).sum(0), None


class SwiGLUFn(torch.autograd.Function):
    """The activation alone (no matrices): a = silu(h1) ⊙ h3 ⊙ g from h = [h1 | h3], the output of the
    stacked W1|W3 matrix, and g the router's gate of each routed slot (M5: a column; None in a dense FFN).
    Autograd's formulas, in its order, so the same bits; but the backward
    writes dh1 and dh3 straight into the two halves of dh, where autograd's chunk would join them with a
    copy of the whole 2F-wide gradient (4.0–4.2 against 4.6–4.9 ms forward and backward at [2560, 1600] on
    2 CPU threads). It saves h and silu(h1), as autograd does, and recomputes silu(h1) ⊙ h3 for dg."""
    @staticmethod
    def forward(ctx, h, g):
        h1, h3 = h.chunk(2, dim=-1)
        s = F.silu(h1)
        a = s * h3
        ctx.save_for_backward(h, s, g)
        return a if g is None else a * g

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: the out= writes are not differentiable
    def backward(ctx, da):
        h, s, g = ctx.saved_tensors
        h1, h3 = h.chunk(2, dim=-1)
        dg = None
        if g is not None:
            dg = (da * (s * h3)).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
            da = da * g
        dh = torch.empty_like(h)
        dh1, dh3 = dh.chunk(2, dim=-1)
        torch.mul(da, s, out=dh3)
        torch.ops.aten.silu_backward.grad_input(da * h3, h1, grad_input=dh1)
        return dh, dg


def swiglu(h, g=None):
    """silu(h1) ⊙ h3 (⊙ g, the routed slot's gate) for h = [h1 | h3]: SwiGLUFn in eager code; compiled,
    the plain expression, which inductor fuses into one kernel."""
    if torch.compiler.is_compiling():
        h1, h3 = h.chunk(2, dim=-1)
        a = F.silu(h1) * h3
        return a if g is None else a * g
    return SwiGLUFn.apply(h, g)


class RMSNorm(nn.Module):
    def __init__(self, D, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x):
        if x.device.type == "cpu" and not torch.compiler.is_compiling():  # elsewhere a fused kernel, or inductor's
            return RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def alibi_slopes(H):
    """ALiBi head slopes (Press et al. 2022; docs/method.md §3): 2^(−8h/H) for H a power of two; otherwise the
    P slopes of the largest power of two P below H, then every other slope of the 2P sequence."""
    def geometric(n):
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]
    if H & (H - 1) == 0:
        return geometric(H)
    P = 2 ** math.floor(math.log2(H))
    return geometric(P) + geometric(2 * P)[0::2][: H - P]


def alibi_bias(slopes_H, T, dtype):
    """[1, H, T, T] additive attention bias: −m_h·(i − j) for key j ≤ query i, −inf for j > i. Four
    dimensions, not three: on CPU, SDPA takes its flash kernel only with a 2-D or 4-D mask; with [H, T, T]
    it falls back to the math path, which writes out every B·H·T·T score (1.5× the time, fwd + bwd)."""
    pos = torch.arange(T, device=slopes_H.device)
    rel_TT = (pos[None, :] - pos[:, None]).float()       # j − i
    bias = slopes_H[:, None, None] * rel_TT
    return bias.masked_fill(rel_TT > 0, float("-inf")).to(dtype)[None]


# FlexAttention, the CUDA path: ALiBi is a score_mod that the fused kernel evaluates on each fp32 score,
# and causality a block mask, so the blocks above the diagonal are skipped rather than computed and
# masked. SDPA with the materialised [1, H, T, T] bias above stays the reference and the CPU path
# (FlexAttention has no backward on CPU). It must be compiled to be fast: inside a compiled block
# torch.compile lowers it to the fused kernels; called eagerly it needs a compiled wrapper of its own.
@functools.cache
def flex_attention_compiled():
    return torch.compile(flex_attention, dynamic=False)  # made on first use: torch.compile costs ~3 s of imports


@functools.cache
def alibi_score_mod(H):
    """score − m_h·(i − j) with the slopes of alibi_slopes(H) in closed form, computed in the kernel in
    fp32: h < P takes 2^(−8(h+1)/P); the rest every other slope of the 2P sequence, 2^(−4(2(h−P)+1)/P).
    One function per H, so that compiled code is reused rather than traced again for a new closure."""
    P = 2 ** math.floor(math.log2(H))

    def score_mod(score, b, h, q_idx, kv_idx):
        e = torch.where(h < P, (h + 1) * (8.0 / P), (2 * (h - P) + 1) * (4.0 / P))
        return score - torch.exp2(-e) * (q_idx - kv_idx)
    return score_mod


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_block_masks = {}


def causal_block_mask(T, device):
    """The causal BlockMask for T×T attention: built once per (T, device) in eager code, traced into the
    graph when compiling (it depends on nothing but T)."""
    if torch.compiler.is_compiling():
        return create_block_mask(causal, None, None, T, T, device=device)
    key = (T, str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(causal, None, None, T, T, device=device)
    return _block_masks[key]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.H, self.Dh = cfg.H, cfg.Dh
        self.qkv = nn.Linear(cfg.Dm, 3 * cfg.H * cfg.Dh, bias=False)
        self.proj = nn.Linear(cfg.H * cfg.Dh, cfg.Dm, bias=False)
        self.score_mod = alibi_score_mod(cfg.H)

    def forward(self, x_BTD, mask):
        """mask: a BlockMask (FlexAttention with ALiBi as a score_mod) or the fp32 [1, H, T, T] ALiBi bias (SDPA)."""
        B, T, _ = x_BTD.shape
        # split, as nanoGPT does: the backward joins the three gradients with one cat (a permute of a
        # [B, T, 3, H, Dh] view needed a stack and a copy: the same bits, ~1 % of the CPU step)
        q, k, v = (t.view(B, T, self.H, self.Dh).transpose(1, 2) for t in self.qkv(x_BTD).split(self.H * self.Dh, dim=-1))
        if isinstance(mask, BlockMask):  # on CPU (tests only: no backward there) the slow eager reference
            eager_cuda = q.is_cuda and not torch.compiler.is_compiling()
            flex = flex_attention_compiled() if eager_cuda else flex_attention
            y = flex(q, k, v, score_mod=self.score_mod, block_mask=mask)
        else:  # the 4-D bias takes SDPA's flash kernel, which would cast it to q's dtype: under autocast the
            # 3-D bias keeps it fp32 (the math path computes in the bias's dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if q.dtype == mask.dtype else mask[0])
        return self.proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh))


class SwiGLU(nn.Module):
    """FFN(x) = W2·(silu(W1·x) ⊙ W3·x), with W1 and W3 stacked in one matrix: 3·Dm·F parameters."""
    def __init__(self, Dm, F_):
        super().__init__()
        self.w13 = nn.Linear(Dm, 2 * F_, bias=False)
        self.w2 = nn.Linear(F_, Dm, bias=False)

    def forward(self, x):
        return self.w2(swiglu(self.w13(x)))


class MoEAux(NamedTuple):
    """What an MoE layer reports besides its output."""
    balance: Tensor   # M6
    load: Tensor      # [E] routing slots per expert
    z_loss: Tensor    # mean over tokens of logsumexp(router logits)²
    logit_ms: Tensor  # mean square of the router logits


class MoE(nn.Module):
    """M1–M6: softmax router, top-K gates (not renormalised unless norm_topk), E routed SwiGLU
    experts of width De, an ungated shared expert of width Dse, and the balance loss."""
    def __init__(self, cfg):
        super().__init__()
        self.E, self.K, self.norm_topk = cfg.E, cfg.K, cfg.norm_topk
        self.z_trained = cfg.router_z_coef > 0  # else the z-loss is only logged
        self.router = nn.Linear(cfg.Dm, cfg.E, bias=False)                   # Wg
        self.w13 = nn.Parameter(torch.empty(cfg.E, cfg.Dm, 2 * cfg.De))     # [W1ᵀ | W3ᵀ] per expert
        self.w2 = nn.Parameter(torch.empty(cfg.E, cfg.De, cfg.Dm))          # W2ᵀ per expert
        self.shared = SwiGLU(cfg.Dm, cfg.Dse) if cfg.Dse else None
        # under DDP the ranks' micro-batches together are one micro-batch: f (M6) is counted over all
        # of them, so the balance loss, and the run, do not depend on how many ranks share the batch
        self.balance_group, self.balance_world = None, 1
        # loss-free balancing (DeepSeek-V3): a bias on the scores that chooses the top K and nothing else;
        # moved after each optimizer step (GPT.update_expert_bias), saved with the model, not a parameter:
        # outside N and C (docs/method.md §9)
        if cfg.expert_bias_rate:
            self.register_buffer("expert_bias", torch.zeros(cfg.E))
        else:
            self.expert_bias = None

    def route(self, x_TD):
        """M1–M4: gate scores s [T, E], gates g and experts e [T, K], and the router's logits' stats
        (logsumexp per token, for the z-loss; mean square). The router runs in fp32 whatever the autocast
        dtype: in bf16 logits, near-ties flip which experts a token gets."""
        with torch.autocast(x_TD.device.type, enabled=False):
            z_TE = F.linear(x_TD.float(), self.router.weight.float())
        # M1, softmax written out: torch's CPU softmax backward rounds differently on 1 and 2 threads when
        # E is no multiple of 16 (E = 40: 3e-8 on the gradient); these ops do not
        z_max_T1 = z_TE.amax(-1, keepdim=True).detach()
        e_TE = (z_TE - z_max_T1).exp()
        sum_T1 = e_TE.sum(-1, keepdim=True)
        s_TE = e_TE / sum_T1
        if self.expert_bias is None:
            g_TK, e_TK = s_TE.topk(self.K, dim=-1)        # M2, M3: g_i = s_i on the top K
        else:                                             # the bias chooses; the gates stay the unbiased s
            e_TK = (s_TE.detach() + self.expert_bias).topk(self.K, dim=-1).indices
            g_TK = s_TE.gather(-1, e_TK)
        if self.norm_topk:
            g_TK = g_TK / g_TK.sum(-1, keepdim=True)      # M4
        lse_T = (z_max_T1 + sum_T1.log()).squeeze(-1)     # logsumexp of the logits, from the softmax's pieces
        return s_TE, g_TK, e_TK, (lse_T, z_TE.detach().square().mean())

    def z_loss(self, lse_T):
        """ST-MoE's router z-loss: the mean over tokens of logsumexp(z)², z the router's logits."""
        return lse_T.square().mean()

    def balance(self, s_TE, counts_E):
        """M6: L_balance = E·Σ f_i·p_i, f_i = share of the K·T slots, p_i = mean gate score. Under DDP,
        f comes from every rank's counts (a constant: no gradient flows through it); each rank's p is
        its own, and averaging the ranks' gradients makes it the mean p of the whole micro-batch."""
        f_E = counts_E.float() / counts_E.sum()
        if self.balance_group is not None and self.training:
            f_E = funcol.all_reduce(f_E, "sum", self.balance_group) / self.balance_world
        return self.E * (f_E * s_TE.mean(0)).sum()

    def forward(self, x_TD):
        """(y, aux): aux holds the balance loss, the slots per expert [E], the z-loss (detached unless it
        is trained on) and the mean square of the router's logits."""
        s_TE, g_TK, e_TK, (lse_T, logit_ms) = self.route(x_TD)
        w13, w2, xe = self.w13, self.w2, x_TD
        if torch.is_autocast_enabled(x_TD.device.type):   # custom ops are not autocast: cast by hand
            dt = torch.get_autocast_dtype(x_TD.device.type)
            w13, w2, xe = w13.to(dt), w2.to(dt), x_TD.to(dt)
        y_TD, counts_E = routed_experts(xe, g_TK, e_TK, w13, w2)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)               # M5: the shared expert, ungated
        return y_TD.to(x_TD.dtype), self.aux(s_TE, counts_E, lse_T, logit_ms)

    def aux(self, s_TE, counts_E, lse_T, logit_ms):
        z = self.z_loss(lse_T if self.z_trained else lse_T.detach())
        return MoEAux(self.balance(s_TE, counts_E), counts_E, z, logit_ms)

    def forward_loop(self, x_TD):
        """M1–M6 written the obvious way, one expert at a time: the reference that the fused path is
        tested against (tests/test_model.py on CPU, bench.py gpu-check in bf16 on a GPU). Slow."""
        s_TE, g_TK, e_TK, (lse_T, logit_ms) = self.route(x_TD)
        y_TD = torch.zeros_like(x_TD)
        counts_E = torch.zeros(self.E, device=x_TD.device)
        for i in range(self.E):
            tok, slot = (e_TK == i).nonzero(as_tuple=True)
            counts_E[i] = len(tok)
            h1, h3 = (x_TD[tok] @ self.w13[i]).chunk(2, dim=-1)
            y_TD = y_TD.index_add(0, tok, ((F.silu(h1) * h3 * g_TK[tok, slot, None].to(h3.dtype)) @ self.w2[i]).to(y_TD.dtype))
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD, self.aux(s_TE, counts_E, lse_T, logit_ms)


class Block(nn.Module):
    def __init__(self, cfg, kind):
        super().__init__()
        self.norm1, self.attn, self.norm2 = RMSNorm(cfg.Dm), Attention(cfg), RMSNorm(cfg.Dm)
        self.ffn = MoE(cfg) if kind == "moe" else SwiGLU(cfg.Dm, cfg.Dffn)

    def forward(self, x_BTD, mask):
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), mask)
        h_BTD = self.norm2(x_BTD)
        if isinstance(self.ffn, SwiGLU):
            return x_BTD + self.ffn(h_BTD), None
        y_TD, aux = self.ffn(h_BTD.view(-1, h_BTD.shape[-1]))
        # in the residual stream's dtype: on CUDA under autocast the MoE returns fp32 (rms_norm runs in fp32),
        # which would turn a bf16 stream (FSDP's) fp32 from here on
        return x_BTD + y_TD.view_as(x_BTD).to(x_BTD.dtype), aux


ATTENTION = ("sdpa", "flex")


class GPT(nn.Module):
    """attention: "sdpa" (the materialised ALiBi bias; any device) or "flex" (FlexAttention; CUDA for training)."""
    def __init__(self, cfg: GPTConfig, attention="sdpa"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r} is unknown: expected one of {', '.join(ATTENTION)}")
        self.cfg, self.attention = cfg, attention
        self.wte = nn.Embedding(cfg.vocab_size, cfg.Dm)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in flops.layer_kinds(cfg))
        self.norm_f = RMSNorm(cfg.Dm)
        self.lm_head = nn.Linear(cfg.Dm, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.register_buffer("slopes", torch.tensor(alibi_slopes(cfg.H)), persistent=False)
        self._alibi_bias = None  # GPT.alibi_bias_for's [1, H, T, T] bias for the last length seen
        self.checkpointing = False  # activation checkpointing: keep each block's input, recompute the rest
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # GPT-2's init: N(0, 0.02) everywhere, the matrices that write into the residual stream scaled
        # by 1/√(2L) so its variance does not grow with depth; norms at 1. A small router std keeps
        # the first routing near uniform, so no expert starts out starved.
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.L)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, MoE):
                nn.init.normal_(m.w13, 0.0, std)
                nn.init.normal_(m.w2, 0.0, out_std)
        for m in self.modules():  # second pass: children come after their parents in modules()
            if isinstance(m, (Attention, SwiGLU)):
                nn.init.normal_((m.proj if isinstance(m, Attention) else m.w2).weight, 0.0, out_std)

    def forward(self, idx_BT, targets_BT=None):
        """Logits, and with targets the loss L_CE + λ·L_balance (+ router_z_coef·L_z) and its parts. Stats:
        'ce', 'balance' and 'z_loss' (means over MoE layers), 'load' [Le, E] slots per expert (M6),
        'logit_ms' [Le] the mean square of each MoE layer's router logits."""
        x = self.wte(idx_BT)
        T = idx_BT.shape[1]
        mask = causal_block_mask(T, x.device) if self.attention == "flex" else self.alibi_bias_for(T)
        auxes = []
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, aux = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x, aux = block(x, mask)
            if aux is not None:
                auxes.append(aux)
        if targets_BT is None:
            return self.lm_head(self.norm_f(x[:, -1:])), None, {}
        logits, ce = self.head(x, targets_BT)
        if not auxes:  # no ce + 0 here: compiled, that sum next to ce.detach() came out without a grad_fn (torch 2.13)
            zero = ce.new_zeros(())
            return logits, ce, {"ce": ce.detach(), "balance": zero, "z_loss": zero, "load": ce.new_zeros(0, 0),
                                "logit_ms": ce.new_zeros(0)}
        balance = torch.stack([a.balance for a in auxes]).mean()  # means over the MoE layers (our choice)
        z_loss = torch.stack([a.z_loss for a in auxes]).mean()
        loss = ce + self.cfg.balance_coef * balance
        if self.cfg.router_z_coef:
            loss = loss + self.cfg.router_z_coef * z_loss
        return logits, loss, {"ce": ce.detach(), "balance": balance.detach(), "z_loss": z_loss.detach(),
                              "load": torch.stack([a.load for a in auxes]),
                              "logit_ms": torch.stack([a.logit_ms for a in auxes])}

    def alibi_bias_for(self, T):
        """The [1, H, T, T] ALiBi bias that every layer reads, built on the first forward of length T (on the
        slopes' device) and kept until a forward of another length: it depends on nothing else, and
        building it took ~1 ms a step of the CPU default run. One built under inference_mode is built
        again outside it (SDPA saves the bias for the backward, which an inference tensor refuses). It
        stays fp32 whatever the autocast dtype: in bf16 the smallest slope's 2048 distances collapse to
        641 values. Compiling a whole GPT, it is built in the graph, as causal_block_mask's mask is."""
        if torch.compiler.is_compiling():
            return alibi_bias(self.slopes, T, torch.float32)
        bias = self._alibi_bias
        if (bias is None or bias.shape[-1] != T or bias.device != self.slopes.device
                or (bias.is_inference() and not torch.is_inference_mode_enabled())):
            bias = self._alibi_bias = alibi_bias(self.slopes, T, torch.float32)
        return bias

    @torch.no_grad()
    def update_expert_bias(self, load_LE):
        """Loss-free balancing, after an optimizer step: each MoE layer's bias moves by rate·sign(mean load
        − load), from the step's slots per expert over all ranks (load_LE [Le, E]), and is kept at zero mean."""
        rate = self.cfg.expert_bias_rate
        for moe, load_E in zip((m for m in self.modules() if isinstance(m, MoE)), load_LE):
            moe.expert_bias += rate * torch.sign(load_E.mean() - load_E)
            moe.expert_bias -= moe.expert_bias.mean()

    def head(self, x_BTD, targets_BT):
        """Logits and the mean cross-entropy (in fp32) over the targets that are not −1."""
        logits = self.lm_head(self.norm_f(x_BTD))
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BT.reshape(-1), ignore_index=-1)
        return logits, ce

    def count_balance_over(self, group, world):
        """Under DDP: each MoE layer's f (M6) over the micro-batches of all `world` ranks of `group`."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.balance_group, m.balance_world = group, world

    def compile_regions(self):
        """torch.compile each block and the head on their own ("regional compilation"), in place. Blocks
        of one kind run the same code on other weights, so they share one compiled graph and a deep model
        compiles about as fast as a shallow one; what is lost is fusion across block boundaries."""
        for block in self.blocks:
            block.compile(fullgraph=True, dynamic=False)
        self.head = torch.compile(self.head, fullgraph=True, dynamic=False)  # an instance attribute over the method
        return self

    def param_counts(self):
        """(N, Na) counted from the tensors: no embeddings, no LM head, no norms (docs/method.md §2).
        A routed-expert tensor [E, …] counts once in N and K/E of it in Na."""
        N = Na = 0
        for module in self.modules():
            if isinstance(module, (nn.Embedding, RMSNorm)) or module is self.lm_head:
                continue
            for name, p in module.named_parameters(recurse=False):
                N += p.numel()
                Na += p[0].numel() * module.K if isinstance(module, MoE) and name in ("w13", "w2") else p.numel()
        return N, Na

    @torch.no_grad()
    def generate(self, idx_BT, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab=None):
        """Sample max_new_tokens continuations, conditioning on at most the last S tokens, from the first
        `vocab` logits (the tokenizer's; vocab_size may be rounded up past it). Runs SDPA
        whatever self.attention says: the length grows by one each step, and compiled FlexAttention
        would compile again for every length."""
        attention, self.attention = self.attention, "sdpa"
        try:
            for _ in range(max_new_tokens):
                logits, _, _ = self(idx_BT[:, -self.cfg.S:])
                logits = logits[:, -1, :vocab].float() / max(temperature, 1e-6)
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx_BT = torch.cat([idx_BT, nxt], dim=1)
        finally:
            self.attention = attention
            if attention == "flex":  # a flex model never reads the bias: do not keep a [1, H, S, S] one for it
                self._alibi_bias = None
        return idx_BT
