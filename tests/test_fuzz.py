"""Fuzzing the command line (issue 22, item 7): one invariant for every input.

Whatever the arguments and files, `gkp-onnx` either
  * exits 0 and writes exactly its outputs, each valid (an output model passes onnx.checker and
    loads in onnxruntime; a JSON output parses), touching no other file; or
  * exits 1 (only where a fidelity threshold or `optimize --bench` was asked for): outputs as
    for 0 (README: "the model is still written") and FAILED on stdout; or
  * exits 2 with exactly one line on stderr, starting with "gkp-onnx", having written nothing
    (the folders it was given hold the same files, byte for byte, as before);
never exit 3 (internal error) or any other code, never a traceback, never a changed input.
"Stderr" counts what a terminal would show: file descriptor 2, log records of level WARNING and
up (the CLI's logging.basicConfig sends them there), and Python warnings shown by default.

Part 1 draws flags with hypothesis (GKP_ONNX_FUZZ_EXAMPLES=N for N examples per test, randomized;
default 25, derandomized so CI runs the same examples); part 2 runs fixed lists of corrupted
models, calibration archives and saved plans (tests/mutations.py), and fixed flag cases.

Product bugs found are listed in KNOWN_BUGS: their reproducing cases are strict xfails (so the
suite notices the fix), and the hypothesis tests tolerate exactly those signatures while the bug
is open, recording each with hypothesis.event. Nothing else is tolerated.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fixtures import TOPOLOGIES
from mutations import DATA_MUTATIONS, MODEL_MUTATIONS, PLAN_MUTATIONS

from gkp_onnx.cli import main

EXAMPLES = int(os.environ.get("GKP_ONNX_FUZZ_EXAMPLES") or 25)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("GKP_ONNX_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large], database=None)
ZOO = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
THRESHOLD_FLAGS = ("--max-abs-diff", "--min-cosine", "--min-top1-agreement")
SHOWN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # hidden by default


# ============================================================== known product bugs

@dataclass(frozen=True)
class Bug:
    """An open invariant violation: its exit code and a pattern of the stderr it gives. With
    `fuzzed`, the hypothesis tests (which draw it) tolerate it; the CASE_BUGS cases naming it are
    strict xfails."""
    reason: str
    code: int
    stderr: str  # regex searched in the stderr text
    fuzzed: bool = False
    argv: str = ""  # and in the command line

    def matches(self, result: "Result") -> bool:
        return result.code == self.code and re.search(self.stderr, result.err) is not None \
            and re.search(self.argv, " ".join(result.argv)) is not None


KNOWN_BUGS: dict[str, Bug] = {}  # none open
# Fixed since the suite found them (their cases now pass and guard against regressions): a model
# that loads but cannot run, initializers whose bytes do not fit their dims, Conv group 0 or not
# dividing the channels, bench --repeats/--min-time/--threads out of range, --exclude regexes that
# overflow, .npz members that are not arrays, plans that are not plans or do not fit the model,
# --flag=-- (argparse hands on an empty list), and N:M calibration scores on Convs GKP made grouped.


# ============================================================== running the CLI

@dataclass
class Result:
    argv: list[str]
    code: object
    out: str
    err: str  # fd 2, then log records, then shown warnings, one per line
    err_lines: list[str] = field(default_factory=list)

    def command(self) -> str:
        return "gkp-onnx " + " ".join(shlex.quote(a) for a in self.argv)

    def describe(self) -> str:
        return f"{self.command()} | exit {self.code} | stderr: {self.err!r} | stdout tail: {self.out[-300:]!r}"


def run_cli(argv: list[str], capfd, caplog) -> Result:
    capfd.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors (and -h)
            code = exc.code
    captured = capfd.readouterr()
    logged = [line for r in caplog.records if r.levelno >= logging.WARNING for line in r.getMessage().splitlines()]
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, SHOWN_WARNINGS)]
    lines = [line for line in captured.err.splitlines() if line.strip()] + logged + shown
    return Result(argv, code, captured.out, "\n".join(lines), lines)


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root: relative path -> sha256 (or '<dir>')."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "<link>" + os.readlink(path)
        elif path.is_dir():
            state[rel] = "<dir>"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def valid_model(path: Path) -> None:
    onnx.checker.check_model(str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_invariant(result: Result, root: Path, before: dict[str, str], outputs: dict[Path, str] = {},
                    exit1_allowed: bool = False) -> None:
    """The invariant (module docstring). `outputs`: the files a success writes -> 'model' or 'json'."""
    what = result.describe()
    assert "Traceback" not in result.err and "Traceback" not in result.out, what
    allowed = {0, 2} | ({1} if exit1_allowed else set())
    assert result.code in allowed, f"exit code {result.code} (allowed: {sorted(allowed)}): {what}"
    after = tree(root)
    if result.code == 2:
        assert len(result.err_lines) == 1 and result.err_lines[0].startswith("gkp-onnx"), \
            f"exit 2 without exactly one 'gkp-onnx' line on stderr: {what}"
        changed = sorted(set(before.items()) ^ set(after.items()))
        assert after == before, f"files changed or left behind on failure: {changed}: {what}"
        return
    if result.code == 1:
        assert "FAILED" in result.out, f"exit 1 without FAILED on stdout: {what}"
    expected = {str(p.relative_to(root)) for p in outputs}
    missing = [p for p in expected if p not in after]
    assert not missing, f"outputs missing after exit {result.code}: {missing}: {what}"
    extra = sorted(set(after) - set(before) - expected)
    assert not extra, f"unexpected files after exit {result.code}: {extra}: {what}"
    touched = sorted(p for p in before if p not in expected and after.get(p) != before[p])
    assert not touched, f"files other than the outputs changed: {touched}: {what}"
    for path, kind in outputs.items():
        if kind == "model":
            try:
                valid_model(path)
            except Exception as exc:
                raise AssertionError(f"invalid output model {path.name}: {exc}: {what}") from None
        else:
            json.loads(path.read_text())


def tolerated(result: Result) -> str | None:
    """The KNOWN_BUGS entry (drawn by the hypothesis tests) this result is."""
    for name, bug in KNOWN_BUGS.items():
        if bug.fuzzed and bug.matches(result):
            return name
    return None


def check_or_known(result: Result, root, before, outputs={}, exit1_allowed=False) -> None:
    """check_invariant, except for a result that is a known open bug (recorded as an event)."""
    event(f"exit {result.code}")
    if result.code in (0, 1) and result.err_lines:  # allowed, but worth a look in --hypothesis-show-statistics
        event(f"exit {result.code} with stderr: {result.err_lines[0][:60]}")
    try:
        check_invariant(result, root, before, outputs, exit1_allowed)
    except AssertionError:
        name = tolerated(result)
        if name is None:
            raise
        event(f"known bug {name}")
        note(f"known bug {name}: {result.describe()}")


# ============================================================== files the cases use

@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Fixture models (and the zoo model), a pruned residual for compare, and its saved plan."""
    folder = tmp_path_factory.mktemp("fuzz-sources")
    with pytest.MonkeyPatch.context() as env:  # as conftest's autouse fixtures, for this session-wide work
        env.setenv("GKP_ONNX_CACHE", str(folder / "cache"))
        env.setenv("GKP_ONNX_NCHWC_BLOCK", "1")
        paths = {}
        for name in TOPOLOGIES:
            paths[name] = folder / f"{name}.onnx"
            onnx.save(TOPOLOGIES[name](), paths[name])
        if ZOO.exists():
            paths["zoo"] = ZOO
        paths["residual_pruned"], paths["plan"] = folder / "residual_pruned.onnx", folder / "plan.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(["optimize", str(paths["residual"]), str(paths["residual_pruned"]), "--ratio", "0.5",
                         "--save-plan", str(paths["plan"])])
        assert code == 0
    return paths


