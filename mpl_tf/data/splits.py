"""Labeled / unlabeled / validation / test splits, drawn by seed from labels.

Every function here is pure: it takes the label array of a source's training
split (and a seed) and returns {split: index array}. Working from labels
alone is what lets ImageNet's 1.28M images be split before a single image is
read, and makes each rule testable on synthetic labels in milliseconds.

Rules (defaults; every count can be overridden):

* 'cifar10_4k' (the paper): 400 labeled and 500 validation images per class,
  drawn by seed; the other 41,000 training images are unlabeled; test is the
  source's test split. Variant 'released_code': the first 4,000 records are
  labeled and all 50,000 are unlabeled (so the unlabeled set includes the
  labeled images), as in the released code, which has no validation split.
  Here the last 5,000 records are the validation split, so model selection
  never uses the test set; they are disjoint from the labeled images but,
  as every training image in that code, also in the unlabeled set.
* 'svhn_1k': 100 labeled and 500 validation images per class (every SVHN
  class has more than 4,600 training images), the rest unlabeled.
* 'imagenet_10pct': 10% of each class labeled (rounded half up per class:
  1,300 -> 130, 732 -> 73), 25 validation images per class (25,000, like the
  released code's 'heldout' files), and all other training images
  unlabeled, labeled ones included (the released code's unlabeled set is all
  of train); `unlabeled_includes_labeled=False` excludes them.
* 'custom': any labeled_per_class (int) or labeled_fraction, validation per
  class (balanced) or num_validation in total (random), and optionally
  num_test held out from train when the source has no test split.

How one draw works: a seeded permutation of all training indices; the first
`num_test`, then the next `num_validation`, are held out at random; then
each class's remaining images, in permutation order, give its labeled
images, then its per-class validation images; everything left is unlabeled.
Index arrays come back in permutation order, so classes are mixed. Labeled,
validation and test never overlap; the unlabeled split overlaps the labeled
one only when asked (and the validation one only in 'released_code').
"""

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

SPLIT_RULES = ('cifar10_4k', 'svhn_1k', 'imagenet_10pct', 'custom')
VARIANTS = ('paper', 'released_code')


@dataclasses.dataclass(frozen=True)
class SplitParams:
  """How many images each split gets; see the module docstring."""
  labeled_per_class: Optional[int] = None
  # Fraction of each class's training images, rounded half up per class.
  labeled_fraction: Optional[float] = None
  validation_per_class: int = 0
  # Validation drawn at random over all classes (not balanced).
  num_validation: int = 0
  # Test images held out from the training split at random (0: the source's
  # own test split is used).
  num_test: int = 0
  unlabeled_includes_labeled: bool = False


RULE_DEFAULTS = {
    'cifar10_4k': SplitParams(labeled_per_class=400, validation_per_class=500),
    'svhn_1k': SplitParams(labeled_per_class=100, validation_per_class=500),
    'imagenet_10pct': SplitParams(labeled_fraction=0.1,
                                  validation_per_class=25,
                                  unlabeled_includes_labeled=True),
    'custom': SplitParams(),
}


def rule_params(rule: str, **overrides) -> SplitParams:
  """The rule's defaults with the non-None `overrides` applied.

  Giving labeled_per_class drops the default labeled_fraction and vice
  versa; likewise for validation_per_class and num_validation.
  """
  if rule not in RULE_DEFAULTS:
    raise ValueError(f'Unknown split rule {rule!r}; choose one of '
                     f'{", ".join(SPLIT_RULES)}.')
  unknown = set(overrides) - {f.name for f in dataclasses.fields(SplitParams)}
  if unknown:
    raise ValueError(f'Unknown split parameters: {", ".join(sorted(unknown))}.')
  given = {key: value for key, value in overrides.items() if value is not None}
  exclusive = [('labeled_per_class', 'labeled_fraction'),
               ('validation_per_class', 'num_validation')]
  for first, second in exclusive:
    if first in given and second in given:
      raise ValueError(f'Give {first} or {second}, not both.')
  params = dataclasses.asdict(RULE_DEFAULTS[rule])
  for first, second in exclusive:
    if first in given:
      params[second] = SplitParams.__dataclass_fields__[second].default
    if second in given:
      params[first] = SplitParams.__dataclass_fields__[first].default
  params.update(given)
  return SplitParams(**params)


def _check_labels(labels: np.ndarray,
                  num_classes: Optional[int]) -> Tuple[np.ndarray, int]:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be a 1-D integer array; got '
                     f'{labels.dtype} with shape {labels.shape}.')
  if labels.size == 0:
    raise ValueError('The training split has no images.')
  if labels.min() < 0:
    raise ValueError(f'labels must be 0-based class indices; got a minimum '
                     f'of {labels.min()}.')
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  elif labels.max() >= num_classes:
    raise ValueError(f'label {labels.max()} is out of range for '
                     f'num_classes={num_classes}.')
  class_sizes = np.bincount(labels, minlength=num_classes)
  empty = np.flatnonzero(class_sizes == 0)
  if empty.size:
    raise ValueError(
        f'Classes {empty[:10].tolist()} have no training images, so they '
        f'cannot have a labeled example. Remove the empty classes (an empty '
        f'class folder?) or fix the labels.')
  return labels.astype(np.int64), num_classes


