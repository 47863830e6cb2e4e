"""The ``cpkp`` command line: a thin layer over the Python API.

Every user mistake surfaces as one line ``cpkp: error: ...`` and exit code 2; the library raises
:class:`cpkp.errors.CpkpError` for those and this module prints them.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cpkp import __version__
from cpkp.errors import ConfigError, CpkpError, ImageError

logger = logging.getLogger("cpkp")

DEFAULT_PRESET = "cpu_rd_lite0"
SOURCE_FILE = "source.json"


# --------------------------------------------------------------------------------- arguments


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=["mvtec", "visa", "folder"],
        required=required,
        help="dataset layout: mvtec (also MPDD, BTAD, MVTec LOCO), visa, or plain folders",
    )
    g.add_argument("--root", type=Path, help="dataset root folder (mvtec, visa)")
    g.add_argument("--category", help="category folder under the root (mvtec, visa)")
    g.add_argument("--normal", type=Path, help="folder of normal training images (folder)")
    g.add_argument("--abnormal", type=Path, help="folder of defect test images (folder)")
    g.add_argument("--masks", type=Path, help="folder of masks matched by file stem (folder)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training (override the preset)")
    g.add_argument(
        "--config",
        default=DEFAULT_PRESET,
        help=f"preset name or YAML file (default: {DEFAULT_PRESET}; see `cpkp info`)",
    )
    g.add_argument("--variant", choices=["rd", "fd"], help="student: reverse or forward")
    g.add_argument("--backbone", help="backbone name, e.g. tf_efficientnet_lite0, wide_resnet50_2")
    g.add_argument("--weights", help="local ImageNet weight file for torchvision backbones")
    g.add_argument(
        "--download-weights",
        action="store_true",
        default=None,
        help="allow downloading torchvision ImageNet weights (off by default)",
    )
    g.add_argument("--image-size", type=int, help="model input size in pixels (multiple of 32)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int, help="images per batch")
    g.add_argument("--lr-student", type=float, help="student learning rate")
    g.add_argument("--lr-teacher", type=float, help="teacher learning rate")
    g.add_argument("--alpha", type=float, help="teacher loss weight of L_kp (paper: 0.999)")
    g.add_argument("--gamma", type=float, help="weight of A_kd in the fused map (paper: 0.5)")
    g.add_argument("--coreset-ratio", type=float, help="prototype size / bank size (paper: 0.01)")
    g.add_argument("--grid-stride", type=int, choices=[4, 8], help="prototype grid stride")
    g.add_argument("--fusion", choices=["standardized", "raw"], help="how the maps are fused")
    g.add_argument(
        "--co-progression",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the teacher learn slowly (off: the teacher never steps)",
    )
    g.add_argument(
        "--prototype",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the knowledge prototype (off: no L_kp, no A_kp)",
    )
    g.add_argument(
        "--teacher-grad-via-bottleneck",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RD: let L_kd reach the teacher through the bottleneck too (ablation)",
    )
    g.add_argument(
        "--kp-normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide L_kp by the bank's mean nearest-neighbour distance",
    )
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 mixed precision for the networks on CUDA",
    )
    g.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other config field, e.g. --set prototype.max_prototypes=20000 (repeatable)",
    )


# maps argparse destinations to config fields
_OVERRIDES = {
    "variant": ("model", "variant"),
    "backbone": ("model", "backbone"),
    "weights": ("model", "weights"),
    "download_weights": ("model", "download_weights"),
    "image_size": ("data", "image_size"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr_student": ("train", "lr_student"),
    "lr_teacher": ("train", "lr_teacher"),
    "alpha": ("train", "alpha"),
    "gamma": ("scoring", "gamma"),
    "coreset_ratio": ("prototype", "coreset_ratio"),
    "grid_stride": ("prototype", "grid_stride"),
    "fusion": ("scoring", "fusion"),
    "co_progression": ("train", "co_progression"),
    "prototype": ("prototype", "enabled"),
    "teacher_grad_via_bottleneck": ("train", "teacher_grad_via_bottleneck"),
    "kp_normalise": ("train", "kp_normalise"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "amp": ("train", "amp"),
    "checkpoint_every": ("train", "checkpoint_every"),
}


def config_from_args(args: argparse.Namespace):
    """The preset named by ``--config`` with every given option applied on top."""
    import yaml

    from cpkp.config import apply_overrides, load_preset

    config = load_preset(args.config)
    overrides: dict[str, dict[str, Any]] = {}
    for dest, (section, key) in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    for item in args.set:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        overrides.setdefault(section, {})[key] = yaml.safe_load(raw)
    apply_overrides(config, overrides, source="command line")
    return config.validate()


def read_split(args: argparse.Namespace):
    """The dataset named on the command line, read and checked."""
    from cpkp.data.readers import read_dataset

    if args.dataset == "folder":
        if args.normal is None:
            raise ConfigError("--dataset folder needs --normal DIR (and optionally --abnormal)")
        return read_dataset(
            "folder", None, None, normal=args.normal, abnormal=args.abnormal, masks=args.masks
        )
    if args.root is None or args.category is None:
        raise ConfigError(f"--dataset {args.dataset} needs --root DIR and --category NAME")
    return read_dataset(args.dataset, args.root, args.category)


def _source_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("dataset", "root", "category", "normal", "abnormal", "masks")
    return {k: None if getattr(args, k) is None else str(getattr(args, k)) for k in keys}


# ---------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from cpkp import runio
    from cpkp.api import Detector

    if args.resume is not None:
        return _resume(args)
    if args.dataset is None or args.out is None:
        raise ConfigError("cpkp train needs --dataset and --out (or --resume RUN)")
    config = config_from_args(args)
    splits = read_split(args)
    out = Path(args.out)
    _log_to_file(out / "train.log")
    runio.write_json(out / SOURCE_FILE, _source_of(args))
    detector = Detector(config)
    start = time.perf_counter()
    detector.fit(splits.train, run_dir=out, progress=not args.quiet)
    print(f"trained in {time.perf_counter() - start:.1f} s; run saved to {out}")
    if args.test:
        return _test_run(out, splits.test, overlays=not args.no_overlays, quiet=args.quiet)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from cpkp import runio
    from cpkp.api import Detector

    run = Path(args.resume)
    _log_to_file(run / "train.log")
    start = time.perf_counter()
    Detector.resume(run, progress=not args.quiet)
    print(f"resumed and finished in {time.perf_counter() - start:.1f} s; run saved to {run}")
    if args.test:
        source = runio.read_json(run / SOURCE_FILE)
        for key, value in source.items():
            setattr(
                args,
                key,
                None
                if value is None
                else Path(value)
                if key != "dataset" and key != "category"
                else value,
            )
        splits = read_split(args)
        return _test_run(run, splits.test, overlays=not args.no_overlays, quiet=args.quiet)
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from cpkp import runio
    from cpkp.data.readers import read_dataset

    run = Path(args.run)
    source = runio.read_json(run / SOURCE_FILE) if (run / SOURCE_FILE).exists() else {}
    if not source and args.root is None:
        raise ConfigError(f"{run}: no {SOURCE_FILE} in the run; give --dataset and --root")
    kind = args.dataset or source.get("dataset")
    root = args.root or source.get("root")
    category = args.category or source.get("category")
    if kind == "folder":
        splits = read_dataset(
            "folder",
            None,
            None,
            normal=Path(args.normal or source["normal"]),
            abnormal=_opt_path(args.abnormal or source.get("abnormal")),
            masks=_opt_path(args.masks or source.get("masks")),
        )
    else:
        splits = read_dataset(kind, Path(root), category)
    return _test_run(run, splits.test, overlays=not args.no_overlays, quiet=args.quiet)


def _test_run(run: Path, samples, overlays: bool, quiet: bool) -> int:
    from cpkp.api import Detector
    from cpkp.evaluate import run_test

    detector = Detector.load(run)
    outputs = run_test(detector, samples, out_dir=run, overlays=overlays, progress=not quiet)
    print(format_metrics(outputs.metrics))
    print(f"metrics, scores and overlays written to {run}")
    return 0


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per part (fused, A_kd, A_kp), headline metrics."""
    names = {"fused": "fused", "kd": "A_kd alone", "kp": "A_kp alone"}
    cols = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max"]
    lines = [f"{'map':<12}" + "".join(f"{c:>14}" for c in cols)]
    for part, values in metrics.items():
        overall = values.get("overall", values)
        lines.append(f"{names.get(part, part):<12}" + "".join(_cell(overall.get(c)) for c in cols))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{'undefined':>14}" if value is None else f"{value:>14.4f}"


