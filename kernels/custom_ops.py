"""The custom ops and autograd Functions behind model.py's fast paths, each equal to a plain expression there:

- gmm, gmm_wgrad: torch's grouped GEMM as the custom ops moe_equal::gmm and moe_equal::gmm_wgrad, with fake
  kernels, an autograd rule and a FLOP formula (the routed experts of model.routed_experts);
- RMSNormFn: RMSNorm with its gradient in closed form (model.RMSNorm, CPU eager; plain path F.rms_norm);
- SwiGLUFn: the SwiGLU activation with a backward that writes into one gradient tensor (model.swiglu, eager).

tests/test_model.py checks each against its plain path; what each bought is in docs/results.md.
"""
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


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


# ----------------------------------------------------------------------------- hand-written backwards
class RMSNormFn(torch.autograd.Function):
    """y = x̂ ⊙ w with x̂ = x / rms(x), rms(x) = sqrt(mean(x²) + eps), and its gradient in closed form:
    dx = (g − x̂ · mean(g ⊙ x̂)) / rms(x) with g = dy ⊙ w, and dw = Σ_rows dy ⊙ x̂. For CPU eager code,
    where F.rms_norm's autograd backward is a long chain of small ops: the same forward bits, the
    gradient to rounding."""
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
    Autograd's formulas, in its order, so the same bits; but the backward writes dh1 and dh3 straight
    into the two halves of dh, where autograd's chunk would join them with a copy of the whole 2F-wide
    gradient. It saves h and silu(h1), as autograd does, and recomputes silu(h1) ⊙ h3 for dg."""
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
