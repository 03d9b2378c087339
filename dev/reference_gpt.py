"""A plain nanoGPT-style GPT, written again here (after Karpathy's model.py), that `python dev/bench.py nanogpt`
measures the dense twin against, per executed FLOP. Not used for training."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceBlock(nn.Module):
    """nanoGPT's block (Karpathy's model.py, written again here): pre-LayerNorm, one qkv matrix, causal
    SDPA, a GELU MLP; no biases."""
    def __init__(self, Dm, H, Dh, hidden):
        super().__init__()
        self.H, self.Dh = H, Dh
        self.ln1, self.ln2 = nn.LayerNorm(Dm, bias=False), nn.LayerNorm(Dm, bias=False)
        self.qkv, self.proj = nn.Linear(Dm, 3 * H * Dh, bias=False), nn.Linear(H * Dh, Dm, bias=False)
        self.fc, self.fc_proj = nn.Linear(Dm, hidden, bias=False), nn.Linear(hidden, Dm, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, self.H, self.Dh).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(self.H * self.Dh, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, S, self.H * self.Dh))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class ReferenceGPT(nn.Module):
    """A plain nanoGPT-style GPT at a dense Shape: learned positions, LayerNorm, causal SDPA without ALiBi,
    and a GELU MLP of width 1.5·Dffn, which has the matmul parameters and FLOPs of the SwiGLU of width
    Dffn; the LM head as the model's (tied or not). Its executed FLOPs per token are those of the dense
    model of the same Shape (flops.M_exec): the same matrices, the same LM head, causal attention."""
    def __init__(self, shape, vocab_size, tie_embeddings=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, shape.Dm), nn.Embedding(shape.S, shape.Dm)
        self.blocks = nn.ModuleList(ReferenceBlock(shape.Dm, shape.H, shape.Dh, 3 * shape.Dffn // 2) for _ in range(shape.L))
        self.ln_f = nn.LayerNorm(shape.Dm, bias=False)
        self.lm_head = nn.Linear(shape.Dm, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def matmul_params(self):
        """The blocks' matrices: what flops.count calls N for a dense model."""
        return sum(m.weight.numel() for b in self.blocks for m in b.modules() if isinstance(m, nn.Linear))

    def forward(self, idx_BS, targets_BS):
        x = self.wte(idx_BS) + self.wpe(torch.arange(idx_BS.shape[1], device=idx_BS.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets_BS.reshape(-1)), {}
