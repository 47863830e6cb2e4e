"""Export a trained run to one ONNX graph, and run that graph with onnxruntime.

The graph goes from an image tensor to the image scores and the anomaly maps: the resize to
the model size, the teacher (its normalisation inside), the student, ``A_kd``, the aggregation
``f_agg`` and the nearest-prototype search, the fusion with the run's calibration, and the
Gaussian smoothing. The prototype, the scaling statistics and the thresholds are constants;
the teaching monitor, the optimisers and every training step are left out.

Three library steps do not trace into ONNX as written, so this module has equivalents, each
tested against the library function:

- the antialiased bilinear resize: ONNX ``Resize`` with ``antialias=1`` weighs border pixels
  unlike PyTorch (it repeats the edge where PyTorch renormalises), so the graph multiplies by
  the resize's weight matrices, built inside the graph from the input's height and width;
- the channel and area pooling of ``f_agg`` (the exporter refuses adaptive pooling) and its
  unfold: fixed averaging matrices and shifted slices;
- the nearest-prototype search: one batched matrix product instead of blocks per image.

Files written by :func:`export_onnx`::

    model.onnx   input "image" [B, 3, H, W] float32 in [0, 1], any B, H, W; outputs
                 "scores" [B] and "maps" [B, 1, S, S] at the model size S
    model.json   input size, normalisation, thresholds, calibration, cpkp version, source run,
                 the run's geometry (resize mode, tiles) and region of interest

The graph squashes its input to S x S. A run trained with ``data.resize: aspect`` or with tiles
scores S x S views instead: :class:`OnnxDetector` cuts each image into the views with
:mod:`cpkp.geometry`, runs the graph on them (its resize is then the identity) and stitches the
maps back, exactly as :meth:`cpkp.api.Detector.predict` does; it does so in every mode.
"""

from __future__ import annotations

import base64
import copy
import datetime
import io
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.onnx.operators import shape_as_tensor
from torch.utils.data import DataLoader

import cpkp
from cpkp import runio
from cpkp.api import Detector
from cpkp.config import PrototypeConfig
from cpkp.data.dataset import ImageDataset
from cpkp.errors import CheckpointError, ConfigError, DatasetError
from cpkp.geometry import Geometry
from cpkp.inference import (
    ImageInput,
    Prediction,
    image_list,
    prediction_from,
    require_finite,
    single_thread_worker,
    stream_image_maps,
    tensor_views,
)
from cpkp.prototype import f_agg
from cpkp.scoring import fuse, gaussian_smooth, image_scores, kd_map

logger = logging.getLogger(__name__)

ONNX_FILE, META_FILE = runio.EXPORT_FILES
EXPORT_DIR = runio.EXPORT_DIR  # default output folder inside the run folder (replaced with it)
FORMAT = "cpkp-onnx"
FORMAT_VERSION = 1
OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("scores", "maps")
DYNAMIC_AXES = {
    "image": {0: "batch", 2: "height", 3: "width"},
    "scores": {0: "batch"},
    "maps": {0: "batch"},
}
CHECK_TOLERANCE = 1e-4  # export check: map difference to PyTorch over the largest map value


# ---------------------------------------------------------------------------------------------
# Exportable equivalents of library steps


def resize_weights(in_size: Tensor, out_size: int) -> Tensor:
    """Weights of PyTorch's antialiased bilinear resize along one axis.

    ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` makes output pixel
    ``i`` the triangle-weighted mean of the input pixels around ``(i + 0.5) * in / out``; the
    triangle spans ``in / out`` input pixels on each side when shrinking (one when enlarging),
    and its weights are renormalised where it overhangs the border. Built from tensor
    operations only, so a traced graph keeps ``in_size`` dynamic.

    Args:
        in_size: 0-d integer tensor, the input length.
        out_size: the output length.

    Returns:
        [out_size, in_size] float32, each row summing to 1.
    """
    # The arithmetic follows PyTorch's kernel step by step, so rounding differs least.
    scale = in_size.to(torch.float32) / out_size
    inverse_support = 1.0 / scale.clamp_min(1.0)
    centres = scale * (torch.arange(out_size, dtype=torch.float32) + 0.5)
    pixels = torch.arange(in_size.to(torch.int64), dtype=torch.float32)

    distance = (((pixels[None, :] - centres[:, None]) + 0.5) * inverse_support).abs()
    weights = (1.0 - distance).clamp_min(0.0)
    return weights / weights.sum(1, keepdim=True)


