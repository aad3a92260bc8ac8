"""Command line: argument parsing, exit codes, and printing the Report. Nothing else."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time

from . import __version__
from .pipeline import UnsupportedModel, fuse, no_collections
from .report import Validation
from .rules import DEFAULT_RULES, PATTERNS, RULES, describe
from .storage import io
from .storage.sinks import MemorySink
from .storage.staging import Staging
from .validate import DEFAULT_ATOL, DEFAULT_RTOL, ValidationError, validate

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_WOULD_FUSE = 1  # --dry-run --exit-code: not in deploy form (something to fuse, or a near miss)
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

EPILOG = """\
exit codes:
  0  success, including "nothing to fuse" (the model is re-saved unchanged)
  1  the fused model differs from the original, cannot be proven equal to it (every input
     empty, say), or onnxruntime cannot run it; nothing written
     (with --dry-run --exit-code: the model is not in deploy form, or was not searched)
  2  bad usage or bad input: a missing, empty, truncated or non-ONNX file (a PyTorch checkpoint,
     ...), missing external data, an unsupported opset, an output or report path that is a
     file the input reads, an input name the model lacks, a shape onnxruntime refuses, an
     original model onnxruntime cannot run (use --no-check), a model whose meaning
     onnx.checker leaves open (the default opset imported twice with different versions, a
     weight no reader takes); or out of memory
  3  internal error (a bug: please report it; ONNX_REPVGG_DEBUG=1 shows the traceback)
  130 interrupted; nothing written (once the output is in place, the message says it is complete)
"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, exit code 2 via main()
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnx-repvgg",
                description="Fuse re-parameterizable blocks (RepVGG and kin) of an ONNX model into\n"
                            "single convolutions, and prove the result with onnxruntime.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="ONNX model to read (external data is loaded from beside it)")
    p.add_argument("output", nargs="?", help="where to write the fused model (not needed with --dry-run)")
    p.add_argument("--no-check", action="store_true", help="skip validation with onnxruntime")
    p.add_argument("--check", type=int, default=1, metavar="N",
                   help="number of seeded random input sets to validate with (default 1)")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"relative tolerance (default {DEFAULT_RTOL:g}; 1e-2 for float16 outputs)")
    p.add_argument("--atol", type=float, default=None,
                   help=f"absolute tolerance (default {DEFAULT_ATOL:g}; 1e-3 for float16 outputs)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="an input's shape during validation (repeatable); dynamic dims are otherwise "
                        "chosen: batch 1, others large enough that every conv window meets data")
    p.add_argument("--input-data", action="append", default=[], metavar="NAME:FILE.npy",
                   help="real data for an input during validation (repeatable; .npy, no pickles)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs (default 0)")
    p.add_argument("--only", metavar="RULES", help="run only these rules (comma-separated; see --list-patterns)")
    p.add_argument("--skip", metavar="RULES", help="do not run these rules (comma-separated)")
    p.add_argument("--bn-to-conv", action="store_true",
                   help="turn BatchNormalizations that nothing absorbs into depthwise 1x1 Convs")
    p.add_argument("--allow-densify", action="store_true",
                   help="merge branches whose groups differ (e.g. depthwise beside dense), or whose dilations "
                        "need a kernel with more taps than the branches, into one denser conv")
    p.add_argument("--freeze-initializers", action="store_true",
                   help="treat initializers that are also graph inputs as constants, and remove them from "
                        "the inputs (IR 3 / keep_initializers_as_inputs exports)")
    p.add_argument("--list-patterns", action="store_true", help="list the rules and exit")
    p.add_argument("--dry-run", action="store_true", help="find and report blocks; write nothing")
    p.add_argument("--exit-code", action="store_true",
                   help="with --dry-run: exit 1 when the model is not in deploy form (a block would be "
                        "fused, or one was found that cannot be: a near miss) or was not searched, 0 when it "
                        "is (a CI gate)")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input file")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every block and the single-branch folds that do not apply (default: up to 30 blocks)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("--version", action="version", version=f"onnx-repvgg {__version__}")
    return p


