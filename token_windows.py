"""The windows of S+1 tokens that training and evaluation read from a token file (data.py writes and
opens them): the training order over epochs (Loader), the evaluation windows, and bits per character."""
import math

import numpy as np


class Loader:
    """Training windows of S+1 tokens at stride S over the first D̂ tokens (all when D̂ = 0).
    Every window is used once per epoch, in a fresh permutation per epoch drawn from (seed, epoch);
    epochs follow each other as the token budget needs (docs/method.md §6 strict and loose reuse). Global batches
    are cut from that one stream, so the order is the same whatever the number of DDP ranks."""

    def __init__(self, tokens, S, seed, unique_tokens=0):
        if unique_tokens > len(tokens) - 1:
            raise ValueError(f"train.unique_tokens={int(unique_tokens):,} is more than the training split holds "
                             f"({len(tokens) - 1:,} tokens to predict): a run planned on fresh data would repeat it; "
                             f"use a bigger corpus or a smaller budget")
        self.n_windows = (int(unique_tokens) or len(tokens) - 1) // S
        if self.n_windows < 1:
            what = (f"train.unique_tokens={int(unique_tokens):,} is" if unique_tokens
                    else f"the training split holds {len(tokens):,} tokens:")
            raise ValueError(f"{what} too few for one window of S+1 = {S + 1} tokens (model.S={S})")
        self.tokens, self.S, self.seed = tokens, S, seed
        self.consumed = 0  # windows handed out, over all ranks
        self._orders = {}

    @property
    def unique_tokens(self):
        """D̂: the tokens one epoch trains on (each window predicts S of them; windows share a token)."""
        return self.n_windows * self.S

    @property
    def epoch(self):
        return self.consumed / self.n_windows

    def order(self, epoch):
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._orders[epoch]

    def windows(self, start, count):
        """Window indices at positions start .. start+count of the global stream."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(pos // self.n_windows):
            sel = pos // self.n_windows == e
            out[sel] = self.order(int(e))[pos[sel] % self.n_windows]
        return out

    def batch(self, windows):
        """(x, y) int64 arrays [len(windows), S]: y is x shifted by one token."""
        rows = np.stack([self.tokens[w * self.S: w * self.S + self.S + 1] for w in windows]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    def next_step(self, micro, accum, rank, world):
        """This rank's `accum` micro-batches of `micro` windows for one optimizer step of
        micro·accum·world windows; micro-step j of rank r takes slot j·world + r of the step."""
        start = self.consumed
        self.consumed += micro * accum * world
        return [self.batch(self.windows(start + (j * world + rank) * micro, micro)) for j in range(accum)]

    def state_dict(self):
        return {"consumed": self.consumed, "n_windows": self.n_windows, "S": self.S, "seed": self.seed}

    def load_state_dict(self, state):
        for key in ("n_windows", "S", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's loader has {key}={state[key]}, this run {getattr(self, key)}: "
                                 f"the data, S, seed or unique_tokens changed")
        self.consumed = state["consumed"]


def eval_windows(tokens, S, max_tokens=0, rank=0, world=1):
    """Non-overlapping windows over the first max_tokens tokens (all when 0): each token after the
    first is predicted exactly once. This rank's share: windows rank, rank + world, …"""
    usable = min(len(tokens), max_tokens or len(tokens))
    for i in range(rank, (usable - 1) // S, world):
        row = np.asarray(tokens[i * S: i * S + S + 1], dtype=np.int64)
        yield row[:-1], row[1:]


def bpc(nll_nats, chars):
    """Bits per character: summed token NLL in nats / (ln 2 · characters of the decoded text)."""
    return nll_nats / (math.log(2) * chars)
