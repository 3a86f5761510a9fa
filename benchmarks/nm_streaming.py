"""N:M 2:4 on a model larger than memory: time and peak memory of `gkp-onnx optimize --nm 2:4`.

    python benchmarks/nm_streaming.py [--dtype float16 float32] [--folder DIR]

Generates a Llama-shaped model at TinyLlama-1.1B's dimensions with random weights in external data
(gkp_onnx.models.llama_external: 22 layers, hidden 2048, FFN 5632, 32 heads, 4 KV heads), then runs
the command in a child process and reads its peak resident memory (getrusage of the children).
Needs about 2.2 GB (float16) / 4.4 GB (float32) of disk per model and twice that for the output.
Writes benchmarks/results/nm_streaming.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gkp_onnx.models.llama_external import LlamaShape, write_llama

RESULTS = Path(__file__).parent / "results"


def run(dtype: str, folder: Path) -> dict:
    model = folder / f"tinyllama_{dtype}.onnx"
    start = time.perf_counter()
    write_llama(model, LlamaShape(), dtype)
    generated = time.perf_counter() - start
    command = [sys.executable, "-m", "gkp_onnx.cli", "optimize", str(model), str(folder / "out.onnx"),
               "--nm", "2:4", "--report", str(folder / "report.json")]
    # a fresh process runs the command, so its children's peak is this command's alone
    probe = (f"import resource, subprocess, sys; done = subprocess.run({command!r}, capture_output=True, text=True); "
             f"sys.stderr.write(done.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             f"sys.exit(done.returncode)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"optimize failed ({done.returncode}): {done.stderr.strip()}")
    peak = int(done.stdout.split()[-1])  # KiB on Linux
    report = json.loads((folder / "report.json").read_text())
    data_bytes = (model.parent / (model.name + ".data")).stat().st_size
    for path in folder.iterdir():
        path.unlink()
    return {"dtype": dtype, "weights_gb": data_bytes / 1e9, "params": report["before"]["params"],
            "sparse_layers": len(report["nm"]["layers"]), "mac_share": report["nm"]["eligible_mac_share"],
            "seconds": seconds, "peak_rss_gb": peak * 1024 / 1e9,
            "generate_seconds": generated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    parser.add_argument("--folder", help="where the models are written (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        rows = [run(dtype, Path(tmp)) for dtype in args.dtype]
    lines = ["# N:M 2:4 streamed: a TinyLlama-1.1B-shaped model in external data", "",
             "| weights | size | params | layers 2:4 | MatMul MACs 2:4 | optimize s | peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['weights_gb']:.2f} GB | {r['params'] / 1e9:.2f} G | {r['sparse_layers']} | "
                     f"{100 * r['mac_share']:.1f}% | {r['seconds']:.0f} | {r['peak_rss_gb']:.2f} GB |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nm_streaming.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "nm_streaming.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