class Workspace:
    """A temporary root with in/ (inputs: models, data) and out/ (where outputs go)."""

    def __init__(self, root: Path, sources: dict[str, Path]):
        self.root, self.sources = root, sources
        self.inp, self.out = root / "in", root / "out"
        self.inp.mkdir()
        self.out.mkdir()

    def model(self, name: str) -> Path:
        """A copy of a source model in in/ ('zoo' falls back to residual where onnx has none)."""
        if name == "zoo" and name not in self.sources:
            name = "residual"
        path = self.inp / f"{name}.onnx"
        if not path.exists():
            shutil.copyfile(self.sources[name], path)
        return path

    def any_model(self, name: str) -> Path:
        """A model, or something given where a model is expected."""
        if name == "missing":
            return self.inp / "missing.onnx"
        if name == "folder":
            return self.inp
        if name == "junk":
            return self.file("junk.onnx", b"\x08\x07garbage")
        return self.model(name)

    def file(self, name: str, data: bytes) -> Path:
        path = self.inp / name
        path.write_bytes(data)
        return path

    def calibration(self, mutation: str) -> Path:
        """in/data.npz: a DATA_MUTATIONS entry of 4 samples for an [N, 8, 10, 10] input, 10 classes."""
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 8, 10, 10)).astype(np.float32)
        y = rng.integers(0, 10, 4).astype(np.int64)
        return self.file("data.npz", DATA_MUTATIONS[mutation](self.inp, x, y))

    def plan(self, mutation: str) -> Path:
        """in/plan.json: a PLAN_MUTATIONS entry of the residual fixture's plan at ratio 0.5."""
        plan = json.loads(self.sources["plan"].read_text())
        return self.file("plan.json", PLAN_MUTATIONS[mutation](plan).encode())


