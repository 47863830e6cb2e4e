"""The ``cpkp`` command line: a thin layer over the Python API.

Every user mistake surfaces as one line ``cpkp: error: ...`` and exit code 2; the library raises
:class:`cpkp.errors.CpkpError` for those and this module prints them. ``cpkp predict`` exits
with 1 when it skipped unreadable images (it scores the others and lists the skipped ones).
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import logging
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpkp import __version__, runio
from cpkp.benchmark import DEFAULT_VARIANTS
from cpkp.errors import CheckpointError, ConfigError, CpkpError, ImageError

logger = logging.getLogger("cpkp")
MAX_INFO_SIZE = 1024  # cpkp info runs every network once: WRN50-2 at 4096 px needs ~24 GB

DEFAULT_PRESET = "cpu_rd_lite0"
SOURCE_FILE = runio.SOURCE_FILE
EXIT_SKIPPED = 1  # cpkp predict: some images were unreadable and skipped
EXIT_ERROR = 2  # a user mistake, reported in one line
MAX_PREDICT_WORKERS = 4  # cpkp predict: default data-loader processes at most
WRITE_THREADS = 2  # cpkp predict: threads writing heat maps and masks
WRITE_QUEUE = 16  # cpkp predict: predictions waiting to be written, at most
PRESET_DEFAULT = " (default: the preset's value)"


# --------------------------------------------------------------------------------- arguments


_DATA_OPTIONS = (
    # flag, type, help, what happens when a `cpkp train` user leaves it out
    ("--root", Path, "dataset root folder (mvtec, visa)", "required for mvtec and visa"),
    ("--category", str, "category folder under the root (mvtec, visa)", "required for them"),
    ("--normal", Path, "folder of normal training images (folder)", "required for folder"),
    (
        "--abnormal",
        Path,
        "folder of defect test images (folder)",
        "default: none; the test split holds only the normal/test images, if any",
    ),
    (
        "--masks",
        Path,
        "folder of masks matched by file stem (folder)",
        "default: none; no pixel metrics",
    ),
)


def _add_data_args(p: argparse.ArgumentParser, from_run: bool) -> None:
    """Dataset options; ``from_run``: each defaults to the value in the run's source.json."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=["mvtec", "visa", "folder"],
        help="dataset layout: mvtec (also MPDD, BTAD, MVTec LOCO), visa, or plain folders "
        + ("(default: from the run's source.json)" if from_run else "(required unless --resume)"),
    )
    for flag, kind, text, left_out in _DATA_OPTIONS:
        default = "default: from the run's source.json" if from_run else left_out
        g.add_argument(flag, type=kind, help=f"{text} ({default})")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "model and training",
        "Each option overrides one value of the preset named by --config; an option left out "
        "keeps the preset's value (`cpkp info` lists the presets).",
    )
    g.add_argument(
        "--config",
        help=f"preset name or YAML file (default: {DEFAULT_PRESET}; see `cpkp info`)",
    )
    g.add_argument(
        "--variant", choices=["rd", "fd"], help="student: reverse or forward" + PRESET_DEFAULT
    )
    g.add_argument(
        "--backbone",
        help="backbone name, e.g. tf_efficientnet_lite0, wide_resnet50_2" + PRESET_DEFAULT,
    )
    g.add_argument(
        "--weights",
        help="local ImageNet weight file for torchvision backbones (default: the preset's "
        "value; without one, the torch hub cache)",
    )
    g.add_argument(
        "--download-weights",
        action="store_true",
        default=None,
        help="allow downloading torchvision ImageNet weights (default: the preset's value, "
        "off in every shipped preset)",
    )
    _model_option(g, "--image-size", int, "model input size in pixels (multiple of 32)")
    g.add_argument(
        "--resize",
        choices=["squash", "aspect"],
        help="how an image becomes the square model input: squash (the whole frame, aspect "
        "ratio changed, as the paper) or aspect (long side to the model size, padded)"
        + PRESET_DEFAULT,
    )
    _model_option(
        g,
        "--tile",
        int,
        "cut images into tiles of this many pixels, each resized to the model size, and "
        "stitch the maps back (0: no tiles; large or long parts)",
    )
    _model_option(g, "--overlap", int, "pixels neighbouring tiles share (with --tile)")
    g.add_argument(
        "--roi",
        type=_absolute,
        help="region-of-interest mask image: only its non-zero pixels are scored (resized to "
        "each image); stored in the run (default: the preset's value, none)",
    )
    _model_option(g, "--epochs", int, "training epochs")
    _model_option(g, "--batch-size", int, "images per batch")
    _model_option(g, "--lr-student", float, "student learning rate")
    _model_option(g, "--lr-teacher", float, "teacher learning rate")
    _model_option(g, "--alpha", float, "teacher loss weight of L_kp (paper: 0.999)")
    _model_option(g, "--gamma", float, "weight of A_kd in the fused map (paper: 0.5)")
    _model_option(g, "--coreset-ratio", float, "prototype size / bank size (paper: 0.01)")
    g.add_argument(
        "--grid-stride", type=int, choices=[4, 8], help="prototype grid stride" + PRESET_DEFAULT
    )
    g.add_argument(
        "--fusion", choices=["standardized", "raw"], help="how the maps are fused" + PRESET_DEFAULT
    )
    _model_switch(g, "--co-progression", "let the teacher learn slowly (off: it never steps)")
    _model_switch(g, "--prototype", "build the knowledge prototype (off: no L_kp, no A_kp)")
    _model_switch(
        g,
        "--teacher-grad-via-bottleneck",
        "RD: let L_kd reach the teacher through the bottleneck too (ablation)",
    )
    _model_switch(g, "--kp-normalise", "divide L_kp by the bank's mean nearest-neighbour distance")
    _model_option(g, "--seed", int, "random seed")
    _model_option(g, "--device", str, "auto (CUDA when present), cpu, cuda, cuda:1 ...")
    _model_switch(g, "--amp", "bf16 mixed precision for the networks on CUDA")
    _model_switch(
        g, "--compile", "torch.compile the networks for scoring (calibration, test, predict)"
    )
    _model_option(g, "--checkpoint-every", int, "epochs between checkpoints")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other config field, e.g. --set prototype.max_prototypes=20000; repeatable "
        "(default: none)",
    )


