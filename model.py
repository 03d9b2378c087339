"""A dense or Mixture-of-Experts GPT, as in docs/method.md §3; tags (M1)–(M15) are that file's equations.

Pre-norm decoder: RMSNorm, causal attention with ALiBi, SwiGLU. An MoE layer is a softmax router,
top-K, an optional shared expert and a load-balancing loss (M1–M6). The routed experts run as two
grouped GEMMs over tokens sorted by expert: dropless, no data-dependent shapes, so
torch.compile(fullgraph=True) makes one graph that survives any routing; no host synchronisation on the
grouped path (CPU, sm90/sm100 in bf16), one host read per layer on the padded path (other GPUs).

Each layer is its plain math. Where a faster path computes the same thing, one commented line chooses it;
the fast paths are in kernels/custom_ops.py, tested equal to the plain ones (tests/test_model.py), and
what they bought is in docs/results.md.

Shape suffixes, with the paper's letters: B batch, S sequence length, T = B·S tokens, D model width Dm (a
suffix only: the paper's D, training tokens, is flops.py's), H heads, E experts, K experts per token, F expert
or FFN hidden width (a suffix; F alone is torch.nn.functional), V vocabulary, R = T·K routing slots.
"""
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

import flops

from kernels.custom_ops import RMSNormFn, SwiGLUFn, expert_path, gmm, padded_mm


@dataclass
class GPTConfig(flops.Shape):
    """[model] of a run's config: the shape in the paper's notation (flops.Shape) and the rest of the model.
    harness/config.py checks every value against its table before one of these is made."""
    vocab_size: int = 256        # token ids; set from the data (past 256: a multiple of 64) unless given
    norm_topk: bool = False      # M4: renormalise the K gates to sum to 1 (needs K > 1)
    balance_coef: float = 0.01   # λ in L_CE + λ·L_balance, with the normalised f of M6
    tie_embeddings: bool = False  # the LM head uses the token embedding's weights
    init_std: float = 0.02       # std of the normal init (GPT-2's); what writes into the residual: /√(2L)
    router_z_coef: float = 0.0   # ST-MoE's router z-loss, mean over tokens of logsumexp(router logits)², times this
    expert_bias_rate: float = 0.0  # loss-free balancing (DeepSeek-V3): a routing bias moved by this rate each step


# ----------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """x / rms(x) ⊙ w with rms(x) = sqrt(mean(x²) + eps)."""
    def __init__(self, Dm, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(Dm))
        self.eps = eps

    def forward(self, x):
        # fast path, CPU eager: the same forward, its gradient in closed form
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # elsewhere a fused kernel, or inductor's


# ----------------------------------------------------------------------------- ALiBi
def alibi_slopes(H):
    """ALiBi head slopes (Press et al. 2022; docs/method.md §3): 2^(−8h/H) for H a power of two; otherwise the
    P slopes of the largest power of two P below H, then every other slope of the 2P sequence."""
    def geometric(n):
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]
    if H & (H - 1) == 0:
        return geometric(H)
    P = 2 ** math.floor(math.log2(H))
    return geometric(P) + geometric(2 * P)[0::2][: H - P]


def alibi_bias(slopes_H, S, dtype):
    """[1, H, S, S] additive attention bias for SDPA: −m_h·(i − j) for key j ≤ query i, −inf for j > i.
    Four dimensions, not three: see attend."""
    pos = torch.arange(S, device=slopes_H.device)
    rel_SS = (pos[None, :] - pos[:, None]).float()       # j − i
    bias = slopes_H[:, None, None] * rel_SS
    return bias.masked_fill(rel_SS > 0, float("-inf")).to(dtype)[None]


@functools.cache
def alibi_score_mod(H):
    """ALiBi for FlexAttention: score − m_h·(i − j), computed in the kernel in fp32, with the slopes of
    alibi_slopes(H) in closed form: h < P takes 2^(−8(h+1)/P); the rest every other slope of the 2P
    sequence, 2^(−4(2(h−P)+1)/P). Written twice because neither derives from the other without changing
    bits: from H = 64 on, the kernel's fp32 exp2 and alibi_slopes' powers differ by a rounding
    (tests/test_model.py compares them). One function per H, so that compiled code is reused rather
    than traced again for a new closure."""
    P = 2 ** math.floor(math.log2(H))

    def score_mod(score, b, h, q_idx, kv_idx):
        e = torch.where(h < P, (h + 1) * (8.0 / P), (2 * (h - P) + 1) * (4.0 / P))
        return score - torch.exp2(-e) * (q_idx - kv_idx)
    return score_mod


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# FlexAttention's blocks are 128 wide. With both a block mask and a score_mod, its backward gives NaN
# gradients at lengths off a multiple of 128 (pytorch/pytorch#153799, open): such lengths are padded to
# the next multiple (attend), and the block mask is built for the padded length.
FLEX_BLOCK = 128


