"""The global FS-Merge training step of a Llama SuperNet in PyTorch eager, written as the
authors' code runs its ViT/BERT SuperNets: the literal n-branch SuperNet, each M/U materialised
as a dense matrix (diagonal stack + low-rank product) every step and applied to the
concatenated branches; RMSNorms trained in merged space; RoPE and grouped-query causal
attention once in merged space; AdamW + OneCycleLR stepped every batch. The loss reconstructs
every model's final hidden states at every token.

Used by `cargo bench -p fsmerge-worker --bench llama_step`, which runs this script with the same
shapes and thread count and prints the ratios. Prints one JSON line: {"step_ms": median}.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from vit_reference_step import MU, branches


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x, cos, sin):
    """x [B, heads, T, hd]: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Block(nn.Module):
    def __init__(self, n, d, h, heads, kv, r):
        super().__init__()
        hd = d // heads
        rh = max(1, r * h // d)
        rnd = lambda *s: torch.randn(*s) * 0.02  # frozen weights
        self.wq, self.wk, self.wv = rnd(n, d, d), rnd(n, kv * hd, d), rnd(n, kv * hd, d)
        self.wo = rnd(n, d, d)
        self.wg, self.wu, self.wd = rnd(n, h, d), rnd(n, h, d), rnd(n, d, h)
        self.zero = {k: torch.zeros(n, k) for k in {d, kv * hd, h}}
        self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
        self.u_att, self.u_o, self.u_0 = MU(False, n, d, r), MU(False, n, d, r), MU(False, n, d, r)
        self.m_q, self.m_o, self.m_down = MU(True, n, d, r), MU(True, n, d, r), MU(True, n, d, r)
        self.m_k, self.m_v = MU(True, n, kv * hd, r), MU(True, n, kv * hd, r)
        self.m_gate, self.m_up = MU(True, n, h, rh), MU(True, n, h, rh)
        self.u_1 = MU(False, n, h, rh)
        self.heads, self.kv, self.hd = heads, kv, hd

    def forward(self, x, cos, sin, mask):
        B, T, d = x.shape
        z = self.zero
        a = self.u_att(self.ln1(x))
        q = self.m_q(branches(a, self.wq, z[d]))
        k = self.m_k(branches(a, self.wk, z[self.kv * self.hd]))
        v = self.m_v(branches(a, self.wv, z[self.kv * self.hd]))
        split = lambda t, h: t.view(B, T, h, self.hd).transpose(1, 2)
        q, k, v = rope(split(q, self.heads), cos, sin), rope(split(k, self.kv), cos, sin), split(v, self.kv)
        rep = self.heads // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-2, -1) / self.hd ** 0.5 + mask, -1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + self.m_o(branches(self.u_o(ctx), self.wo, z[d]))
        g = self.u_0(self.ln2(x))
        gated = F.silu(self.m_gate(branches(g, self.wg, z[self.wg.shape[1]]))) * self.m_up(
            branches(g, self.wu, z[self.wu.shape[1]]))
        return x + self.m_down(branches(self.u_1(gated), self.wd, z[d]))


class SuperNet(nn.Module):
    def __init__(self, n, d, h, layers, heads, kv, vocab, r):
        super().__init__()
        self.n, self.d = n, d
        self.embed = torch.randn(n, vocab, d) * 0.02
        self.m_emb = MU(True, n, d, r)
        self.blocks = nn.ModuleList(Block(n, d, h, heads, kv, r) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.u_final = MU(False, n, d, r)
        self.hd = d // heads

    def forward(self, ids):
        B, T = ids.shape
        e = self.embed[:, ids].permute(1, 2, 0, 3).reshape(B, T, -1)  # [B, T, n*d]
        x = self.m_emb(e)
        hd = self.hd
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(T).float(), inv)
        ang = torch.cat([freqs, freqs], -1)
        cos, sin = ang.cos(), ang.sin()
        mask = torch.full((T, T), float("-inf")).triu(1)
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        return self.u_final(self.norm(x))  # [B, T, n*d]


def main():
    p = argparse.ArgumentParser()
    for name, default in [("n", 2), ("batch", 64), ("tokens", 64), ("rank", 12), ("width", 64),
                          ("mlp", 128), ("layers", 4), ("heads", 4), ("kv", 2), ("vocab", 30522),
                          ("threads", 1), ("steps", 30), ("warmup", 5)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = SuperNet(a.n, a.width, a.mlp, a.layers, a.heads, a.kv, a.vocab, a.rank)
    ids = torch.randint(1, a.vocab, (a.batch, a.tokens))
    target = torch.randn(a.batch, a.tokens, a.n * a.width)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-3)
    total = a.steps + a.warmup
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=total, anneal_strategy="linear")
    times = []
    for step in range(total):
        t0 = time.perf_counter()
        loss = ((net(ids) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"step_ms": 1e3 * times[len(times) // 2], "loss": loss.item()}))


if __name__ == "__main__":
    main()
