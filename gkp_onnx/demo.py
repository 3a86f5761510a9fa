"""`gkp-onnx demo`: the whole job on a real pretrained model, with nothing to download.

Exports the pretrained CIFAR-10 ResNet-56 carried in gkp_onnx/assets to ONNX, optimizes it with
the default pipeline, and validates it on 500 CIFAR-10 test images with their exact pixels
(accuracy before/after, fidelity, the per-layer report).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from gkp_onnx.errors import GkpError
from gkp_onnx.model_io import save_model

WEIGHTS = "resnet56-4bfd9763.th"
IMAGES = "cifar10_test_exact_first500.npz"


def asset(name: str) -> Path:
    return Path(str(resources.files("gkp_onnx") / "assets" / name))


def prepare(out_dir: Path) -> tuple[Path, Path]:
    """Write the dense ResNet-56 ONNX and the preprocessed evaluation data into out_dir."""
    from gkp_onnx.models.cifar_resnet import load_akamaster, preprocess
    from gkp_onnx.models.export import export

    model_path, data_path = out_dir / "resnet56.onnx", out_dir / "cifar10_exact500.npz"
    export(load_akamaster("resnet56", str(asset(WEIGHTS))), (1, 3, 32, 32), model_path)
    images = np.load(asset(IMAGES))
    np.savez(data_path, x=preprocess(images["x"]), y=images["y"])
    return model_path, data_path


def run_demo(out_dir: str = "gkp-demo", **options) -> int:
    from gkp_onnx.optimize import optimize

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GkpError(f"cannot create demo directory {out}: {exc.strerror}") from None
    print(f"demo: exporting the pretrained CIFAR-10 ResNet-56 to {out}/resnet56.onnx")
    model_path, data_path = prepare(out)
    options.setdefault("ratio", 0.4375)
    optimized, report = optimize(model_path, calib=str(data_path), **options)
    optimized_path = save_model(optimized, out / "resnet56.gkp.onnx")
    report.save(out / "report.json")
    print(report.table())
    fidelity = report.fidelity
    print(f"\ntop-1 on {fidelity.samples} exact-pixel CIFAR-10 test images: dense "
          f"{100 * fidelity.accuracy_reference:.2f}% -> pruned {100 * fidelity.accuracy_candidate:.2f}% "
          f"(one-shot, data-free, no recovery)")
    print(f"wrote {optimized_path} and {out / 'report.json'}")
    return 0
