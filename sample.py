"""Text from a run's checkpoint (whole or sharded), as nanoGPT's sample.py:

    python sample.py out/default --prompt="ROMEO:" --tokens=300
    python sample.py out/default --samples=3 --temperature=0.8 --top_k=50 --seed=7
"""
import contextlib
import math
import sys

from harness import interrupts  # first: Ctrl-C while torch loads ends in one line, not a traceback
if __name__ == "__main__":
    interrupts.quit_while_starting("sample.py")

import torch

import data

from harness import checkpoint
from harness import helptext
from harness import parallel
from harness import rundir


def sample_text(model, tokenizer, prompt, tokens, temperature=0.8, top_k=None, seed=1337, vocab=None,
                autocast=contextlib.nullcontext()):
    """The prompt and `tokens` sampled tokens after it, decoded, under the run's autocast. Its own generator:
    the global RNG is untouched."""
    device = next(model.parameters()).device
    model.eval()  # also: no balance loss, so no collective under DDP
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")
    generator = torch.Generator(device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast:
        out = model.generate(idx, tokens, temperature, top_k, generator, vocab)
    return tokenizer.decode(out[0].tolist())


def parser():
    """The command line (tests/test_every_input.py fuzzes each of its flags)."""
    p = helptext.Parser(prog="sample.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by train.py")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=300, help="tokens to sample after the prompt")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    interrupts.stop_on_signals()
    for name, ok, allowed in (("tokens", 1 <= a.tokens <= 10**6, "an integer in 1..1,000,000"),
                              ("samples", 1 <= a.samples <= 1000, "an integer in 1..1000"),
                              ("temperature", math.isfinite(a.temperature) and a.temperature > 0, "a finite number > 0"),
                              ("top_k", a.top_k >= 0, "an integer >= 0 (0: all tokens)"),
                              ("seed", 0 <= a.seed < 2**63, "an integer in 0..2^63-1")):
        if not ok:
            p.error(f"--{name}={getattr(a, name)}: expected {allowed}")
    if not rundir.utf8(a.prompt):
        p.error("--prompt: not valid UTF-8 text")
    try:
        device = parallel.parse_device(a.device)
        model, state = checkpoint.load_model(a.run_dir, device)
        tokenizer = data.get_tokenizer(state["data"]["tokenizer"])
        print(f"{a.run_dir}: step {state['step']}, {model.cfg.scheme}, tokenizer {state['data']['tokenizer']}",
              file=sys.stderr)
        for i in range(a.samples):
            if i:
                print("\n" + "-" * 40)
            print(sample_text(model, tokenizer, a.prompt, a.tokens, a.temperature, a.top_k or None, a.seed + i,
                              state["data"]["vocab_size"], checkpoint.autocast_of(state, device)))
    except (ValueError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        interrupts.exit_interrupted("sample.py", e)


if __name__ == "__main__":
    main()
