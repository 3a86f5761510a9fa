"""Knowledge-distillation fine-tuning of a pruned ONNX model (`gkp-onnx recover`).

The pruned graph runs in torch through `TorchGraph` (same nodes, same Gathers and grouped
Convs), the teacher (the original model) likewise without gradients. Loss: KL divergence of the
student's softmax(logits / T) from the teacher's, times T² (every float output of rank >= 2,
softmax over the last axis), plus cross-entropy on the first output when labels are used.
AdamW with a cosine learning rate over all steps: exported graphs usually have BatchNorm folded
into the Conv weights, so a deep network trains without normalisation and its gradients span
orders of magnitude (up to 1000x the weight they update in a one-shot pruned ResNet-56);
SGD diverged at every learning rate tried, Adam's per-weight step is bounded by the rate.
Weights that are exactly zero in the pruned model (N:M, zeroed kernels) get no gradient and
stay zero. BatchNormalization
keeps its running statistics (only its scale and shift train). Image inputs (rank 4) are
augmented with a random crop from a zero-padded copy and a horizontal flip.

Every random draw comes from (seed, epoch, step), so a run is deterministic on CPU and a run
resumed from a checkpoint continues exactly where the interrupted one stopped. The trained
values go back into the initializers of a copy of the pruned graph: the structure is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import input_specs
from gkp_onnx.model_io import load_model
from gkp_onnx.options import RecoverOptions
from gkp_onnx.torch_graph import TorchGraph, write_back
from gkp_onnx.validate import Dataset

log = logging.getLogger(__name__)
CHECKPOINT = "recover.pt"


@dataclass
class RecoverReport:
    epochs: int
    steps: int
    samples: int
    device: str
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_step: int = 0
    finished: bool = True

    def summary(self) -> str:
        losses = ", ".join(f"{loss:.4f}" for loss in self.epoch_losses)
        state = "finished" if self.finished else "stopped early (checkpoint kept; rerun to continue)"
        resumed = f", resumed at step {self.resumed_from_step}" if self.resumed_from_step else ""
        return (f"recover: {state}: {self.steps} steps over {self.samples} samples on {self.device}{resumed}, "
                f"{self.seconds:.1f} s; mean loss per epoch: {losses or '-'}")


def recover(pruned: onnx.ModelProto | str | os.PathLike, teacher: onnx.ModelProto | str | os.PathLike,
            data: Dataset, options: RecoverOptions | None = None, progress: bool = True,
            **kwargs) -> tuple[onnx.ModelProto, RecoverReport]:
    """Distil `teacher` into `pruned` on `data`; returns the trained copy of `pruned` and a report."""
    opts = options or RecoverOptions(**kwargs)
    pruned = load_model(pruned) if not isinstance(pruned, onnx.ModelProto) else pruned
    teacher = load_model(teacher) if not isinstance(teacher, onnx.ModelProto) else teacher
    _check_pair(pruned, teacher)
    device = _device(opts.device)
    student = TorchGraph(pruned).to(device)
    if not student.named_weights():
        raise GkpError("the pruned model has no float32 weights to train")
    reference = TorchGraph(teacher, trainable={}).to(device).eval()
    masked = [(param, student.masks[name].to(device)) for name, param in student.named_weights()
              if name in student.masks]
    parameters = [p for _, p in student.named_weights()]
    optimizer = torch.optim.AdamW(parameters, lr=opts.lr, weight_decay=opts.weight_decay)
    labels = torch.from_numpy(data.labels.astype(np.int64)) if opts.labels and data.labels is not None else None
    if opts.labels and labels is None:
        raise GkpError("--labels needs labels in the data (y in the .npz, or an image folder)")
    steps_per_epoch = math.ceil(len(data) / opts.batch)
    total = steps_per_epoch * opts.epochs
    fingerprint = _fingerprint(pruned, teacher, data, opts)
    state = _load_checkpoint(opts.checkpoint, fingerprint, student, optimizer, device)
    start = state.get("step", 0)
    epoch_losses = state.get("epoch_losses", [])
    running = state.get("running", 0.0)
    bar = Progress(total, start, enabled=progress)
    began, step = time.perf_counter(), start
    stop = total if opts.max_steps is None else min(total, start + opts.max_steps)
    while step < stop:
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0 or step == start:  # the epoch's sample order, drawn once per epoch
            order = np.random.default_rng([opts.seed, epoch]).permutation(len(data))
        chosen = order[index * opts.batch:(index + 1) * opts.batch]
        inputs = {name: torch.from_numpy(array[chosen]).to(device) for name, array in data.inputs.items()}
        if opts.augment:
            inputs = _augment(inputs, torch.Generator().manual_seed(_seed(opts.seed, epoch, index)))
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * opts.lr * (1 + math.cos(math.pi * step / total))
        with torch.no_grad():
            targets = reference(**inputs)
        outputs = student(**inputs)
        loss = _loss(outputs, targets, None if labels is None else labels[chosen].to(device), opts.temperature)
        if not torch.isfinite(loss):  # NaN/Inf in the data or a diverging rate: nothing is written
            raise GkpError(f"recover: the loss became {loss.item()} at step {step + 1}; check the data for "
                           f"NaN/Inf values or lower --lr (nothing was written)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for param, mask in masked:
                if param.grad is not None:
                    param.grad.mul_(mask)
            optimizer.step()
            for param, mask in masked:
                param.mul_(mask)
        step += 1
        running += loss.item()
        bar.update(step, epoch, loss.item(), len(chosen))
        if index == steps_per_epoch - 1:
            epoch_losses.append(running / steps_per_epoch)
            running = 0.0
            bar.epoch_done(epoch, opts.epochs, epoch_losses[-1])
        if opts.checkpoint and (step % opts.checkpoint_every == 0 or index == steps_per_epoch - 1 or step == stop):
            _save_checkpoint(opts.checkpoint, fingerprint, student, optimizer, step, epoch_losses, running)
    bar.close()
    report = RecoverReport(opts.epochs, step, len(data), str(device), time.perf_counter() - began,
                           epoch_losses, start, finished=step == total)
    return write_back(pruned, student.cpu()), report


def _check_pair(pruned: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    mine = [(s.name, s.shape[1:]) for s in input_specs(pruned)]
    theirs = [(s.name, s.shape[1:]) for s in input_specs(teacher)]
    if mine != theirs:
        raise GkpError(f"the pruned model's inputs {mine} differ from the teacher's {theirs}")
    if len(pruned.graph.output) != len(teacher.graph.output):
        raise GkpError("the pruned model and the teacher have different numbers of outputs")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise GkpError("--device cuda: this torch build has no usable CUDA device")
    return torch.device(name)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _augment(inputs: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random crop from a zero-padded copy (pad = size / 8) and horizontal flip, per NCHW image."""
    out = {}
    for name, x in inputs.items():
        if x.dim() != 4 or not x.is_floating_point() or min(x.shape[2:]) < 8:
            out[name] = x
            continue
        n, _, h, w = x.shape
        pad = max(1, min(h, w) // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        crops = [padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]
        out[name] = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip.tolist())])
    return out


