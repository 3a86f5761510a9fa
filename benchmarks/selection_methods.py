"""Kernel selection methods compared on the real CIFAR-10 ResNets: one-shot and reconstructed.

    python benchmarks/selection_methods.py [--models resnet56] [--groups 8] [--images 1024]
        [--methods leanflex,l2,random,tmi,sr]      (--images 0: one-shot only)

Ratio 0.4375 at a fixed G (the prior art's setting: G = 8), so every method prunes the same
MACs and only the kept kernels (and for sr the grouping) differ. Top-1 on the 932 exact-pixel test
images and the 10k JPEG test set; reconstruction on unlabeled JPEG test images disjoint from them.
Writes benchmarks/results/selection_methods.json and .md after every row, keeping earlier rows of
the same setting that the run does not repeat.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cifar10 import RESULTS, dense_model, save_rows, test_sets, top1
from gkp_onnx import optimize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--methods", default="leanflex,l2,random,tmi,sr")
    parser.add_argument("--ratio", type=float, default=0.4375)
    args = parser.parse_args()
    evaluation = test_sets()
    unlabeled = evaluation["jpeg10k"].inputs["input"][932:932 + args.images]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, x=unlabeled)
        for name in args.models.split(","):
            dense = dense_model(name, Path(tmp))
            for method in args.methods.split(","):
                for images in sorted({0, args.images}):
                    start = time.perf_counter()
                    model, _ = optimize(dense, ratio=args.ratio, groups=args.groups, method=method, validate=False,
                                        channel_multiple=1,  # the prior art's uniform setting
                                        calib=str(calib) if images else None, reconstruct=bool(images))
                    rows.append({"model": name, "method": method, "images": images,
                                 "seconds": time.perf_counter() - start,
                                 **{k: top1(model, d) for k, d in evaluation.items()}})
                    print(rows[-1], flush=True)
                    write(rows, args)


def write(rows: list[dict], args) -> None:
    rows = save_rows("selection_methods", rows, lambda r: (r["model"], r["method"], r["images"]),
                     ratio=args.ratio, groups=args.groups)
    lines = ["# Kernel selection methods on CIFAR-10", "",
             f"Ratio {args.ratio}, G = {args.groups} for every layer (equal MACs for every method); top-1 on the "
             "932 exact-pixel test images and the 10k JPEG test set; images = 0: one-shot, else reconstructed on "
             "that many unlabeled JPEG test images disjoint from the exact ones. Time: optimize, incl. reconstruction.",
             "", "| model | method | images | top-1 exact | top-1 JPEG 10k | time s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['images']} | {100 * r['exact932']:.2f}% | "
                     f"{100 * r['jpeg10k']:.2f}% | {r['seconds']:.1f} |")
    (RESULTS / "selection_methods.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