def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from cpkp import runio
    from cpkp.api import Detector
    from cpkp.data.images import load_image
    from cpkp.report import blend, colorize

    paths = _expand_inputs(args.paths)
    if not paths:
        raise ConfigError("no image files found in the given paths")
    detector = Detector.load(args.run)
    out = Path(args.out)
    good, failed = [], []
    for path in paths:
        try:
            load_image(path)
            good.append(path)
        except ImageError as err:
            failed.append(str(path))
            print(f"cpkp: skipped {err}", file=sys.stderr)
    rows = []
    for start in range(0, len(good), detector.config.train.batch_size):
        chunk = good[start : start + detector.config.train.batch_size]
        for pred in detector.predict(chunk):
            stem = Path(pred.path).stem
            image = load_image(pred.path)
            hi = max(detector.calibration.pixel_threshold * 1.5, float(pred.map.max()))
            lo = float(np.percentile(pred.map, 1))
            heat = blend(image, colorize(pred.map, lo, hi))
            runio.atomic_write(
                out / f"{stem}_heatmap.png", lambda t, a=heat: Image.fromarray(a).save(t, "PNG")
            )
            mask = (pred.mask * 255).astype(np.uint8)
            runio.atomic_write(
                out / f"{stem}_mask.png", lambda t, a=mask: Image.fromarray(a).save(t, "PNG")
            )
            rows.append([pred.path, f"{pred.score:.6g}", int(pred.is_anomalous)])
            print(f"{pred.path}\t{pred.score:.4f}\t{'ANOMALOUS' if pred.is_anomalous else 'ok'}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "score", "prediction"])
    writer.writerows(rows)
    for path in failed:
        writer.writerow([path, "", "unreadable"])
    runio.write_text(out / "predictions.csv", buffer.getvalue())
    print(f"{len(rows)} images scored, {len(failed)} unreadable; results in {out}")
    return 1 if failed and not rows else 0


def _expand_inputs(items: list[str]) -> list[Path]:
    from cpkp.data.readers import list_images

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.exists():
            paths.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    return paths


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from cpkp.data.demo import make_demo_dataset

    summary = make_demo_dataset(
        Path(args.out),
        seed=args.seed,
        categories=args.categories.split(",") if args.categories else None,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_defect=args.n_defect,
        size=args.size,
    )
    print(_format_summary(summary))
    print(f"demo dataset written to {args.out}")
    return 0


def _format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for category, counts in summary.get("categories", summary).items():
        lines.append(f"{category}: {counts}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from cpkp.demo_run import run_demo

    table = run_demo(
        Path(args.out),
        categories=args.categories.split(",") if args.categories else None,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from cpkp.config import preset_names
    from cpkp.info import model_table

    print(f"cpkp {__version__}")
    print("presets: " + ", ".join(preset_names()))
    print(model_table(args.image_size))
    return 0


# ---------------------------------------------------------------------------------- plumbing


def build_parser() -> argparse.ArgumentParser:
    """The ``cpkp`` argument parser with all its subcommands."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cpkp",
        description="CPKP anomaly detection: train on normal images, score and localise defects.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"cpkp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or INFO logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a detector on normal images", formatter_class=fmt)
    _add_data_args(p, required=False)
    _add_model_args(p)
    p.add_argument("--out", help="run folder to write (required unless --resume)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a killed run from its last checkpoint (other options are ignored)",
    )
    p.add_argument("--test", action="store_true", help="test on the test split after training")
    p.add_argument("--no-overlays", action="store_true", help="with --test: skip overlay PNGs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "test", help="metrics of a trained run on its test split", formatter_class=fmt
    )
    p.add_argument("--run", required=True, help="run folder written by `cpkp train`")
    _add_data_args(p, required=False)
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser(
        "predict", help="score images or folders with a trained run", formatter_class=fmt
    )
    p.add_argument("--run", required=True, help="run folder written by `cpkp train`")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions", help="folder for heat maps, masks and CSV")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "demo", help="build the demo data, train and test CPKP(RD) on it", formatter_class=fmt
    )
    p.add_argument("--out", default="demo-run", help="folder for the data, runs and table")
    p.add_argument("--categories", help="comma-separated demo categories (default: all)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "demo-data", help="write the demo dataset (MVTec AD layout)", formatter_class=fmt
    )
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--categories", help="comma-separated categories (default: all)")
    p.add_argument("--n-train", type=int, default=60, help="train/good images per category")
    p.add_argument("--n-test-good", type=int, default=20, help="test/good images per category")
    p.add_argument("--n-defect", type=int, default=40, help="defect images per category")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser(
        "info", help="presets, backbones and students with their cost", formatter_class=fmt
    )
    p.add_argument("--image-size", type=int, default=256, help="input size for GFLOPs")
    p.set_defaults(func=cmd_info)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.addHandler(console)
    # The root passes INFO on so that a run folder's log file gets it even when quiet.
    root.setLevel(min(level, logging.INFO))


def _log_to_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cpkp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except CpkpError as err:
        print(f"cpkp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpkp: interrupted; files already written are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
