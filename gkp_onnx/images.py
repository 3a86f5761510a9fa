"""Image folders as datasets: one subfolder per class, decoded and preprocessed into model inputs.

The layout is the usual `root/<class>/<image>`; classes are the sorted subfolder names and give
the labels (0, 1, ...). Preprocessing, in order: resize so the shorter side is `resize` pixels,
centre-crop `crop` x `crop`, scale to [0, 1], subtract `mean` and divide by `std` per channel,
then lay out as the model input wants (NCHW or NHWC, found from where the 3 channels are). By
default `crop` is the model's input size and `resize` equals `crop`, so images already at the
input size pass unchanged. The decoded folder is held in memory as float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gkp_onnx.errors import GkpError
from gkp_onnx.options import check, check_floats

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class ImageSpec:
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    bgr: bool = False  # channel order of the model input

    def __post_init__(self):
        check("resize", self.resize)
        check("crop", self.crop)
        check_floats("mean", self.mean)
        check_floats("std", self.std, nonzero=True)


def list_images(root: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """Image files in class order (sorted subfolder names) and their labels."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise GkpError(f"image folder {root} has no images in class subfolders (expected {root}/<class>/<image>)")
    return files, np.array(labels, dtype=np.int64)


def _layout(shape: list[int]) -> tuple[str, int]:
    """'nchw' or 'nhwc', and the spatial size, from a rank-4 input shape with 1 or 3 channels."""
    if len(shape) == 4 and shape[1] in (1, 3) and shape[2] == shape[3]:
        return "nchw", shape[2]
    if len(shape) == 4 and shape[3] in (1, 3) and shape[1] == shape[2]:
        return "nhwc", shape[1]
    raise GkpError(f"an image folder needs a model input shaped [N, 3, H, H] or [N, H, H, 3]; "
                   f"this one is {shape}")


def decode(path: Path, spec: ImageSpec, size: int, channels: int) -> np.ndarray:
    """One preprocessed image as float32 HWC."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            crop = spec.crop or size
            resize = spec.resize or crop
            width, height = image.size
            scale = resize / min(width, height)
            if scale != 1:
                image = image.resize((max(crop, round(width * scale)), max(crop, round(height * scale))),
                                     Image.BILINEAR)
            width, height = image.size
            left, top = (width - crop) // 2, (height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
            array = np.asarray(image, dtype=np.float32).reshape(crop, crop, channels) / 255.0
    except OSError as exc:
        raise GkpError(f"cannot decode image {path}: {exc}") from None
    if spec.bgr:
        array = array[..., ::-1]
    return (array - np.asarray(spec.mean[:channels], np.float32)) / np.asarray(spec.std[:channels], np.float32)


def load_image_folder(root: str | os.PathLike, shape: list[int], spec: ImageSpec,
                      choose=None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of the folder; `choose(count)` may pick which of the sorted files to decode."""
    files, labels = list_images(root)
    layout, size = _layout(shape)
    channels = shape[1] if layout == "nchw" else shape[3]
    if (spec.crop or size) != size:
        raise GkpError(f"--crop {spec.crop} does not match the model's input size {size}")
    for name, values in (("--mean", spec.mean), ("--std", spec.std)):
        if 1 < len(values) < channels:
            raise GkpError(f"{name} has {len(values)} values; the model's images have {channels} channels "
                           f"(give one value, or one per channel)")
    chosen = range(len(files)) if choose is None else choose(len(files))
    x = np.stack([decode(files[i], spec, size, channels) for i in chosen])
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), labels[list(chosen)]
