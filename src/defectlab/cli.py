"""``defectlab`` command line. Every command ends with one summary line saying where its
outputs went; errors are one line naming the file and the problem.

Exit status: 0 done; 1 ``data check`` found problems (listed); 2 the command could not run
(bad arguments or paths, unreadable data, an occupied port, no permission, a full disk, or
an unexpected failure, whose traceback is written to a log file the message names); 130
interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from defectlab import __version__, api, registry
from defectlab.data.io import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, image_limits
from defectlab.errors import ConfigError, DefectlabError, OutputError
from defectlab.evaluate import synthesis_cli

#: exit status of ``data check`` when it found problems
EXIT_PROBLEMS = 1
#: exit status of a command that could not run
EXIT_ERROR = 2

_OS_REASONS = {
    errno.EEXIST: "exists and is not a folder",
    errno.ENOTDIR: "part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "does not exist",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EADDRINUSE: "address already in use",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file or socket operation: the path, then what went wrong."""
    reason = _OS_REASONS.get(exc.errno or -1, exc.strerror or str(exc))
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that names a file or lies under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: {flag} names an existing file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{path}: {parent} is a file, so {flag} cannot be created")
            if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
                raise OutputError(f"{path}: permission denied to create it in {parent}")
            break
    return path


def _log_traceback(command: str, exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected failure to a file; ``None`` if even that fails."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(os.environ.get("DEFECTLAB_LOG_DIR") or tempfile.gettempdir())
    path = folder / f"defectlab-{command}-{stamp}-{os.getpid()}.log"
    try:
        path.write_text(
            f"defectlab {__version__} {command}: {sys.argv}\n"
            + "".join(traceback.format_exception(exc)),
            encoding="utf-8",
        )
    except OSError:
        return None
    return path


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def cmd_models(args: argparse.Namespace) -> str:
    entries = registry.available(args.family)
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        print(f"{e.name:<{width}}  {e.family:<11}  {e.description}")
    return f"{len(entries)} models registered"


def cmd_data_check(args: argparse.Namespace) -> tuple[str, int]:
    summary = api.check_data(
        args.path,
        layout=args.layout,
        category=args.category,
        mask_threshold=args.mask_threshold,
        workers=args.workers,
        max_pixels=args.max_pixels,
        min_side=args.min_side,
    )
    print(
        f"layout:   {summary['layout']}"
        + (f" (category {summary['category']})" if summary["category"] else "")
    )
    print(f"root:     {summary['root']}")
    print(f"normal:   {summary['n_normal']}")
    print(f"defect:   {summary['n_defect']} ({summary['n_defect_with_mask']} with masks)")
    if summary["n_uncertain"]:
        print(f"uncertain (kept out of metrics): {summary['n_uncertain']}")
    for kind, count in summary["defect_types"].items():
        print(f"  {kind}: {count}")
    for problem in summary["problems"]:
        print(f"problem: {problem}")
    line = (
        f"{summary['layout']}: {summary['n_normal']} normal, {summary['n_defect']} defect "
        f"images ({summary['n_defect_with_mask']} with masks), {len(summary['problems'])} problems"
    )
    return line, EXIT_PROBLEMS if summary["problems"] else 0


def cmd_train(args: argparse.Namespace) -> str:
    check_output_folder(args.out)
    if args.model == "auto":  # label-free model selection: defectlab.selection
        return _train_auto(args)
    run = api.train(
        args.model,
        args.data,
        args.out,
        category=args.category,
        image_size=args.image_size,
        device=args.device,
        seed=args.seed,
        overrides=args.set,
        resume=args.resume,
        distributed=args.distributed,
    )
    if args.distributed:
        from defectlab.distributed import launched_rank  # only this command needs it

        if launched_rank() != 0:  # one summary per torchrun launch: rank 0 prints it
            return ""
    chosen = "".join(  # what data-adaptive defaults chose, before the summary line
        f"{key}=auto → {choice['value']}: {choice['reason']}\n"
        for key, choice in run.config.resolved.items()
    )
    if not run.calibration:  # a learned synthesizer scores nothing, so has no thresholds
        return (
            f"{chosen}trained {run.config.model} → {run.run_dir} (sample it with `defectlab synth`)"
        )
    return (
        f"{chosen}trained {run.config.model} → {run.run_dir} (image threshold "
        f"{run.image_threshold:.4g}, pixel threshold {run.pixel_threshold:.4g})"
    )


def _train_auto(args: argparse.Namespace) -> str:
    from defectlab import selection

    if args.distributed:
        raise ConfigError("--model auto trains its candidates one by one: drop --distributed")
    chosen = selection.select(
        args.data,
        args.out,
        category=args.category,
        image_size=args.image_size,
        device=args.device,
        seed=args.seed,
        overrides=args.set,
        resume=args.resume,
    )
    print(f"model=auto → {chosen.chosen}: {chosen.reason}")
    return chosen.summary()


def cmd_predict(args: argparse.Namespace) -> str:
    check_output_folder(args.out)
    with image_limits(max_pixels=args.max_pixels):
        result = api.predict(
            args.run,
            args.input,
            args.out,
            device=args.device,
            backend=args.backend,
            tile=args.tile,
            batch_size=args.batch_size,
            workers=args.workers,
            overlays=not args.no_overlays,
        )
    resumed = f" (+{result['n_resumed']} done before)" if result["n_resumed"] else ""
    return (
        f"{result['n_images']} images inspected{resumed} with {result['backend']} "
        f"({result['images_per_second']:.1f} img/s), {result['n_defect']} of "
        f"{result['n_total']} flagged defective, {result['n_skipped']} skipped → "
        f"{result['out']}/scores.csv"
    )


#: formats ``defectlab export --format`` writes
EXPORT_FORMATS = ("onnx",)


def cmd_export(args: argparse.Namespace) -> str:
    from defectlab.deploy.onnx import export_onnx

    if args.format not in EXPORT_FORMATS:  # argparse admits only these; a direct caller may not
        raise ConfigError(f"--format {args.format!r}: defectlab exports to onnx only")
    if args.out is not None:
        check_output_folder(args.out)
    meta = export_onnx(args.run, args.out, quantize=args.quantize)
    check, int8 = meta["check"], meta["quantization"]
    if int8:
        return (
            f"exported {meta['model']} to int8 ONNX: decisions agree with PyTorch on "
            f"{int8['decision_agreement']:.1%} and mask pixels on {int8['mask_agreement']:.2%} "
            f"of {check['images']} images → {meta['out']}/model.onnx"
        )
    return (
        f"exported {meta['model']} to ONNX (opset {meta['opset']}); ONNX Runtime matches PyTorch "
        f"on {check['images']} images within {check['max_abs_score_diff']:.2g} (scores), "
        f"{check['max_abs_anomaly_map_diff']:.2g} (maps) → {meta['out']}/model.onnx"
    )


def cmd_evaluate(args: argparse.Namespace) -> str:
    check_output_folder(args.out)
    metrics = api.evaluate(
        args.run,
        args.data,
        args.out,
        category=args.category,
        device=args.device,
        include_uncertain=args.include_uncertain,
    )
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "iou", "f1"):
        print(f"{key:<12} {_fmt(metrics.get(key))}")
    return (
        f"image AUROC {_fmt(metrics['image_auroc'])} on {metrics['n_normal']} normal + "
        f"{metrics['n_defect']} defect test images ({metrics['split']}) → {args.out}/report.html"
    )


