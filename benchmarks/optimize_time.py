"""Wall time of `gkp_onnx.optimize` (analysis + rewrite, no validation) on real-size models.

    python benchmarks/optimize_time.py [--repeats 3] [--ratio 0.4375] [--cost-model analytic|measured]

Models: ResNet-56 (the carried pretrained weights) and the ImageNet-shaped ResNet-50 (random
weights). The clustering cache (and, with --cost-model measured, the latency cache) starts empty
(a private $GKP_ONNX_CACHE): the first run is cold, the others warm (median). Writes
benchmarks/results/optimize_time.json, keeping the rows of the other cost model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from gkp_onnx import optimize
from gkp_onnx.demo import WEIGHTS, asset
from gkp_onnx.models.cifar_resnet import load_akamaster
from gkp_onnx.models.export import build, export

from cifar10 import save_rows


def models(tmp: Path) -> dict[str, Path]:
    r56 = export(load_akamaster("resnet56", str(asset(WEIGHTS))), (1, 3, 32, 32), tmp / "resnet56.onnx")
    model, shape = build("resnet50")
    return {"resnet56": r56, "resnet50": export(model, shape, tmp / "resnet50.onnx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.4375)
    parser.add_argument("--cost-model", default="analytic", choices=["analytic", "measured"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GKP_ONNX_CACHE"] = str(Path(tmp) / "cache")
        for name, path in models(Path(tmp)).items():
            for groups in (None, 4):
                times, report = [], None
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    _, report = optimize(path, ratio=args.ratio, groups=groups, validate=False,
                                         cost_model=args.cost_model, bench_threads=2)
                    times.append(time.perf_counter() - start)
                rows.append({"model": name, "groups": groups or "auto", "cost_model": args.cost_model,
                             "layers": len(report.plan.layers),
                             "cold_s": times[0], "warm_median_s": statistics.median(times[1:]), "times_s": times,
                             "mac_ratio": report.after.macs / report.before.macs})
                r = rows[-1]
                print(f"{name:<9} G={r['groups']:<5} {args.cost_model:<8} {r['layers']:>3} layers  "
                      f"cold {r['cold_s']:6.2f}s  warm median {r['warm_median_s']:6.2f}s (runs {', '.join(f'{t:.2f}' for t in times)})  "
                      f"MACs x{r['mac_ratio']:.3f}", flush=True)
    save_rows("optimize_time", rows, lambda r: (r["model"], r["groups"], r.get("cost_model", "analytic")),
              ratio=args.ratio)


if __name__ == "__main__":
    main()
