"""Inputs of batch runs: listing image files and a prefetching, worker-decoded image dataset."""
from .inputs import (IMAGE_EXTENSIONS, ImageDataset, InputItem, fit_size, list_inputs, load_rgb, prefetch_loader,
                     same_size_batches)

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "InputItem", "fit_size", "list_inputs", "load_rgb",
           "prefetch_loader", "same_size_batches"]