@pytest.fixture
def workspace(sources):
    with tempfile.TemporaryDirectory(prefix="gkp-fuzz-") as tmp:
        yield Workspace(Path(tmp), sources)


class new_workspace:
    """A Workspace for one hypothesis example (a function-scoped fixture would be shared)."""

    def __init__(self, sources):
        self.sources = sources

    def __enter__(self) -> Workspace:
        self.tmp = tempfile.TemporaryDirectory(prefix="gkp-fuzz-")
        return Workspace(Path(self.tmp.name), self.sources)

    def __exit__(self, *exc):
        self.tmp.cleanup()


# ============================================================== strategies

def sometimes(valid: st.SearchStrategy, invalid: st.SearchStrategy, one_in: int = 4) -> st.SearchStrategy:
    """`invalid` about one time in `one_in`, else `valid` (so runs that reach the work are common)."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda bad: invalid if bad else valid)


NO_NUL = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8)
JUNK = st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e999", "-0", "0x10", "1_0", "1,2", "abc", "auto",
                        "None", "--", "-", "٣", "²", "1.5", "-1", "0", "1e-320", str(2 ** 64),
                        str(-2 ** 64)]) | NO_NUL
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True).map(repr)
ANY_INT = st.sampled_from([0, 1, 2, 3, 4, 8, 16, -1, -2 ** 31, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64,
                           10 ** 30]).map(str) | st.integers(-2 ** 70, 2 ** 70).map(str)
BAD_NUMBER = ANY_FLOAT | ANY_INT | JUNK


def flag(name: str, values: st.SearchStrategy) -> st.SearchStrategy:
    """A flag with a value, written as --flag=value or as two words."""
    return st.tuples(values, st.booleans()).map(lambda v: [f"{name}={v[0]}"] if v[1] else [name, v[0]])


def decimal(low: float, high: float) -> st.SearchStrategy:
    return st.floats(low, high).map(repr)


DIM = st.sampled_from(["-1", "0", "1", "2", "3", "8", "10", "16", str(2 ** 31), str(2 ** 62), "a", "", " 8", "1.0"])
INPUT_SHAPE = sometimes(
    st.sampled_from(["x:1,8,10,10", "x:2,8,10,10", "x:3,8,10,10", "x:16,8,10,10"]),
    st.one_of(st.tuples(st.sampled_from(["x", "y", "", "x:x", "batch", "X"]),
                        st.lists(DIM, max_size=5).map(",".join)).map(lambda t: f"{t[0]}:{t[1]}"),
              st.sampled_from(["x:1,8,4,4", "x:1,8,1,1", "x:1,3,10,10", "x:1,8,10", "x", "x:", ":1,8,10,10",
                               f"x:{2 ** 31},8,10,10"]), JUNK), one_in=2)
NM = sometimes(st.sampled_from(["2:4", "1:2", "4:8", "1:4", "3:4", "1:1", "8:16"]),
               st.one_of(st.tuples(st.sampled_from(["-1", "0", "5", "4", str(2 ** 40), "a", ""]),
                                   st.sampled_from(["-1", "0", "3", "16", str(2 ** 40), "a", ""]))
                         .map(lambda t: f"{t[0]}:{t[1]}"), st.sampled_from(["2:4:8", "2/4", ":", "4:2"]), JUNK))
REGEX = sometimes(st.sampled_from([".*", "", "conv", "conv1", "^conv[0-9]+$", "weight", "(?i)CONV", "conv3\\.weight",
                                   "a|b", "nothing"]),
                  st.sampled_from(["(", "[a-", "*", "a{1,2", "(?P<x", "\\", "(?<=a+)b", "x{99999999999}", "\\p{L}",
                                   "(a)\\2", "x{4294967296}"]) | NO_NUL)
BATCHES = sometimes(st.sampled_from(["1", "2", "1,2", "2,1,1", "3"]),
                    st.sampled_from(["0", "-1", "4097", "a", "", "1,", "1.5", str(2 ** 64), "1,,2"]))
THRESHOLD = st.one_of(
    flag("--max-abs-diff", sometimes(st.sampled_from(["1e-9", "0", "1e-3", "1", "100"]) | decimal(0, 10),
                                     BAD_NUMBER)),
    flag("--min-cosine", sometimes(st.sampled_from(["0.5", "0.99", "-1", "1", "0.999999"]) | decimal(-1, 1),
                                   BAD_NUMBER)),
    flag("--min-top1-agreement", sometimes(st.sampled_from(["0", "0.5", "1"]) | decimal(0, 1), BAD_NUMBER)))
BENCH = st.tuples(BATCHES, sometimes(st.just("0"), st.sampled_from(["-1", "nan", "inf", "x"])),
                  sometimes(st.just("1"), st.sampled_from(["0", "-1", "x"])),
                  st.sampled_from([None, None, "cpu", "cuda", "tpu"]),
                  st.sampled_from([None, None, "1", "2", "0", "-1", str(2 ** 31), str(2 ** 64)])).map(
    lambda t: ["--bench", f"--bench-batch={t[0]}", f"--bench-min-time={t[1]}", f"--bench-repeats={t[2]}"]
    + (["--providers", t[3]] if t[3] else []) + ([f"--threads={t[4]}"] if t[4] else []))

OPTIMIZE_FLAGS = st.one_of(
    flag("--ratio", sometimes(st.sampled_from(["0", "0.25", "0.5", "0.75", "0.9"]) | decimal(0, 0.999),
                              BAD_NUMBER | st.sampled_from(["1", "-0.1", "1.0000001"]))),
    flag("--groups", sometimes(st.sampled_from(["auto", "1", "2", "4", "8", "16", "3"]),
                               st.sampled_from(["0", "-1", str(2 ** 64), "Auto"]) | JUNK)),
    flag("--method", sometimes(st.sampled_from(["leanflex", "l2", "random", "tmi", "sr"]),
                               st.sampled_from(["LEANFLEX", "", "foo"]))),
    flag("--seed", sometimes(st.integers(0, 2 ** 32 - 1).map(str), BAD_NUMBER)),
    flag("--min-group-width", sometimes(st.sampled_from(["1", "2", "4", "8", "16", "1000"]), BAD_NUMBER)),
    flag("--speed-weight", sometimes(decimal(0, 100) | st.sampled_from(["0", "1e30"]), BAD_NUMBER)),
    flag("--channel-multiple", sometimes(st.sampled_from(["auto", "1", "2", "3", "4", "8", "16", "1000",
                                                          str(2 ** 100)]), JUNK)),
    flag("--cost-model", sometimes(st.just("analytic"), st.sampled_from(["bogus", ""]))),
    flag("--exclude", REGEX),
    THRESHOLD,
    flag("--input-shape", INPUT_SHAPE),
    flag("--nm", NM),
    flag("--ffn-ratio", sometimes(st.sampled_from(["0", "0.25", "0.5", "0.9"]) | decimal(0, 0.999),
                                  BAD_NUMBER | st.sampled_from(["1", "-0.1"]))),
    flag("--target-speedup", sometimes(st.sampled_from(["1.5", "2"]), BAD_NUMBER | st.sampled_from(["1", "0.5", "11"]),
                                       one_in=2)),
    flag("--head-ratio", sometimes(st.sampled_from(["0", "0.25", "0.5", "0.9"]) | decimal(0, 0.999),
                                   BAD_NUMBER | st.sampled_from(["1", "-0.1"]))),
    st.sampled_from([["--include-stem"], ["--no-gkp"], ["--no-cache"], ["--no-share-streams"], ["--nm-conv"],
                     ["--nm-include-head"], ["--no-nm-permute"], ["--reconstruct"],
                     ["--nm-method", "sparsegpt"]]),
    BENCH,
)


def pick_path(ws: Workspace, choice: str, model_in: Path, model_out: Path | str, name: str) -> str:
    return str({"fresh": ws.out / name, "input": model_in, "output": model_out, "folder": ws.out,
                "in_folder": ws.inp / name, "missing_folder": ws.out / "missing" / name,
                "slash": f"{ws.out / name}/", "dot": f"{ws.out}/."}[choice])


PATH_CHOICES = sometimes(st.just("fresh"), st.sampled_from(["input", "output", "folder", "in_folder",
                                                              "missing_folder", "slash", "dot"]))


def has_threshold(argv: list[str]) -> bool:
    return any(a.split("=")[0] in THRESHOLD_FLAGS for a in argv)


def flatten(lists) -> list[str]:
    return [word for words in lists for word in words]


# ============================================================== part 1: flags

@FUZZ
@given(topology=st.sampled_from(["residual", "chain", "classifier"]) | st.sampled_from(sorted(TOPOLOGIES)),
       flags=st.lists(OPTIMIZE_FLAGS, max_size=6).map(flatten),
       output=sometimes(st.just("fresh"), st.sampled_from(["input", "folder", "missing_folder", "slash", "in_folder",
                                                            "dot"]), one_in=6),
       report=st.none() | PATH_CHOICES, plan=st.none() | PATH_CHOICES,
       calib=sometimes(st.sampled_from([None, None, "valid", "valid_no_labels"]),
                       st.sampled_from(sorted(DATA_MUTATIONS))),
       replay=sometimes(st.none(), st.sampled_from(sorted(PLAN_MUTATIONS)), one_in=6))
def test_optimize_flags(sources, topology, flags, output, report, plan, calib, replay, capfd, caplog):
    with new_workspace(sources) as ws:
        model = ws.model(topology)
        out = pick_path(ws, output, model, ws.out / "out.onnx", "out.onnx")
        argv = ["optimize", str(model), out] + flags
        outputs = {Path(out): "model"}
        for option, choice, name in (("--report", report, "report.json"), ("--save-plan", plan, "plan.json")):
            if choice is not None:
                path = pick_path(ws, choice, model, out, name)
                argv += [option, path]
                outputs[Path(path)] = "json"
        if calib is not None:
            argv += ["--calib", str(ws.calibration(calib))]
        if replay is not None:
            argv += ["--plan", str(ws.plan(replay))]
        before = tree(ws.root)
        result = run_cli(argv, capfd, caplog)
        check_or_known(result, ws.root, before, outputs, exit1_allowed=has_threshold(argv) or "--bench" in argv)


def _elements(dtype):
    kind = np.dtype(dtype).kind
    if kind == "f":
        return st.floats(allow_nan=True, allow_infinity=True, width=16) | st.floats(-3, 3, width=16)
    if kind == "c":
        return st.complex_numbers(allow_nan=True, allow_infinity=True, width=64)
    if kind == "b":
        return st.booleans()
    info = np.iinfo(dtype)
    return st.integers(int(info.min), int(info.max))


def npz_arrays() -> st.SearchStrategy:
    """The arrays of a `compare --data` archive: often right (finite float32 [N, 8, 10, 10], labels
    in range), else NaN, other dtypes, wrong shapes, zero samples, huge zero-size dims."""
    good_x = st.integers(1, 3).flatmap(lambda n: hnp.arrays(np.float32, (n, 8, 10, 10), elements=st.floats(
        -3, 3, width=32)))
    dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_,
                              np.complex64])
    shapes = st.one_of(st.integers(0, 3).map(lambda n: (n, 8, 10, 10)),
                       st.sampled_from([(2, 8, 10, 11), (2, 3, 10, 10), (8, 10, 10), (1, 1, 8, 10, 10), (), (2,),
                                        (0, 0, 0, 0)]),
                       hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))
    bad_x = st.one_of(st.tuples(dtypes, shapes).flatmap(lambda t: hnp.arrays(t[0], t[1], elements=_elements(t[0]))),
                      st.sampled_from([(2 ** 31, 8, 0, 10), (0, 2 ** 31, 10, 10), (0, 8, 10, 10)])
                      .map(lambda shape: np.zeros(shape, np.float32)))
    x = sometimes(good_x, bad_x, one_in=2)
    labels = sometimes(st.integers(1, 3).flatmap(lambda n: hnp.arrays(np.int64, (n,), elements=st.integers(0, 9))),
                       st.one_of(st.integers(0, 3).flatmap(lambda n: hnp.arrays(np.int64, (n,),
                                                                                  elements=st.integers(-2, 12))),
                                 hnp.arrays(st.sampled_from([np.float32, np.int8, np.uint64]),
                                            hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))))
    return st.fixed_dictionaries({"x": x}, optional={"y": labels, "input": x, "X": x})


@FUZZ
@given(pair=st.sampled_from([("residual", "residual_pruned"), ("residual", "residual"), ("chain", "residual"),
                             ("classifier", "classifier"), ("residual_pruned", "residual")]),
       arrays=st.none() | npz_arrays(),
       flags=st.lists(st.one_of(flag("--seed", sometimes(st.integers(0, 2 ** 32 - 1).map(str), BAD_NUMBER)),
                                flag("--input-shape", INPUT_SHAPE), THRESHOLD), max_size=4).map(flatten),
       data_path=sometimes(st.just("npz"), st.sampled_from(["missing", "folder", "model"])))
def test_compare_data(sources, pair, arrays, flags, data_path, capfd, caplog):
    with new_workspace(sources) as ws:
        reference, candidate = ws.model(pair[0]), ws.model(pair[1])
        if pair[0] == pair[1]:
            candidate = ws.file("copy.onnx", reference.read_bytes())
        argv = ["compare", str(reference), str(candidate)] + flags
        if arrays is not None:
            path = {"npz": ws.inp / "data.npz", "missing": ws.inp / "nope.npz", "folder": ws.inp,
                    "model": reference}[data_path]
            if data_path == "npz":
                buffer = io.BytesIO()
                np.savez(buffer, **arrays)
                path.write_bytes(buffer.getvalue())
            argv += ["--data", str(path)]
        before = tree(ws.root)
        result = run_cli(argv, capfd, caplog)
        check_or_known(result, ws.root, before, exit1_allowed=has_threshold(argv))


@FUZZ
@given(model=sometimes(st.sampled_from(["residual", "chain", "classifier", "residual_pruned", "zoo"]),
                       st.sampled_from(["missing", "folder", "junk"])),
       flags=st.lists(st.one_of(flag("--nm", NM), flag("--input-shape", INPUT_SHAPE), st.just(["--include-stem"])),
                      max_size=3).map(flatten))
def test_inspect_flags(sources, model, flags, capfd, caplog):
    with new_workspace(sources) as ws:
        path = ws.any_model(model)
        before = tree(ws.root)
        result = run_cli(["inspect", str(path)] + flags, capfd, caplog)
        check_or_known(result, ws.root, before)


@FUZZ
@given(models=st.lists(sometimes(st.sampled_from(["residual", "residual_pruned", "chain", "classifier"]),
                                 st.sampled_from(["missing", "folder", "junk"]), one_in=6), min_size=1, max_size=3),
       flags=st.lists(st.one_of(
           flag("--batch", BATCHES),
           flag("--warmup", sometimes(st.sampled_from(["0", "1"]), st.sampled_from(["-1", "x", "1.5"]))),
           flag("--repeats", sometimes(st.sampled_from(["1", "2"]), st.sampled_from(["0", "-1", "x"]))),
           flag("--min-time", sometimes(st.sampled_from(["0", "1e-6"]),
                                        st.sampled_from(["-1", "nan", "inf", "x", ""]))),
           flag("--threads", sometimes(st.sampled_from(["1", "2"]), st.sampled_from(["0", "-1", str(2 ** 31),
                                                                                     str(2 ** 64), "x"]))),
           st.sampled_from([["--providers", "cpu"], ["--providers", "cuda"], ["--providers", "cpu", "cpu"],
                            ["--providers", "tpu"]]),
           flag("--input-shape", INPUT_SHAPE)), max_size=4).map(flatten),
       json_path=st.none() | PATH_CHOICES)
def test_bench_flags(sources, models, flags, json_path, capfd, caplog):
    with new_workspace(sources) as ws:
        paths = [ws.any_model(m) for m in models]
        # fast by default: the fuzzed flags come after (argparse keeps the last)
        argv = ["bench"] + [str(p) for p in paths] + ["--warmup=1", "--repeats=1", "--min-time=0"] + flags
        outputs = {}
        if json_path is not None:
            path = pick_path(ws, json_path, paths[0], ws.out / "x.onnx", "timings.json")
            argv += ["--json", path]
            outputs[Path(path)] = "json"
        before = tree(ws.root)
        result = run_cli(argv, capfd, caplog)
        check_or_known(result, ws.root, before, outputs)


# ============================================================== part 2: corrupted files

# Parametrized cases that violate the invariant today: case id -> (KNOWN_BUGS key, its stderr line).
CASE_BUGS: dict[str, tuple[str, str]] = {}  # case id -> (KNOWN_BUGS key, its stderr line)
# (each line ends with " (rerun with --debug for the traceback)")


def cases(ids: list[str], argnames: int = 1) -> list:
    """pytest.param per case id ('a/b/c' splits into `argnames` arguments); strict xfail where
    CASE_BUGS names the case."""
    params = []
    for case in ids:
        marks = []
        if case in CASE_BUGS:
            key, line = CASE_BUGS[case]
            marks = [pytest.mark.xfail(strict=True, reason=f"exit {KNOWN_BUGS[key].code}, stderr: {line} [{key}]")]
        params.append(pytest.param(*case.split("/", argnames - 1), marks=marks, id=case))
    return params


BASES = ["residual", "squeezenet"]
COMMANDS = ["optimize", "inspect", "compare", "bench"]


def _base_model(name: str) -> onnx.ModelProto:
    if name == "squeezenet":
        if not ZOO.exists():
            pytest.skip(f"the onnx package has no {ZOO}")
        return onnx.load(ZOO)
    return TOPOLOGIES[name]()


@pytest.mark.parametrize("base,mutation,command", cases([f"{b}/{m}/{c}" for b in BASES for m in MODEL_MUTATIONS
                                                          for c in COMMANDS], 3))
def test_corrupted_model(base, mutation, command, capfd, caplog, workspace):
    ws = workspace
    model = _base_model(base)
    clean = ws.file("clean.onnx", model.SerializeToString())
    data = MODEL_MUTATIONS[mutation](model, ws.inp)
    if data is None:
        pytest.skip(f"{base} has nothing for {mutation}")
    path = ws.file("model.onnx", data)
    outputs = {}
    if command == "optimize":
        out = ws.out / "out.onnx"
        argv = ["optimize", str(path), str(out), "--report", str(ws.out / "report.json")]
        outputs = {out: "model", ws.out / "report.json": "json"}
    elif command == "inspect":
        argv = ["inspect", str(path)]
    elif command == "compare":
        argv = ["compare", str(path), str(clean)]
    else:
        argv = ["bench", str(path), str(clean), "--warmup=1", "--repeats=1", "--min-time=0",
                "--json", str(ws.out / "t.json")]
        outputs = {ws.out / "t.json": "json"}
    before = tree(ws.root)
    check_invariant(run_cli(argv, capfd, caplog), ws.root, before, outputs)


OUTPUT_PATH_CASES = ["data_file", "data_file_via_report", "data_file_via_plan", "outside_file",
                     "claimed_data_file", "same_output_twice", "beside_input"]


@pytest.mark.parametrize("case", cases(OUTPUT_PATH_CASES))
def test_outputs_and_external_data(case, capfd, caplog, workspace):
    """A model with external weights (in/weights.bin): no output may be its data file; an output
    model claims NAME.data too."""
    ws = workspace
    model = TOPOLOGIES["residual"]()
    if case == "outside_file":  # the model names ../outside.bin (onnx refuses to read it)
        data = MODEL_MUTATIONS["external_outside_folder"](model, ws.inp)
    else:
        data = MODEL_MUTATIONS["external_ok"](model, ws.inp)
    if case == "claimed_data_file":  # the input's data is in/out.onnx.data; the output in/out.onnx claims it
        (ws.inp / "weights.bin").replace(ws.inp / "out.onnx.data")
        data = _relocated(data, "out.onnx.data")
    path = ws.file("model.onnx", data)
    out, report, plan = ws.out / "out.onnx", ws.out / "report.json", None
    if case == "data_file":
        out = ws.inp / "weights.bin"
    elif case == "data_file_via_report":
        report = ws.inp / "weights.bin"
    elif case == "data_file_via_plan":
        plan = ws.inp / "weights.bin"
    elif case == "outside_file":
        out = ws.root / "outside.bin"
    elif case == "claimed_data_file":
        out = ws.inp / "out.onnx"
    elif case == "same_output_twice":
        report = out
    elif case == "beside_input":
        out = ws.inp / "pruned.onnx"
    argv = ["optimize", str(path), str(out), "--report", str(report)]
    outputs = {out: "model", report: "json"}
    if plan is not None:
        argv += ["--save-plan", str(plan)]
        outputs[plan] = "json"
    before = tree(ws.root)
    check_invariant(run_cli(argv, capfd, caplog), ws.root, before, outputs)


def _relocated(data: bytes, location: str) -> bytes:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model.SerializeToString()


DATA_COMMANDS = ["optimize", "reconstruct", "compare"]


@pytest.mark.parametrize("mutation,command", cases([f"{m}/{c}" for m in DATA_MUTATIONS for c in DATA_COMMANDS], 2))
def test_corrupted_calibration_data(mutation, command, capfd, caplog, workspace):
    ws = workspace
    model = ws.model("classifier")
    data = ws.calibration(mutation)
    outputs = {}
    if command == "compare":
        argv = ["compare", str(model), str(ws.file("candidate.onnx", model.read_bytes())), "--data", str(data)]
    else:
        out = ws.out / "out.onnx"
        argv = ["optimize", str(model), str(out), "--calib", str(data), "--ratio", "0.5"]
        argv += ["--reconstruct"] if command == "reconstruct" else []
        outputs = {out: "model"}
    before = tree(ws.root)
    check_invariant(run_cli(argv, capfd, caplog), ws.root, before, outputs)


PLAN_TARGETS = ["residual/" + m for m in PLAN_MUTATIONS] + ["chain/valid", "classifier/valid", "zoo/valid"]


@pytest.mark.parametrize("target,mutation", cases(PLAN_TARGETS, 2))
def test_corrupted_plan(target, mutation, capfd, caplog, workspace):
    """optimize --plan: the residual fixture's saved plan, corrupted, or replayed on another model."""
    ws = workspace
    if target == "zoo" and "zoo" not in ws.sources:
        pytest.skip(f"the onnx package has no {ZOO}")
    model, out, report = ws.model(target), ws.out / "out.onnx", ws.out / "report.json"
    argv = ["optimize", str(model), str(out), "--plan", str(ws.plan(mutation)), "--report", str(report)]
    before = tree(ws.root)
    check_invariant(run_cli(argv, capfd, caplog), ws.root, before, {out: "model", report: "json"})


