"""BPC of a run's checkpoint (whole or sharded) on any prepared data, per split, without training (docs/method.md §6):

    python evaluate.py out/default                                 # the run's own validation splits
    python evaluate.py out/default --data=data/other --eval_tokens=0 --splits=val,train [--json]

The data must be tokenised as the run's was (the same tokenizer, within the model's vocabulary). The
numbers are those train.py logs: summed NLL in nats / (ln 2 · characters), over the first eval_tokens
tokens of each split (0: all of it).
"""
import itertools
import json
import math
import sys

from harness import interrupts  # first: Ctrl-C while torch loads ends in one line, not a traceback
if __name__ == "__main__":
    interrupts.quit_while_starting("evaluate.py")

import numpy as np
import torch
import torch.distributed as dist

import data

from harness import checkpoint
from harness import parallel


@torch.no_grad()
def evaluate_splits(model, val_splits, S, eval_tokens, table, autocast, rank, world, batch=8):
    """BPC per validation split (docs/method.md §6): summed NLL in nats / (ln 2 · characters of the targets). Every
    rank runs the same number of batches (FSDP gathers weights in every forward), padding with ignored rows."""
    was_training = model.training
    model.eval()
    out = {}
    device = model.wte.weight.device
    for name, tokens in val_splits.items():
        nll = torch.zeros(2, dtype=torch.float64, device=device)  # [nats, characters]
        windows = data.eval_windows(tokens, S, eval_tokens, rank, world)
        n_windows = data.eval_window_count(len(tokens), S, eval_tokens)
        for _ in range(math.ceil(math.ceil(n_windows / world) / batch)):  # streamed: never all in memory
            rows = list(itertools.islice(windows, batch))
            x, y = (np.array([r[i] for r in rows], np.int64).reshape(-1, S) for i in (0, 1))
            nll[1] += float(table[y].sum())
            if len(x) < batch:  # pad the last batch with ignored rows: a compiled model sees one shape
                x, y = (np.concatenate([a, np.full((batch - len(a), S), fill, np.int64)]) for a, fill in ((x, 0), (y, -1)))
            xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            with autocast:
                logits, _, _ = model(xt, yt)
            nll[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), yt.flatten(), ignore_index=-1,
                                                        reduction="sum")
        if world > 1:
            dist.all_reduce(nll)
        out[name] = data.bpc(nll[0].item(), nll[1].item())
    model.train(was_training)
    return out


def evaluate_run(run_dir, data_dir=None, splits=None, eval_tokens=None, device="cpu"):
    """({split: BPC}, checkpoint state) of run_dir's checkpoint on data_dir (default: the run's own data), in
    batches of the run's micro-batch per rank, as train.py evaluated it: one process repeats its numbers."""
    device = torch.device(device)
    model, state = checkpoint.load_model(run_dir, device)
    sched = state.get("schedule", {})
    batch = max(1, sched.get("micro_batch", 8) // state.get("world", 1))
    saved = state["config"]["train"]
    own = data_dir is None
    data_dir = data_dir or saved["data"]
    try:
        meta = data.load_meta(data_dir)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"--data={data_dir}: {e}") from None
    changed = data.changed_data(state["data"], meta, data_dir) if own else []
    if changed:
        raise ValueError(f"{run_dir} was trained on other data than {data_dir} holds now ({'; '.join(changed)}): its "
                         f"numbers would not be the run's; give --data={data_dir} to evaluate on the data as it is")
    if meta["tokenizer"] != state["data"]["tokenizer"] or meta["vocab_size"] > model.cfg.vocab_size:
        raise ValueError(f"{data_dir} is tokenised with {meta['tokenizer']} (vocabulary {meta['vocab_size']:,}); "
                         f"the run in {run_dir} with {state['data']['tokenizer']} (vocabulary {model.cfg.vocab_size:,}): "
                         f"prepare the data with data.py --tokenizer={state['data']['tokenizer']}")
    names = splits or [s for s in meta["splits"] if s != "train"]
    for s in names:
        if s not in meta["splits"]:
            raise ValueError(f"--splits: {data_dir} has no split {s!r} (it has {', '.join(meta['splits'])})")
    eval_tokens = saved.get("eval_tokens", 0) if eval_tokens is None else eval_tokens
    if eval_tokens and eval_tokens < model.cfg.S + 1:
        raise ValueError(f"--eval_tokens={eval_tokens}: expected 0 (all of each split) or at least S+1 = {model.cfg.S + 1}")
    tokens = {s: data.open_split(data_dir, s, meta) for s in names}
    short = data.too_short(data_dir, meta, tokens, model.cfg.S)
    if short:
        raise ValueError(f"{short}: give it more text, or leave it out with --splits")
    table = data.char_table(data.get_tokenizer(meta["tokenizer"]))
    return evaluate_splits(model, tokens, model.cfg.S, eval_tokens, table, checkpoint.autocast_of(state, device), 0, 1,
                           batch), state


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags)."""
    from harness import helptext
    p = helptext.Parser(prog="evaluate.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by train.py")
    p.add_argument("--data", help="a folder written by data.py (default: the run's own)")
    p.add_argument("--splits", help="comma-separated splits (default: every split but train)")
    p.add_argument("--eval_tokens", type=int, help="tokens per split; 0 = all (default: the run's eval_tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    interrupts.stop_on_signals()
    if a.eval_tokens is not None and not 0 <= a.eval_tokens < 2**63:
        p.error(f"--eval_tokens={a.eval_tokens}: expected 0 (all of each split) or a positive count")
    if a.data is not None and not a.data.strip():
        p.error("--data='': expected a folder written by data.py")
    if a.splits is not None and not all(a.splits.split(",")):
        p.error(f"--splits={a.splits!r}: expected split names separated by commas")
    try:
        device = parallel.parse_device(a.device)
        bpc, state = evaluate_run(a.run_dir, a.data, a.splits.split(",") if a.splits else None, a.eval_tokens, device)
    except (ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted("evaluate.py", e)
    if a.json:
        print(json.dumps({"run": a.run_dir, "step": state["step"], **{f"bpc_{k}": v for k, v in bpc.items()}}))
    else:
        print(f"{a.run_dir} (step {state['step']}): " + ", ".join(f"BPC {k} {v:.4f}" for k, v in bpc.items()))
    return bpc


if __name__ == "__main__":
    main()