def check_params(params: SplitParams) -> None:
  """ValueError for sizes that no label array could satisfy."""
  if (params.labeled_per_class is None) == (params.labeled_fraction is None):
    raise ValueError('Give exactly one of labeled_per_class (images per '
                     'class) and labeled_fraction (of each class).')
  if params.labeled_per_class is not None and params.labeled_per_class < 1:
    raise ValueError(f'labeled_per_class={params.labeled_per_class} must be '
                     f'>= 1: every class needs a labeled example.')
  if params.labeled_fraction is not None and not (
      0.0 < params.labeled_fraction <= 1.0):
    raise ValueError(f'labeled_fraction={params.labeled_fraction} must be in '
                     f'(0, 1].')
  for name in ('validation_per_class', 'num_validation', 'num_test'):
    if getattr(params, name) < 0:
      raise ValueError(f'{name}={getattr(params, name)} must be >= 0.')


def _check_params(params: SplitParams, num_images: int) -> None:
  check_params(params)
  if params.num_validation + params.num_test >= num_images:
    raise ValueError(
        f'num_validation + num_test = {params.num_validation + params.num_test}'
        f' leaves no training images out of {num_images}; ask for fewer.')


def labeled_counts(labels: np.ndarray, params: SplitParams,
                   num_classes: Optional[int] = None) -> np.ndarray:
  """Labeled images wanted per class (fractions rounded half up)."""
  labels, num_classes = _check_labels(labels, num_classes)
  if params.labeled_per_class is not None:
    return np.full(num_classes, params.labeled_per_class, np.int64)
  class_sizes = np.bincount(labels, minlength=num_classes)
  return np.floor(params.labeled_fraction * class_sizes + 0.5).astype(np.int64)


def _in_order(indices: np.ndarray, rank: np.ndarray) -> np.ndarray:
  """`indices` sorted by their position in the seeded permutation."""
  return indices[np.argsort(rank[indices], kind='stable')]


