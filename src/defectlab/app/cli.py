"""Command-line entry points of the workbench: ``app``, ``inspect``, ``retrain``.

:func:`register` adds them to the ``defectlab`` parser; each returns its summary line and
raises :class:`~defectlab.errors.DefectlabError` for input it cannot use (exit code 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from defectlab.errors import ConfigError

DB_HELP = (
    "database URL: sqlite:///PATH (default: workbench.db beside the run) or "
    "postgresql://USER@HOST/NAME"
)


def _db_url(args: argparse.Namespace, run: str | None) -> str:
    from defectlab.app.db import default_url

    if args.db:
        return args.db
    if run is None:
        raise ConfigError("--db is required here (a database URL)")
    return default_url(Path(run).resolve().parent)


def cmd_inspect(args: argparse.Namespace) -> str:
    from defectlab.app.db import Database, files_dir
    from defectlab.app.ingest import ingest_folder, register_version, version_inspector

    if not Path(args.input).exists():
        raise ConfigError(f"{args.input}: --input does not exist")
    url = _db_url(args, args.run)
    db = Database(url)
    try:
        inspector = None
        version = register_version(db, args.run, device=args.device)
        inspector = version_inspector(version, args.device)
        result = ingest_folder(
            db,
            version,
            args.input,
            files_dir(url, args.files),
            inspector=inspector,
            batch_size=args.batch_size,
            workers=args.workers,
        )
    finally:
        db.close()
    return (
        f"inspect: {result['n_inspected']} new images inspected by version {version.id} "
        f"({result['n_flagged']} flagged), {result['n_already']} already in the database, "
        f"{result['n_skipped']} unreadable → {db.engine.url.render_as_string()}"
    )


def demo_inspection_input(run: Path) -> list[str]:
    """The input folder of a batch inspection of ``run`` found beside it (``defectlab demo``
    writes one), so ``app --run`` opens on those parts; empty when there is none."""
    import json

    for identity in sorted(run.resolve().parent.glob("*/inspection.json")):
        try:
            info = json.loads(identity.read_text())
        except (OSError, ValueError):
            continue
        named = Path(str(info.get("run", "")))
        candidates = {named.resolve(), (identity.parent.parent / named.name).resolve()}
        if run.resolve() in candidates and Path(str(info.get("input", ""))).is_dir():
            return [str(info["input"])]
    return []


def cmd_app(args: argparse.Namespace) -> str:
    from defectlab.app.web import run_app

    url = _db_url(args, args.run)
    scan = list(args.scan or [])
    if not scan and args.run:
        scan = demo_inspection_input(Path(args.run))
        if scan:
            print(f"scanning {scan[0]}, where this run's batch inspection read its images")
    for folder in scan:
        if not Path(folder).is_dir():
            raise ConfigError(f"{folder}: --scan names no folder")
    run_app(
        url,
        run=args.run,
        scan=scan,
        host=args.host,
        port=args.port,
        files=args.files,
        device=args.device,
        max_upload_mb=args.max_upload_mb,
        insecure=args.insecure,
    )
    return f"stopped the workbench on http://{args.host}:{args.port}"


def cmd_retrain(args: argparse.Namespace) -> str:
    from defectlab.app.db import Database, files_dir
    from defectlab.app.retrain import retrain

    db = Database(args.db)
    try:
        result: dict[str, Any] = retrain(
            db,
            files_dir(args.db, args.files),
            from_run=args.from_run,
            out=args.out,
            min_per_class=args.min_per_class,
            promote=args.promote,
            device=args.device,
            segmenter_epochs=args.epochs,
            synthesis=tuple(m for m in args.synthesis.split(",") if m),
            maskgan_epochs=args.maskgan_epochs,
        )
    finally:
        db.close()
    return result["summary"]


def register(sub: Any) -> None:
    """Add ``app``, ``inspect`` and ``retrain`` to the ``defectlab`` subcommands."""
    p = sub.add_parser("inspect", help="inspect a folder into the workbench database")
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--input", required=True, help="an image or a folder (searched recursively)")
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--files", help="folder for masks and heat maps (default beside the db)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, auto or cuda[:N]")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("app", help="the inspection workbench in the browser (review station)")
    p.add_argument("--run", help="trained run folder (registered as a model version)")
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--files", help="folder for masks and heat maps (default beside the db)")
    p.add_argument(
        "--scan",
        action="append",
        metavar="FOLDER",
        help="a folder the app inspects at start and on its Scan button (repeatable; default: "
        "the folder a batch inspection of --run beside it read, as `defectlab demo` writes)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get 413")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host (reads are then open to anyone who reaches it)",
    )
    p.add_argument("--device", default="cpu", help="cpu, auto or cuda[:N]")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser(
        "retrain", help="recalibrate (and retrain) a model from the reviews in the database"
    )
    p.add_argument("--db", required=True, help=DB_HELP)
    p.add_argument(
        "--from", dest="from_run", help="run of the version to improve (default: active)"
    )
    p.add_argument("--files", help="folder for masks and heat maps (default beside the db)")
    p.add_argument(
        "--out", help="folder for the new runs: segmenter, fused (default beside the run)"
    )
    p.add_argument(
        "--min-per-class",
        type=int,
        default=5,
        help="reviewed defects with masks needed per class to train a segmenter (K)",
    )
    p.add_argument("--epochs", type=int, default=30, help="segmenter training epochs")
    p.add_argument(
        "--synthesis",
        default="procedural,copy-paste",
        help="synthetic defects added to the segmenter's reviewed ones, comma-separated: "
        "procedural, copy-paste (the reviewed defects pasted on reviewed normals), maskgan "
        "(trains a MaskGAN on the reviewed defects first: slow on a CPU); empty for none",
    )
    p.add_argument(
        "--maskgan-epochs", type=int, default=20, help="MaskGAN epochs (with --synthesis maskgan)"
    )
    p.add_argument("--promote", action="store_true", help="make the new version active")
    p.add_argument("--device", default="cpu", help="cpu, auto or cuda[:N]")
    p.set_defaults(func=cmd_retrain)
