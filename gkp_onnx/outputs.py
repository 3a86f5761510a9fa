"""The output guard: every file a command writes, checked before any work and written together.

    with Outputs() as outputs:
        outputs.read_model(args.input)                      # the input model and its external data
        outputs.read(args.calib)
        model_path = outputs.add(args.output, "output", model=True)
        report_path = outputs.add(args.report, "--report")
        ...                                                 # the work
        outputs.stage(model_path, lambda path: save_model(model, path))
        outputs.stage(report_path, report.save)
    # all staged files are moved into place here, only when the block ends without an error

An output is refused (one-line GkpError, before any work) when it is an input (by resolved path or
same-file identity: a hard link, a symlink), another output, a folder or a name ending in a slash,
something other than a regular file (a device), or in a folder that does not exist or cannot be
written. A model output also claims its external-data file (`NAME.data`). Files are written into
a `.gkp-tmp-<pid>-*` folder beside their target and renamed into place at the end; on an error,
Ctrl-C or SIGTERM (the CLI turns it into SystemExit) the folder is removed, and folders of runs
that were killed (their pid no longer alive) are removed by the next run writing there.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from gkp_onnx.errors import GkpError

TMP_PREFIX = ".gkp-tmp-"


class Outputs:
    def __init__(self) -> None:
        self.reads: dict[Path, str] = {}  # resolved path -> what it is
        self.targets: dict[Path, str] = {}  # resolved path -> the flag that names it
        self.staged: list[tuple[Path, Path]] = []  # (temporary folder, target)
        self.models: dict[Path, str] = {}  # input models whose external data is looked up when needed

    def read(self, path: str | os.PathLike | None, what: str = "input") -> None:
        """A file (or folder) the command reads: no output may be it."""
        if path is not None and Path(path).exists():
            self.reads[Path(path).resolve()] = what

    def read_model(self, path: str | os.PathLike | None, what: str = "input model") -> None:
        """An ONNX model and the external-data files it names."""
        if path is not None and Path(path).is_file():
            self.read(path, what)
            self.models[Path(path).resolve()] = what

    def add(self, path: str | os.PathLike | None, flag: str, model: bool = False) -> Path | None:
        """Check an output path; returns it resolved (None for None)."""
        if path is None:
            return None
        text = os.fspath(path)
        if not text or text.endswith(("/", os.sep)):
            raise GkpError(f"{flag} {text!r} is empty or ends with a slash: give a file name")
        try:
            target = Path(text).resolve()
            dangling = Path(text).is_symlink() and not Path(text).exists()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long, a path the system refuses
            raise GkpError(f"{flag} {text[:60]}: {getattr(exc, 'strerror', None) or exc}") from None
        if dangling:
            raise GkpError(f"{flag} {text} is a symbolic link to nothing")
        claimed = [target] + ([target.with_name(target.name + ".data")] if model else [])
        for source, what in list(self.models.items()):  # external data lives in (or below) the model's folder
            if target.is_relative_to(source.parent):
                del self.models[source]
                for location in _external_locations(source):
                    self.read(source.parent / location, f"external data of the {what}")
        for file in claimed:
            for read, what in self.reads.items():
                if file == read or _same_file(file, read):
                    raise GkpError(f"{flag} {text} would overwrite the {what} ({read}); the input is never modified")
            if file in self.targets:
                raise GkpError(f"{flag} {text} is also given as {self.targets[file]}")
        if target.is_dir():
            raise GkpError(f"{flag} {text} is a directory")
        if target.exists() and not target.is_file():
            raise GkpError(f"{flag} {text} is not a regular file")
        parent = target.parent
        if not parent.is_dir():
            raise GkpError(f"{flag}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise GkpError(f"{flag}: the folder {parent} is not writable")
        try:
            longest = os.pathconf(parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            longest = 255
        if max(len(os.fsencode(file.name)) for file in claimed) > longest:
            raise GkpError(f"{flag}: the file name {target.name[:40]}... is longer than the {longest} bytes "
                           f"the folder allows")
        remove_stale(parent)
        for file in claimed:
            self.targets[file] = flag
        return target

    def stage(self, target: Path | None, write: Callable[[Path], object]) -> None:
        """Write `target` (an added output) into a temporary folder beside it, with its own name;
        `write(path)` may write more files there (a model's external data), moved along with it."""
        if target is None:
            return
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=target.parent))
        except OSError as exc:
            raise GkpError(f"cannot write to {target.parent}: {exc.strerror}") from None
        self.staged.append((folder, target))
        write(folder / target.name)

    def commit(self) -> None:
        try:
            for folder, target in self.staged:
                for file in sorted(folder.iterdir()):
                    os.replace(file, target.parent / file.name)
        except OSError as exc:
            raise GkpError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            self.discard()

    def discard(self) -> None:
        for folder, _ in self.staged:
            shutil.rmtree(folder, ignore_errors=True)
        self.staged = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def remove_stale(folder: Path) -> None:
    """Remove the temporary folders that runs killed before their end left in `folder`."""
    try:
        entries = [entry for entry in folder.iterdir() if entry.name.startswith(TMP_PREFIX)]
    except OSError:
        return
    for entry in entries:
        match = re.match(rf"{re.escape(TMP_PREFIX)}(\d+)-", entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _external_locations(path: Path) -> list[str]:
    """The external-data files a model names (read without loading them); [] when unreadable."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable model is load_model's to report, with its own words
        return []
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return sorted({entry.value for t in tensors for entry in t.external_data if entry.key == "location"})
