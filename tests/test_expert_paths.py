"""The two expert paths of model.routed_experts: which one kernels.custom_ops.expert_path picks for a GPU and
dtype (the table, without a GPU), and the padded one (padded_mm and its custom ops) against the plain loop over
experts and against the grouped_mm path, forward and backward, on CPU, with its one host read per layer, its
FLOP count, torch.library.opcheck, and torch.compile(fullgraph=True)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model
from kernels.custom_ops import PAD_ROWS, expert_path, padded_gmm, padded_gmm_backward, padded_layout, padded_mm
from model import MoE, GPTConfig

BF16, FP32, FP16 = torch.bfloat16, torch.float32, torch.float16


@pytest.mark.parametrize("device,capability,dtype,path", [
    ("cuda", (9, 0), BF16, "grouped_mm"), ("cuda", (10, 0), BF16, "grouped_mm"),
    ("cuda", (8, 0), BF16, "padded"), ("cuda", (8, 9), BF16, "padded"),
    ("cuda", (12, 0), BF16, "padded"), ("cuda", (9, 0), FP32, "padded"),
    ("cuda", (9, 0), FP16, "padded"), ("cpu", None, FP32, "grouped_mm"),
    ("cpu", None, BF16, "grouped_mm"),
])
def test_expert_path_table(device, capability, dtype, path):
    # the same choice compiled or not: both paths are custom ops with static-shaped fakes
    name, why = expert_path(device, dtype, capability=capability)
    assert name == path
    if device == "cuda":  # the reason names the capability and the dtype
        sm, dt = f"sm{capability[0]}{capability[1]}", {BF16: "bf16", FP32: "fp32", FP16: "fp16"}[dtype]
        assert why.startswith(f"{sm} in {dt}: "), why


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("sizes,dtype", [((5, 0, 3, 17), FP32), ((0, 0, 7), FP32), ((2, 40, 0, 1), BF16)])
def test_padded_gmm_matches_a_loop_over_groups(sizes, dtype):
    # forward, dx and dw against one matmul per group (in fp32); an empty group's dw exactly zero
    torch.manual_seed(sum(sizes))
    E, D, Dout = len(sizes), 16, 24
    x = torch.randn(sum(sizes), D).to(dtype).requires_grad_()
    w = torch.randn(E, D, Dout).to(dtype).requires_grad_()
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    dy = torch.randn(sum(sizes), Dout).to(dtype)
    M = padded_layout(offs, len(x))[1]
    assert M.device.type == "cpu" and M.item() == -(-max(sizes) // PAD_ROWS) * PAD_ROWS
    y = padded_mm(offs, len(x))(x, w, offs)
    starts = [0] + offs[:-1].tolist()
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y_ref = torch.cat([xf[a:b] @ wf[e] for e, (a, b) in enumerate(zip(starts, offs.tolist()))])
    tol = 1e-6 if dtype == FP32 else 1e-2
    assert y.dtype == dtype and rel_err(y.float(), y_ref) < tol
    grads = torch.autograd.grad(y, (x, w), dy)
    grads_ref = torch.autograd.grad(y_ref, (xf, wf), dy.float())
    assert all(g.dtype == dtype and rel_err(g.float(), r) < tol for g, r in zip(grads, grads_ref))
    empty = torch.tensor(sizes) == 0
    assert grads[1][empty].eq(0).all() and grads[1][~empty].ne(0).any(-1).any(-1).all()


def random_moe(seed, E, K):
    torch.manual_seed(seed)
    moe = MoE(GPTConfig(scheme="full", L=1, Dm=32, H=2, E=E, K=K, De=16, Dse=0))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    torch.nn.init.normal_(moe.router.weight, 0.0, 2.0)  # a sharp router
    return moe


def run(moe, x, dy):
    """y and the gradients of x, router, w13 and w2 (through the output and the balance loss)."""
    y, aux = moe(x)
    return (y, *torch.autograd.grad((y * dy).sum() + aux.balance, (x, moe.router.weight, moe.w13, moe.w2))), aux.load


@pytest.fixture
def padded(monkeypatch):
    """routed_experts on the padded path, and the count of host reads (.item(), .tolist(), .cpu()) it makes."""
    monkeypatch.setattr(model, "expert_path", lambda device, dtype: ("padded", "test"))
    reads = []
    for name in ("item", "tolist", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name, **k: reads.append(_name)
                            or _real(t, *a, **k))
    return reads


@pytest.mark.parametrize("E,K,T", [(8, 2, 24), (16, 1, 12), (12, 4, 50)])
def test_padded_path_matches_loop_and_grouped_mm_with_one_host_read(E, K, T, padded):
    moe = random_moe(E * 10 + K, E, K)
    x = (torch.randn(T, 32) + 1.0).requires_grad_()  # a shared direction: the router's favourites get more
    dy = torch.randn(T, 32)
    with pytest.MonkeyPatch.context() as mp:  # the references first, without the padded path and uncounted
        mp.setattr(model, "expert_path", lambda device, dtype: ("grouped_mm", "test"))
        grouped, load = run(moe, x, dy)
    y_loop, aux_loop = moe.forward_loop(x)
    loop = torch.autograd.grad((y_loop * dy).sum() + aux_loop.balance, (x, moe.router.weight, moe.w13, moe.w2))
    assert (load == 0).any() and load.max() > 2 * load.float().mean()  # empty experts and uneven loads
    padded.clear()
    out, _ = run(moe, x, dy)
    assert padded == ["cpu"]  # one host read per layer (padded_layout's), forward and backward together
    for a, b, c in zip(out, grouped, (y_loop, *loop)):
        assert rel_err(a, c) < 1e-5 and rel_err(a, b) < 1e-5
    assert out[3][load == 0].eq(0).all() and out[4][load == 0].eq(0).all()  # empty experts: dw exactly zero


def test_padded_path_counts_the_flops_of_the_grouped_path(monkeypatch):
    # FlopCounterMode counts the useful R rows of each GEMM, forward and backward, as gmm's formulas do
    moe, x = random_moe(3, 8, 2), torch.randn(24, 32).requires_grad_()
    totals = []
    for path in ("grouped_mm", "padded"):
        monkeypatch.setattr(model, "expert_path", lambda device, dtype, _path=path: (_path, "test"))
        with FlopCounterMode(display=False) as counter:
            y, _ = moe(x)
            y.sum().backward()
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] > 0


@pytest.mark.slow
def test_padded_ops_pass_opcheck():
    # schema, fake kernels, autograd rule and AOT dispatch of the three custom ops (~10 s on CPU)
    torch.manual_seed(0)
    offs = torch.tensor([5, 5, 8, 25], dtype=torch.int32)
    x, w, dy = torch.randn(25, 16, requires_grad=True), torch.randn(4, 16, 24, requires_grad=True), torch.randn(25, 24)
    slot, M = padded_layout(offs, 25)
    torch.library.opcheck(padded_layout, (offs, 25))
    torch.library.opcheck(padded_gmm, (x, w, slot, M))
    torch.library.opcheck(padded_gmm_backward, (dy, x.detach(), w.detach(), slot, M))


@pytest.mark.slow
def test_padded_path_compiles_to_one_graph(monkeypatch):
    # what GPT.compile_regions does to a block, on an MoE forced onto the padded path: torch.compile with
    # fullgraph=True (a graph break would raise) matches eager, forward and every gradient, and a new
    # routing (another largest load M) reuses the graph
    monkeypatch.setattr(model, "expert_path", lambda device, dtype: ("padded", "test"))
    moe = random_moe(82, 8, 2)

    def step(x_TD, dy_TD):
        y, aux = moe(x_TD)
        return (y * dy_TD).sum() + aux.balance, y, aux.load

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a running count, across tests
    loads = []
    for scale in (1.0, 3.0):
        x, dy = (torch.randn(24, 32) * scale + 1.0).requires_grad_(), torch.randn(24, 32)
        (loss, y, load), (loss_e, y_e, load_e) = compiled(x, dy), step(x, dy)
        inputs = (x, moe.router.weight, moe.w13, moe.w2)
        for a, b in zip((y, *torch.autograd.grad(loss, inputs)), (y_e, *torch.autograd.grad(loss_e, inputs))):
            assert rel_err(a, b) < 1e-5
        assert load.equal(load_e)
        loads.append(load)
    assert len({-(-int(load.max()) // PAD_ROWS) for load in loads}) == 2  # two different M
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
