#!/usr/bin/env python3
"""Plots a `ulysses bench --csv` sequence-length sweep in the layout of the DeepSpeed-Ulysses
paper's throughput figures: sequence length on the x axis, one series per sequence-parallel
degree P; left panel TFLOP/s per GPU (bars), right panel tokens/s of the whole P-GPU group (line).

  scripts/bench/plot_sweep.py out/sweep/bench.csv --out out/sweep/sweep.png
"""
import argparse
import csv
import sys
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--out", default="sweep.png")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: matplotlib is not installed (pip install matplotlib)")
    rows = list(csv.DictReader(open(a.csv)))
    if not rows:
        sys.exit(f"error: {a.csv}: no rows")
    series = defaultdict(list)  # P -> [(N, tflops, tokens/s)]
    for r in rows:
        tag = f"P={r['P']}" + (" (emulated)" if r.get("emulated") == "1" else "")
        series[tag].append((int(r["N"]), float(r["tflops_per_rank"]), float(r["tokens_per_second"])))
    lengths = sorted({n for s in series.values() for n, _, _ in s})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(series))
    for i, (tag, pts) in enumerate(sorted(series.items())):
        pts.sort()
        xs = [lengths.index(n) + (i - (len(series) - 1) / 2) * width for n, _, _ in pts]
        left.bar(xs, [t for _, t, _ in pts], width=width, label=tag)
        right.plot([n for n, _, _ in pts], [s for _, _, s in pts], marker="o", label=tag)
    left.set_xticks(range(len(lengths)))
    left.set_xticklabels([f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    left.set_xlabel("sequence length")
    left.set_ylabel("TFLOP/s per GPU (model FLOPs, causal)")
    right.set_xscale("log", base=2)
    right.set_xlabel("sequence length")
    right.set_ylabel("tokens/s (P-GPU group)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    first = rows[0]
    fig.suptitle(a.title or f"ulysses bench: {first['layers']} layers, width {first['width']}, "
                            f"{first['heads']} heads, B={first['B']}")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