def cmd_synth(args: argparse.Namespace) -> str:
    check_output_folder(args.out)
    result = api.synthesize(
        args.method,
        args.normal,
        args.out,
        args.n,
        run=args.run,
        defects=args.defects,
        seed=args.seed,
        image_size=args.image_size,
        channels=args.channels,
        overrides=args.set,
    )
    return f"{result['n']} {args.method} defect images with masks → {result['out']}/manifest.csv"


def cmd_demo(args: argparse.Namespace) -> str:
    from defectlab.demo import run_demo

    check_output_folder(args.out)
    result = run_demo(Path(args.out), device=args.device)
    speed = (
        f"{result['inspect_images_per_second']:.0f} img/s"
        if result["inspect_resumed"] < result["inspected"]
        else "all reused from the earlier inspection"
    )
    print(
        f"ONNX export matches PyTorch within {result['onnx_max_score_diff']:.1g}; "
        f"{result['inspected']} test cells inspected with ONNX Runtime ({speed}), "
        f"{result['inspected_defective']} flagged → {result['inspect_results']}"
    )
    return (
        f"demo: {result['model']} on ELPV solar cells, image AUROC {_fmt(result['image_auroc'])} "
        f"({result['seconds']:.0f} s) → {result['report']}"
    )


def cmd_serve(args: argparse.Namespace) -> str:
    from defectlab.deploy.serve import API_KEY_ENV, read_api_keys, serve

    keys = list(args.api_key or [])
    if args.api_key_file:
        keys += read_api_keys(args.api_key_file)
    keys += [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    serve(
        args.run,
        backend=args.backend,
        device=args.device,
        host=args.host,
        port=args.port,
        tile=args.tile,
        max_upload_bytes=round(args.max_upload_mb * 2**20),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_pixels=args.max_pixels,
        api_keys=keys,
        insecure=args.insecure,
    )
    return f"stopped serving {args.run} on http://{args.host}:{args.port}"


#: ``--tile`` values → the ``tile`` argument of predict and serve (None: as the run trained)
TILE_FLAGS = {"auto": None, "on": True, "off": False}


def _tile_flag(text: str) -> bool | None:
    if text not in TILE_FLAGS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TILE_FLAGS)}, got {text!r}")
    return TILE_FLAGS[text]