def resize_antialiased(images: Tensor, size: int) -> Tensor:
    """Resize to ``size x size`` as the library does (bilinear, antialiased, clamped to [0, 1]).

    Args:
        images: [B, C, H, W] float in [0, 1], any H and W.
        size: output side S.

    Returns:
        [B, C, S, S] float32; an S x S input comes back unchanged.
    """
    shape = shape_as_tensor(images)  # a tensor, so the traced graph reads H and W at run time
    rows = resize_weights(shape[2], size)
    cols = resize_weights(shape[3], size)
    # Width first, then height: PyTorch's order of the two passes.
    return (rows @ (images.float() @ cols.T)).clamp(0.0, 1.0)


def average_bins(n_in: int, n_out: int) -> Tensor:
    """The matrix of adaptive average pooling from ``n_in`` to ``n_out`` values.

    Bin ``i`` averages inputs ``floor(i n_in / n_out)`` to ``ceil((i + 1) n_in / n_out) - 1``,
    PyTorch's adaptive pooling bins. Returns [n_out, n_in] float32.
    """
    weights = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def unfold_patches(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """``F.unfold`` reshaped to a grid, as shifted slices (exact copies, static sizes).

    Args:
        x: [B, C, H, W].

    Returns:
        [B, C k k, h, w], channels ordered as ``F.unfold`` orders them (c, then ky, then kx).
    """
    _, channels, height, width = x.shape
    h = (height + 2 * padding - kernel_size) // stride + 1
    w = (width + 2 * padding - kernel_size) // stride + 1
    x = F.pad(x, (padding, padding, padding, padding))

    shifted = [
        x[:, :, ky : ky + stride * (h - 1) + 1 : stride, kx : kx + stride * (w - 1) + 1 : stride]
        for ky in range(kernel_size)
        for kx in range(kernel_size)
    ]
    return torch.stack(shifted, dim=2).reshape(-1, channels * kernel_size**2, h, w)


class PatchAggregation(nn.Module):
    """``f_agg`` for fixed feature-map sizes, with pooling as fixed matrix products.

    Args:
        feats: the three feature maps of one batch at the model size, to read channels and
            sizes from (their values are not used).
        cfg: the prototype options the run was trained with.
    """

    def __init__(self, feats: Sequence[Tensor], cfg: PrototypeConfig) -> None:
        super().__init__()
        self.grid = tuple(f_agg(feats, cfg).shape[-2:])
        self.kernel_size, self.stride, self.padding = cfg.kernel_size, cfg.stride, cfg.padding
        self.modes = []
        for level, f in enumerate(feats):
            channels, height, width = f.shape[1:]
            pool = average_bins(channels, cfg.channels_per_level)
            self.register_buffer(f"channels{level}", pool[:, :, None, None], persistent=False)
            self.modes.append(_grid_mode((height, width), self.grid))
            if self.modes[-1] == "pool":
                self.register_buffer(f"rows{level}", average_bins(height, self.grid[0]), False)
                self.register_buffer(f"cols{level}", average_bins(width, self.grid[1]), False)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Three maps [B, C_l, h_l, w_l] -> patch vectors [B, D, h, w] on the prototype grid."""
        levels = [self._level(f, i) for i, f in enumerate(feats)]
        return unfold_patches(torch.cat(levels, 1), self.kernel_size, self.stride, self.padding)

    def _level(self, x: Tensor, level: int) -> Tensor:
        """Pool one level over channels, then bring it to the grid."""
        pool = getattr(self, f"channels{level}")
        if pool.shape[0] != pool.shape[1]:
            x = F.conv2d(x, pool)
        mode = self.modes[level]
        if mode == "pool":
            return getattr(self, f"rows{level}") @ x @ getattr(self, f"cols{level}").T
        if mode == "upsample":
            return F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)
        return x


def _grid_mode(size: tuple[int, int], grid: tuple[int, int]) -> str:
    """How a level reaches the grid, by the rule of ``cpkp.prototype._to_grid``."""
    if size == grid:
        return "same"
    if size[0] >= grid[0] and size[1] >= grid[1]:
        return "pool"
    return "upsample"


def prototype_distances(patches: Tensor, keys: Tensor, keys_sq: Tensor, shift: Tensor) -> Tensor:
    """Distance of every patch to its nearest prototype, in one batched matrix product.

    ``||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2``, with both sides shifted by the prototypes'
    mean as :func:`cpkp.prototype.nearest_prototype` does, clamped at 0, minimum over the
    prototypes, square root.

    Args:
        patches: [B, D, h, w] patch vectors.
        keys: [M, D] prototypes minus ``shift``.
        keys_sq: [M] squared norms of ``keys``.
        shift: [D] the prototypes' mean.

    Returns:
        [B, 1, h, w] float32 Euclidean distances.
    """
    h, w = patches.shape[-2:]
    queries = patches.flatten(2).transpose(1, 2) - shift
    nearest = (keys_sq - 2.0 * (queries @ keys.T)).amin(-1) + queries.square().sum(-1)
    return nearest.clamp_min(0.0).sqrt().reshape(-1, 1, h, w)


# ---------------------------------------------------------------------------------------------
# The exported module


class ExportedDetector(nn.Module):
    """A trained detector as one traceable module: image tensor in, scores and maps out.

    Holds float32 copies of the teacher and student, the prototype shifted by its mean, and
    the calibration as Python constants.

    Args:
        detector: a fitted :class:`~cpkp.api.Detector`; it is not changed.

    Raises:
        CheckpointError: the detector is not trained.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        if not detector.is_fitted:
            raise CheckpointError("this detector is not trained: call fit() or Detector.load()")
        self.image_size = detector.image_size
        self.teacher = _frozen_copy(detector.teacher)
        self.student = _frozen_copy(detector.student)
        scoring = detector.config.scoring
        self.calibration = copy.copy(detector.calibration)
        self.gamma, self.fusion = scoring.gamma, scoring.fusion
        self.sigma = detector._sigma()

        self.aggregation: PatchAggregation | None = None
        if detector.prototype is not None:
            vectors = detector.prototype.vectors.float().cpu()
            shift = vectors.mean(0)
            self.register_buffer("shift", shift)
            self.register_buffer("keys", vectors - shift)
            self.register_buffer("keys_sq", (vectors - shift).square().sum(1))
            with torch.no_grad():
                feats = self.teacher(torch.zeros(1, 3, self.image_size, self.image_size))
            self.aggregation = PatchAggregation(feats, detector.config.prototype)
        self.eval()

    def train(self, mode: bool = True) -> ExportedDetector:
        """Stay in inference mode whatever is asked: BatchNorm keeps the trained statistics.

        The ONNX exporter sets the mode back after tracing; a module built in training mode
        would come back with BatchNorm layers that update their statistics on every call.
        """
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Score images of any size.

        Args:
            images: [B, 3, H, W] float in [0, 1], or uint8 in [0, 255].

        Returns:
            scores [B] and maps [B, 1, S, S], the fused, smoothed maps at the model size.
        """
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        x = resize_antialiased(images, self.image_size)
        size = (self.image_size, self.image_size)

        teacher_feats = self.teacher(x)
        student_feats = self.student(x, teacher_feats)
        a_kd = kd_map(teacher_feats, student_feats, size)
        a_kp = None if self.aggregation is None else self._kp_map(teacher_feats, size)

        fused = fuse(a_kd, a_kp, self.calibration, self.gamma, self.fusion)
        maps = gaussian_smooth(fused, self.sigma)
        return image_scores(maps), maps

    def _kp_map(self, teacher_feats: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """``A_kp`` [B, 1, S, S]: nearest-prototype distances upsampled to the model size."""
        patches = self.aggregation(teacher_feats)
        dist = prototype_distances(patches, self.keys, self.keys_sq, self.shift)
        return F.interpolate(dist, size=size, mode="bilinear", align_corners=False)


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).float().cpu().eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Export


def export_onnx(run_dir: str | Path, out_dir: str | Path | None = None, check: bool = True) -> Path:
    """Write a run's detector as ``model.onnx`` and its description ``model.json``.

    Uses PyTorch's TorchScript-based ONNX exporter (``dynamo=False``) at opset 18, with dynamic
    batch, height and width.

    Args:
        run_dir: a finished run folder.
        out_dir: where to write (default: ``run_dir/export``).
        check: when onnxruntime is installed, score two random images with both the ONNX graph
            and the PyTorch detector and record the largest differences in ``model.json``.

    Returns:
        The path of ``model.onnx``.

    Raises:
        CheckpointError: ``run_dir`` is not a finished run.
        ConfigError: ``out_dir`` is a file, or the ``onnx`` package is not installed.
    """
    run_dir = Path(run_dir)
    runio.check_run_dir(run_dir)
    out_dir = run_dir / EXPORT_DIR if out_dir is None else Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: the export folder is a file, not a folder")
    _require_onnx()
    detector = Detector.load(run_dir, device="cpu")
    module = ExportedDetector(detector)

    start = time.perf_counter()
    onnx_path = out_dir / ONNX_FILE
    runio.atomic_write(onnx_path, lambda tmp: _trace_to_onnx(module, tmp))
    logger.info(
        "exported %s (%.1f MB) in %.1f s",
        onnx_path,
        onnx_path.stat().st_size / 1e6,
        time.perf_counter() - start,
    )

    meta = _export_meta(detector, run_dir)
    if check:
        meta["check"] = _check_against_pytorch(onnx_path, meta, detector)
    runio.write_json(out_dir / META_FILE, meta)
    return onnx_path


def _trace_to_onnx(module: ExportedDetector, path: Path) -> None:
    """Trace ``module`` on a batch of two model-size images and write the graph to ``path``."""
    size = module.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # Shape checks in the networks are constant at the fixed model size: tracing may warn.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter warns that it is deprecated (see docs/export.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=True,
        )
    _declare_output_shapes(path, size)


def _declare_output_shapes(path: Path, size: int) -> None:
    """Write the outputs' shapes into the graph: scores [batch], maps [batch, 1, S, S].

    The exporter cannot infer them through the backbone's size-dependent padding and leaves
    placeholder names, which would mislead a reader of the graph.
    """
    import onnx

    model = onnx.load(str(path))
    shapes = {"scores": ["batch"], "maps": ["batch", 1, size, size]}
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for value in shapes[output.name]:
            dim = dims.add()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    onnx.save(model, str(path))


def _require_onnx() -> None:
    """PyTorch's exporter writes the graph with the ``onnx`` package; say so if it is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "cpkp export needs the onnx package, which is not installed; run "
            "`pip install cpkp[onnx]` (or `pip install onnx onnxruntime`)"
        ) from err