def _absolute(path: str) -> str:
    """A path option as an absolute path, so that the run's config stays valid elsewhere."""
    return str(Path(path).absolute())


def _model_option(g: argparse._ArgumentGroup, flag: str, kind: type, text: str) -> None:
    g.add_argument(flag, type=kind, help=text + PRESET_DEFAULT)


def _model_switch(g: argparse._ArgumentGroup, flag: str, text: str) -> None:
    g.add_argument(
        flag, action=argparse.BooleanOptionalAction, default=None, help=text + PRESET_DEFAULT
    )


# maps argparse destinations to config fields
_OVERRIDES = {
    "variant": ("model", "variant"),
    "backbone": ("model", "backbone"),
    "weights": ("model", "weights"),
    "download_weights": ("model", "download_weights"),
    "image_size": ("data", "image_size"),
    "resize": ("data", "resize"),
    "tile": ("data", "tile"),
    "overlap": ("data", "tile_overlap"),
    "roi": ("data", "roi"),
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
    "compile": ("train", "compile"),
    "checkpoint_every": ("train", "checkpoint_every"),
}


def config_from_args(args: argparse.Namespace):
    """The preset named by ``--config`` with every given option applied on top."""
    import yaml

    from cpkp.config import apply_overrides, load_preset

    config = load_preset(args.config or DEFAULT_PRESET)
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


_FOLDER_ONLY = ("normal", "abnormal", "masks")
_ROOTED_ONLY = ("root", "category")


def check_dataset_options(kind: str, args: argparse.Namespace) -> None:
    """Refuse the data options that ``kind`` would ignore, so none is dropped silently."""
    unused = _ROOTED_ONLY if kind == "folder" else _FOLDER_ONLY
    given = [f"--{key}" for key in unused if getattr(args, key, None) is not None]
    if given:
        needs = "mvtec or visa" if kind == "folder" else "folder"
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(
            f"{', '.join(given)} only {verb} to --dataset {needs}; the dataset here is {kind}"
        )


def read_split(args: argparse.Namespace):
    """The dataset named on the command line, read and checked."""
    from cpkp.data.readers import read_dataset

    check_dataset_options(args.dataset, args)
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
    """The dataset options as source.json stores them: folders as absolute paths."""
    source: dict[str, Any] = {"dataset": args.dataset, "category": args.category}
    for key in ("root", "normal", "abnormal", "masks"):
        value = getattr(args, key)
        source[key] = None if value is None else str(Path(value).absolute())
    return source


# ---------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    """``cpkp train``; under torchrun, one process of a data-parallel run (docs/scaling.md)."""
    from cpkp import distributed

    if not distributed.launched():
        return _train_command(args)
    if not distributed.is_main():
        _quiet_console()  # rank 0 logs and prints; the others speak only when they fail
    try:
        with distributed.failure_guard():
            return _train_command(args)
    finally:
        distributed.cleanup()


def _quiet_console() -> None:
    """Only errors reach this process's console (ranks other than 0 of a torchrun launch)."""
    for handler in _HANDLERS:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def _train_command(args: argparse.Namespace) -> int:
    from cpkp import distributed
    from cpkp.api import Detector
    from cpkp.data.dataset import validate_images
    from cpkp.data.images import load_roi

    if args.resume is not None:
        return _resume(args)
    if args.dataset is None or args.out is None:
        raise ConfigError("cpkp train needs --dataset and --out (or --resume RUN)")
    config = config_from_args(args)
    out = Path(args.out)
    _check_out_folder(out, args.force)
    splits = read_split(args)
    _refuse_out_among_images(out, [s.image for s in splits.train + splits.test])
    # Every input is checked before the run folder is touched, so a bad file changes nothing.
    validate_images(splits.train + (splits.test if args.test else []))
    if config.data.roi is not None:
        load_roi(config.data.roi)  # a bad region-of-interest mask, too
    detector = Detector(config)  # an unavailable device fails here
    # Under torchrun every rank has made the checks above once all have joined: only then does
    # rank 0, the only one that writes, touch the folder.
    distributed.init_from_env(detector.device)
    main = distributed.is_main()
    if main:
        # Missing weights or an unknown backbone fail here, before the folder is touched.
        detector.check_networks()
    if args.force and runio.run_markers(out) and main:
        _remove_old_run(out)

    if main:
        _log_to_file(out / runio.LOG_FILE)
    logger.info("dataset: %s", splits.describe())
    start = time.perf_counter()
    detector.fit(splits.train, run_dir=out, progress=not args.quiet, source=_source_of(args))
    distributed.cleanup()  # training is over: what follows is rank 0's alone
    if not main:
        return 0
    print(f"trained in {time.perf_counter() - start:.1f} s; run saved to {out}")
    if args.test:
        return _test_run(
            out,
            splits.test,
            overlays=not args.no_overlays,
            report=not args.no_report,
            quiet=args.quiet,
        )
    return 0