def _add_tile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tile",
        nargs="?",
        type=_tile_flag,
        const=True,
        default=None,
        metavar="auto|on|off",
        help="score images as overlapping native-resolution model-size tiles, maps stitched "
        "(--tile alone: on); auto (default): as the run was trained (data.tile)",
    )


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        type=_pixels,
        default=DEFAULT_MAX_PIXELS,
        help="images declaring more pixels are refused before decoding (default "
        f"{DEFAULT_MAX_PIXELS:.0e}; e.g. 2e8)",
    )


def _pixels(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of pixels: {text!r}") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(value)


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectlab",
        description="Visual inspection when defect images are scarce.",
    )
    parser.add_argument("--version", action="version", version=f"defectlab {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("--family", choices=registry.FAMILIES)
    p.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("check", help="detect the layout, count images/masks, find bad files")
    p.add_argument("path", help="dataset folder, or 'elpv' for the bundled solar cells")
    p.add_argument("--layout", default="auto", help="auto, mvtec, folder, magnetic-tile, elpv")
    p.add_argument("--category", help="MVTec AD category")
    p.add_argument(
        "--mask-threshold",
        type=int,
        default=127,
        help="mask pixels above this (8-bit scale) are defect",
    )
    p.add_argument("--workers", type=int, default=2)
    _add_max_pixels(p)
    p.add_argument(
        "--min-side",
        type=int,
        default=DEFAULT_MIN_SIDE,
        help="report images whose shorter side is below this (training skips them)",
    )
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="train a detector or segmenter into a run directory")
    p.add_argument(
        "--model", required=True, help="a name from `defectlab models`, or auto (label-free choice)"
    )
    p.add_argument("--data", required=True, help="dataset folder, or 'elpv'")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--category", help="MVTec AD category")
    p.add_argument("--image-size", type=int, help="model input size in pixels (default 128)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting: data.image_size=64, train.batch_size=8, "
        "calibration.image_quantile=0.995, or a model field (epochs=3)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one of several processes started by torchrun (gloo on CPU, nccl on CUDA): "
        "each trains on its share of every batch, rank 0 writes the run",
    )
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="score images with a trained run")
    p.add_argument("--run", required=True)
    p.add_argument(
        "--input", required=True, help="an image file or a folder (searched recursively)"
    )
    p.add_argument("--out", required=True)
    _add_tile(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="image decoding/writing threads")
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: run the export in --run (or --run/export) with ONNX Runtime",
    )
    p.add_argument("--no-overlays", action="store_true", help="write masks and scores only")
    _add_max_pixels(p)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained run to ONNX with its thresholds baked in")
    p.add_argument("--run", required=True)
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="onnx",
        help="graph format (only onnx so far): model.onnx plus metadata.json",
    )
    p.add_argument("--out", help="export folder (default RUN/export)")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="static int8 graph calibrated on the run's validation images (faster on CPU)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="metrics and report on the test split of a dataset")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--category")
    p.add_argument(
        "--include-uncertain",
        action="store_true",
        help="ELPV: count probability 1/3 and 2/3 cells as defective",
    )
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("synth", help="synthesize defect images with exact masks")
    p.add_argument("--method", required=True, help="a synthesizer from `defectlab models`")
    p.add_argument("--normal", required=True, help="folder of normal images or a dataset")
    p.add_argument("--defects", help="folder of real defect examples (learned methods)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run", help="trained run directory (learned methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, help="resize normal images first (default: native)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a synthesizer setting, e.g. shapes=scratch",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("serve", help="serve a trained run over HTTP (POST /inspect)")
    p.add_argument("--run", required=True, help="run folder (or export folder for --backend onnx)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    _add_tile(p)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get 413")
    p.add_argument(
        "--max-concurrency", type=int, default=2, help="inferences running at once (threads)"
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond those get 503"
    )
    _add_max_pixels(p)
    p.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="require this key (Authorization: Bearer KEY or X-API-Key: KEY) on every request "
        "but /health; repeat for several. Prefer DEFECTLAB_API_KEY (comma-separated) or "
        "--api-key-file: arguments are visible to other users in the process list",
    )
    p.add_argument("--api-key-file", help="a file with one accepted key per line")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key (anyone who reaches it can use it)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the main job on the bundled ELPV solar cells")
    p.add_argument("--out", default="demo-output")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    synthesis_cli.add_parser(sub)
    from defectlab.app.cli import register as register_workbench

    register_workbench(sub)  # app, inspect, retrain: the inspection workbench
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure becomes one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], str | tuple[str, int]] = args.func
    started = time.perf_counter()
    try:
        outcome = func(args)
    except KeyboardInterrupt:
        hint = " (resume training with --resume)" if args.command == "train" else ""
        print(f"defectlab {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        print(f"defectlab {args.command}: {_one_line(args.command, exc)}", file=sys.stderr)
        return EXIT_ERROR
    summary, code = outcome if isinstance(outcome, tuple) else (outcome, 0)
    if summary:  # empty for the non-main processes of a distributed run
        print(f"{summary} [{time.perf_counter() - started:.1f} s]")
    return code


def _one_line(command: str, exc: Exception) -> str:
    """Expected failures say what and where; anything else names the log of its traceback."""
    if isinstance(exc, DefectlabError):
        return f"error: {exc}"
    if isinstance(exc, OSError):
        return f"error: {describe_os_error(exc)}"
    if isinstance(exc, MemoryError):
        return "error: out of memory (lower --batch-size or --workers, or data.max_pixels)"
    log = _log_traceback(command, exc)
    where = f"traceback in {log}" if log else "rerun with --traceback to see where"
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"unexpected error: {type(exc).__name__}: {first} ({where}; please report it)"
