"""Inputs of batch runs (image files, a prefetching image dataset) and labelled segmentation datasets."""
from .datasets import DATASETS, Sample, SegDataset, open_dataset
from .inputs import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    InputItem,
    fit_size,
    list_inputs,
    load_rgb,
    prefetch_loader,
    same_size_batches,
)

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "InputItem", "fit_size", "list_inputs", "load_rgb",
           "prefetch_loader", "same_size_batches", "DATASETS", "Sample", "SegDataset", "open_dataset"]