def _remove_old_run(out: Path) -> None:
    """--force: delete the previous run's cpkp files (runio.RUN_FILES, overlays), nothing else."""
    removed = runio.remove_run_files(out, runio.RUN_FILES, overlays=True)
    logger.info("--force: removed %d files of the previous run in %s", len(removed), out)


def _check_out_folder(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or that holds a run unless --force."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    found = runio.run_markers(out) if out.is_dir() else []
    if found and not force:
        names = ", ".join(p.name for p in found)
        if (out / runio.CHECKPOINT_FILE).exists():
            hint = f"continue it with `cpkp train --resume {out}`, replace it with --force"
        else:
            hint = "it has no checkpoint to resume from: replace it with --force"
        raise ConfigError(
            f"--out {out}: already holds a cpkp run ({names}); {hint}, or choose another --out"
        )


# Options that cannot change a run being resumed (it continues with its own config.yaml).
_RESUME_FIXED = (
    ("dataset", "root", "category", "normal", "abnormal", "masks", "out", "config")
    + tuple(dest for dest in _OVERRIDES if dest != "epochs")
    + ("set", "force")
)


def _resume(args: argparse.Namespace) -> int:
    from cpkp import distributed
    from cpkp.api import Detector, resolve_device
    from cpkp.checkpoint import read_checkpoint
    from cpkp.config import load_config
    from cpkp.data.dataset import validate_images

    run = Path(args.resume)
    fixed = [_flag(dest) for dest in _RESUME_FIXED if getattr(args, dest, None) not in (None, [])]
    if fixed:
        raise ConfigError(
            f"--resume {run}: continues the run with its own settings, so these options would "
            f"be ignored: {', '.join(fixed)}. With --resume give only --epochs (to train "
            "longer), --test, --no-overlays and --no-report."
        )
    if not run.is_dir():
        raise CheckpointError(f"{run}: run folder not found")
    checkpoint = run / runio.CHECKPOINT_FILE
    if not checkpoint.is_file():
        read_checkpoint(run)  # raises the error that says what is missing
    test_split = None
    if args.test:
        _fill_from_source(args, run)
        test_split = read_split(args).test
        validate_images(test_split)
    if distributed.launched():
        distributed.init_from_env(resolve_device(load_config(run / runio.CONFIG_FILE).train.device))
    main = distributed.is_main()
    if args.epochs is not None and main:
        _set_resume_epochs(run, args.epochs, runio.load_metadata(checkpoint).get("epoch", 0))
    distributed.barrier()  # the other ranks read the config that rank 0 may have rewritten

    if main:
        _log_to_file(run / runio.LOG_FILE)
    start = time.perf_counter()
    Detector.resume(run, progress=not args.quiet)
    distributed.cleanup()  # training is over: what follows is rank 0's alone
    if not main:
        return 0
    print(f"resumed and finished in {time.perf_counter() - start:.1f} s; run saved to {run}")
    if test_split is not None:
        return _test_run(
            run,
            test_split,
            overlays=not args.no_overlays,
            report=not args.no_report,
            quiet=args.quiet,
        )
    return 0


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _set_resume_epochs(run: Path, epochs: int, done: int) -> None:
    """--epochs with --resume: train to another epoch count, not below the checkpoint's."""
    from cpkp.config import load_config

    if epochs < done:
        raise ConfigError(
            f"--epochs {epochs}: the checkpoint in {run} is already after epoch {done}; give "
            f"--epochs {done} or more"
        )
    config = load_config(run / runio.CONFIG_FILE)
    if config.train.epochs == epochs:
        return
    logger.info("%s: epochs changed from %d to %d", run, config.train.epochs, epochs)
    config.train.epochs = epochs
    runio.write_yaml(run / runio.CONFIG_FILE, config.validate().to_dict())


def _fill_from_source(args: argparse.Namespace, run: Path) -> None:
    """Set the dataset options from the run's source.json."""
    path = run / SOURCE_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found, so --test does not know the dataset; resume without --test "
            "and run `cpkp test --run RUN --dataset ...`"
        )
    for key, value in runio.read_json(path).items():
        if key in ("dataset", "category"):
            setattr(args, key, value)
        elif key in ("root", "normal", "abnormal", "masks"):
            setattr(args, key, _opt_path(value))


