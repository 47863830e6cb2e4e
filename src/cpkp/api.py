"""The Python API: build a detector, fit it on normal images, score images, save and load.

    detector = Detector.from_preset("cpu_rd_lite0", train={"epochs": 5})
    detector.fit(["good/000.png", "good/001.png", ...])
    result = detector.predict(["part.png"])        # scores and maps at each image's own size
    detector.save("runs/plate"); Detector.load("runs/plate")

The command line is a thin layer over this class.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import cpkp
from cpkp import distributed, runio
from cpkp.backbones import create_backbone
from cpkp.config import Config, apply_overrides, load_config, load_preset
from cpkp.data.dataset import ImageDataset, validate_images
from cpkp.data.images import load_roi
from cpkp.data.records import Sample
from cpkp.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ImageError,
    WeightsError,
)
from cpkp.geometry import (
    Geometry,
    Layout,
    region_max,
    resize_nearest,
    stitch,
    valid_views,
)
from cpkp.inference import (
    ImageInput,
    ImageMaps,
    ImageSource,
    Prediction,
    image_list,
    prediction_from,
    require_finite,
    single_thread_worker,
    stream_image_maps,
    tensor_views,
)
from cpkp.models import create_student
from cpkp.prototype import (
    Prototype,
    build_prototype,
    check_prototype_width,
    coreset_size,
    f_agg,
    merge_banks,
    monitor_bank,
    reselect_prototype,
    select_prototype,
)
from cpkp.scoring import (
    Calibration,
    fuse,
    gaussian_smooth,
    image_scores,
    kd_map,
    kp_map,
    robust_scale,
)
from cpkp.training import (
    CoProgressionTrainer,
    EpochLog,
    average_running_stats,
    check_finite,
    recalibrate_batchnorm,
)

logger = logging.getLogger(__name__)

# Fields of `data` whose change makes a trained run's prototype grid and thresholds wrong.
CALIBRATED_FIELDS = ("image_size", "resize", "tile", "tile_overlap", "roi")
ROI_TENSOR = "roi.mask"  # the region of interest, [H, W] uint8, beside the weights


@dataclass
class ScoreBatch:
    """Scores and maps of a batch at the model's size.

    Attributes:
        scores: [B] image scores of the fused, smoothed map.
        maps: [B, 1, S, S] fused, smoothed anomaly maps.
        kd_maps: [B, 1, S, S] smoothed ``A_kd`` (raw units), or None.
        kp_maps: [B, 1, S, S] smoothed ``A_kp`` (raw units), or None without a prototype.
        kp_index: [B, h, w] index of the nearest prototype per patch, or None.
    """

    scores: Tensor
    maps: Tensor
    kd_maps: Tensor | None
    kp_maps: Tensor | None
    kp_index: Tensor | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to torch.

    Under torchrun, ``auto`` and ``cuda`` mean the GPU of this process's ``LOCAL_RANK``.
    """
    if name == "auto":
        return distributed.local_device(
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return distributed.local_device(torch.device(name))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Detector:
    """A CPKP anomaly detector: teacher, student, knowledge prototype and calibration.

    Args:
        config: the run configuration (validated here).
    """

    def __init__(self, config: Config) -> None:
        self.config = config.validate()
        self.device = resolve_device(config.train.device)
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        self.prototype: Prototype | None = None
        self.calibration = Calibration()
        self.kp_scale = 1.0
        self.train_images: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.epoch_logs: list[EpochLog] = []
        self.weights_source = ""
        self.roi: Tensor | None = None  # [H, W] bool region of interest (data.roi), stored
        self._train_views: int | None = None  # model inputs of the training images (tiles)
        self._run_dir: Path | None = None  # the run folder it trains into or was loaded from
        self._epochs_done: int | None = None  # as read by load(), which has no epoch logs
        self._compiled: tuple[tuple[int, int], nn.Module, nn.Module] | None = None

    @classmethod
    def from_preset(cls, name: str = "cpu_rd_lite0", **overrides: dict[str, Any]) -> Detector:
        """A detector from a shipped preset (or YAML path), with section overrides.

        Example: ``Detector.from_preset("cpu_rd_lite0", train={"epochs": 2})``.
        """
        config = load_preset(name)
        apply_overrides(config, overrides, source="overrides")
        return cls(config)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def geometry(self) -> Geometry:
        """How images become model inputs (data.resize, data.tile; cpkp.geometry)."""
        return Geometry.from_config(self.config.data)

    @property
    def is_fitted(self) -> bool:
        return self.teacher is not None and self.student is not None

    # ----------------------------------------------------------------------------- training

    def fit(
        self,
        images: ImageInput,
        run_dir: str | Path | None = None,
        progress: bool = True,
        on_epoch: Callable[[EpochLog], None] | None = None,
        source: dict[str, Any] | None = None,
    ) -> list[EpochLog]:
        """Train on normal images: build the prototype, co-progress, calibrate.

        Every image is checked before anything is written, so a bad file leaves ``run_dir``
        as it was. Under torchrun every process calls this with the same arguments: each
        trains on its share of the images, and only rank 0 writes ``run_dir`` and shows
        progress (docs/scaling.md).

        Args:
            images: normal training images (Sample records or paths), or a folder of them.
            run_dir: when given, the run is saved there: the config at once, a checkpoint
                every ``train.checkpoint_every`` epochs and at the end, the per-epoch log, and
                the final weights, prototype and calibration. A previous run's cpkp files
                there are removed first (``runio.RUN_FILES``; other files stay).
            progress: show progress bars.
            on_epoch: called after every epoch with its log.
            source: where the images came from (dataset kind and folders), written to
                ``run_dir/source.json`` for ``cpkp test``.

        Returns:
            One :class:`EpochLog` per epoch.
        """
        cfg = self.config
        distributed.init_from_env(self.device)
        progress = progress and distributed.is_main()
        dataset = self._training_dataset(images)
        seed_everything(cfg.train.seed)
        # Weights, device and prototype width fail here, before run_dir (and a run being
        # replaced there) is touched; starting the folder uses no random numbers.
        monitor = self._build_networks()
        if cfg.prototype.enabled:
            check_prototype_width(monitor.channels, cfg.prototype)
        run_dir = self._start_run_dir(run_dir, source)

        if cfg.prototype.enabled:
            self.prototype = self._build_prototype(monitor, dataset, progress)
            self.kp_scale = self._kp_scale() if cfg.train.kp_normalise else 1.0
            self.kp_scale = distributed.broadcast_object(self.kp_scale)
        del monitor

        trainer = self._trainer()
        generator = torch.Generator().manual_seed(cfg.train.seed)
        return self._train(dataset, trainer, generator, 0, run_dir, progress, on_epoch)

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        progress: bool = True,
        on_epoch: Callable[[EpochLog], None] | None = None,
    ) -> Detector:
        """Continue a killed run from its last checkpoint and finish it.

        The prototype, both optimisers' states and every random state (data order included)
        are restored, never rebuilt, so on the CPU the final weights are bit-identical to those
        of an uninterrupted run with the same seed.
        """
        from cpkp.checkpoint import optimizer_from_flat, read_checkpoint, restore_random_states

        run_dir = Path(run_dir)
        tensors, meta = read_checkpoint(run_dir)
        detector = cls(load_config(run_dir / runio.CONFIG_FILE))
        distributed.init_from_env(detector.device)
        detector._restore_networks(tensors, run_dir)
        detector.train_images = list(meta["train_images"])
        detector.kp_scale = float(meta["kp_scale"])
        detector.weights_source = meta["weights_source"]
        detector.epoch_logs = [EpochLog(**log) for log in meta["epoch_logs"]]
        detector._run_dir = run_dir
        if (run_dir / runio.META_FILE).is_file():
            # A finished run trained on (--epochs): its history so far stays on record.
            detector.history = list(runio.read_meta(run_dir).get("history", []))
            detector._drop_additions_after_checkpoint(run_dir)
        dataset = detector._training_dataset(detector.train_images)

        trainer = detector._trainer()
        optimizer_from_flat(trainer.optim_student, tensors, meta["optim_student"], "optim_student")
        optimizer_from_flat(trainer.optim_teacher, tensors, meta["optim_teacher"], "optim_teacher")
        generator = torch.Generator()
        restore_random_states(tensors, meta["random"], generator)
        logger.info("resuming %s after epoch %d", run_dir, meta["epoch"])
        detector._train(dataset, trainer, generator, meta["epoch"], run_dir, progress, on_epoch)
        return detector

    def _drop_additions_after_checkpoint(self, run_dir: Path) -> None:
        """Take add-normal's images off the history: the checkpoint has none of them."""
        additions = [e for e in self.history if e.get("event") == "add-normal"]
        if not additions:
            return
        dropped = [image for event in additions for image in event.get("images", [])]
        logger.warning(
            "%s: resuming from the training checkpoint drops the %d image(s) that add-normal "
            "added after it; add them again with `cpkp add-normal` once training ends",
            run_dir,
            len(dropped),
        )
        self.history = [e for e in self.history if e.get("event") != "add-normal"]
        self.history.append({"event": "additions-dropped", "time": _now(), "images": dropped})

    def _training_dataset(self, images: ImageInput) -> ImageDataset:
        images = image_list(images)
        if len(images) == 0:
            raise DatasetError("no training images were given")
        validate_images(images)
        if self.roi is None and self.config.data.roi is not None:
            self.roi = torch.from_numpy(load_roi(self.config.data.roi))
        dataset = ImageDataset(images, self.image_size, self.geometry)
        self._check_batchnorm_batches(len(dataset))
        if len(images) < distributed.world_size():
            raise DatasetError(
                f"{len(images)} training image(s) for {distributed.world_size()} processes: "
                "each process needs at least one; start fewer processes (--nproc-per-node)"
            )
        if not self.geometry.single_view:
            logger.info(
                "%d training images give %d tiles (%s)",
                len(images),
                len(dataset),
                self.geometry.describe(),
            )
        # Absolute, so that the run folder stays valid when the working directory changes.
        self.train_images = [str(_path_of(s).absolute()) for s in images]
        self._train_views = len(dataset)
        return dataset

    def _check_batchnorm_batches(self, n_images: int) -> None:
        """Refuse what would give the student a one-value BatchNorm batch in training.

        At 32 px the RD bottleneck's grid is 1x1, so a batch of one image gives BatchNorm a
        single value per channel, which it cannot normalise. A lone last batch is dropped
        then (:meth:`_drops_lone_batch`); a single image or ``batch_size`` 1 is refused. The
        FD student's smallest grid is 2x2 at 32 px, so it trains on any batch.
        """
        if not self._has_1x1_grid() or n_images == 0:
            return
        if n_images == 1:
            raise DatasetError(
                f"1 training image at data.image_size={self.image_size}: the student's "
                "bottleneck grid is 1x1 and BatchNorm needs more than one value per channel; "
                "give at least 2 images or an image size of 64 or more"
            )
        if self.config.train.batch_size == 1:
            raise ConfigError(
                f"train.batch_size=1 at data.image_size={self.image_size}: the student's "
                "bottleneck grid is 1x1 and BatchNorm needs more than one value per channel; "
                "use a batch size of 2 or more, or an image size of 64 or more"
            )
        if self._drops_lone_batch(n_images):
            logger.info(
                "%d images in batches of %d: each epoch leaves out its one-image last batch "
                "(a 1x1 grid at %d px)",
                n_images,
                self.config.train.batch_size,
                self.image_size,
            )

    def _drops_lone_batch(self, n_images: int) -> bool:
        """Whether training drops a last batch of one image (see _check_batchnorm_batches)."""
        lone = n_images > 1 and n_images % self.config.train.batch_size == 1
        return lone and self._has_1x1_grid()

    def _has_1x1_grid(self) -> bool:
        """Whether the student has a 1x1 feature grid (RD's bottleneck at stride 32)."""
        return self.config.model.variant == "rd" and self.image_size < 64

    def _start_run_dir(
        self, run_dir: str | Path | None, source: dict[str, Any] | None = None
    ) -> Path | None:
        """Replace a previous run's cpkp files in ``run_dir``; write the config and source.

        The CLI's ``train.log`` stays: the command line may already be writing to it.
        """
        if run_dir is None:
            self._run_dir = None  # a new model: a folder it was loaded from is no longer its own
            return None
        run_dir = Path(run_dir)
        if not distributed.is_main():
            self._run_dir = run_dir  # rank 0 writes it
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        if runio.run_markers(run_dir):
            names = [n for n in runio.RUN_FILES if n != runio.LOG_FILE]
            removed = runio.remove_run_files(run_dir, names, overlays=True)
            removed += runio.remove_stale_export(run_dir)
            logger.info("%s: replaced a previous run (%d files removed)", run_dir, len(removed))
        (run_dir / runio.TRAIN_LOG).unlink(missing_ok=True)
        runio.write_yaml(run_dir / runio.CONFIG_FILE, self.config.to_dict())
        if source is not None:
            runio.write_json(run_dir / runio.SOURCE_FILE, source)
        self._run_dir = run_dir
        return run_dir

    def _build_prototype(
        self, monitor: nn.Module, dataset: ImageDataset, progress: bool
    ) -> Prototype:
        """K from the monitor's patches of every training image (DESIGN.md §1.1).

        Under torchrun each rank extracts the patches of its share of the images; rank 0
        merges the banks in image order, selects K once and sends it to every rank, so all
        hold the same bits. The bank is then the one a single process builds, unless a rank's
        share alone exceeds ``prototype.max_bank``.
        """
        cfg = self.config
        sampler = self._shard(dataset)
        loader = self._loader(dataset, sampler=sampler)
        if sampler is None:
            return build_prototype(
                monitor, loader, cfg.prototype, self.device, seed=cfg.train.seed, progress=progress
            )
        seed = cfg.train.seed
        bank, provenance, grid = monitor_bank(
            monitor, loader, cfg.prototype, self.device, seed + distributed.rank(), progress
        )
        banks, provenances = distributed.gather_rows(bank), distributed.gather_rows(provenance)
        chosen = None
        if distributed.is_main():
            bank, provenance = merge_banks(banks, provenances, grid, cfg.prototype, seed)
            logger.info("prototype: the other ranks wait while rank 0 selects K")
            chosen = select_prototype(
                bank, provenance, grid, cfg.prototype, self.device, seed, progress
            ).to_tensors()
        return Prototype.from_tensors(distributed.broadcast_tensors(chosen))

    def _shard(
        self, dataset: ImageDataset, generator: torch.Generator | None = None
    ) -> distributed.ShardSampler | None:
        """This rank's share of the images under torchrun; None in a single process.

        With the run's generator (training): shuffled as one process would, and padded so
        that every rank takes the same number of steps. Without: each image once overall.
        """
        if not distributed.active():
            return None
        training = generator is not None
        return distributed.ShardSampler(dataset, training, generator, pad=training)

    def _trainer(self) -> CoProgressionTrainer:
        vectors = None
        if self.prototype is not None:
            vectors = self.prototype.vectors.to(self.device).float()
        return CoProgressionTrainer(self.teacher, self.student, vectors, self.config, self.kp_scale)

    def _train(
        self,
        dataset: ImageDataset,
        trainer: CoProgressionTrainer,
        generator: torch.Generator,
        start_epoch: int,
        run_dir: Path | None,
        progress: bool,
        on_epoch: Callable[[EpochLog], None] | None,
    ) -> list[EpochLog]:
        """Epochs ``start_epoch + 1 .. epochs``, checkpoints, then calibration and the save."""
        cfg = self.config
        if not distributed.is_main():
            run_dir, progress = None, False  # rank 0 writes the run folder and shows progress
        sampler = self._shard(dataset, generator)
        drop = self._drops_lone_batch(len(dataset) if sampler is None else len(sampler))
        loader = self._loader(
            dataset, shuffle=True, generator=generator, drop_last=drop, sampler=sampler
        )
        if len(loader) == 0:
            raise DatasetError(
                f"{len(dataset)} training images for {distributed.world_size()} processes "
                f"leave each process one image per epoch, a lone batch that the {self.image_size}"
                " px student cannot normalise: give more images or start fewer processes"
            )
        views = "" if len(dataset) == len(dataset.samples) else f" ({len(dataset)} tiles)"
        logger.info(
            "training %s student on %d images%s for %d epochs (co_progression=%s, prototype=%s)",
            cfg.model.variant.upper(),
            len(dataset.samples),
            views,
            cfg.train.epochs,
            cfg.train.co_progression,
            cfg.prototype.enabled,
        )
        kept = None
        with trainer.data_parallel(self.device):
            for epoch in range(start_epoch, cfg.train.epochs):
                log = self._train_epoch(trainer, loader, epoch, progress)
                self.epoch_logs.append(log)
                if on_epoch is not None:
                    on_epoch(log)
                if cfg.train.keep_epoch == epoch + 1:
                    kept = self._snapshot()
                if run_dir is not None:
                    _append_train_log(run_dir / runio.TRAIN_LOG, log)
                    done = epoch + 1 == cfg.train.epochs
                    if (epoch + 1) % cfg.train.checkpoint_every == 0 or done:
                        self._save_checkpoint(run_dir, trainer, generator, epoch + 1)

        if kept is not None:
            # The user chose an earlier epoch from normal images only; never by test labels.
            self.teacher.load_state_dict(kept["teacher"])
            self.student.load_state_dict(kept["student"])
            logger.info("kept the weights of epoch %d", cfg.train.keep_epoch)
        # NOTE: RD4AD tests with the running statistics as they stand after training; cpkp
        # recomputes them once for the final weights (docs/deviations.md).
        sampler = self._shard(dataset)
        drop = self._drops_lone_batch(len(dataset) if sampler is None else len(sampler))
        recalibrate_batchnorm(
            self.student,
            self.teacher,
            (
                _channels_last(b["image"], self.device)
                for b in self._loader(dataset, drop_last=drop, sampler=sampler)
            ),
        )
        average_running_stats(self.student)  # under torchrun: over every rank's batches
        self.calibrate(dataset, progress=progress)
        n_images = len(dataset.samples)  # images, not tiles
        event = {"event": "fit", "time": _now(), "images": n_images, "epochs": cfg.train.epochs}
        if start_epoch > 0:
            event |= {"event": "resume", "from_epoch": start_epoch}
        self.history.append(event)
        if run_dir is not None:
            self.save(run_dir)
        distributed.barrier()  # every rank ends with rank 0's files written
        return self.epoch_logs

    def _snapshot(self) -> dict[str, dict[str, Tensor]]:
        return {
            "teacher": {k: v.clone() for k, v in self.teacher.state_dict().items()},
            "student": {k: v.clone() for k, v in self.student.state_dict().items()},
        }

    def _save_checkpoint(
        self, run_dir: Path, trainer: CoProgressionTrainer, generator: torch.Generator, epoch: int
    ) -> None:
        from cpkp.checkpoint import optimizer_to_flat, random_states, write_checkpoint

        tensors = self._network_tensors()
        student_t, student_meta = optimizer_to_flat(trainer.optim_student, "optim_student")
        teacher_t, teacher_meta = optimizer_to_flat(trainer.optim_teacher, "optim_teacher")
        rng_t, rng_meta = random_states(generator)
        meta = {
            "format_version": runio.FORMAT_VERSION,
            "cpkp_version": cpkp.__version__,
            "epoch": epoch,
            "train_images": self.train_images,
            "kp_scale": self.kp_scale,
            "weights_source": self.weights_source,
            "optim_student": student_meta,
            "optim_teacher": teacher_meta,
            "random": rng_meta,
            "epoch_logs": [dataclasses.asdict(log) for log in self.epoch_logs],
        }
        write_checkpoint(run_dir, tensors | student_t | teacher_t | rng_t, meta)
        logger.info("checkpoint after epoch %d written to %s", epoch, run_dir)

    def check_networks(self) -> None:
        """Build the backbone once to check its weights and the prototype width; keep nothing.

        Raises:
            WeightsError: the backbone's weights cannot be found or do not fit.
            ConfigError: ``prototype.channels_per_level`` exceeds a level's channels.
        """
        cfg = self.config
        backbone = create_backbone(
            cfg.model.backbone,
            weights=cfg.model.weights,
            download=cfg.model.download_weights,
            quiet=True,
        )
        if cfg.prototype.enabled:
            check_prototype_width(backbone.channels, cfg.prototype)

    def _build_networks(self) -> nn.Module:
        """Monitor (frozen pretrained backbone), teacher (its trainable copy) and student."""
        cfg = self.config
        monitor = create_backbone(
            cfg.model.backbone, weights=cfg.model.weights, download=cfg.model.download_weights
        )
        self.weights_source = monitor.weights_source
        monitor = _place(monitor, self.device).eval().requires_grad_(False)
        self.teacher = copy.deepcopy(monitor).requires_grad_(True)
        student = create_student(cfg.model.variant, monitor.name, monitor.channels)
        self.student = _place(student, self.device)
        return monitor

    def _train_epoch(
        self, trainer: CoProgressionTrainer, loader: DataLoader, epoch: int, progress: bool
    ) -> EpochLog:
        sums: dict[str, float] = {"kd": 0.0, "kp": 0.0, "teacher": 0.0}
        first = None
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{self.config.train.epochs}",
            disable=not progress,
            leave=False,
        )
        start = time.perf_counter()
        for i, batch in enumerate(bar):
            x = _channels_last(batch["image"], self.device)
            with self._autocast():
                result = trainer.train_step(x, measure_gradients=(i == 0))
            check_finite(result, epoch, i)
            first = first or result
            sums["kd"] += result.kd
            sums["kp"] += result.kp or 0.0
            sums["teacher"] += result.teacher or 0.0
            postfix = {"L_kd": f"{result.kd:.4f}"}
            if result.kp is not None:
                postfix["L_kp"] = f"{result.kp:.4f}"
            bar.set_postfix(postfix)
        n = len(loader)
        if distributed.active():
            # Every rank takes n steps; the log shows the mean over the global batches.
            totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
            distributed.all_reduce_mean_([totals])
            sums = dict(zip(sums, totals.tolist()))
        has_kp = trainer.teacher_steps and self.prototype is not None
        log = EpochLog(
            epoch=epoch + 1,
            kd=sums["kd"] / n,
            kp=sums["kp"] / n if has_kp else None,
            teacher=sums["teacher"] / n if trainer.teacher_steps else None,
            grad_kp_norm=first.grad_kp_norm,
            grad_kd_norm=first.grad_kd_norm,
            grad_cosine=first.grad_cosine,
            extra={"seconds": round(time.perf_counter() - start, 3)},
        )
        logger.info(
            "epoch %d: L_kd %.5f%s%s",
            log.epoch,
            log.kd,
            "" if log.kp is None else f", L_kp {log.kp:.5f}",
            ""
            if log.grad_cosine is None
            else f", |grad kp| {log.grad_kp_norm:.3g}, |grad kd| {log.grad_kd_norm:.3g}, "
            f"cos {log.grad_cosine:.3f}",
        )
        return log

    def _scoring_networks(self) -> tuple[nn.Module, nn.Module]:
        """Teacher and student for scoring; with ``train.compile``, their ``torch.compile``.

        Compiled once per pair of network objects and kept beside them (the weights stay
        shared, so a compiled pair sees training's updates); training always runs the plain
        modules, whose autograd.grad teacher step and DDP wrapping compilation does not help.
        """
        if not self.config.train.compile:
            return self.teacher, self.student
        key = (id(self.teacher), id(self.student))
        if self._compiled is None or self._compiled[0] != key:
            logger.info("compiling the teacher and the student with torch.compile (first call)")
            self._compiled = (key, torch.compile(self.teacher), torch.compile(self.student))
        return self._compiled[1], self._compiled[2]

    def _autocast(self):
        if self.config.train.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _kp_scale(self) -> float:
        """Mean nearest-neighbour distance among prototypes (``kp_normalise``)."""
        vectors = self.prototype.vectors.float()
        if len(vectors) < 2:
            return 1.0
        idx = torch.arange(len(vectors))
        dists = []
        for start in range(0, len(vectors), 4096):
            rows = idx[start : start + 4096]
            d = torch.cdist(vectors[rows], vectors)
            d[torch.arange(len(rows)), rows] = math.inf
            dists.append(d.min(1).values)
        return float(torch.cat(dists).mean().clamp_min(1e-6))

    # -------------------------------------------------------------------------- calibration

    def calibrate(
        self, images: ImageDataset | Sequence[ImageSource], progress: bool = False
    ) -> Calibration:
        """Robust scaling and thresholds from normal training images (own prototypes excluded).

        The scaling is measured on the unsmoothed maps of the model inputs, on their image
        part (not the padding) inside the region of interest. The image threshold is the
        ``image_threshold_quantile`` of these images' scores, the pixel threshold the
        ``pixel_threshold_quantile`` of their smoothed pixel scores, both taken on the maps
        that :meth:`predict` computes (tiles stitched, padding cut off, inside the region of
        interest), so that they mean the same there. A tile's search leaves out the
        prototypes of every tile of its image.
        """
        dataset = images if isinstance(images, ImageDataset) else self._dataset(images)
        sampler = self._shard(dataset)  # under torchrun: this rank's share of the images
        prototype_owners = self._prototype_owners(dataset)
        kd_all, kp_all, order, sizes = [], [], [], []
        loader = self._loader(dataset, sampler=sampler)
        for batch in tqdm(loader, desc="calibrating", disable=not progress):
            kd, kp, _ = self._raw_maps(batch["image"], batch["owner"], prototype_owners)
            if kd is not None:
                kd_all.append(kd.cpu())
            if kp is not None:
                kp_all.append(kp.cpu())
            order.append(batch["index"])
            sizes.append(batch["size"])
        if sampler is not None:
            # Rank 0 computes the statistics from every rank's maps, in image order, and sends
            # them: every rank holds the same calibration.
            kd_all = self._gather_maps(kd_all, order)
            kp_all = self._gather_maps(kp_all, order) if self.prototype is not None else []
            sizes = _gather_in_order(sizes, order, torch.zeros(0, 2, dtype=torch.long))
            if not distributed.is_main():
                self.calibration = Calibration.from_dict(distributed.broadcast_object(None))
                return self.calibration
        kd = torch.cat(kd_all) if kd_all else None  # [V, 1, S, S], every view in order
        kp = torch.cat(kp_all) if kp_all else None
        sizes = torch.cat(sizes)
        layouts = [
            self.geometry.layout(*sizes[dataset.starts[i]].tolist())
            for i in range(len(dataset.samples))
        ]
        inside = self._inside_views(layouts)
        cal = Calibration()
        if kd is not None:
            cal.kd_median, cal.kd_p99 = robust_scale(_subsample(_select(kd, inside)))
        if kp is not None:
            cal.kp_median, cal.kp_p99 = robust_scale(_subsample(_select(kp, inside)))
        self.calibration = cal

        fused = self._fuse_smooth(kd, kp)
        scores, pixels = [], []
        for i, layout in enumerate(layouts):
            views = dataset.views_of(i)
            canvas = stitch(fused[views.start : views.stop], layout)
            roi = None if self.roi is None else resize_nearest(self.roi, layout.canvas)
            scores.append(region_max(canvas, roi))
            inside_roi = roi is not None and bool(roi.any())
            pixels.append(canvas[:, roi].reshape(-1) if inside_roi else canvas.reshape(-1))
        scoring = self.config.scoring
        cal.image_threshold = float(
            np.quantile(torch.cat(scores).numpy(), scoring.image_threshold_quantile)
        )
        cal.pixel_threshold = float(
            np.quantile(_subsample(torch.cat(pixels)), scoring.pixel_threshold_quantile)
        )
        logger.info(
            "calibration: A_kd median %.4g p99 %.4g; A_kp median %.4g p99 %.4g; "
            "thresholds image %.4g pixel %.4g",
            cal.kd_median,
            cal.kd_p99,
            cal.kp_median,
            cal.kp_p99,
            cal.image_threshold,
            cal.pixel_threshold,
        )
        if sampler is not None:
            distributed.broadcast_object(cal.to_dict())
        return cal

    def _prototype_owners(self, dataset: ImageDataset) -> Tensor | None:
        """[M] the image of ``dataset`` each prototype was taken from (-1: none of them).

        A prototype's provenance names the model input (view) it came from; with tiles,
        several views share an image.
        """
        if self.prototype is None:
            return None
        views = self.prototype.provenance[:, 0]
        known = views < len(dataset)
        owners = torch.full_like(views, -1)
        owners[known] = dataset.owners[views[known]]
        return owners.to(self.device)

    def _inside_views(self, layouts: Sequence[Layout]) -> Tensor | None:
        """[V, 1, S, S] bool: the image part of every view inside the region of interest.

        None when every pixel counts (squashed images without a region of interest).
        """
        if self.geometry.mode == "squash" and self.roi is None:
            return None
        masks = []
        for layout in layouts:
            roi = None if self.roi is None else resize_nearest(self.roi, layout.canvas)
            masks.append(valid_views(layout, roi))
        return torch.cat(masks)

    def _gather_maps(self, maps: list[Tensor], order: list[Tensor]) -> list[Tensor]:
        """Every rank's maps ``[n_r, 1, S, S]`` on rank 0 as one stack in item order."""
        size = self.image_size
        return _gather_in_order(maps, order, torch.zeros(0, 1, size, size))

    # ----------------------------------------------------------------- adding normal images

    def add_normal(self, images: ImageInput, progress: bool = False) -> dict[str, Any]:
        """Add approved normal images to the trained detector without training its networks.

        Their patch vectors (``f_agg`` of the teaching monitor, rebuilt as :meth:`fit` built
        it) join the prototype: K is chosen anew over the old prototypes and the new patches
        by the same greedy k-center rule, keeping ``M = coreset_size(min(bank, max_bank))``
        prototypes for the bank of all training images, old and new, which is the ``M`` that
        :meth:`fit` on all of them would keep. The scaling and thresholds are then recomputed
        over all training images, each without its own prototypes. Teacher and student are
        not touched. Images already in the training list are skipped with a warning. When an
        image cannot be read, nothing changes. :meth:`save` writes the result.

        Args:
            images: the new normal images (paths or Sample records), or a folder of them.
            progress: show progress bars.

        Returns:
            ``{"added": [absolute paths], "skipped": [already in the run], "prototypes_before":
            M0, "prototypes_after": M1, "bank_size": patch vectors of all training images,
            "calibration_before": {...}, "calibration": {...}}``.

        Raises:
            ConfigError: the run has no prototype (``prototype.enabled`` is false).
            ImageError: a new image, or a training image needed for the calibration, cannot
                be read (every bad file is named).
            WeightsError: the monitor cannot be rebuilt, or does not reproduce K.
        """
        self._require_fitted()
        if self.prototype is None:
            raise ConfigError(
                "prototype.enabled is false in this run: it has no knowledge prototype for "
                "add-normal to extend; retrain with the new images instead"
            )
        added, skipped = self._new_images(images)
        before = (self.prototype, self.calibration, self.train_images, self._train_views)
        summary = {
            "added": added,
            "skipped": skipped,
            "prototypes_before": len(self.prototype.vectors),
            "prototypes_after": len(self.prototype.vectors),
            "bank_size": self._bank_size(),
            "calibration_before": self.calibration.to_dict(),
            "calibration": self.calibration.to_dict(),
        }
        if not added:
            logger.warning("add-normal: no new image; the run is left as it was")
            return summary
        validate_images(added)
        everything = self._readable_training_images(added)

        prototype = self._extended_prototype(added, everything, progress)
        self.prototype, self.train_images = prototype, [*self.train_images, *added]
        self._train_views = len(everything)
        try:
            self.calibrate(everything, progress=progress)
        except BaseException:
            self.prototype, self.calibration, self.train_images, self._train_views = before
            raise
        self.history.append(
            {
                "event": "add-normal",
                "time": _now(),
                "images": added,
                "prototypes_before": summary["prototypes_before"],
                "prototypes_after": len(prototype.vectors),
            }
        )
        summary["prototypes_after"] = len(prototype.vectors)
        summary["bank_size"] = self._bank_size()
        summary["calibration"] = self.calibration.to_dict()
        return summary

    def _new_images(self, images: ImageInput) -> tuple[list[str], list[str]]:
        """Absolute paths of the images not yet in the training list, and of those that are."""
        items = image_list(images)
        if len(items) == 0:
            raise DatasetError("no images were given")
        known = {Path(p).resolve() for p in self.train_images}
        added, skipped = [], []
        for item in items:
            path = _path_of(item)
            key = path.resolve()
            (skipped if key in known else added).append(str(path.absolute()))
            known.add(key)
        if skipped:
            logger.warning(
                "add-normal: %d image(s) already in the run's training images, skipped: %s",
                len(skipped),
                ", ".join(skipped),
            )
        return added, skipped

    def _readable_training_images(self, added: list[str]) -> ImageDataset:
        """All training images, old then new; the old ones must still be readable."""
        try:
            validate_images(self.train_images)
        except ImageError as err:
            raise ImageError(
                "add-normal recomputes the scaling and thresholds on every training image of "
                f"the run (meta.json train_images), so they must stay readable: {err}"
            ) from err
        return ImageDataset([*self.train_images, *added], self.image_size, self.geometry)

    def _extended_prototype(
        self, added: list[str], everything: ImageDataset, progress: bool
    ) -> Prototype:
        """K re-selected over the old prototypes and the monitor's patches of ``added``."""
        cfg = self.config
        monitor = self._rebuild_monitor()
        self._check_monitor(monitor, everything)
        # The new images' views come last; their item indices become the provenance.
        first = everything.starts[len(self.train_images)]
        new_views = Subset(everything, range(first, len(everything)))
        batches = ({"image": b["image"], "index": b["index"]} for b in self._view_loader(new_views))
        vectors, provenance, grid = monitor_bank(
            monitor, batches, cfg.prototype, self.device, cfg.train.seed, progress
        )
        del monitor
        if tuple(grid) != tuple(self.prototype.grid):
            raise CheckpointError(
                f"the new images give a {grid} prototype grid, the run's prototype has "
                f"{self.prototype.grid}: the run folder does not match its config.yaml"
            )

        bank = len(everything) * grid[0] * grid[1]
        m = coreset_size(min(bank, cfg.prototype.max_bank), cfg.prototype)
        m = min(m, len(self.prototype.vectors) + len(vectors))
        logger.info(
            "add-normal: %d new images, %d patch vectors; prototype re-selected over %d old "
            "prototypes and the new patches: M = %d for a bank of %d patch vectors",
            len(added),
            len(vectors),
            len(self.prototype.vectors),
            m,
            bank,
        )
        return reselect_prototype(
            self.prototype,
            vectors,
            provenance,
            m,
            cfg.prototype,
            seed=cfg.train.seed,
            progress=progress,
            device=self.device,
        )

    def _rebuild_monitor(self) -> nn.Module:
        """The teaching monitor as :meth:`fit` built it, frozen, on this detector's device.

        A ``random:`` backbone is drawn right after seeding with ``train.seed``, as in fit; the
        caller's random state is left as it was.
        """
        model = self.config.model
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.train.seed)
                monitor = create_backbone(
                    model.backbone, weights=model.weights, download=model.download_weights
                )
        except WeightsError as err:
            raise WeightsError(
                "add-normal needs the teaching monitor, the pretrained backbone the prototype "
                f"was built from (model.backbone={model.backbone!r} in {runio.CONFIG_FILE}), "
                f"and cannot rebuild it: {err}"
            ) from err
        return _place(monitor, self.device).eval().requires_grad_(False)

    def _check_monitor(self, monitor: nn.Module, everything: ImageDataset) -> None:
        """Refuse a monitor that does not give back the stored prototypes of one image.

        Other weights than those K was built from would put the new patches in another feature
        space than the old prototypes. The owner of the first prototype is recomputed; float16
        storage and another device stay far inside the 1% tolerance.
        """
        provenance = self.prototype.provenance
        owner = int(provenance[0, 0])
        rows = provenance[:, 0] == owner
        x = everything[owner]["image"].unsqueeze(0)
        with torch.inference_mode():
            agg = f_agg(monitor(_channels_last(x, self.device)), self.config.prototype)
        agg = agg[0].float().cpu()
        recomputed = agg[:, provenance[rows, 1], provenance[rows, 2]].T  # [k, D]
        stored = self.prototype.vectors[rows].float()
        error = float((recomputed - stored).abs().max())
        scale = float(stored.abs().max())
        if not error <= 0.01 * scale + 1e-3:
            raise WeightsError(
                f"the teaching monitor rebuilt from model.backbone={self.config.model.backbone!r} "
                f"(weights: {monitor.weights_source}) does not reproduce the run's prototypes "
                f"(largest difference {error:.3g} for values up to {scale:.3g}, on "
                f"{everything.samples[int(everything.owners[owner])].image}); the run was built "
                "with other weights "
                f"({self.weights_source or 'unknown'}): make them available as "
                f"model.weights in {runio.CONFIG_FILE}"
            )

    def _bank_size(self) -> int:
        """Patch vectors of all training images: the bank that M is measured against."""
        h, w = self.prototype.grid
        views = len(self.train_images) if self._train_views is None else self._train_views
        return views * h * w

    # ------------------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score_batch(self, x: Tensor) -> ScoreBatch:
        """Score a batch of images already at the model size.

        Args:
            x: [B, 3, S, S] images in [0, 1].
        """
        self._require_fitted()
        kd, kp, index = self._raw_maps(x)
        maps = self._fuse_smooth(kd, kp)
        sigma = self._sigma()
        return ScoreBatch(
            scores=image_scores(maps),
            maps=maps,
            kd_maps=None if kd is None else gaussian_smooth(kd, sigma),
            kp_maps=None if kp is None else gaussian_smooth(kp, sigma),
            kp_index=index,
        )

    def predict(
        self,
        images: ImageInput | Tensor,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> list[Prediction]:
        """Score images of any size; maps come back at each image's own size.

        Each image becomes model inputs as ``data.resize`` and ``data.tile`` say
        (:mod:`cpkp.geometry`); its score is the maximum of its map inside the region of
        interest. An image is anomalous when its score is strictly above the image threshold,
        a pixel when its value is strictly above the pixel threshold (and it lies inside the
        region of interest; the map is zero outside).

        Args:
            images: paths / Sample records, a folder of images, or a tensor [B, 3, H, W] in
                [0, 1].
            batch_size: model inputs per forward pass, a tile counting as one (default: the
                training batch size).
            workers: data-loader processes reading the images (default: data.num_workers).

        Raises:
            ImageError: an image cannot be read (see :func:`cpkp.data.load_image`).
            ScoringError: a score or map is NaN or infinite (the images are named).
        """
        return require_finite(list(self.iter_predict(images, batch_size, workers)))

    def iter_predict(
        self,
        images: ImageInput | Tensor,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[Prediction]:
        """:meth:`predict` image by image, in input order, each as soon as it is scored.

        The predictions are not checked for NaN or infinite values here; :meth:`predict` and
        ``cpkp predict`` check them.
        """
        cal = self.calibration
        for item in self.image_maps(images, batch_size, workers):
            yield prediction_from(item, cal.image_threshold, cal.pixel_threshold)

    def image_maps(
        self,
        images: ImageInput | Tensor,
        batch_size: int | None = None,
        workers: int | None = None,
        parts: bool = False,
    ) -> Iterator[ImageMaps]:
        """Each image's smoothed maps on its canvas, in input order (:class:`ImageMaps`).

        Args:
            images: as :meth:`predict` takes them.
            batch_size: model inputs per forward pass (default: the training batch size).
            workers: data-loader processes reading the images (default: data.num_workers).
            parts: also return the smoothed ``A_kd`` and ``A_kp`` maps (``"kd"``, ``"kp"``).
        """
        self._require_fitted()
        step = batch_size or self.config.train.batch_size
        if isinstance(images, Tensor):
            batches = tensor_views(images, self.geometry, step)
        else:
            batches = self._view_loader(self._dataset(images), step, workers)
        return stream_image_maps(
            batches, lambda x: self._score_views(x, parts), self.geometry, self.roi
        )

    def _score_views(self, x: Tensor, parts: bool) -> dict[str, Tensor]:
        """Smoothed maps of a batch of views [B, 3, S, S]: part -> [B, 1, S, S] on the CPU."""
        result = self.score_batch(x.to(self.device))
        out = {"fused": result.maps.cpu()}
        if parts:
            for name, maps in (("kd", result.kd_maps), ("kp", result.kp_maps)):
                if maps is not None:
                    out[name] = maps.cpu()
        if result.kp_index is not None and self.geometry.mode == "squash":
            out["kp_index"] = result.kp_index.cpu()
        return out

    def _raw_maps(
        self, x: Tensor, owners: Tensor | None = None, prototype_owners: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Unsmoothed ``A_kd`` and ``A_kp`` at the model size, and the prototype indices.

        Args:
            x: [B, 3, S, S] model inputs.
            owners: [B] the image each input belongs to. With ``prototype_owners`` ([M], the
                image each prototype came from), an input's search leaves out its own image's
                prototypes (calibration), unless they are all of them.
        """
        x = _channels_last(x, self.device)
        size = (x.shape[-2], x.shape[-1])
        with torch.inference_mode(), self._autocast():
            self.teacher.eval()
            self.student.eval()
            teacher, student = self._scoring_networks()
            teacher_feats = [f.float() for f in teacher(x)]
            student_feats = [f.float() for f in student(x, teacher_feats)]
        kd = kd_map(teacher_feats, student_feats, size)
        if self.prototype is None:
            return kd, None, None
        vectors = self.prototype.vectors.to(self.device)
        exclude = None
        if owners is not None and prototype_owners is not None:
            exclude = [prototype_owners == int(i) for i in owners]
            exclude = [None if bool(m.all()) else m for m in exclude]
        kp, index = kp_map(teacher_feats, vectors, self.config.prototype, size, exclude)
        return kd, kp, index

    def _fuse_smooth(self, kd: Tensor | None, kp: Tensor | None) -> Tensor:
        scoring = self.config.scoring
        fused = fuse(kd, kp, self.calibration, scoring.gamma, scoring.fusion)
        return gaussian_smooth(fused, self._sigma())

    def _sigma(self) -> float:
        """σ = 4 px at 256x256, scaled with the model size (DESIGN.md §1.3)."""
        return self.config.scoring.sigma * self.image_size / 256.0

    # ------------------------------------------------------------------------ save and load

    def save(self, run_dir: str | Path) -> Path:
        """Write the run folder (config, weights, metadata); every file written atomically.

        Files of an older model in ``run_dir`` are removed, so the folder never mixes two
        runs: test outputs (metrics.json, scores.csv, overlays/) always, and a training run's
        checkpoint, logs and source.json unless ``run_dir`` is the folder this detector was
        trained in, and the model that ``cpkp export`` wrote into ``run_dir/export``. Files
        that cpkp does not write are left alone.
        """
        self._require_fitted()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        own = self._run_dir is not None and _same_folder(self._run_dir, run_dir)
        stale = runio.TEST_FILES if own else (*runio.TEST_FILES, *runio.TRAINING_FILES)
        removed = runio.remove_run_files(run_dir, stale, overlays=True)
        for path in [*removed, *runio.remove_stale_export(run_dir)]:
            logger.info("removed %s, written for an earlier model", path)
        runio.save_tensors(run_dir / runio.WEIGHTS_FILE, self._network_tensors())
        runio.write_yaml(run_dir / runio.CONFIG_FILE, self.config.to_dict())
        runio.write_json(run_dir / runio.META_FILE, self._meta())
        logger.info("saved run to %s", run_dir)
        return run_dir

    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": runio.FORMAT_VERSION,
            "cpkp_version": cpkp.__version__,
            "saved": _now(),
            "backbone": self.config.model.backbone,
            "weights_source": self.weights_source,
            "variant": self.config.model.variant,
            "epochs_done": len(self.epoch_logs) or self._epochs_done,
            "calibration": self.calibration.to_dict(),
            "kp_scale": self.kp_scale,
            "calibrated_with": self._geometry_fields(),
            "prototype_grid": None if self.prototype is None else list(self.prototype.grid),
            "prototype_size": None if self.prototype is None else len(self.prototype.vectors),
            "prototype_bank_size": None if self.prototype is None else self._bank_size(),
            "train_images": self.train_images,
            "history": self.history,
        }

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None) -> Detector:
        """Rebuild a detector from a run folder written by :meth:`save`."""
        run_dir = Path(run_dir)
        meta = runio.read_meta(run_dir)
        config = load_config(run_dir / runio.CONFIG_FILE)
        if device is not None:
            config.train.device = device
        detector = cls(config)
        detector._check_geometry_unchanged(meta.get("calibrated_with") or {}, run_dir)
        detector._restore_networks(runio.load_tensors(run_dir / runio.WEIGHTS_FILE), run_dir)
        try:
            detector.calibration = Calibration.from_dict(meta["calibration"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{run_dir / runio.META_FILE}: no valid 'calibration' entry ({err}); the run was "
                "not finished or the file was edited: retrain or resume it"
            ) from err
        detector.kp_scale = float(meta.get("kp_scale", 1.0))
        detector.train_images = list(meta.get("train_images", []))
        detector.history = list(meta.get("history", []))
        detector.weights_source = meta.get("weights_source", "")
        detector._epochs_done = meta.get("epochs_done")
        if detector.prototype is not None and meta.get("prototype_bank_size"):
            h, w = detector.prototype.grid
            detector._train_views = int(meta["prototype_bank_size"]) // (h * w)
        # Saving back into this folder (add_normal) keeps the run's checkpoint, logs and source.
        detector._run_dir = run_dir
        return detector

    def _geometry_fields(self) -> dict[str, Any]:
        """The config fields that the prototype, calibration and thresholds were computed at."""
        data = self.config.data
        return {f"data.{name}": getattr(data, name) for name in CALIBRATED_FIELDS}

    def _check_geometry_unchanged(self, recorded: dict[str, Any], run_dir: Path) -> None:
        """CheckpointError when config.yaml was edited away from what the run was trained at."""
        for key, now in self._geometry_fields().items():
            if key in recorded and recorded[key] != now:
                raise CheckpointError(
                    f"{run_dir / runio.CONFIG_FILE}: {key} is {now!r}, but the run was trained "
                    f"and calibrated at {recorded[key]!r} ({runio.META_FILE}); set it back, or "
                    "train a new run for the new value"
                )

    def _network_tensors(self) -> dict[str, Tensor]:
        tensors = runio.with_prefix(self.teacher.state_dict(), "teacher")
        tensors |= runio.with_prefix(self.student.state_dict(), "student")
        if self.prototype is not None:
            tensors |= runio.with_prefix(self.prototype.to_tensors(), "prototype")
        if self.roi is not None:
            # Stored with the weights, so that test, predict and export need no mask file.
            tensors[ROI_TENSOR] = self.roi.to(torch.uint8).contiguous()
        return tensors

    def _restore_networks(self, tensors: dict[str, Tensor], run_dir: Path) -> None:
        """Teacher, student and prototype from saved tensors (architectures rebuilt quietly)."""
        name = self.config.model.backbone.removeprefix("random:")
        teacher = create_backbone(f"random:{name}", quiet=True)
        # The configured name, so that the log says the run's backbone, not the empty shell's.
        backbone = self.config.model.backbone
        student = create_student(self.config.model.variant, backbone, teacher.channels)
        _load_state(teacher, runio.split_prefixed(tensors, "teacher"), run_dir, "teacher")
        _load_state(student, runio.split_prefixed(tensors, "student"), run_dir, "student")
        self.teacher = _place(teacher, self.device).eval().requires_grad_(True)
        self.student = _place(student, self.device)
        proto = runio.split_prefixed(tensors, "prototype")
        self.prototype = Prototype.from_tensors(proto) if proto else None
        self.roi = tensors[ROI_TENSOR].bool() if ROI_TENSOR in tensors else None

    # ---------------------------------------------------------------------------- internals

    def _dataset(self, images: ImageInput) -> ImageDataset:
        images = image_list(images)
        if len(images) == 0:
            raise DatasetError("no images were given")
        return ImageDataset(images, self.image_size, self.geometry)

    def _view_loader(
        self,
        dataset: ImageDataset | Subset,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> DataLoader:
        """The views of ``dataset`` in order, for scoring (never shuffled, never sharded)."""
        workers = self.config.data.num_workers if workers is None else workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.config.train.batch_size,
            num_workers=workers,
            worker_init_fn=single_thread_worker if workers else None,
            pin_memory=self.device.type == "cuda",
        )

    def _loader(
        self,
        dataset: ImageDataset,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        sampler: distributed.ShardSampler | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.config.train.batch_size,
            shuffle=shuffle and sampler is None,  # a shard sampler shuffles itself
            sampler=sampler,
            drop_last=drop_last,
            generator=generator,
            num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CheckpointError("this detector is not trained: call fit() or Detector.load()")


def _select(maps: Tensor, inside: Tensor | None) -> Tensor:
    """The values of ``maps`` where ``inside`` is true, flat (all of them without a mask)."""
    return maps.reshape(-1) if inside is None else maps[inside]


def _gather_in_order(rows: list[Tensor], order: list[Tensor], empty: Tensor) -> list[Tensor]:
    """Every rank's rows on rank 0 as one tensor in item order (under torchrun)."""
    local = torch.cat(rows) if rows else empty
    index = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)
    parts, indices = distributed.gather_rows(local), distributed.gather_rows(index)
    if parts is None:
        return []
    return [torch.cat(parts)[torch.argsort(torch.cat(indices))]]


def _place(module: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device`` in channels-last layout.

    Depthwise convolutions (EfficientNet) run several times faster channels-last on CPUs, and
    ResNets are no slower; the layout changes no value.
    """
    return module.to(device=device, memory_format=torch.channels_last)


def _channels_last(x: Tensor, device: torch.device) -> Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def _load_state(module: nn.Module, state: dict[str, Tensor], run_dir: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{run_dir / runio.WEIGHTS_FILE}: the {what} weights do not match the architecture "
            f"named in {runio.CONFIG_FILE} ({str(err).splitlines()[0]})"
        ) from err


def _append_train_log(path: Path, log: EpochLog) -> None:
    """Append one epoch to the CSV log (header on first write)."""
    fields = ["epoch", "kd", "kp", "teacher", "grad_kp_norm", "grad_kd_norm", "grad_cosine"]
    row = [getattr(log, f) for f in fields] + [log.extra.get("seconds")]
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or log.epoch == 1
    with open(path, "w" if new else "a") as fh:
        if new:
            fh.write(",".join(fields + ["seconds"]) + "\n")
        fh.write(",".join("" if v is None else f"{v:.6g}" for v in row) + "\n")


def _subsample(values: Tensor, limit: int = 20_000_000) -> np.ndarray:
    """A strided subset of at most ``limit`` values, for quantiles on large map stacks."""
    flat = values.reshape(-1)
    step = max(1, math.ceil(flat.numel() / limit))
    return flat[::step].float().numpy()


def _path_of(item: ImageSource) -> Path:
    return item.image if isinstance(item, Sample) else Path(item)


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