def emit(*parts) -> None:
    """print() to stdout; when its reader has gone (| head), the rest goes nowhere and the run
    goes on: the exit code stays the run's own."""
    try:
        print(*parts, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise UsageError(f"--input-shape {spec!r}: expected NAME:D0,D1,...")
        try:
            shapes[name] = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--input-shape {spec!r}: dims must be integers") from None
        if not shapes[name] or any(d < 1 for d in shapes[name]):
            raise UsageError(f"--input-shape {spec!r}: dims must be >= 1 (a dim of 0 would compare nothing)")
    return shapes


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def choose_rules(args) -> list[str]:
    for name in _names(args.only) + _names(args.skip):
        if name not in RULES:
            raise UsageError(f"unknown rule {name!r}; known: {', '.join(RULES)}")
    chosen = _names(args.only) or list(DEFAULT_RULES)
    if args.bn_to_conv and "bn_to_conv" not in chosen:
        chosen.append("bn_to_conv")
    return [r for r in chosen if r not in _names(args.skip)]


def _split_name_path(spec: str) -> tuple[str, str, str]:
    """NAME:FILE split at the first colon after which an existing file is named, so that an input
    name may hold colons (tf2onnx's 'input:0') and a path may too (C:\\data\\x.npy); at the first
    colon when no split names a file (the error then names the file not found)."""
    at = spec.find(":")
    while at >= 0:
        if os.path.isfile(spec[at + 1:]):
            return spec[:at], ":", spec[at + 1:]
        at = spec.find(":", at + 1)
    return spec.partition(":")


def load_input_data(specs: list[str]) -> dict:
    import numpy as np

    feeds = {}
    for spec in specs:
        name, sep, path = _split_name_path(spec)
        if not sep or not name or not path:
            raise UsageError(f"--input-data {spec!r}: expected NAME:FILE.npy")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise io.BadInput(f"--input-data {spec!r}: cannot read a .npy array: {err}") from None
        value = feeds[name]
        if np.issubdtype(value.dtype, np.inexact) and np.isnan(value).any():
            raise UsageError(f"--input-data {spec!r}: holds NaN, which spreads through the model: a comparison "
                             "on it proves nothing")
    return feeds


def _tune_malloc() -> None:
    """Two glibc settings for this process (a no-op where glibc is absent):

    - M_TRIM_THRESHOLD: freed heap is not handed back to the OS between phases. The float64
      sums free large buffers; trimming them makes the next phase (serializing the model) fault
      the same pages in again, which measured about 3x slower on a 222 MB model. Peak memory is
      unchanged: the kept pages are reused.
    - M_MXFAST = 0: small freed chunks are merged when freed, not kept in "fast bins" to be
      merged all at once by the next larger request. onnx.checker frees ~10^5 small C++
      objects; merging them later cost ~60 ms on a 24,000-node model, and nothing measurable
      when freed.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(1, 0)  # M_MXFAST
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    _tune_malloc()
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help / --version
            return int(exit_.code or 0)
        if args.list_patterns:
            emit("rules:")
            for name in RULES:
                default = "" if name in DEFAULT_RULES else " (opt-in)"
                emit(f"  {name}{default}: {describe(name)}")
            emit("patterns:")
            width = max(len(family) for family, _, _ in PATTERNS)
            for family, diagram, rule in PATTERNS:
                emit(f"  {family:<{width}}  {diagram}   [{rule}]")
            return EXIT_OK
        if args.input is None:
            raise UsageError("an input model is required")
        if args.output is None and not args.dry_run:
            raise UsageError("an output path is required (or use --dry-run)")
        for flag, path in (("input", args.input), ("output", args.output), ("--json", args.json)):
            if path is not None and not path.strip():
                raise UsageError(f"the {flag} path is empty")
        if args.exit_code and not args.dry_run:
            raise UsageError("--exit-code goes with --dry-run (it reports whether anything would be fused)")
        if args.check < 1:
            raise UsageError("--check needs at least 1 input set")
        if args.seed < 0:
            raise UsageError("--seed must be 0 or more")
        for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
            if value is not None and not value >= 0:
                raise UsageError(f"{flag} must be >= 0, got {value}")
        if args.verbose and args.quiet:
            raise UsageError("-v and -q contradict each other")
        shapes = parse_shapes(args.input_shape)
        args.rules = choose_rules(args)
        args.feeds = load_input_data(args.input_data)
        for name, shape in shapes.items():
            if name in args.feeds and tuple(shape) != tuple(args.feeds[name].shape):
                raise UsageError(f"--input-shape {name}:{','.join(map(str, shape))} contradicts --input-data {name}, "
                                 f"of shape {','.join(map(str, args.feeds[name].shape))}")
        return _run(args, shapes)
    except UsageError as err:
        print(f"onnx-repvgg: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except io.BadInput as err:
        print(f"onnx-repvgg: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InterruptedAfterWriting as done:
        print(f"onnx-repvgg: interrupted after {done} was written (it is complete)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("onnx-repvgg: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("onnx-repvgg: error: out of memory; nothing written", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # a bug of ours: one line for users, the traceback on request
        if os.environ.get("ONNX_REPVGG_DEBUG"):
            raise
        print(f"onnx-repvgg: internal error: {type(err).__name__}: {' '.join(str(err).split())[:300]} "
              "(nothing written; set ONNX_REPVGG_DEBUG=1 for the traceback, and please report it)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _check_output_path(args) -> None:
    """What can be known of the output paths before the input is read."""
    if args.output is not None and not args.dry_run:
        if os.path.exists(args.input) and _same_file(args.input, args.output) and not args.overwrite:
            raise UsageError("output is the input file; pass --overwrite to replace it")
        _check_writable(args.output, "output")
        data = args.output + ".data"
        if os.path.isdir(data):  # where an output with external data puts its weights (staging.Staging)
            raise io.BadInput(f"the output's data file {data} is a directory")
    if args.json:
        _check_writable(args.json, "JSON report")


def _check_writable(path: str, what: str) -> None:
    if os.path.isdir(path):
        raise io.BadInput(f"{what} {path} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise io.BadInput(f"cannot write the {what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise io.BadInput(f"cannot write the {what} {path}: folder {folder} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise io.BadInput(f"{what} {path} is not writable")


def _check_outputs_spare_inputs(args, loaded) -> None:
    """No file written (the model, its data file, the JSON report) may be a file the input
    reads (the model or any of its external data files), by real path and by samefile. Only
    --overwrite of the input itself is allowed: then the input is replaced as a whole."""
    reads = [os.path.abspath(args.input)] + sorted(loaded.data_files)
    writes = []
    if args.output is not None and not args.dry_run:
        overwriting = _same_file(args.input, args.output)
        if not overwriting:
            writes.append((args.output, "output"))
        if not overwriting or not loaded.data_files:
            writes.append((args.output + ".data", "output's data file"))
    if args.json:
        writes.append((args.json, "JSON report"))
        if args.output is not None and not args.dry_run:
            for target in (args.output, args.output + ".data"):
                if _same_file(args.json, target):
                    raise UsageError(f"the JSON report {args.json} would overwrite the output {target}")
    for path, what in writes:
        for read in reads:
            if _same_file(read, path):
                raise UsageError(f"the {what} {path} would overwrite {read}, which the input reads")


def _declared_inputs(model, initializers) -> str:
    """The model's real inputs with their declared shapes, e.g. "x [N, 3, 224, 224]".
    `initializers`: the graph inputs that are initializers (io.LoadedModel.initializer_inputs)."""
    described = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
                for d in value.type.tensor_type.shape.dim]
        described.append(f"{value.name} [{', '.join(dims)}]")
    return ", ".join(described) or "(none)"


def _check_input_names(args, shapes, model, initializers) -> None:
    """--input-shape and --input-data must name inputs the model has. `initializers`: the graph
    inputs that are initializers (io.LoadedModel.initializer_inputs)."""
    real = [v.name for v in model.graph.input if v.name not in initializers]
    for flag, names in (("--input-shape", shapes), ("--input-data", args.feeds)):
        unknown = [name for name in names if name not in real]
        if unknown:
            raise UsageError(f"{flag} names {', '.join(repr(n) for n in unknown)}, which the model does not have; "
                             f"its inputs: {', '.join(real) or '(none)'}")


def _attach_block_checks(report) -> None:
    """Each fused block's record gets the max relative difference of its check alone."""
    by_node = {name: check for check in report.validation.blocks for name in check.nodes}
    for record in report.fused:
        check = by_node.get(record.fused_node or "")
        if check is not None and check.checked:
            record.check_max_rel_diff = check.max_rel_diff


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _run(args, shapes) -> int:
    _check_output_path(args)
    # The cyclic collector is off for the run, as in the pass (see pipeline.no_collections): the
    # loader, the pass and the writer leave no cyclic garbage, and the first collection after a
    # walk over a big model would scan every object of the modules imported (~60 ms) for nothing.
    with no_collections():
        return _run_staged(args, shapes)


class Progress:
    """'onnx-repvgg: fusing...' on stderr while a phase runs, only when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False

    def phase(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[Konnx-repvgg: {text}...")
            sys.stderr.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _use_color() -> bool:
    """ANSI colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _run_staged(args, shapes) -> int:
    say = (lambda *a: None) if args.quiet else emit
    args.color = _use_color()
    timings: dict[str, float] = {}
    progress = Progress(not args.quiet and sys.stderr.isatty())
    staging = None
    try:
        progress.phase("loading")
        t = time.perf_counter()
        # Weights stay on disk (external data, and large inline initializers too): they are read
        # per block, and untouched ones are copied to the output by byte range.
        loaded = io.load(args.input, load_external_data=False)
        timings["load"] = time.perf_counter() - t
        _check_outputs_spare_inputs(args, loaded)
        _check_input_names(args, shapes, loaded.model, loaded.initializer_inputs)
        args.declared = _declared_inputs(loaded.model, loaded.initializer_inputs)
        staging = None if args.dry_run else Staging(args.output)
        return _phases(args, shapes, loaded, staging, say, timings, progress)
    finally:
        progress.done()
        if staging is not None:
            staging.discard()  # a no-op after commit; removes everything on any failure


def _phases(args, shapes, loaded, staging, say, timings, progress) -> int:
    external = loaded.used_external_data or loaded.tensor_bytes > io.EXTERNAL_THRESHOLD
    # Fused weights go to the output's data file at once, or are kept as arrays for the writer.
    sink = staging.sink() if staging is not None and external else MemorySink()
    progress.phase("fusing")
    t = time.perf_counter()
    try:
        model, report = fuse(loaded.model, inplace=True, rules=args.rules, base_dir=loaded.base_dir, sink=sink,
                             allow_densify=args.allow_densify, freeze_initializer_inputs=args.freeze_initializers,
                             _initializer_elements=loaded.initializer_elements,
                             _stray_subgraphs=loaded.stray_subgraphs)
    except UnsupportedModel as err:
        raise io.BadInput(str(err)) from None
    timings["fuse"] = time.perf_counter() - t
    report.input_path = args.input
    report.size_before = loaded.size
    report.timings = timings

    if staging is None:
        progress.done()
        say(f"onnx-repvgg {__version__}: {args.input} (dry run, nothing written)")
        say(report.to_text(verbose=args.verbose, color=args.color, dry_run=True))
        _write_json(args, report)
        if args.exit_code and (report.fused or report.skipped or report.left_alone or report.unsearched):
            return EXIT_WOULD_FUSE  # (a model, or a part of it, not searched is not known to be in deploy form)
        return EXIT_OK

    # --allow-densify can grow it (a model with nothing fused has the tensors it had); the fused
    # model's tensors are at most the loaded ones plus the new ones, so most models are not walked
    external = external or (bool(report.fused) and loaded.tensor_bytes + sink.offered_bytes > io.EXTERNAL_THRESHOLD
                            and io.tensor_bytes(model) > io.EXTERNAL_THRESHOLD)
    progress.phase("saving")
    t = time.perf_counter()
    staging.write(model, external, loaded.base_dir, memory=sink if isinstance(sink, MemorySink) else None,
                  nested=loaded.nested_tensors)
    timings["save"] = time.perf_counter() - t
    del model, loaded, sink  # the staged file is the fused model from here on
    if not args.no_check:
        progress.phase("validating with onnxruntime")
        t = time.perf_counter()
        try:
            report.validation = validate(args.input, staging.model_path,
                                         input_sets=args.check, rtol=args.rtol, atol=args.atol,
                                         input_shapes=shapes, seed=args.seed, input_data=args.feeds)
        except ValidationError as err:
            progress.done()
            timings["validate"] = time.perf_counter() - t
            report.validation = Validation(passed=False, input_sets=args.check, error=str(err))
            given = args.input_shape or args.input_data
            advice = {"input": (f"Check --input-shape/--input-data against the model's inputs: {args.declared}"
                                if given else f"Give its input shapes with --input-shape NAME:D0,D1,... "
                                f"(the model's inputs: {args.declared})"),
                      "original": "The original model does not run in onnxruntime; --no-check writes the "
                                  "fused model unvalidated",
                      "sets": "Nothing written",
                      "unsupported": "--no-check writes the fused model unvalidated",
                      "fused": "Nothing written"}[err.side]
            print(f"onnx-repvgg: error: validation could not run: {str(err).rstrip('. ')}. {advice}.",
                  file=sys.stderr)
            _write_json_after_failure(args, report)
            return EXIT_VALIDATION_FAILED if err.side == "fused" else EXIT_BAD_INPUT
        timings["validate"] = time.perf_counter() - t
        _attach_block_checks(report)
    progress.done()
    if report.validation is not None and not report.validation.passed:
        say(f"onnx-repvgg {__version__}: {args.input} -> (not written)")
        say(report.to_text(verbose=args.verbose, color=args.color))
        validation = report.validation
        differs = any(not o.passed for o in validation.compared) or any(
            b.checked and not b.passed for b in validation.blocks)
        why = "differs from the original" if differs else \
            f"could not be proven equal to the original ({'; '.join(validation.notes) or 'nothing was compared'})"
        print(f"onnx-repvgg: error: the fused model {why}; nothing written", file=sys.stderr)
        _write_json_after_failure(args, report)
        return EXIT_VALIDATION_FAILED
    report.size_after = staging.size()
    report.output_path = args.output
    # The JSON report is staged before the model is moved into place: a report that cannot be
    # written fails the run (exit 2) with nothing written, never after the model was.
    pending = _stage_json(args, report)
    # The moves into place are one step for an interrupt: a Ctrl-C between the data file's and the
    # model's would leave an old model beside new data (the input itself, with --overwrite).
    with _interrupts_deferred() as interrupted:
        try:
            staging.commit()
        except BaseException:
            if pending is not None:
                os.unlink(pending)
            raise
        if pending is not None:
            os.replace(pending, args.json)
    try:
        if interrupted:
            raise KeyboardInterrupt
        say(f"onnx-repvgg {__version__}: {args.input} -> {args.output}")
        if not args.quiet:
            say(report.to_text(verbose=args.verbose, color=args.color))
        if args.no_check:
            say("validation: skipped (--no-check)")
    except KeyboardInterrupt:
        raise InterruptedAfterWriting(args.output) from None
    return EXIT_OK


class InterruptedAfterWriting(KeyboardInterrupt):
    """Interrupted once the output was in place (while the report was printed)."""


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT held while the block runs (in the main thread, where Python handles it); the list
    it yields is not empty afterwards if one came meanwhile."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # (no signal handling here)
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage_json(args, report) -> str | None:
    """Write the JSON report to a hidden file beside its target; return that file's path."""
    if not args.json:
        return None
    folder = os.path.dirname(os.path.abspath(args.json))
    path = None
    try:
        handle, path = tempfile.mkstemp(prefix=f".{os.path.basename(args.json)}.", suffix=".tmp", dir=folder)
        os.chmod(path, 0o666 & ~_umask())  # (mkstemp makes it 0600: the mode a new file gets, as the model's)
        with os.fdopen(handle, "w") as f:
            f.write(json_text(report.to_dict()))
            f.write("\n")
    except OSError as err:
        if path is not None:
            os.unlink(path)
        raise io.BadInput(f"cannot write the JSON report {args.json}: {err.strerror or err}") from None
    return path


def json_text(value, depth: int = 0) -> str:
    """JSON of a report: objects indented by two spaces, a list of objects or lists with one
    item per line, each item written compactly. (json.dump with indent=2 goes through the pure
    Python encoder, ~25 us a block record; each part here is one call of the C encoder.)"""
    pad = "  " * depth
    if isinstance(value, dict) and value:
        return "{\n" + ",\n".join(f"{pad}  {_json_key(key)}: {json_text(item, depth + 1)}"
                                    for key, item in value.items()) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(f"{pad}  {json.dumps(item)}" for item in value) + "\n" + pad + "]"
    return json.dumps(value)


def _json_key(key) -> str:
    """A dict key as json writes it: a string as it is, a number, bool or None as its JSON text
    in quotes."""
    return json.dumps(key) if isinstance(key, str) else json.dumps({key: 0})[1:-4]


def _write_json(args, report) -> None:
    pending = _stage_json(args, report)
    if pending is not None:
        os.replace(pending, args.json)


def _write_json_after_failure(args, report) -> None:
    """The report of a failed run: a report that cannot be written is said, but the exit code
    stays the failure's own."""
    try:
        _write_json(args, report)
    except io.BadInput as err:
        print(f"onnx-repvgg: error: {err}", file=sys.stderr)