def cmd_test(args: argparse.Namespace) -> int:
    from cpkp.data.readers import read_dataset

    run = Path(args.run)
    runio.check_run_dir(run)
    source = runio.read_json(run / SOURCE_FILE) if (run / SOURCE_FILE).exists() else {}
    kind = args.dataset or source.get("dataset")
    if kind is None:
        raise ConfigError(
            f"{run}: no {SOURCE_FILE} in the run (trained from Python?), so the dataset is "
            "unknown; give --dataset and its folders"
        )
    check_dataset_options(kind, args)
    root = args.root or source.get("root")
    category = args.category or source.get("category")
    if kind == "folder":
        normal = args.normal or source.get("normal")
        if normal is None:
            raise ConfigError("--dataset folder needs --normal DIR (and optionally --abnormal)")
        splits = read_dataset(
            "folder",
            None,
            None,
            normal=Path(normal),
            abnormal=_opt_path(args.abnormal or source.get("abnormal")),
            masks=_opt_path(args.masks or source.get("masks")),
        )
    else:
        if root is None or category is None:
            raise ConfigError(f"--dataset {kind} needs --root DIR and --category NAME")
        splits = read_dataset(kind, Path(root), category)
    return _test_run(
        run, splits.test, overlays=not args.no_overlays, report=not args.no_report, quiet=args.quiet
    )


def _test_run(run: Path, samples, overlays: bool, report: bool, quiet: bool) -> int:
    from cpkp.api import Detector
    from cpkp.evaluate import run_test

    detector = Detector.load(run)
    outputs = run_test(
        detector, samples, out_dir=run, overlays=overlays, progress=not quiet, report=report
    )
    print(format_metrics(outputs.metrics))
    written = "metrics, scores and overlays" if overlays else "metrics and scores"
    print(f"{written} written to {run}")
    if report:
        print(f"report: {run / runio.REPORT_FILE} (open it in a browser)")
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
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from cpkp.data.images import check_image
    from cpkp.inference import require_finite

    paths = _expand_inputs(args.paths)
    if not paths:
        raise ConfigError("no image files found in the given paths")
    if args.run is not None:
        runio.check_run_dir(Path(args.run))  # "not a run" before what --out would do to one
    _check_predict_out(Path(args.out), paths, args.run or _source_run(args.model))
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    runner = _predictor(args)
    out = Path(args.out)
    good, failed = [], []
    for path in paths:
        try:
            check_image(path)
            good.append(path)
        except ImageError as err:
            failed.append(str(path))
            print(f"cpkp: skipped {err}", file=sys.stderr)

    names = _output_names(good)
    rows = []
    start = time.perf_counter()
    cleared = False  # the earlier prediction in --out goes once this one has a first result
    if good:
        batch_size = args.batch_size or runner.batch_size
        workers = _predict_workers(args.workers, runner.workers, len(good), batch_size)
        predictions = _predictions_skipping(runner, good, batch_size, workers, failed)
        bar = tqdm(
            predictions, total=len(good), desc="predicting", unit="image", disable=args.quiet
        )
        out.mkdir(parents=True, exist_ok=True)  # a bad --out fails before any scoring
        # Heat maps and masks are written by threads while the next images are scored; at
        # most WRITE_QUEUE images wait, so that maps do not pile up in memory. An image is
        # reported once its files are written.
        with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
            writing: deque = deque()
            for pred in bar:
                require_finite([pred])  # before anything of this image is written
                if not cleared:
                    _clear_earlier_prediction(out)
                    cleared = True
                name = names[pred.path]
                job = pool.submit(_write_prediction, runner.pixel_threshold, pred, out, name)
                writing.append((job, pred, name))
                while len(writing) > WRITE_QUEUE or (writing and writing[0][0].done()):
                    rows.append(_report_prediction(*writing.popleft()))
            while writing:
                rows.append(_report_prediction(*writing.popleft()))
        elapsed = time.perf_counter() - start
        logger.info(
            "scored %d images in %.1f s (%.1f images/s; batch %d, %d workers)",
            len(rows),
            elapsed,
            len(rows) / max(elapsed, 1e-9),
            batch_size,
            workers,
        )
    if not rows:
        raise ImageError(
            f"none of the {len(failed)} input image(s) could be read; nothing written to {out}"
        )
    runio.write_text(out / "predictions.csv", _predictions_csv(rows, failed))
    print(f"{len(rows)} image(s) scored, {len(failed)} unreadable; results in {out}")
    if failed:
        print(
            f"cpkp: skipped {len(failed)} unreadable file(s): {', '.join(failed)}", file=sys.stderr
        )
        return EXIT_SKIPPED
    return 0


def _report_prediction(job: Future, pred: Any, name: str) -> list[Any]:
    """Wait for an image's files, print its line; its row of predictions.csv."""
    from tqdm.auto import tqdm

    job.result()  # raises the writer's error (a full disk, an --out that is a file)
    verdict = "ANOMALOUS" if pred.is_anomalous else "ok"
    tqdm.write(f"{pred.path}\t{pred.score:.4f}\t{verdict}", file=sys.stdout)
    heatmap, mask = f"{name}_heatmap.png", f"{name}_mask.png"
    return [pred.path, f"{pred.score:.6g}", int(pred.is_anomalous), heatmap, mask]


