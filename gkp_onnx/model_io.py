"""Loading and saving ONNX models: checked loads, atomic writes, external data for large models.

The input file is never written to. Outputs go to a temporary folder inside the target
directory and are renamed into place, so a reader never sees a half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from gkp_onnx.errors import GkpError

# protobuf cannot serialise a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model (external data included); raise GkpError on bad input."""
    path = Path(path)
    if not path.exists():
        raise GkpError(f"no such file: {path}")
    if not path.is_file():
        raise GkpError(f"not a file: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise GkpError(f"not a readable ONNX model: {path} ({_first_line(exc)})") from None
    if not model.opset_import or not model.graph.node:
        raise GkpError(f"not an ONNX model (no graph or opset): {path}")
    check_model(model, what=str(path))
    return model


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """onnx.checker on a model of any size (large ones are checked through a temporary file)."""
    try:
        if not is_large(model):
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp) / "model.onnx"
                _save(model, tmp_path)
                onnx.checker.check_model(str(tmp_path))
    except (onnx.checker.ValidationError, DecodeError, ValueError) as exc:
        raise GkpError(f"invalid ONNX model {what}: {_first_line(exc)}") from None


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike) -> Path:
    """Refuse an output that would overwrite the input or cannot be written; return it resolved."""
    out = Path(output_path).resolve()
    if input_path is not None and Path(input_path).resolve() == out:
        raise GkpError(f"output path is the input path: {output_path} (the input is never modified)")
    if out.is_dir():
        raise GkpError(f"output path is a directory: {output_path}")
    parent = out.parent
    if not parent.is_dir():
        raise GkpError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GkpError(f"output directory is not writable: {parent}")
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` atomically; models near protobuf's 2 GiB limit get an external data file."""
    out = Path(path).resolve()
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".gkp-tmp-", dir=out.parent))
    except OSError as exc:
        raise GkpError(f"cannot write to {out.parent}: {exc.strerror}") from None
    try:
        written = _save(model, tmp_dir / out.name)
        for file in written:
            os.replace(file, out.parent / file.name)
    except OSError as exc:
        raise GkpError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def _save(model: onnx.ModelProto, path: Path) -> list[Path]:
    if not is_large(model):
        onnx.save_model(model, str(path))
        return [path]
    data_name = path.name + ".data"
    copy = onnx.ModelProto()  # save_model moves the weights of the proto it is given out to the file
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [path, path.parent / data_name]


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialised as one protobuf (weights near 2 GiB)."""
    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    return size >= EXTERNAL_DATA_THRESHOLD


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
