"""Input data of mpl_tf: prepared TFRecord splits and the tf.data pipelines.

* `records`: the one TFRecord schema (writer and parser) and `manifest.json`.
* `offline`: real digit sets shipped in pip packages, prepared by seed.
* `augment`: batched image augmentations of the training views.
* `pipeline`: the training, labeled-only and padded evaluation datasets.
"""