def _check_against_pytorch(
    onnx_path: Path, meta: dict[str, Any], detector: Detector
) -> dict[str, Any] | None:
    """Largest score and map differences between the graph and the detector on two images."""
    try:
        runner = OnnxDetector(onnx_path, meta=meta)
    except ConfigError as err:
        logger.info("export check skipped: %s", err)
        return None
    size = detector.image_size
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, size + size // 2, size - size // 4, generator=generator)

    scores, maps = runner.score_batch(images)
    reference = detector.score_batch(
        F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    )
    differences = {
        "images": f"2 random images of {size + size // 2}x{size - size // 4} px",
        "max_abs_score_difference": float(np.abs(scores - reference.scores.numpy()).max()),
        "max_abs_map_difference": float(np.abs(maps - reference.maps.numpy()).max()),
        "max_abs_map_value": float(reference.maps.abs().max()),
    }
    relative = differences["max_abs_map_difference"] / max(1.0, differences["max_abs_map_value"])
    log = logger.warning if relative > CHECK_TOLERANCE else logger.info
    log(
        "ONNX vs PyTorch on %s: scores differ by at most %.3g, maps by %.3g",
        differences["images"],
        differences["max_abs_score_difference"],
        differences["max_abs_map_difference"],
    )
    return differences


def _export_meta(detector: Detector, run_dir: Path) -> dict[str, Any]:
    """What ``model.json`` says about the graph and where it came from."""
    cfg = detector.config
    cal = detector.calibration
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cpkp_version": cpkp.__version__,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run_dir.resolve()),
        "onnx_file": ONNX_FILE,
        "opset": OPSET,
        "exporter": f"torch.onnx TorchScript exporter, torch {torch.__version__}",
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"],
            "range": [0.0, 1.0],
            "channels": "RGB",
        },
        "outputs": {
            "scores": ["batch"],
            "maps": ["batch", 1, cfg.data.image_size, cfg.data.image_size],
        },
        "dynamic_axes": DYNAMIC_AXES,
        "image_size": cfg.data.image_size,
        "resize": "bilinear with antialiasing (PyTorch's weights), inside the graph",
        "normalisation": {
            "mean": list(detector.teacher.mean),
            "std": list(detector.teacher.std),
            "where": "inside the graph",
        },
        "thresholds": {"image": cal.image_threshold, "pixel": cal.pixel_threshold},
        "calibration": cal.to_dict(),
        "geometry": _geometry_meta(detector.geometry),
        "roi": _roi_meta(detector.roi),
        "scoring": {
            "fusion": cfg.scoring.fusion,
            "gamma": cfg.scoring.gamma,
            "sigma_px": detector._sigma(),
        },
        "backbone": cfg.model.backbone,
        "variant": cfg.model.variant,
        "prototype_size": None if detector.prototype is None else len(detector.prototype.vectors),
        "batch_size": cfg.train.batch_size,
        "check": None,
    }


