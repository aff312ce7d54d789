#!/usr/bin/env python3
"""Plot ulysses metrics files (JSON lines, one object per step) as loss and throughput curves.

usage: scripts/plot_metrics.py run1.jsonl [run2.jsonl ...] [-o metrics.png]

Each file becomes one line per panel, labelled by its file name: training loss (and the
validation loss where it was measured), tokens/s, and achieved TFLOP/s per rank.
Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import sys
from pathlib import Path


def load(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not a JSON object: {e}")
    if not rows:
        sys.exit(f"{path}: no metrics in the file")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("-o", "--output", default="metrics.png")
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("matplotlib is needed: pip install matplotlib")

    fig, (ax_loss, ax_tok, ax_flops) = plt.subplots(1, 3, figsize=(16, 4.5))
    for path in args.files:
        rows = load(path)
        steps = [r["step"] for r in rows]
        label = path.stem
        ax_loss.plot(steps, [r["loss"] for r in rows], label=f"{label} train")
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            ax_loss.plot(*zip(*val), "o--", label=f"{label} val")
        ax_tok.plot(steps, [r["tokens_per_second"] for r in rows], label=label)
        ax_flops.plot(steps, [r["tflops_per_rank"] for r in rows], label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_tok.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_flops.set(xlabel="step", ylabel="TFLOP/s per rank", title="achieved FLOP rate")
    for ax in (ax_loss, ax_tok, ax_flops):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