@dataclass
class _Predictor:
    """What ``cpkp predict`` needs of a run (--run) or of an exported model (--model)."""

    iter_predict: Any  # (paths, batch_size, workers) -> Iterator[Prediction], in input order
    pixel_threshold: float
    batch_size: int  # default model inputs per forward pass
    workers: int  # configured data-loader processes (0: choose)


def _source_run(model: str | None) -> str | None:
    """The run an exported model came from (its model.json), when that folder is still here."""
    if model is None:
        return None
    description = Path(model).with_suffix(".json")
    try:
        source = runio.read_json(description).get("source_run")
    except (CheckpointError, OSError, UnicodeDecodeError, AttributeError):
        return None  # OnnxDetector reports a missing or damaged model.json
    return source if isinstance(source, str) and Path(source).is_dir() else None


def _predictor(args: argparse.Namespace) -> _Predictor:
    """The predictor of --run or of --model."""
    if args.model is not None:
        from cpkp.export import OnnxDetector

        if Path(args.model).suffix.lower() != ".onnx":
            raise ConfigError(
                f"--model {args.model}: expected the .onnx file written by `cpkp export`"
            )
        for flag in ("amp", "compile"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag} applies to --run; an ONNX model runs as exported")

        runner = OnnxDetector(args.model)
        return _Predictor(runner.iter_predict, runner.pixel_threshold, runner.batch_size, 0)

    from cpkp.api import Detector

    detector = Detector.load(Path(args.run))  # cmd_predict checked that it is a run
    detector.config.train.amp |= args.amp
    detector.config.train.compile |= args.compile
    return _Predictor(
        detector.iter_predict,
        detector.calibration.pixel_threshold,
        detector.config.train.batch_size,
        detector.config.data.num_workers,
    )


def _predict_workers(given: int | None, configured: int, images: int, batch_size: int) -> int:
    """--workers, else the run's data.num_workers, else up to 4 (one core kept for scoring).

    Inputs that fit in one batch are read in this process: starting workers would cost more.
    """
    if given is not None:
        return given
    if configured > 0:
        return configured
    if images <= batch_size:
        return 0
    return max(0, min(MAX_PREDICT_WORKERS, (os.cpu_count() or 1) - 1))


def _output_names(paths: list[Path]) -> dict[str, str]:
    """A file-name stem per input, unique: ``part`` or, when stems repeat, ``part-2``, ``part-3``.

    Inputs from different folders often share a name (``good/000.png``, ``bad/000.png``); each
    gets its own heat map and mask, and predictions.csv says which is whose.
    """
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem, name, k = Path(path).stem, Path(path).stem, 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        names[str(path)] = name
    return names


def _predictions_skipping(runner, paths: list[Path], batch_size: int, workers: int, failed):
    """``runner.iter_predict`` over ``paths``, skipping an image that only a full decode finds
    unreadable (the quick check passed it): it is reported and added to ``failed``, and
    scoring starts again after the images already yielded (they come in input order).
    """
    from cpkp.data.images import load_image

    remaining = list(paths)
    while remaining:
        done = 0
        try:
            for pred in runner.iter_predict(remaining, batch_size, workers):
                done += 1
                yield pred
            return
        except ImageError:
            # A worker process re-raises the error without its file, so find the file here.
            for path in remaining[done:]:
                try:
                    load_image(path)
                except ImageError as err:
                    failed.append(str(path))
                    print(f"cpkp: skipped {err}", file=sys.stderr)
                    break
            else:
                raise
            remaining = [p for p in remaining[done:] if p != path]


def _write_prediction(pixel_threshold: float, pred, out: Path, name: str) -> None:
    """The heat map and the thresholded mask of one prediction, as PNGs under ``out``."""
    from PIL import Image

    from cpkp.data.images import load_image
    from cpkp.report import blend, colorize

    image = load_image(pred.path)
    hi = max(pixel_threshold * 1.5, float(pred.map.max()))
    lo = float(np.percentile(pred.map, 1))
    heat = blend(image, colorize(pred.map, lo, hi))
    runio.atomic_write(
        out / f"{name}_heatmap.png", lambda t, a=heat: Image.fromarray(a).save(t, "PNG")
    )
    mask = (pred.mask * 255).astype(np.uint8)
    runio.atomic_write(
        out / f"{name}_mask.png", lambda t, a=mask: Image.fromarray(a).save(t, "PNG")
    )


