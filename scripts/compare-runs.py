#!/usr/bin/env python3
"""Compare two fsmerge runs: every result row of metrics.json (accuracies within --acc, 1e-6 by
default) and every tensor of the merged model (relative max difference within --rel, 1e-5).
Used to check that a refactor keeps landed results: `scripts/compare-runs.py runs/a runs/b`.
Exits 1 and names each difference otherwise."""
import argparse, glob, json, os, sys

from safetensors.numpy import load_file


def rows(run):
    m = json.load(open(os.path.join(run, "metrics.json")))
    return {r["method"]: r for r in m["results"]}


def tensors(run):
    files = sorted(glob.glob(os.path.join(run, "merged*.safetensors")) + glob.glob(os.path.join(run, "merged", "*.safetensors")))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--acc", type=float, default=1e-6)
    p.add_argument("--rel", type=float, default=1e-5)
    args = p.parse_args()
    bad = []
    ra, rb = rows(args.a), rows(args.b)
    if list(ra) != list(rb):
        bad.append(f"methods differ: {list(ra)} vs {list(rb)}")
    for name in ra.keys() & rb.keys():
        x, y = ra[name], rb[name]
        pairs = [("mean_task_acc", x["mean_task_acc"], y["mean_task_acc"]),
                 ("val_mean_task_acc", x["val_mean_task_acc"], y["val_mean_task_acc"]),
                 ("joint_acc", x.get("joint_acc") or 0.0, y.get("joint_acc") or 0.0)]
        pairs += [(f"per_task_acc.{t}", v, y["per_task_acc"].get(t, float("nan"))) for t, v in x["per_task_acc"].items()]
        for field, u, v in pairs:
            if not abs(u - v) <= args.acc:
                bad.append(f"{name}: {field} {u} vs {v}")
    ta, tb = tensors(args.a), tensors(args.b)
    if set(ta) != set(tb):
        bad.append(f"tensor names differ: {sorted(set(ta) ^ set(tb))}")
    worst = 0.0
    for name in ta.keys() & tb.keys():
        x, y = ta[name].astype("float64"), tb[name].astype("float64")
        if x.shape != y.shape:
            bad.append(f"{name}: shape {x.shape} vs {y.shape}")
            continue
        scale = max(abs(y).max(), 1e-12) if y.size else 1.0
        rel = abs(x - y).max() / scale if x.size else 0.0
        worst = max(worst, rel)
        if rel > args.rel:
            bad.append(f"{name}: relative difference {rel:.3e}")
    print(f"{len(ra)} rows, {len(ta)} tensors compared; largest relative tensor difference {worst:.3e}")
    for b in bad:
        print("DIFF", b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
