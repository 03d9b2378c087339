"""Run under torchrun by test_parallel.py: one FSDP2 training step of a model whose dims do not divide
by the ranks; prints, per rank, the bytes of parameters, gradients and AdamW state that are allocated
(storages counted once) next to what parallel.state_bytes plans."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig  # noqa: E402

from harness import parallel  # noqa: E402
from harness.config import TrainConfig  # noqa: E402


def allocated(tensors):
    storages = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = GPTConfig(vocab_size=259, scheme="1dense", L=3, Dm=40, H=3, Dh=12, Dffn=70, S=16, E=5, K=2, De=16, Dse=24)
model = GPT(cfg)
parallel.wrap(model, "fsdp", TrainConfig(), torch.device("cpu"), "float32")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, cfg.vocab_size, (2, cfg.S))
model(x, x)[1].backward()
opt.step()
measured = [allocated(model.parameters()), allocated(p.grad for p in model.parameters()),
            allocated(v for state in opt.state.values() for v in state.values())]
planned = list(parallel.state_bytes(parallel.param_shapes(cfg), "fsdp", world, rank))
print(json.dumps({"rank": rank, "measured": measured, "planned": planned}), flush=True)
dist.destroy_process_group()