def _clear_earlier_prediction(out: Path) -> None:
    """Remove the files an earlier ``predict`` wrote into ``out``.

    ``out`` then holds one prediction only, as a run folder holds one model: a heat map left
    from an earlier image set would otherwise sit beside the new ones, named in no CSV. Only
    files that its predictions.csv names, in ``out`` itself and with the names predict gives
    (``*_heatmap.png``, ``*_mask.png``), are removed; everything else is left alone. Called
    once the new prediction has its first result, so a command that fails before (a damaged
    model, a bad option) leaves the earlier prediction whole.
    """
    listing = out / "predictions.csv"
    if not listing.is_file():
        return
    try:
        with listing.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        logger.warning("%s: not read (%s); the files it lists are left in place", listing, err)
        return
    removed = 0
    for row in rows:
        for column, suffix in (("heatmap", "_heatmap.png"), ("mask", "_mask.png")):
            name = row.get(column) or ""
            if not name.endswith(suffix) or Path(name).name != name:
                continue
            try:
                (out / name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
    listing.unlink()
    logger.info("%s: removed the earlier prediction (%d heat maps and masks)", out, removed)


def _predictions_csv(rows: list[list[Any]], failed: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "score", "prediction", "heatmap", "mask"])
    writer.writerows(rows)
    for path in failed:
        writer.writerow([path, "", "unreadable", "", ""])
    return buffer.getvalue()


def cmd_add_normal(args: argparse.Namespace) -> int:
    from cpkp.api import Detector

    run = Path(args.run)
    runio.check_run_dir(run)
    paths = _expand_inputs(args.paths)
    if not paths:
        raise ConfigError("no image files found in the given paths")
    detector = Detector.load(run)
    start = time.perf_counter()
    # Every image is checked and everything computed before the run folder is touched.
    summary = detector.add_normal(paths, progress=not args.quiet)
    for path in summary["skipped"]:
        print(f"skipped, already a training image of the run: {path}")
    if not summary["added"]:
        print(f"no new image: {run} left as it was")
        return 0

    _log_to_file(run / runio.LOG_FILE)
    stale = [name for name in runio.TEST_FILES if (run / name).is_file()]
    stale += [runio.OVERLAYS_DIR] if (run / runio.OVERLAYS_DIR).is_dir() else []
    logger.info("add-normal: %s", ", ".join(summary["added"]))
    detector.save(run)
    before, after = summary["calibration_before"], summary["calibration"]
    print(
        f"added {len(summary['added'])} normal image(s) to {run} in "
        f"{time.perf_counter() - start:.1f} s; teacher and student unchanged"
    )
    print(f"prototypes: {summary['prototypes_before']} -> {summary['prototypes_after']}")
    print(
        f"image threshold: {before['image_threshold']:.4g} -> {after['image_threshold']:.4g}; "
        f"pixel threshold: {before['pixel_threshold']:.4g} -> {after['pixel_threshold']:.4g}"
    )
    if stale:
        print(f"removed stale test outputs: {', '.join(stale)}; rerun `cpkp test --run {run}`")
    return 0


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
    unique, seen = [], set()
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    if len(unique) < len(paths):
        logger.info("%d image(s) given more than once are taken once", len(paths) - len(unique))
    return unique


def _check_predict_out(out: Path, paths: list[Path], run: str | None) -> None:
    """Refuse an output folder that is a file, a folder of input images, or in the run or its data.

    Heat maps and masks beside the images would be read as images by the next predict on that
    folder (a subfolder is not: folders are listed without recursion); among a run's files
    they would mix with what cpkp manages there; in the run's dataset, ``cpkp test`` would
    read them as test images (or a new defect type).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; choose a folder for the results")
    target = out.resolve()
    for folder in sorted({Path(p).resolve().parent for p in paths}):
        if target == folder:
            raise ConfigError(
                f"--out {out}: is {folder}, a folder of input images; the heat maps would mix "
                "with the images (and be read as images next time): choose another folder"
            )
    if run is None:
        return
    if Path(run).resolve() in (target, *target.parents):
        raise ConfigError(f"--out {out}: lies in the run folder {run}; choose another folder")
    for folder in _dataset_folders(Path(run)):
        if folder in (target, *target.parents):
            raise ConfigError(
                f"--out {out}: lies in {folder}, the dataset of the run {run}; `cpkp test` would "
                "read the heat maps as test images: choose another folder"
            )


def _dataset_folders(run: Path) -> list[Path]:
    """The dataset folders a run's source.json names (none when it has no readable one)."""
    try:
        source = runio.read_json(run / SOURCE_FILE) if (run / SOURCE_FILE).is_file() else {}
    except (CheckpointError, OSError, UnicodeDecodeError):  # reported where it is needed
        return []
    if not isinstance(source, dict):
        return []
    if source.get("dataset") == "folder":
        names = [source.get(key) for key in ("normal", "abnormal", "masks")]
    elif source.get("root") and source.get("category"):
        names = [str(Path(source["root"]) / source["category"])]
    else:
        names = []
    return [Path(name).resolve() for name in names if isinstance(name, str) and name]


