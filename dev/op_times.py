"""Where an eager CPU step's time goes, op by op (`python dev/bench.py nanogpt --by_op`): each aten op the step calls,
timed by a dispatch mode, summed by name and grouped by kind. On a CPU an op's call is its work;
torch.profiler's own bookkeeping inflates small CPU ops."""
import collections
import statistics
import time

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

OP_KINDS = ("GEMM", "attention", "optimizer step", "element-wise and the rest")


class OpTimes(TorchDispatchMode):
    """Wall time of each aten op a CPU step calls, summed per op name into `ms`. An op counts with what it
    calls (a custom op such as gmm with its _grouped_mm); an optimizer's step() names its ops "optimizer:<op>"."""
    def __init__(self):
        super().__init__()
        self.ms = collections.Counter()
        self.prefix = ""

    def __enter__(self):
        mode = super().__enter__()
        self.hooks = [register_optimizer_step_pre_hook(lambda *_: setattr(self, "prefix", "optimizer:")),
                      register_optimizer_step_post_hook(lambda *_: setattr(self, "prefix", ""))]
        return mode

    def __exit__(self, *exc):
        try:
            for hook in self.hooks:
                hook.remove()
        finally:
            return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.ms[self.prefix + func.overloadpacket.__name__] += 1e3 * (time.perf_counter() - t)
        return out


def op_kind(name):
    return ("optimizer step" if name.startswith("optimizer:")
            else "GEMM" if name in ("mm", "addmm", "bmm", "baddbmm", "gmm", "gmm_wgrad")
            else "attention" if name.startswith("_scaled_dot_product") else "element-wise and the rest")


def ms_by_op(steps, n):
    """{model: {op: ms per step}}, the median over n rounds of one step each, the models in turn."""
    rounds = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            with OpTimes() as timer:
                step()
            rounds[k].append(timer.ms)
    return {k: {op: statistics.median(r[op] for r in rs) for op in set().union(*rs)} for k, rs in rounds.items()}


def print_by_op(by_op, top):
    """Each model's ms per step by kind of op, then the `top` element-wise ops one by one."""
    names = list(by_op)
    print(f"  ms per step by op (median of rounds, under a dispatch-mode timer):\n  {'':28}" +
          "".join(f"{n:>16}" for n in names))
    for kind in OP_KINDS:
        print(f"  {kind:28}" + "".join(f"{sum(v for o, v in by_op[n].items() if op_kind(o) == kind):16.2f}" for n in names))
    ops = sorted(set().union(*by_op.values()), key=lambda o: -max(by_op[n].get(o, 0.0) for n in names))
    for op in [o for o in ops if op_kind(o) == OP_KINDS[-1]][:top]:
        print(f"    {op:26}" + "".join(f"{by_op[n].get(op, 0.0):16.2f}" for n in names))
