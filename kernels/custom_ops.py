"""The custom ops and autograd Functions behind model.py's fast paths, each equal to a plain expression there:

- gmm, gmm_wgrad: torch's grouped GEMM as the custom ops moe_equal::gmm and moe_equal::gmm_wgrad, with fake
  kernels, an autograd rule and a FLOP formula (the routed experts of model.routed_experts);
- expert_path, padded_mm: which of two expert GEMMs runs for a device and dtype, and the second one, a padded
  bmm for the GPUs and dtypes where torch's grouped GEMM runs one GEMM per expert, as the custom ops
  moe_equal::padded_layout, moe_equal::padded_gmm and moe_equal::padded_gmm_backward (eager or compiled);
- RMSNormFn: RMSNorm with its gradient in closed form (model.RMSNorm, CPU eager; plain path F.rms_norm);
- SwiGLUFn: the SwiGLU activation with a backward that writes into one gradient tensor (model.swiglu, eager).

tests/test_model.py and tests/test_expert_paths.py check each against its plain path; what each bought is in
docs/results.md.
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


# ----------------------------------------------------------------------------- choosing the expert path
# torch's _grouped_mm_cuda (aten/src/ATen/native/cuda/GroupedBlas.cpp) takes its CUTLASS kernel
# (bf16bf16_grouped_mm: no host sync) only when mat_a, mat_b and the output are bf16 and
# _scaled_mm_allowed_device(sm90_only=true, sm100_only=true) holds, i.e. compute capability major 9 or 10
# (ROCm: only CK builds on gfx942/gfx950). Everywhere else it runs _grouped_mm_fallback
# (aten/src/ATen/native/GroupedMMUtils.h): offs.cpu(), then one mm_out per group; the CPU build runs that
# fallback too, where copying offs waits for nothing.
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def expert_path(device, dtype, capability=None):
    """("grouped_mm" or "padded", why): how model.routed_experts runs the experts' GEMMs for inputs of this
    device and dtype; the one place that chooses. capability (major, minor) stands in for the GPU's, so the
    table can be checked without a GPU. The choice is the same compiled or not: both paths are custom ops
    that torch.compile(fullgraph=True) traces."""
    device = torch.device(device)
    if device.type != "cuda":
        return "grouped_mm", f"{device.type}: torch's own grouped_mm, no device to wait for"
    if torch.version.hip and capability is None:
        return "padded", "ROCm: torch's grouped_mm has a fast kernel only in CK builds on gfx942/gfx950"
    major, minor = capability or torch.cuda.get_device_capability(device)
    where = f"sm{major}{minor} in {_DTYPE_NAMES.get(dtype, str(dtype))}"
    if major not in (9, 10):
        before = "before sm90" if major < 9 else "outside sm90 and sm100"
        return "padded", f"{where}: torch's grouped_mm falls back to one GEMM per expert {before}"
    if dtype != torch.bfloat16:
        return "padded", f"{where}: torch's grouped_mm falls back to one GEMM per expert outside bf16"
    return "grouped_mm", f"{where}: torch's grouped_mm runs its CUTLASS kernel, no host sync"


# ----------------------------------------------------------------------------- padded expert GEMM
# Three custom ops, so that torch.compile(fullgraph=True) traces the path as it traces gmm: the one
# data-dependent size, M, lives inside them, and their fake kernels give static shapes.
PAD_ROWS = 16  # each expert's rows are padded to the largest load rounded up to this, so shapes repeat


@torch.library.custom_op("moe_equal::padded_layout", mutates_args=())
def padded_layout(offs: Tensor, R: int) -> tuple[Tensor, Tensor]:
    """(slot [R], M): M the largest group (expert load) rounded up to PAD_ROWS, as a 0-dim int64 tensor on
    the host, and slot[r] = e·M + (r − start of e) the slot of row r of group e in an [E·M] padding.
    Its .cpu() is the padded path's one device-to-host read per layer, forward and backward together (one
    more where activation checkpointing recomputes the layer): the GEMMs below read M from that host
    tensor, which waits for nothing. torch's fallback syncs once per GEMM, six per layer."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    M = -(-counts.max().cpu() // PAD_ROWS) * PAD_ROWS
    r = torch.arange(R, device=offs.device)
    e_R = torch.searchsorted(offs, r.to(offs.dtype), right=True)
    return e_R * int(M) + r - (offs - counts).long()[e_R], M.long()


@padded_layout.register_fake
def _(offs, R):
    return offs.new_empty(R, dtype=torch.int64), torch.empty((), dtype=torch.int64, device="cpu")


def _pad(x_RD, slot_R, E, M):
    """[R, D] rows sorted by expert → [E, M, D], each row at its slot, zeros where no row falls."""
    return x_RD.new_zeros(E * M, x_RD.shape[1]).index_copy_(0, slot_R, x_RD).view(E, M, -1)


def _unpad(y_EMD, slot_R):
    return y_EMD.flatten(0, 1).index_select(0, slot_R)


@torch.library.custom_op("moe_equal::padded_gmm", mutates_args=())
def padded_gmm(x: Tensor, w: Tensor, slot: Tensor, M: Tensor) -> Tensor:
    """gmm's product, out[r] = x[r] @ w[e], as one torch.bmm over [E, M, Din]: the rows scattered to their
    slots (padded_layout), multiplied, gathered back."""
    return _unpad(torch.bmm(_pad(x, slot, w.shape[0], int(M)), w), slot)


@padded_gmm.register_fake
def _(x, w, slot, M):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_equal::padded_gmm_backward", mutates_args=())
def padded_gmm_backward(dy: Tensor, x: Tensor, w: Tensor, slot: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dw) of padded_gmm, by the same padded bmm; an empty expert's padded rows are all zero, so its
    dw is exactly zero."""
    E, M = w.shape[0], int(M)
    dy_EMF = _pad(dy, slot, E, M)
    return (_unpad(torch.bmm(dy_EMF, w.transpose(1, 2)), slot),
            torch.bmm(_pad(x, slot, E, M).transpose(1, 2), dy_EMF))


@padded_gmm_backward.register_fake
def _(dy, x, w, slot, M):
    return torch.empty_like(x), torch.empty_like(w)


def _padded_gmm_backward(ctx, dy):
    return *padded_gmm_backward(dy, *ctx.saved_tensors), None, None


padded_gmm.register_autograd(_padded_gmm_backward, setup_context=_gmm_setup)


@register_flop_formula(torch.ops.moe_equal.padded_gmm)
def _padded_gmm_flops(x_shape, w_shape, slot_shape, M_shape, out_shape=None, **kwargs):
    return 2 * x_shape[0] * x_shape[1] * w_shape[2]  # the useful R rows, as gmm's: not the E·M padded ones


@register_flop_formula(torch.ops.moe_equal.padded_gmm_backward)
def _padded_gmm_backward_flops(dy_shape, x_shape, w_shape, slot_shape, M_shape, out_shape=None, **kwargs):
    return 2 * 2 * x_shape[0] * x_shape[1] * w_shape[2]  # dx and dw


def padded_mm(offs_E, R):
    """gmm's stand-in where torch's grouped_mm would run one GEMM per expert (expert_path): made once per
    layer from offs, with the layer's one host read (padded_layout), then called as gmm is, for the
    layer's GEMMs, forward and backward. It costs E·M rows of GEMM for R rows of work. Eager or compiled:
    torch.compile(fullgraph=True) sees three custom ops with static shapes."""
    slot_R, M = padded_layout(offs_E, R)
    return lambda x_RD, w_EDF, offs_E=None: padded_gmm(x_RD, w_EDF, slot_R, M)


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