# ---------------------------------------------------------------------------------------------
# Running an exported model


class OnnxDetector:
    """An exported model run by onnxruntime, with the predictions of :class:`Detector`.

    Args:
        path: ``model.onnx`` written by :func:`export_onnx`; the ``.json`` of the same name
            must lie beside it.
        threads: onnxruntime's intra-op threads (default: its own choice, one per core).
        meta: the export description, instead of reading the ``.json`` file.

    Raises:
        CheckpointError: the model or its description is missing or unreadable.
        ConfigError: onnxruntime is not installed.
    """

    def __init__(
        self, path: str | Path, threads: int | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path}: model file not found; `cpkp export --run RUN` writes model.onnx"
            )
        self.meta = _read_meta(self.path) if meta is None else meta
        self.session = _session(self.path, threads)
        self.image_size = int(self.meta["image_size"])
        self.image_threshold = float(self.meta["thresholds"]["image"])
        self.pixel_threshold = float(self.meta["thresholds"]["pixel"])
        self.batch_size = int(self.meta.get("batch_size") or 8)
        self.geometry = _geometry_from_meta(self.meta, self.path.with_suffix(".json"))
        self.roi = _roi_from_meta(self.meta, self.path.with_suffix(".json"))

    def score_batch(self, images: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores [B] and maps [B, 1, S, S] at the model size.

        Args:
            images: [B, 3, H, W] float in [0, 1], or uint8 in [0, 255].
        """
        x = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {list(x.shape)}")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return scores, maps

    def predict(
        self,
        images: ImageInput | Tensor,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> list[Prediction]:
        """Score images of any size; maps come back at each image's own size.

        The predictions of :meth:`cpkp.api.Detector.predict`: the same views (the run's
        geometry), the same stitching, region of interest and thresholds; only the views' maps
        come from the graph. An image is anomalous when its score is strictly above the image
        threshold, a pixel when its value is strictly above the pixel threshold.

        Args:
            images: paths / Sample records, a folder of images, or a tensor [B, 3, H, W] in
                [0, 1] (or uint8).
            batch_size: model inputs per run of the graph, a tile counting as one (default:
                the training batch size).
            workers: data-loader processes reading the images (default: none).

        Raises:
            ImageError: an image cannot be read.
            ScoringError: a score or map is NaN or infinite.
        """
        return require_finite(list(self.iter_predict(images, batch_size, workers)))

    def iter_predict(
        self,
        images: ImageInput | Tensor,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[Prediction]:
        """:meth:`predict` image by image, in input order, without the finiteness check."""
        step = batch_size or self.batch_size
        if isinstance(images, Tensor):
            if images.dtype == torch.uint8:
                images = images.float() / 255.0
            batches = tensor_views(images, self.geometry, step)
        else:
            items = image_list(images)
            if len(items) == 0:
                raise DatasetError("no images were given")
            batches = DataLoader(
                ImageDataset(items, self.image_size, self.geometry),
                batch_size=step,
                num_workers=workers or 0,
                worker_init_fn=single_thread_worker if workers else None,
            )
        for item in stream_image_maps(batches, self._score_views, self.geometry, self.roi):
            yield prediction_from(item, self.image_threshold, self.pixel_threshold)

    def _score_views(self, views: Tensor) -> dict[str, Tensor]:
        """The graph's fused, smoothed maps of S x S views: {"fused": [B, 1, S, S]}."""
        _, maps = self.score_batch(views)
        return {"fused": torch.from_numpy(maps)}


def _geometry_meta(geometry: Geometry) -> dict[str, Any]:
    """How model.json describes the views the graph is run on."""
    meta: dict[str, Any] = geometry.to_dict()
    meta["description"] = geometry.describe()
    if geometry.mode != "squash":
        meta["note"] = (
            "run the graph on S x S views cut as cpkp.geometry cuts them and stitch the maps "
            "back; cpkp.export.OnnxDetector does both"
        )
    return meta


def _geometry_from_meta(meta: dict[str, Any], source: Path) -> Geometry:
    """The geometry model.json names; exports without one squash, as they all did."""
    size = int(meta["image_size"])
    raw = meta.get("geometry") or {}
    try:
        return Geometry(
            size,
            str(raw.get("resize", "squash")),
            int(raw.get("tile", 0)),
            int(raw.get("overlap", 0)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid 'geometry' entry {raw!r} ({err})") from err


def _roi_meta(roi: Tensor | None) -> dict[str, Any] | None:
    """The region of interest as a base64 PNG (0/255), so that model.json carries it."""
    if roi is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(roi.numpy().astype(np.uint8) * 255).save(buffer, "PNG")
    return {"png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _roi_from_meta(meta: dict[str, Any], source: Path) -> Tensor | None:
    raw = meta.get("roi")
    if raw is None:
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(raw["png_base64"]))) as im:
            return torch.from_numpy(np.asarray(im.convert("L")) > 0)
    except Exception as err:  # a damaged entry: base64, PNG or key errors
        raise CheckpointError(f"{source}: the 'roi' entry cannot be decoded ({err})") from err


def _read_meta(onnx_path: Path) -> dict[str, Any]:
    """The ``.json`` beside an exported model, checked to be a cpkp export."""
    path = onnx_path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found; `cpkp export` writes it beside {onnx_path.name} and "
            "predict needs its thresholds: keep the two files together"
        )
    meta = runio.read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cpkp export description (no format {FORMAT!r})")
    missing = [key for key in ("image_size", "thresholds") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; export the run again")
    return meta


def _session(path: Path, threads: int | None) -> Any:
    """An onnxruntime CPU session on ``path``."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ConfigError(
            "running an exported model needs onnxruntime, which is not installed; run "
            "`pip install cpkp[onnx]` (or `pip install onnxruntime`)"
        ) from err
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for unreadable graphs
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({err})") from err