# Flag values the hypothesis tests found violating the invariant (most fixed since; CASE_BUGS says
# which are open), kept as fixed cases, with a few controls: {model} is the residual fixture, {out}
# a fresh output, {calib} a valid calibration archive.
FLAG_CASES = {
    "optimize/ratio-0.5": ["optimize", "{model}", "{out}", "--ratio", "0.5"],  # controls
    "optimize/nm=--": ["optimize", "{model}", "{out}", "--nm=--"],
    "bench/repeats-1": ["bench", "{model}", "--min-time", "0", "--repeats", "1"],
    "bench/repeats-0": ["bench", "{model}", "--min-time", "0", "--repeats", "0"],
    "bench/repeats-negative": ["bench", "{model}", "--min-time", "0", "--repeats", "-1"],
    "bench/min-time-inf": ["bench", "{model}", "--repeats", "1", "--min-time", "inf"],
    "bench/min-time-nan": ["bench", "{model}", "--repeats", "1", "--min-time", "nan"],
    "bench/threads-2**31": ["bench", "{model}", "--repeats", "1", "--min-time", "0", "--threads", str(2 ** 31)],
    "optimize/bench-threads-2**31": ["optimize", "{model}", "{out}", "--bench", "--bench-repeats", "1",
                                     "--bench-min-time", "0", "--threads", str(2 ** 31)],
    "optimize/exclude-huge-repeat": ["optimize", "{model}", "{out}", "--exclude", "x{99999999999}"],
    "inspect/input-shape=--": ["inspect", "{model}", "--input-shape=--"],
    "bench/input-shape=--": ["bench", "{model}", "--repeats", "1", "--min-time", "0", "--input-shape=--"],
    "optimize/ratio=--": ["optimize", "{model}", "{out}", "--ratio=--"],
    "optimize/exclude=--": ["optimize", "{model}", "{out}", "--exclude=--"],
    "optimize/nm-conv-grouped-calib": ["optimize", "{model}", "{out}", "--groups", "2", "--channel-multiple", "2",
                                       "--nm", "2:4", "--nm-conv", "--calib", "{calib}"],
}


@pytest.mark.parametrize("name", cases(list(FLAG_CASES)))
def test_flag_case(name, capfd, caplog, workspace):
    ws = workspace
    model, out = ws.model("residual"), ws.out / "out.onnx"
    argv = [a.replace("{model}", str(model)).replace("{out}", str(out)) for a in FLAG_CASES[name]]
    if "{calib}" in argv:
        argv[argv.index("{calib}")] = str(ws.calibration("valid"))
    outputs = {out: "model"} if argv[0] == "optimize" else {}
    before = tree(ws.root)
    check_invariant(run_cli(argv, capfd, caplog), ws.root, before, outputs,
                    exit1_allowed=has_threshold(argv) or "--bench" in argv)