def draw(labels: np.ndarray, seed: int, params: SplitParams,
         num_classes: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Draws the four splits by seed; see the module docstring.

  Args:
    labels: int [N], the training split's 0-based labels.
    seed: seed of the permutation; the same seed gives the same splits.
    params: the split sizes.
    num_classes: number of classes (default: max label + 1); every class
      must have images.

  Returns:
    {'labeled', 'unlabeled', 'validation', 'test': int64 index arrays into
    `labels`}; 'test' is empty unless params.num_test > 0.
  """
  labels, num_classes = _check_labels(labels, num_classes)
  num_images = labels.shape[0]
  _check_params(params, num_images)
  wanted = labeled_counts(labels, params, num_classes)
  order = np.random.default_rng(seed).permutation(num_images)
  rank = np.empty(num_images, np.int64)
  rank[order] = np.arange(num_images)
  held_out = params.num_test + params.num_validation
  test = order[:params.num_test]
  random_validation = order[params.num_test:held_out]
  rest = order[held_out:]
  # A stable sort keeps each class's images in permutation order.
  rest_by_class = rest[np.argsort(labels[rest], kind='stable')]
  ends = np.cumsum(np.bincount(labels[rest], minlength=num_classes))
  labeled_parts, validation_parts = [], [random_validation]
  for label in range(num_classes):
    members = rest_by_class[ends[label - 1] if label else 0:ends[label]]
    if wanted[label] < 1:
      raise ValueError(
          f'labeled_fraction={params.labeled_fraction} gives class {label} '
          f'(of {np.sum(labels == label)} images) no labeled example; ask '
          f'for a larger fraction or a labeled_per_class.')
    needed = wanted[label] + params.validation_per_class
    if members.shape[0] < needed:
      asked = (f'labeled_per_class={params.labeled_per_class}'
               if params.labeled_per_class is not None else
               f'labeled_fraction={params.labeled_fraction} '
               f'({wanted[label]} images)')
      raise ValueError(
          f'{asked} and validation_per_class={params.validation_per_class} '
          f'need {needed} images of class {label}, but it has only '
          f'{members.shape[0]} left after the random test/validation '
          f'draws; ask for fewer labels or validation images per class, or '
          f'a smaller num_test/num_validation.')
    labeled_parts.append(members[:wanted[label]])
    validation_parts.append(members[wanted[label]:needed])
  labeled = _in_order(np.concatenate(labeled_parts), rank)
  validation = _in_order(np.concatenate(validation_parts), rank)
  taken = np.zeros(num_images, bool)
  taken[test] = True
  taken[validation] = True
  if not params.unlabeled_includes_labeled:
    taken[labeled] = True
  unlabeled = order[~taken[order]]
  if unlabeled.shape[0] == 0:
    raise ValueError('No unlabeled images are left; ask for fewer labels '
                     'or validation/test images.')
  return {'labeled': labeled, 'unlabeled': unlabeled,
          'validation': validation, 'test': test.astype(np.int64)}


def draw_released_code(labels: np.ndarray, params: SplitParams,
                       positions: Optional[np.ndarray] = None,
                       num_classes: Optional[int] = None
                       ) -> Dict[str, np.ndarray]:
  """The released code's CIFAR split: first records labeled, all unlabeled.

  Labeled: the first labeled_per_class * num_classes records (4,000) in file
  order. Validation (absent from the released code): the last
  validation_per_class * num_classes records (5,000), or num_validation.
  Unlabeled: every record, labeled and validation ones included. No seed.

  Args:
    labels: int [N] in the order the source yields them.
    params: sizes; labeled_fraction is taken of all N records.
    positions: optional int [N], each record's position in the original
      file order (TFDS's CIFAR-10 'id' train_NNNNN), when the source yields
      records in another order.
    num_classes: number of classes (default: max label + 1).

  Returns:
    {'labeled', 'unlabeled', 'validation', 'test'}; 'test' is empty.
  """
  labels, num_classes = _check_labels(labels, num_classes)
  check_params(params)
  num_images = labels.shape[0]
  if params.num_test:
    raise ValueError("The 'released_code' variant uses the source's test "
                     'split; drop num_test.')
  if params.labeled_per_class is not None:
    num_labeled = params.labeled_per_class * num_classes
  else:
    num_labeled = int(np.floor(params.labeled_fraction * num_images + 0.5))
  num_validation = (params.num_validation or
                    params.validation_per_class * num_classes)
  if num_labeled + num_validation > num_images:
    raise ValueError(f'{num_labeled} labeled and {num_validation} validation '
                     f'records do not fit in {num_images}; ask for fewer.')
  file_order = (np.arange(num_images) if positions is None else
                np.argsort(positions, kind='stable'))
  labeled = file_order[:num_labeled]
  validation = file_order[num_images - num_validation:]
  missing = np.flatnonzero(np.bincount(labels[labeled],
                                       minlength=num_classes) == 0)
  if missing.size:
    raise ValueError(f'The first {num_labeled} records have no example of '
                     f'classes {missing[:10].tolist()}; ask for more labels.')
  return {'labeled': labeled.astype(np.int64),
          'unlabeled': file_order.astype(np.int64),
          'validation': validation.astype(np.int64),
          'test': np.zeros([0], np.int64)}


def make(rule: str, labels: np.ndarray, seed: int,
         params: Optional[SplitParams] = None, variant: str = 'paper',
         positions: Optional[np.ndarray] = None,
         num_classes: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Applies a named rule (default sizes unless `params` is given)."""
  params = rule_params(rule) if params is None else params
  if variant not in VARIANTS:
    raise ValueError(f'Unknown variant {variant!r}; choose one of '
                     f'{", ".join(VARIANTS)}.')
  if variant == 'released_code':
    if rule != 'cifar10_4k':
      raise ValueError("variant='released_code' exists for the cifar10_4k "
                       f'rule only (the released code has no {rule} split).')
    return draw_released_code(labels, params, positions, num_classes)
  return draw(labels, seed, params, num_classes)


def cifar10_4k(labels: np.ndarray, seed: int, variant: str = 'paper',
               positions: Optional[np.ndarray] = None,
               **overrides) -> Dict[str, np.ndarray]:
  """CIFAR-10-4K: 400 labeled and 500 validation per class, rest unlabeled."""
  return make('cifar10_4k', labels, seed,
              rule_params('cifar10_4k', **overrides), variant, positions)


def svhn_1k(labels: np.ndarray, seed: int, **overrides
            ) -> Dict[str, np.ndarray]:
  """SVHN-1K: 100 labeled and 500 validation per class, rest unlabeled."""
  return make('svhn_1k', labels, seed, rule_params('svhn_1k', **overrides))


def imagenet_10pct(labels: np.ndarray, seed: int, **overrides
                   ) -> Dict[str, np.ndarray]:
  """ImageNet-10%: 10% per class labeled, 25 per class validation."""
  return make('imagenet_10pct', labels, seed,
              rule_params('imagenet_10pct', **overrides))


def custom(labels: np.ndarray, seed: int, **overrides
           ) -> Dict[str, np.ndarray]:
  """A user's own sizes; labeled_per_class or labeled_fraction is needed."""
  return make('custom', labels, seed, rule_params('custom', **overrides))
