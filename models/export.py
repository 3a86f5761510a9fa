"""Export the benchmark-zoo models to ONNX (opset 17).

    python -m gkp_onnx.models.export resnet56 out.onnx --weights resnet56-4bfd9763.th
    python -m gkp_onnx.models.export resnet50 out.onnx
    python -m gkp_onnx.models.export vit_small out.onnx
    python -m gkp_onnx.models.export vgg16 out.onnx
    python -m gkp_onnx.models.export mobilenet_v2 out.onnx   (also mobilenet_v3)
    python -m gkp_onnx.models.export speech_conv1d out.onnx  (also whisper_tiny_encoder)
    python -m gkp_onnx.models.export yolo_style out.onnx     (also efficientnet_b0, resnext26, unet)

The legacy TorchScript exporter (dynamo=False) is used on purpose: it emits exactly opset 17
and, in eval mode, folds BatchNorm into the Conv weights, which is the form deployment
engineers hand to gkp-onnx. The batch axis is dynamic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gkp_onnx.models.cifar_resnet import DEPTHS, cifar_resnet, load_akamaster
from gkp_onnx.models.audio import speech_conv1d
from gkp_onnx.models.mobilenet import mobilenet_v2, mobilenet_v3
from gkp_onnx.models.modern import efficientnet_b0, resnext26, unet, yolo_style
from gkp_onnx.models.resnet50 import resnet50
from gkp_onnx.models.vgg import vgg16
from gkp_onnx.models.vit import vit_small
from gkp_onnx.models.whisper import whisper_tiny_encoder

OPSET = 17
SHAPES = {"efficientnet_b0": (1, 3, 224, 224), "resnext26": (1, 3, 224, 224), "unet": (1, 3, 256, 256),
          "yolo_style": (1, 3, 320, 320)}  # models.modern
MODELS = sorted(DEPTHS) + ["mobilenet_v2", "mobilenet_v3", "resnet50", "vgg16", "speech_conv1d", "vit_small",
                           "whisper_tiny_encoder", *SHAPES]


def build(name: str, weights: str | None = None, seed: int = 0) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model in eval mode and its input shape for one sample."""
    if name == "resnet50":
        return resnet50(seed), (1, 3, 224, 224)
    if name == "mobilenet_v2":
        return mobilenet_v2(seed), (1, 3, 224, 224)
    if name == "mobilenet_v3":
        return mobilenet_v3(seed), (1, 3, 224, 224)
    if name == "vit_small":
        return vit_small(seed), (1, 3, 224, 224)
    if name == "whisper_tiny_encoder":
        return whisper_tiny_encoder(seed), (1, 80, 300)
    if name in SHAPES:
        builder = {"efficientnet_b0": efficientnet_b0, "resnext26": resnext26, "unet": unet, "yolo_style": yolo_style}
        return builder[name](seed), SHAPES[name]
    if name == "speech_conv1d":
        return speech_conv1d(seed), (1, 64, 400)
    if name == "vgg16":
        return vgg16(seed), (1, 3, 32, 32)
    if weights:
        return load_akamaster(name, weights), (1, 3, 32, 32)
    torch.manual_seed(seed)
    return cifar_resnet(name).eval(), (1, 3, 32, 32)


def export(model: torch.nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(input_shape),), str(path), opset_version=OPSET, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gkp_onnx.models.export", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("output")
    parser.add_argument("--weights", help="akamaster checkpoint (.th) for the CIFAR ResNets")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    args = parser.parse_args(argv)
    model, shape = build(args.model, args.weights, args.seed)
    print(export(model, shape, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
