#!/usr/bin/env python3
"""Scaling model: predicted step time and TFLOP/s per GPU of a P-GPU sequence-parallel run, from the
per-rank compute measured with `ulysses bench` (usually with parallel.emulate_sequence = P, i.e. one
device doing one rank's work) plus the communication time of the all-to-alls from their volume and
a link bandwidth. Megatron-style sequence parallelism on the same compute is modelled beside it.

  scripts/scaling_model.py bench.csv [--link nvlink|ib|GBPS] [--elem-bytes 2] [--overlap 0.0]

Model, per optimizer step and rank (every number printed says which assumptions made it):
  compute   = forward_ms + backward_ms from the CSV (model FLOPs of one rank, incl. the local copies
              that stand in for the all-to-alls when emulated)
  ulysses   = all_to_all_bytes (the communicator's count: bytes leaving the rank, fp32 on the CPU)
              * elem_bytes / 4 / bandwidth;  per layer 8 (P-1)/P * B N C / P elements (fwd + bwd)
  megatron  = per layer an all-gather and a reduce-scatter of B N C elements around attention and
              around the MLP, forward and backward: 8 (P-1)/P * B N C elements per layer
  step      = compute + (1 - overlap) * comm;  TFLOP/s per GPU = flops_per_rank_step / step
Bandwidths: NVLink 4 about 450 GB/s per direction per GPU; InfiniBand NDR 400 Gb/s = 50 GB/s per GPU.
"""
import argparse
import csv
import sys

LINKS = {"nvlink": 450e9, "ib": 50e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="rows from `ulysses bench --csv` (emulated or real P)")
    ap.add_argument("--link", default="nvlink", help="nvlink (450 GB/s), ib (50 GB/s) or a number in GB/s")
    ap.add_argument("--elem-bytes", type=float, default=2.0, help="bytes per element on the wire (bf16: 2)")
    ap.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden under compute")
    ap.add_argument("--compute-scale", type=float, default=1.0,
                    help="multiply the measured compute time (e.g. to project CPU numbers; 1: as measured)")
    ap.add_argument("--out", help="write the predictions as CSV here")
    a = ap.parse_args()
    try:
        bw = LINKS[a.link] if a.link in LINKS else float(a.link) * 1e9
    except ValueError:
        sys.exit(f"error: --link '{a.link}': expected nvlink, ib or a bandwidth in GB/s")
    if not 0.0 <= a.overlap <= 1.0:
        sys.exit("error: --overlap must be in [0, 1]")
    try:
        rows = list(csv.DictReader(open(a.csv)))
    except OSError as e:
        sys.exit(f"error: {a.csv}: {e}")
    need = {"layers", "width", "B", "N", "P", "forward_ms", "backward_ms", "all_to_all_bytes", "flops_per_rank_step"}
    if not rows or not need <= set(rows[0]):
        sys.exit(f"error: {a.csv}: expected a `ulysses bench --csv` file with columns {sorted(need)}")
    assume = (f"link {bw / 1e9:.0f} GB/s, {a.elem_bytes:g} B/elem, overlap {a.overlap:g}, "
              f"compute x{a.compute_scale:g} of measured")
    print(f"# assumptions: {assume}; compute from {a.csv}")
    hdr = ("L", "C", "B", "N", "P", "emul", "compute_ms", "ulysses_comm_ms", "ulysses_step_ms", "ulysses_TFLOPs/GPU",
           "megatron_comm_ms", "megatron_step_ms", "megatron_TFLOPs/GPU", "speedup")
    print(" ".join(f"{h:>10}" for h in hdr) + "  assumptions")
    out = []
    for r in rows:
        L, C, B, N, P = (int(r[k]) for k in ("layers", "width", "B", "N", "P"))
        compute_s = (float(r["forward_ms"]) + float(r["backward_ms"])) / 1e3 * a.compute_scale
        flops = float(r["flops_per_rank_step"])
        uly_bytes = float(r["all_to_all_bytes"]) * a.elem_bytes / 4.0
        recompute = r.get("recompute", "none")
        # full recompute repeats the forward collectives: Megatron's too (3 of every 4 -> x 1.5)
        meg_elems = 8.0 * (P - 1) / P * B * N * C * L * (1.5 if recompute == "full" else 1.0)
        meg_bytes = meg_elems * a.elem_bytes
        uly_s, meg_s = uly_bytes / bw, meg_bytes / bw
        uly_step = compute_s + (1 - a.overlap) * uly_s
        meg_step = compute_s + (1 - a.overlap) * meg_s
        vals = dict(L=L, C=C, B=B, N=N, P=P, emulated=r.get("emulated", "0"), compute_ms=compute_s * 1e3,
                    ulysses_comm_ms=uly_s * 1e3, ulysses_step_ms=uly_step * 1e3,
                    ulysses_tflops_per_gpu=flops / uly_step / 1e12, megatron_comm_ms=meg_s * 1e3,
                    megatron_step_ms=meg_step * 1e3, megatron_tflops_per_gpu=flops / meg_step / 1e12,
                    speedup=meg_step / uly_step, assumptions=assume)
        out.append(vals)
        print(f"{L:>10} {C:>10} {B:>10} {N:>10} {P:>10} {vals['emulated']:>10} {compute_s * 1e3:>10.2f} "
              f"{uly_s * 1e3:>10.3f} {uly_step * 1e3:>10.2f} {vals['ulysses_tflops_per_gpu']:>10.4f} "
              f"{meg_s * 1e3:>10.3f} {meg_step * 1e3:>10.2f} {vals['megatron_tflops_per_gpu']:>10.4f} "
              f"{vals['speedup']:>10.3f}  [{assume}]")
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0].keys()))
            w.writeheader()
            w.writerows(out)


if __name__ == "__main__":
    main()
