"""Datasets: readers for MVTec AD, VisA and plain folders, image and mask loading.

Readers turn a folder layout into :class:`Sample` records; :class:`ImageDataset` turns records
into resized tensors in [0, 1].
"""

from cpkp.data.dataset import ImageDataset, validate_images
from cpkp.data.images import (
    IMAGE_EXTENSIONS,
    check_image,
    is_image_file,
    load_image,
    load_mask,
    resize_image,
    resize_mask,
)
from cpkp.data.readers import (
    DATASET_KINDS,
    list_categories,
    list_images,
    read_dataset,
    read_folder,
    read_mvtec,
    read_visa,
)
from cpkp.data.records import DatasetSplits, Sample

__all__ = [
    "DATASET_KINDS",
    "IMAGE_EXTENSIONS",
    "DatasetSplits",
    "ImageDataset",
    "Sample",
    "check_image",
    "is_image_file",
    "list_categories",
    "list_images",
    "load_image",
    "load_mask",
    "read_dataset",
    "read_folder",
    "read_mvtec",
    "read_visa",
    "resize_image",
    "resize_mask",
    "validate_images",
]
