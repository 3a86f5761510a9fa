"""The gkp-onnx command line: one module per subcommand, argument groups shared (args.py); it
parses arguments and calls the library, no algorithm lives here."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from gkp_onnx.cli import bench, compare, demo, inspect, optimize, recover, sweep
from gkp_onnx.errors import GkpError


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit code 2), like every other bad input; -h shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gkp-onnx", description="Grouped Kernel Pruning compiler for ONNX models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in (optimize, sweep, inspect, compare, recover, bench, demo):
        command.register(sub)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: staged outputs are removed on the way out


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    given = sys.argv[1:] if argv is None else argv
    bare = next((arg for arg in given if arg.startswith("--") and arg.endswith("=--")), None)
    if bare is not None:  # argparse would take "--" as "no value" and hand on an empty list
        parser.error(f"argument {bare[:-3]}: expected a value, got '--'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # its warnings and errors: gkp-onnx says what failed, in one line
    try:
        code = args.func(args)
        sys.stdout.flush()  # a pipe's buffer is written here, where a closed reader is caught below
        return code
    except GkpError as exc:
        print(f"gkp-onnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gkp-onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read stdout stopped (`| head`): nothing more to say to anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as exc:
        if args.debug:
            raise
        print(f"gkp-onnx: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 3

