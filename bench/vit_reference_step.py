"""The global FS-Merge training step of a ViT SuperNet in PyTorch eager, written as the authors'
code (merges/merge_layers_vit_full.py) runs it: the literal n-branch SuperNet, each M/U
materialised as a dense matrix (diagonal stack + low-rank product) every step and applied to the
concatenated branches, attention once in merged space, AdamW + OneCycleLR stepped every batch.

Used by `cargo bench -p fsmerge-worker --bench vit_step`, which runs this script with the same
shapes and thread count and prints the ratios. Prints one JSON line: {"step_ms": median}.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


class MU(nn.Module):
    """diagonal_and_low_rank, `first` init. Merge: code layout [n*k, k]; unmerge: [k, n*k]."""

    def __init__(self, merge, n, k, r):
        super().__init__()
        s = k ** -0.5
        self.merge, self.n, self.k = merge, n, k
        if merge:
            m = torch.zeros(n, k)
            m[0] = 1.0
            self.diag = nn.Parameter(m)
            self.a = nn.Parameter(torch.zeros(n * k, r))
            self.b = nn.Parameter(0.1 * s * torch.randn(r, k) / r)
        else:
            self.diag = nn.Parameter(torch.ones(n, k))
            self.a = nn.Parameter(torch.zeros(k, r))
            self.b = nn.Parameter(0.1 * s * torch.randn(r, n * k) / r)

    def forward(self, x):
        diags = [torch.diag(self.diag[i]) for i in range(self.n)]
        dense = torch.cat(diags, 0 if self.merge else 1) + self.a @ self.b
        return x @ dense


def branches(v, w, b):
    """Per-model linear maps of concatenated inputs v [..., n*in] → [..., n*out]."""
    n, out, inp = w.shape
    y = torch.einsum("...ni,noi->...no", v.view(*v.shape[:-1], n, inp), w) + b
    return y.reshape(*v.shape[:-1], n * out)


class Block(nn.Module):
    def __init__(self, n, d, h, heads, r):
        super().__init__()
        rh = max(1, r * h // d)
        rnd = lambda *s: torch.randn(*s) * 0.02  # frozen weights
        self.w = {k: rnd(n, d, d) for k in "qkvo"}
        self.b = {k: torch.zeros(n, d) for k in "qkvo"}
        self.w1, self.b1 = rnd(n, h, d), torch.zeros(n, h)
        self.w2, self.b2 = rnd(n, d, h), torch.zeros(n, d)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.u_att, self.u_o, self.u_0 = MU(False, n, d, r), MU(False, n, d, r), MU(False, n, d, r)
        self.m_q, self.m_k, self.m_v = MU(True, n, d, r), MU(True, n, d, r), MU(True, n, d, r)
        self.m_o, self.m_2 = MU(True, n, d, r), MU(True, n, d, r)
        self.m_1, self.u_1 = MU(True, n, h, rh), MU(False, n, h, rh)
        self.heads = heads

    def forward(self, x):
        B, T, d = x.shape
        a = self.u_att(self.ln1(x))
        q = self.m_q(branches(a, self.w["q"], self.b["q"]))
        k = self.m_k(branches(a, self.w["k"], self.b["k"]))
        v = self.m_v(branches(a, self.w["v"], self.b["v"]))
        split = lambda t: t.view(B, T, self.heads, d // self.heads).transpose(1, 2)
        att = torch.softmax(split(q) @ split(k).transpose(-2, -1) / (d // self.heads) ** 0.5, -1)
        ctx = (att @ split(v)).transpose(1, 2).reshape(B, T, d)
        x = x + self.m_o(branches(self.u_o(ctx), self.w["o"], self.b["o"]))
        g = self.u_0(self.ln2(x))
        z = F.gelu(self.m_1(branches(g, self.w1, self.b1)))
        return x + self.m_2(branches(self.u_1(z), self.w2, self.b2))


class SuperNet(nn.Module):
    def __init__(self, n, d, h, layers, heads, patch, image, r):
        super().__init__()
        self.n, self.d, self.patch = n, d, patch
        tokens = (image // patch) ** 2 + 1
        self.wp, self.bp = torch.randn(n, d, patch * patch) * 0.02, torch.zeros(n, d)
        self.cls, self.pos = torch.randn(n, d) * 0.02, torch.randn(tokens, n, d) * 0.02
        self.m_pre = MU(True, n, d, r)
        self.blocks = nn.ModuleList(Block(n, d, h, heads, r) for _ in range(layers))
        self.ln_post = nn.LayerNorm(d, eps=1e-12)
        self.u_final = MU(False, n, d, r)

    def forward(self, pixels):
        B, p = pixels.shape[0], self.patch
        z = F.unfold(pixels, p, stride=p).transpose(1, 2)  # [B, P, p*p]
        e = torch.einsum("bpi,ndi->bpnd", z, self.wp) + self.bp
        e = torch.cat([self.cls.expand(B, 1, -1, -1), e], 1) + self.pos
        x = self.m_pre(e.reshape(B, e.shape[1], -1))
        for blk in self.blocks:
            x = blk(x)
        return self.u_final(self.ln_post(x[:, 0]))  # [B, n*d]


def main():
    p = argparse.ArgumentParser()
    for name, default in [("n", 2), ("batch", 128), ("rank", 12), ("width", 64), ("mlp", 128),
                          ("layers", 4), ("heads", 4), ("patch", 7), ("image", 28),
                          ("threads", 1), ("steps", 50), ("warmup", 5)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = SuperNet(a.n, a.width, a.mlp, a.layers, a.heads, a.patch, a.image, a.rank)
    x = torch.randn(a.batch, 1, a.image, a.image)
    target = torch.randn(a.batch, a.n * a.width)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-3)
    total = a.steps + a.warmup
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=total, anneal_strategy="linear")
    times = []
    for step in range(total):
        t0 = time.perf_counter()
        loss = ((net(x) - target) ** 2).mean()
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