def _refuse_out_among_images(out: Path, paths: list[Path]) -> None:
    """ConfigError when ``out`` is a folder of the given images, or lies inside one.

    What cpkp writes there would mix with the images and be read as images next time.
    """
    target = out.resolve()
    for folder in sorted({Path(p).resolve().parent for p in paths}):
        if target == folder or folder in target.parents:
            raise ConfigError(
                f"--out {out}: lies in {folder}, a folder of input images; what cpkp writes "
                "would mix with the images (and be read as images next time): choose another "
                "folder"
            )


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def cmd_export(args: argparse.Namespace) -> int:
    from cpkp.export import META_FILE, export_onnx

    path = export_onnx(args.run, args.out)
    size = path.stat().st_size / 1e6
    print(f"exported {path} ({size:.1f} MB) and {path.with_name(META_FILE)}")
    return 0


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
    if summary["reused"]:
        print(f"demo dataset already in {args.out} (same parameters), reused")
    else:
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


def cmd_benchmark(args: argparse.Namespace) -> int:
    from cpkp.benchmark import plan_jobs, run_benchmark
    from cpkp.data.readers import list_categories

    execute = _benchmark_executor(args)
    base = config_from_args(args)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: expected at least 1")
    folders = {}
    if args.dataset == "folder":
        if args.normal is None:
            raise ConfigError("--dataset folder needs --normal DIR (and optionally --abnormal)")
        folders = {
            key: str(Path(value).absolute())
            for key in ("normal", "abnormal", "masks")
            if (value := getattr(args, key)) is not None
        }
        categories = [Path(args.normal).name]
    elif args.root is None:
        raise ConfigError(f"--dataset {args.dataset} needs --root DIR")
    elif args.categories == "all":
        categories = list_categories(args.dataset, args.root)
    else:
        categories = [c for c in args.categories.split(",") if c]
        unknown = sorted(set(categories) - set(list_categories(args.dataset, args.root)))
        if unknown:
            raise ConfigError(
                f"--categories: {', '.join(unknown)} not found under {args.root} (found: "
                f"{', '.join(list_categories(args.dataset, args.root))})"
            )
    alphas = [_float_option("--alpha", a) for a in args.alphas.split(",")] if args.alphas else []
    out = Path(args.out)
    jobs = plan_jobs(
        args.dataset,
        None if args.root is None else Path(args.root).absolute(),
        categories,
        [v for v in args.variants.split(",") if v],
        list(range(args.seeds)),
        out,
        base,
        alphas=alphas,
        epochs=args.epochs,
        folders=folders,
    )
    logger.info("benchmark: %d runs into %s", len(jobs), out)
    print(run_benchmark(jobs, out, execute=execute, progress=not args.quiet))
    return 0


def _benchmark_executor(args: argparse.Namespace) -> Any:
    """None (in-process) or the Ray executor; Ray options without ``--executor ray`` are refused."""
    if args.executor != "ray":
        for flag, value in (("--address", args.address), ("--cpus-per-run", args.cpus_per_run)):
            if value is not None:
                raise ConfigError(f"{flag} is an option of --executor ray; add --executor ray")
        return None
    from cpkp.ray_executor import RayExecutor

    return RayExecutor(
        address=args.address, cpus_per_run=args.cpus_per_run, progress=not args.quiet
    )


