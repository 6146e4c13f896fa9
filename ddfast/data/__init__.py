"""Image data sets for distillation: low-level readers (:mod:`ddfast.data.formats`) and named,
normalised, deterministically split data sets (:mod:`ddfast.data.datasets`)."""

from ddfast.data.datasets import (
    COLOUR_MEAN,
    COLOUR_STD,
    GREY_MEAN,
    GREY_STD,
    ImageDataset,
    balanced_subset,
    dataset_names,
    load_dataset,
    random_subset,
    stratified_split,
)
from ddfast.data.formats import (
    DatasetFormatError,
    DatasetNotFoundError,
    RestrictedUnpickler,
    read_cifar_batches,
    read_idx,
    read_mnist_pickle,
    read_npz,
)

__all__ = [
    "ImageDataset",
    "load_dataset",
    "dataset_names",
    "stratified_split",
    "balanced_subset",
    "random_subset",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "RestrictedUnpickler",
    "read_idx",
    "read_cifar_batches",
    "read_npz",
    "read_mnist_pickle",
    "GREY_MEAN",
    "GREY_STD",
    "COLOUR_MEAN",
    "COLOUR_STD",
]
