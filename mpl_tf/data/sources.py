"""What a prepared set is read from: a source, its splits and their records.

A source has a training split and, optionally, a test split. Each split
gives its labels up front (a cheap first pass, or the folder names) so the
split rules of `splits.py` can run before any image is read, and then
streams its images as encoded JPEG/PNG bytes, ready for `records.py`.
This module holds that interface (`Source`, `SourceSplit`, `Record`), which
`prepare.py` and `dataset_writer.py` consume; each family of sources reads
its own kind of storage in a module of its own:

* TFDS (`tfds_source.open_tfds`): a data set already prepared in a local
  TFDS data_dir (cifar10, svhn_cropped, imagenet2012, ...). The stored image
  bytes are passed through (PNG for CIFAR/SVHN, JPEG for ImageNet). Never
  downloads: an unprepared data set is an immediate error saying how to
  prepare it. TFDS is read sequentially, in its own (already shuffled)
  order.
* A folder (`folder_source.open_folder`) with one sub-folder per class; the
  class index is the position of the sub-folder's name in sorted order. RGB
  JPEG and PNG files are passed through; gray, RGBA, GIF or BMP files are
  converted to RGB PNG. Read in any order asked for.
* Arrays (`array_source.from_arrays`, `array_source.open_npz`): uint8
  [N, H, W, 3] encoded as PNG.
"""

import abc
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class Record:
  """One image of a source split, ready to be written."""
  index: int
  label: int
  encoded: bytes                 # JPEG or PNG, 3 channels
  image: Optional[np.ndarray]    # uint8 [H, W, 3] when decoding was asked


class SourceSplit(abc.ABC):
  """One split of a source: labels up front, images streamed on demand."""

  def __init__(self, description: str, labels: np.ndarray,
               sequential: bool,
               image_shape: Optional[Tuple[int, int]] = None,
               positions: Optional[np.ndarray] = None):
    self.description = description
    self.labels = np.asarray(labels, np.int64)
    # True: `read` yields in source order, whatever order is asked for.
    self.sequential = sequential
    # (height, width) of every image if known without decoding, else None.
    self.image_shape = image_shape
    # Each record's position in the original file order, if it differs.
    self.positions = positions

  def __len__(self) -> int:
    return self.labels.shape[0]

  @abc.abstractmethod
  def read(self, indices: np.ndarray, decode: bool) -> Iterator[Record]:
    """Yields the records at `indices` (Record.image set if `decode`)."""


@dataclasses.dataclass
class Source:
  """A training split, an optional test split, and what the classes are."""
  kind: str                      # 'tfds', 'folder', 'npz' or 'arrays'
  name: str                      # e.g. 'cifar10', or a folder's base name
  train: SourceSplit
  test: Optional[SourceSplit]
  num_classes: int
  class_names: Optional[List[str]] = None
  details: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def description(self) -> str:
    return f'{self.kind}:{self.name}'