def flex_length(S):
    """The length FlexAttention runs at: S rounded up to a multiple of FLEX_BLOCK."""
    return -(-S // FLEX_BLOCK) * FLEX_BLOCK


_block_masks = {}


def causal_block_mask(S, device):
    """The causal BlockMask for S×S attention: built once per (S, device) in eager code, traced into the
    graph when compiling (it depends on nothing but S)."""
    if torch.compiler.is_compiling():
        return create_block_mask(causal, None, None, S, S, device=device)
    key = (S, str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(causal, None, None, S, S, device=device)
    return _block_masks[key]


# ----------------------------------------------------------------------------- attention
@functools.cache
def flex_attention_compiled():
    return torch.compile(flex_attention, dynamic=False)  # made on first use: torch.compile costs ~3 s of imports


def attend(q, k, v, mask, score_mod):
    """Causal attention with ALiBi over q, k, v [B, H, S, Dh]; the one place that picks the path:
    - mask a BlockMask (built for flex_length(S)), eager on CUDA: FlexAttention compiled (flex_attention_compiled). ALiBi is score_mod,
      which the fused kernel evaluates on each fp32 score; causality is the block mask, so the blocks
      above the diagonal are skipped rather than computed and masked.
    - mask a BlockMask otherwise: flex_attention itself. Inside a compiled block torch.compile lowers it to
      the same fused kernels; eager on CPU it is the slow reference (no backward there: tests only).
    - mask the fp32 [1, H, S, S] bias (GPT.alibi_bias_for): SDPA, the reference and the CPU path."""
    if isinstance(mask, BlockMask):
        eager_cuda = q.is_cuda and not torch.compiler.is_compiling()
        flex = flex_attention_compiled() if eager_cuda else flex_attention
        # zeros past S to the mask's length (flex_length): causality keeps the padded keys from every real
        # query, and the padded queries' rows are cut off, so they get no gradient
        S, pad = q.shape[2], mask.seq_lengths[0] - q.shape[2]
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        return flex(q, k, v, score_mod=score_mod, block_mask=mask)[:, :, :S]
    # SDPA. The bias is fp32 whatever the autocast dtype (in bf16 the smallest slope's 2048 distances fall on
    # 641 values). In fp32 it goes in 4-D, [1, H, S, S], which takes SDPA's CPU flash kernel (with a 3-D mask SDPA
    # falls back to its math path and writes out all B·H·S·S scores). Under autocast q is bf16, and the flash
    # kernel would cast the fp32 bias to q's dtype; so there the bias goes in 3-D, [H, S, S]: the math path keeps
    # it in fp32, and the ALiBi distances stay exact.
    bias = mask if q.dtype == mask.dtype else mask[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Attention(nn.Module):
    """Multi-head causal self-attention, H heads of width Dh, with ALiBi (no position embedding)."""
    def __init__(self, cfg):
        super().__init__()
        self.H, self.Dh = cfg.H, cfg.Dh
        self.qkv = nn.Linear(cfg.Dm, 3 * cfg.H * cfg.Dh, bias=False)
        self.proj = nn.Linear(cfg.H * cfg.Dh, cfg.Dm, bias=False)
        self.score_mod = alibi_score_mod(cfg.H)

    def forward(self, x_BSD, mask):
        """mask: a BlockMask (FlexAttention with ALiBi as a score_mod) or the fp32 [1, H, S, S] ALiBi bias (SDPA)."""
        B, S, _ = x_BSD.shape
        # split, as nanoGPT does: the backward joins the three gradients with one cat, where a permute of a
        # [B, S, 3, H, Dh] view needed a stack and a copy (the same bits; docs/results.md)
        q, k, v = (t.view(B, S, self.H, self.Dh).transpose(1, 2) for t in self.qkv(x_BSD).split(self.H * self.Dh, dim=-1))
        y = attend(q, k, v, mask, self.score_mod)
        return self.proj(y.transpose(1, 2).reshape(B, S, self.H * self.Dh))


# ----------------------------------------------------------------------------- SwiGLU
def swiglu(h, g=None):
    """silu(h1) ⊙ h3 for h = [h1 | h3] (the output of the stacked W1|W3), times g, a routed slot's gate (M5)."""
    # fast path, eager: the same bits, with a backward that writes dh1 and dh3 into one tensor (no joining copy)
    if not torch.compiler.is_compiling():
        return SwiGLUFn.apply(h, g)
    h1, h3 = h.chunk(2, dim=-1)  # compiled, the plain expression: inductor fuses it into one kernel
    a = F.silu(h1) * h3
    return a if g is None else a * g


class SwiGLU(nn.Module):
    """FFN(x) = W2·(silu(W1·x) ⊙ W3·x), with W1 and W3 stacked in one matrix: 3·Dm·hidden parameters."""
    def __init__(self, Dm, hidden):
        super().__init__()
        self.w13 = nn.Linear(Dm, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, Dm, bias=False)

    def forward(self, x):
        return self.w2(swiglu(self.w13(x)))


# ----------------------------------------------------------------------------- MoE
class MoEAux(NamedTuple):
    """What an MoE layer reports besides its output."""
    balance: Tensor   # M6, over this layer's tokens
    load: Tensor      # [E] routing slots per expert
    z_loss: Tensor    # mean over tokens of logsumexp(router logits)²
    logit_ms: Tensor  # mean square of the router logits
    p: Tensor         # [E] mean gate score per expert (M6's p), with its gradient


def router_softmax(z_TE):
    """M1: the gate scores s = softmax(z) over the E experts, and logsumexp(z) per token (for the z-loss),
    from the same pieces. Written out because torch's CPU softmax backward rounds differently on 1 and 2
    threads when E is no multiple of 16 (E = 40: 1e-7 on the gradient); these row-wise ops do not."""
    z_max_T1 = z_TE.amax(-1, keepdim=True).detach()
    e_TE = (z_TE - z_max_T1).exp()
    sum_T1 = e_TE.sum(-1, keepdim=True)
    return e_TE / sum_T1, (z_max_T1 + sum_T1.log()).squeeze(-1)


def balance_loss(counts_E, p_E):
    """M6: L_balance = E·Σ_i f_i·p_i, f_i = counts_i / Σ counts (the share of the K·T routing slots),
    p_i = mean gate score; over the last dimension (E), for one layer or a stack of layers."""
    E = counts_E.shape[-1]
    return E * (counts_E / counts_E.sum(-1, keepdim=True) * p_E).sum(-1)


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
        s_TE, lse_T = router_softmax(z_TE)
        if self.expert_bias is None:
            g_TK, e_TK = s_TE.topk(self.K, dim=-1)        # M2, M3: g_i = s_i on the top K
        else:                                             # the bias chooses; the gates stay the unbiased s
            e_TK = (s_TE.detach() + self.expert_bias).topk(self.K, dim=-1).indices
            g_TK = s_TE.gather(-1, e_TK)
        if self.norm_topk:
            g_TK = g_TK / g_TK.sum(-1, keepdim=True)      # M4
        return s_TE, g_TK, e_TK, (lse_T, z_TE.detach().square().mean())

    def z_loss(self, lse_T):
        """ST-MoE's router z-loss: the mean over tokens of logsumexp(z)², z the router's logits."""
        return lse_T.square().mean()

    def balance(self, p_E, counts_E):
        """M6 over this layer's tokens. Under DDP, GPT.balance counts f over every rank's tokens instead."""
        return balance_loss(counts_E.float(), p_E)

    def forward_loop(self, x_TD):
        """M1–M6 written the obvious way, one expert at a time: the reference that the fused path is
        tested against (tests/test_model.py on CPU, dev/bench.py gpu-check in bf16 on a GPU). Slow."""
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
        p_E = s_TE.mean(0)
        return MoEAux(self.balance(p_E, counts_E), counts_E, z, logit_ms, p_E)


# ----------------------------------------------------------------------------- routed experts
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
    """Σ_k g_k · SwiGLU_{e_k}(x) for every token (the routed part of M5), dropless. The R = T·K routing slots
    are sorted by expert; expert e owns the slots offs[e-1]:offs[e], and two GEMMs run every expert's SwiGLU
    at once, on the path expert_path picks: gmm (torch's grouped GEMM, no host sync) or padded_mm (a padded
    bmm, one host read per layer, forward and backward). Tested against MoE.forward_loop; what was tried and
    dropped is in docs/results.md."""
    T, K = e_TK.shape
    E = w13_EDF2.shape[0]
    e_R, order_R = e_TK.flatten().sort(stable=True)      # the R = T·K slots, grouped by expert
    tok_R = order_R // K                                  # the token behind each slot
    inv_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(T * K, device=e_TK.device))
    # group e ends where ids > e begin; the last group ends at R by construction, so no row of the
    # grouped GEMMs is ever left unwritten (grouped_mm skips rows past the last offset)
    ends = torch.searchsorted(e_R, torch.arange(E - 1, device=e_TK.device), right=True, out_int32=True)
    offs_E = torch.cat([ends, ends.new_full((1,), T * K)])
    mm = gmm if expert_path(x_TD.device, x_TD.dtype)[0] == "grouped_mm" else padded_mm(offs_E, T * K)
    xs_RD = Dispatch.apply(x_TD, tok_R, inv_R, K)
    h_RF2 = mm(xs_RD, w13_EDF2, offs_E)
    # each slot's gate g (M5) scales the narrow hidden (F wide) rather than the output (D wide): same
    # result, less memory traffic; swiglu applies it with the activation
    g_R1 = g_TK.flatten()[order_R].unsqueeze(-1).to(h_RF2.dtype)
    a_RF = swiglu(h_RF2, g_R1)
    o_RD = mm(a_RF, w2_EFD, offs_E)
    counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    return Combine.apply(o_RD, tok_R, inv_R, K), counts_E


class Block(nn.Module):
    def __init__(self, cfg, kind):
        super().__init__()
        self.norm1, self.attn, self.norm2 = RMSNorm(cfg.Dm), Attention(cfg), RMSNorm(cfg.Dm)
        self.ffn = MoE(cfg) if kind == "moe" else SwiGLU(cfg.Dm, cfg.Dffn)

    def forward(self, x_BSD, mask):
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), mask)
        h_BSD = self.norm2(x_BSD)
        if isinstance(self.ffn, SwiGLU):
            return x_BSD + self.ffn(h_BSD), None
        y_TD, aux = self.ffn(h_BSD.view(-1, h_BSD.shape[-1]))  # the MoE sees T = B·S tokens
        # in the residual stream's dtype: on CUDA under autocast the MoE returns fp32 (rms_norm runs in fp32),
        # which would turn a bf16 stream (FSDP's) fp32 from here on
        return x_BSD + y_TD.view_as(x_BSD).to(x_BSD.dtype), aux


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
        self._alibi_bias = None  # GPT.alibi_bias_for's [1, H, S, S] bias for the last length seen
        # under DDP the ranks' micro-batches together are one micro-batch: f (M6) is counted over all of them
        # (GPT.balance), so the balance loss, and the run, do not depend on how many ranks share the batch
        self.balance_group = None
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

    def forward(self, idx_BS, targets_BS=None):
        """With targets: the logits, the loss L_CE + λ·L_balance (+ router_z_coef·L_z) and its parts; without: the
        last position's logits only (what sampling needs), None and {}. Stats:
        'ce', 'balance' and 'z_loss' (means over MoE layers), 'load' [Le, E] slots per expert (M6),
        'logit_ms' [Le] the mean square of each MoE layer's router logits."""
        x = self.wte(idx_BS)
        S = idx_BS.shape[1]
        # FlexAttention's block mask or SDPA's bias: attend picks the path from it
        mask = causal_block_mask(flex_length(S), x.device) if self.attention == "flex" else self.alibi_bias_for(S)
        auxes = []
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, aux = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x, aux = block(x, mask)
            if aux is not None:
                auxes.append(aux)
        if targets_BS is None:
            return self.lm_head(self.norm_f(x[:, -1:])), None, {}
        logits, ce = self.head(x, targets_BS)
        if not auxes:  # no ce + 0 here: compiled, that sum next to ce.detach() came out without a grad_fn (torch 2.13)
            zero = ce.new_zeros(())
            return logits, ce, {"ce": ce.detach(), "balance": zero, "z_loss": zero, "load": ce.new_zeros(0, 0),
                                "logit_ms": ce.new_zeros(0)}
        balance = self.balance(auxes)
        z_loss = torch.stack([a.z_loss for a in auxes]).mean()  # means over the MoE layers (our choice)
        loss = ce + self.cfg.balance_coef * balance
        if self.cfg.router_z_coef:
            loss = loss + self.cfg.router_z_coef * z_loss
        return logits, loss, {"ce": ce.detach(), "balance": balance.detach(), "z_loss": z_loss.detach(),
                              "load": torch.stack([a.load for a in auxes]),
                              "logit_ms": torch.stack([a.logit_ms for a in auxes])}

    def alibi_bias_for(self, S):
        """The [1, H, S, S] ALiBi bias that every layer reads, built on the first forward of length S (on the
        slopes' device) and kept until a forward of another length: it depends on nothing else (building it
        every forward cost time, docs/results.md). One built under inference_mode is built again outside
        it (SDPA saves the bias for the backward, which an inference tensor refuses). It stays fp32
        whatever the autocast dtype (see attend). Compiling a whole GPT, it is built in the graph, as
        causal_block_mask's mask is."""
        if torch.compiler.is_compiling():
            return alibi_bias(self.slopes, S, torch.float32)
        bias = self._alibi_bias
        if (bias is None or bias.shape[-1] != S or bias.device != self.slopes.device
                or (bias.is_inference() and not torch.is_inference_mode_enabled())):
            bias = self._alibi_bias = alibi_bias(self.slopes, S, torch.float32)
        return bias

    @torch.no_grad()
    def update_expert_bias(self, load_LE):
        """Loss-free balancing, after an optimizer step: each MoE layer's bias moves by rate·sign(mean load
        − load), from the step's slots per expert over all ranks (load_LE [Le, E]), and is kept at zero mean."""
        rate = self.cfg.expert_bias_rate
        for moe, load_E in zip((m for m in self.modules() if isinstance(m, MoE)), load_LE):
            moe.expert_bias += rate * torch.sign(load_E.mean() - load_E)
            moe.expert_bias -= moe.expert_bias.mean()

    def head(self, x_BSD, targets_BS):
        """Logits and the mean cross-entropy (in fp32) over the targets that are not −1."""
        logits = self.lm_head(self.norm_f(x_BSD))
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1), ignore_index=-1)
        return logits, ce

    def count_balance_over(self, group, world):
        """Under DDP: each MoE layer's f (M6) over the micro-batches of all `world` ranks of `group` (one
        rank: over its own)."""
        self.balance_group = group if world > 1 else None

    def balance(self, auxes):
        """M6, the mean over the MoE layers of each layer's balance loss. Training over several ranks, f
        counts the slots of every rank's micro-batch: one all-reduce of all layers' counts [Le, E] per
        forward, after the last layer (f is a constant: no gradient flows through it). Each rank's p is its
        own, and averaging the ranks' gradients makes it the mean p of the whole micro-batch."""
        if self.balance_group is None or not self.training:
            return torch.stack([a.balance for a in auxes]).mean()
        counts_LE = funcol.all_reduce(torch.stack([a.load for a in auxes]).float(), "sum", self.balance_group)
        return balance_loss(counts_LE, torch.stack([a.p for a in auxes])).mean()

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
    def generate(self, idx_BS, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab=None):
        """Sample max_new_tokens continuations, conditioning on at most the last S tokens, from the first
        `vocab` logits (the tokenizer's; vocab_size may be rounded up past it). Runs SDPA
        whatever self.attention says: the length grows by one each step, and compiled FlexAttention
        would compile again for every length."""
        attention, self.attention = self.attention, "sdpa"
        try:
            for _ in range(max_new_tokens):
                logits, _, _ = self(idx_BS[:, -self.cfg.S:])
                logits = logits[:, -1, :vocab].float() / max(temperature, 1e-6)
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx_BS = torch.cat([idx_BS, nxt], dim=1)
        finally:
            self.attention = attention
            if attention == "flex":  # a flex model never reads the bias: do not keep a [1, H, S, S] one for it
                self._alibi_bias = None
        return idx_BS

