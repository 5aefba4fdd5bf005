"""Input data of mpl_tf: prepared TFRecord splits and the tf.data pipelines.

* `records`: the one TFRecord schema (writer and parser) and `manifest.json`;
  `shard_list`: which shard files make a split (the manifest's list);
  `record_checks`: the first bad record of a prepared set, named.
* `sources` (with `tfds_source`, `folder_source`, `array_source`), `splits`,
  `dataset_writer` and `prepare`: what `python prepare.py` reads, draws and
  writes.
* `offline`: real digit sets shipped in pip packages, prepared by seed.
* `augment`: batched image augmentations of the training views;
  `randaugment` (with `randaugment_ops`): RandAugment.
* `pipeline`: the training, labeled-only and padded evaluation datasets;
  `record_stream`: which records each input pipeline reads, in which order;
  `input_shares`: each input pipeline's share of a split, at any host count.
"""