def _loss(outputs, targets, labels, temperature: float) -> torch.Tensor:
    terms = []
    for student, teacher in zip(outputs, targets):
        if not student.is_floating_point():
            continue
        if student.dim() >= 2:
            s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, -1)
            t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, -1)
            terms.append(F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2)
        else:
            terms.append(F.mse_loss(student, teacher))
    if labels is not None:
        logits = outputs[0].reshape(-1, outputs[0].shape[-1])
        if logits.shape[0] != labels.numel():
            raise GkpError(f"--labels: the first output {list(outputs[0].shape)} is not one row of logits "
                           f"per label ({labels.numel()} labels in the batch)")
        terms.append(F.cross_entropy(logits, labels.reshape(-1)))
    return sum(terms)


# ------------------------------------------------------------------------------- checkpoints

def _fingerprint(pruned: onnx.ModelProto, teacher: onnx.ModelProto, data: Dataset, opts: RecoverOptions) -> str:
    digest = hashlib.sha256()
    for model in (pruned, teacher):
        digest.update(model.SerializeToString(deterministic=True))
    for name, array in sorted(data.inputs.items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).data)
    if data.labels is not None:
        digest.update(np.ascontiguousarray(data.labels).data)
    run = {k: v for k, v in asdict(opts).items() if k not in ("checkpoint", "checkpoint_every", "max_steps", "device")}
    digest.update(json.dumps(run, sort_keys=True).encode())
    return digest.hexdigest()


def _load_checkpoint(folder: str | None, fingerprint: str, student: TorchGraph, optimizer, device) -> dict:
    if not folder:
        return {}
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        return {}
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a torn or foreign file: torch raises several types
        raise GkpError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}") from None
    if state.get("fingerprint") != fingerprint:
        raise GkpError(f"checkpoint {path} belongs to another run (model, data or options differ); "
                       f"remove it or choose another --checkpoint folder")
    with torch.no_grad():
        for name, param in student.named_weights():
            param.copy_(state["weights"][name])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s at step %d", path, state["step"])
    return state


def _save_checkpoint(folder: str, fingerprint: str, student: TorchGraph, optimizer, step: int,
                     epoch_losses: list[float], running: float) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (CHECKPOINT + ".tmp")
        torch.save({"fingerprint": fingerprint, "step": step, "epoch_losses": list(epoch_losses),
                    "running": running, "optimizer": optimizer.state_dict(),
                    "weights": {name: p.detach() for name, p in student.named_weights()}}, tmp)
        os.replace(tmp, path / CHECKPOINT)
    except OSError as exc:
        raise GkpError(f"cannot write checkpoint in {folder}: {exc.strerror}") from None


class Progress:
    """One status line on stderr: step, epoch, loss, samples per second (a line per epoch when piped)."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.began, self.samples, self.shown = time.perf_counter(), 0, 0.0
        if enabled and start:
            print(f"recover: resuming at step {start}/{total}", file=sys.stderr)

    def update(self, step: int, epoch: int, loss: float, samples: int) -> None:
        self.samples += samples
        now = time.perf_counter()
        if not self.tty or now - self.shown < 0.5:
            return
        self.shown = now
        rate = self.samples / max(now - self.began, 1e-9)
        width = 24
        filled = int(width * step / self.total)
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} epoch {epoch + 1} "
              f"loss {loss:.4f} {rate:.0f} samples/s", end="", file=sys.stderr, flush=True)

    def epoch_done(self, epoch: int, epochs: int, loss: float) -> None:
        if self.enabled:
            rate = self.samples / max(time.perf_counter() - self.began, 1e-9)
            print(("\r" if self.tty else "") + f"epoch {epoch + 1}/{epochs}: mean loss {loss:.4f}, "
                  f"{rate:.0f} samples/s" + " " * 20, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
