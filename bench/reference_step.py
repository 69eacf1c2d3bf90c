"""The global FS-Merge training step in PyTorch eager, written as the authors' code runs it:
the literal n-branch SuperNet, M/U materialised as dense matrices (diagonal stack + low-rank
product) and applied to the concatenated branches, AdamW + OneCycleLR stepped every batch.

Used by `cargo bench -p fsmerge-worker --bench global_step`, which runs this script with the
same shapes and thread count and prints the ratios. Prints one JSON line: {"step_ms": median}.
"""
import argparse
import json
import time

import torch
from torch import nn


class MMatrix(nn.Module):
    """Merge, code layout [n*k, k']: diag stack + M_a @ M_b (diagonal_and_low_rank, first init)."""

    def __init__(self, n, k, r):
        super().__init__()
        s = k ** -0.5
        m = torch.zeros(n, k)
        m[0] = 1.0
        self.n, self.k = n, k
        self.diag = nn.Parameter(m)
        self.a = nn.Parameter(torch.zeros(n * k, r))
        self.b = nn.Parameter(0.1 * s * torch.randn(r, k) / r)

    def forward(self, branches):  # branches [B, n*k]
        dense = torch.cat([torch.diag(self.diag[i]) for i in range(self.n)], 0) + self.a @ self.b
        return branches @ dense


class UMatrix(nn.Module):
    """Unmerge, code layout [k', n*k]: diag concat + U_a @ U_b."""

    def __init__(self, n, k, r):
        super().__init__()
        s = k ** -0.5
        self.n, self.k = n, k
        self.diag = nn.Parameter(torch.ones(n, k))
        self.a = nn.Parameter(torch.zeros(k, r))
        self.b = nn.Parameter(0.1 * s * torch.randn(r, n * k) / r)

    def forward(self, x):  # x [B, k'] -> [B, n, k]
        dense = torch.cat([torch.diag(self.diag[i]) for i in range(self.n)], 1) + self.a @ self.b
        return (x @ dense).view(x.shape[0], self.n, self.k)


class SuperNet(nn.Module):
    def __init__(self, n, dims, r):
        super().__init__()
        self.n = n
        self.w = [torch.randn(n, o, i) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]  # frozen
        self.bias = [torch.randn(n, o) * 0.01 for o in dims[1:]]
        self.ms = nn.ModuleList(MMatrix(n, o, r) for o in dims[1:])
        self.us = nn.ModuleList(UMatrix(n, o, r) for o in dims[1:])

    def forward(self, x):
        h = x
        for l, (w, b) in enumerate(zip(self.w, self.bias)):
            if l == 0:
                v = x.unsqueeze(0).expand(self.n, -1, -1)  # shared input
            else:
                v = self.us[l - 1](h).transpose(0, 1)  # [n, B, in]
            y = torch.bmm(v, w.transpose(1, 2)) + b.unsqueeze(1)  # [n, B, out]
            h = torch.relu(self.ms[l](y.transpose(0, 1).reshape(x.shape[0], -1)))
        return self.us[-1](h)  # [B, n, k]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rank", type=int, default=12)
    p.add_argument("--dims", default="784,256,256,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dims = [int(d) for d in a.dims.split(",")]
    net = SuperNet(a.n, dims, a.rank)
    x = torch.randn(a.batch, dims[0])
    target = torch.randn(a.batch, a.n, dims[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    total = a.steps + a.warmup
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, anneal_strategy="linear")
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