def _float_option(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected a number") from None


def cmd_info(args: argparse.Namespace) -> int:
    from cpkp.config import check_image_size, preset_names
    from cpkp.info import model_table

    check_image_size(args.image_size, "--image-size")
    if args.image_size > MAX_INFO_SIZE:
        raise ConfigError(
            f"--image-size={args.image_size}: at most {MAX_INFO_SIZE} here (the count runs every "
            "network once at that size; the cost grows with its square from there)"
        )

    print(f"cpkp {__version__}")
    print("presets: " + ", ".join(preset_names()))
    print(model_table(args.image_size))
    return 0


# ---------------------------------------------------------------------------------- plumbing


def _os_error_message(err: OSError) -> str:
    """``PATH: reason`` for a system error, with what to do when a file blocks a folder."""
    if err.filename is None:
        return str(err)
    message = f"{err.filename}: {err.strerror or err}"
    if err.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        message += " (a file stands where cpkp writes a folder, or a folder where it writes a file)"
    return message


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except None and empty ones: their help text says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, []) or "(default:" in (action.help or ""):
            return action.help
        if action.default is False:
            return f"{action.help} (default: off)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``cpkp`` argument parser with all its subcommands."""
    fmt = _HelpFormatter
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
    _add_data_args(p, from_run=False)
    _add_model_args(p)
    p.add_argument("--out", help="run folder to write (required unless --resume)")
    p.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="replace a run already in --out: its cpkp files are removed first, other files "
        "stay (default: refuse such a folder)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a killed run from its last checkpoint with its own settings; only "
        "--epochs (train longer), --test, --no-overlays and --no-report may go with it "
        "(default: start a new run)",
    )
    p.add_argument("--test", action="store_true", help="test on the test split after training")
    p.add_argument("--no-overlays", action="store_true", help="with --test: skip overlay PNGs")
    p.add_argument("--no-report", action="store_true", help="with --test: skip report.html")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "test", help="metrics of a trained run on its test split", formatter_class=fmt
    )
    p.add_argument("--run", required=True, help="run folder written by `cpkp train`")
    _add_data_args(p, from_run=True)
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser(
        "predict", help="score images or folders with a trained run", formatter_class=fmt
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", help="run folder written by `cpkp train` (required unless --model)")
    model.add_argument(
        "--model",
        help="model.onnx written by `cpkp export`, run with onnxruntime (its model.json must "
        "lie beside it; required unless --run)",
    )
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument(
        "--out",
        default="predictions",
        help="folder for heat maps, masks and predictions.csv; an earlier prediction there is "
        "replaced, other files are left alone",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="model inputs per forward pass, a tile counting as one (default: the run's "
        "train.batch_size)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="processes that read and resize the images (default: the run's "
        "data.num_workers, else up to 4, one core fewer than the machine has; none when the "
        "images fit in one batch)",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="--run on CUDA: bf16 autocast of the networks (default: the run's train.amp)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="--run: torch.compile the networks first; pays off on many images (default: the "
        "run's train.compile)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a trained run as one ONNX graph (image to score and map)",
        formatter_class=fmt,
    )
    p.add_argument("--run", required=True, help="run folder written by `cpkp train`")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--out", help="folder for model.onnx and model.json (default: RUN/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "add-normal",
        help="add approved normal images to a trained run without retraining its networks",
        formatter_class=fmt,
    )
    p.add_argument("--run", required=True, help="run folder written by `cpkp train`")
    p.add_argument(
        "paths",
        nargs="+",
        help="normal image files or folders; images already in the run are skipped",
    )
    p.set_defaults(func=cmd_add_normal)

    p = sub.add_parser(
        "demo", help="build the demo data, train and test CPKP(RD) on it", formatter_class=fmt
    )
    p.add_argument("--out", default="demo-run", help="folder for the data, runs and table")
    p.add_argument("--categories", help="comma-separated demo categories (default: all)")
    p.add_argument(
        "--epochs", type=int, help="training epochs (default: the preset's, 10 in cpu_rd_lite0)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data and training")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "benchmark",
        help="train and test every category x variant x seed into one folder, one table",
        formatter_class=fmt,
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=["mvtec", "visa", "folder"],
        help="dataset layout (mvtec also reads MPDD, BTAD, MVTec LOCO)",
    )
    p.add_argument("--root", type=Path, help="dataset root folder (required for mvtec and visa)")
    p.add_argument(
        "--categories",
        default="all",
        help="'all' (every category under --root) or a comma-separated list",
    )
    for flag, kind, text, left_out in _DATA_OPTIONS[2:]:
        p.add_argument(flag, type=kind, help=f"{text} ({left_out})")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated: cpkp-rd, cpkp-fd, rd@cpkp, fd@cpkp, cp-only, kp-only, rd, fd",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 per combination")
    p.add_argument(
        "--alpha",
        dest="alphas",
        help="comma-separated teacher-loss weights for an alpha sweep, e.g. 0.9,0.99,0.999 "
        "(default: the configuration's alpha only)",
    )
    p.add_argument("--config", help=f"base preset name or YAML file (default: {DEFAULT_PRESET})")
    p.add_argument(
        "--epochs", type=int, help="training epochs of every variant (default: each variant's)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any base config field, repeatable (default: none)",
    )
    p.add_argument("--out", required=True, help="output folder: runs, benchmark.md, .csv")
    g = p.add_argument_group("executor")
    g.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: one run after the other in this process; ray: the runs as Ray tasks "
        "(pip install 'cpkp[ray]'), one GPU per run where the cluster has GPUs",
    )
    g.add_argument(
        "--address",
        help="with --executor ray: an existing Ray cluster (auto, HOST:PORT or ray://HOST:PORT); "
        "the output folder and dataset must be at the same path on every node (default: a "
        "local Ray instance on this machine's CPUs and GPUs)",
    )
    g.add_argument(
        "--cpus-per-run",
        type=int,
        help="with --executor ray: CPUs and torch threads of each run (default: 1 where runs "
        "get a GPU, else 4, at most a node's CPUs)",
    )
    p.set_defaults(func=cmd_benchmark)

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


_HANDLERS: list[logging.Handler] = []  # added by this command; removed when it ends


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    _add_handler(console)
    # The root passes INFO on so that a run folder's log file gets it even when quiet.
    logging.getLogger().setLevel(min(level, logging.INFO))


def _log_to_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    _add_handler(handler)


def _add_handler(handler: logging.Handler) -> None:
    logging.getLogger().addHandler(handler)
    _HANDLERS.append(handler)


def _remove_handlers() -> None:
    """Detach and close this command's log handlers.

    A later ``main()`` in the same process (tests, notebooks) then writes nothing into this
    run's log file.
    """
    while _HANDLERS:
        handler = _HANDLERS.pop()
        logging.getLogger().removeHandler(handler)
        handler.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cpkp`` console script.

    Returns:
        0 on success; 1 when ``cpkp predict`` skipped unreadable images; 2 for a user mistake
        (one line on stderr); 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except CpkpError as err:
        print(f"cpkp: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        # A read-only or full disk, an output path that is a file: the system's own message,
        # led by the file it names.
        print(f"cpkp: error: {_os_error_message(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cpkp: interrupted; files already written are complete", file=sys.stderr)
        return 130
    finally:
        _remove_handlers()


if __name__ == "__main__":
    sys.exit(main())
