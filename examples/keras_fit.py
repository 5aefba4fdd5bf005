"""Meta Pseudo Labels with Keras's fit(): your own Keras CNN, teacher and student.

Offline, on scikit-learn's 1,797 UCI digits at 16x16 (10 labels per class,
the rest unlabeled), prepared once into --data_dir by mpl_tf.data.offline as
main.py does. 1,000 steps in 10 epochs by default (about a minute on two
CPU cores); CI runs it at 4 steps (tests/test_examples.py):

  .venv/bin/python examples/keras_fit.py
  .venv/bin/python examples/keras_fit.py --pipeline plain
  .venv/bin/python examples/keras_fit.py --steps 20 --epochs 2   # a smoke run

--pipeline library: mpl_tf's MPL stream (the released code's views: flip,
pad-and-crop, RandAugment and Cutout on the augmented view), an endless
stream of batch dicts. --pipeline plain: a plain tf.data pipeline from the
prepared splits' arrays, with Keras's preprocessing layers as augmentation,
yielding ((x_l, y_l), (x_u_ori, x_u_aug)). Prints the EMA student's test
accuracy and the path of the saved student (a plain .keras model).
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np
import tensorflow as tf

import mpl_tf
from mpl_tf.config import Config, DataConfig, MplConfig, OptimConfig
from mpl_tf.data import offline
from mpl_tf.data import pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

CLASSES = 10


def cnn(name: str, image_size: int) -> keras.Model:
  """The user's own network: any Keras model from images to logits."""
  inputs = keras.Input((image_size, image_size, 3))
  x = keras.layers.Conv2D(16, 3, padding='same', activation='relu')(inputs)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.Conv2D(32, 3, padding='same', activation='relu')(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dropout(0.2)(x)
  return keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name=name)


def library_data(config: Config, manifest, eval_batch: int):
  """mpl_tf's training stream, and the test split as (x, y, mask) batches."""
  train = pipeline.train_dataset(config, manifest)
  # Padded to whole batches; the mask (as sample weights) leaves the
  # padding out of the metrics.
  batches = math.ceil(manifest['counts']['test'] / eval_batch)
  test = pipeline.eval_dataset(config, manifest, 'test', eval_batch).map(
      lambda b: (b['images'], b['labels'], b['mask'])).apply(
          tf.data.experimental.assert_cardinality(batches))
  return train, test


def plain_data(config: Config, manifest, eval_batch: int):
  """A plain tf.data pipeline from the arrays of the prepared splits."""
  images, labels = offline.load_source('digits', config.data.image_size)
  split = {name: (images[index], labels[index]) for name, index in
           manifest['source_indices'].items()}
  scale = lambda x: tf.cast(x, tf.float32) / 255.0
  weak = keras.layers.RandomTranslation(0.125, 0.125, fill_mode='constant')
  strong = keras.Sequential([
      keras.layers.RandomTranslation(0.2, 0.2, fill_mode='constant'),
      keras.layers.RandomRotation(0.08, fill_mode='constant'),
      keras.layers.RandomZoom(0.2, fill_mode='constant'),
      keras.layers.RandomContrast(0.5)])
  batch, mu = config.optim.labeled_batch_size, config.optim.uda_ratio
  labeled = (tf.data.Dataset.from_tensor_slices(split['labeled'])
             .repeat().shuffle(1000, seed=0)
             .batch(batch, drop_remainder=True)
             .map(lambda x, y: (scale(weak(x, training=True)), y)))
  unlabeled = (tf.data.Dataset.from_tensor_slices(split['unlabeled'][0])
               .repeat().shuffle(2000, seed=1)
               .batch(batch * mu, drop_remainder=True)
               .map(lambda x: (scale(weak(x, training=True)),
                               scale(strong(x, training=True)))))
  train = tf.data.Dataset.zip((labeled, unlabeled)).prefetch(2)
  test = tf.data.Dataset.from_tensor_slices(split['test']).batch(
      eval_batch).map(lambda x, y: (scale(x), y))
  return train, test


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--pipeline', choices=('library', 'plain'),
                      default='library')
  parser.add_argument('--labeled_batch_size', type=int, default=16)
  parser.add_argument('--uda_ratio', type=int, default=3)
  parser.add_argument('--data_dir', default='data/digits_16px')
  parser.add_argument('--out_dir', default='runs/keras_fit')
  args = parser.parse_args(argv)

  config = Config(
      data=DataConfig(dataset='digits', data_dir=args.data_dir, image_size=16,
                      labeled_per_class=10, num_validation=200, num_test=500,
                      horizontal_flip=False, randaugment_magnitude=5,
                      randaugment_translate_const=2,
                      randaugment_cutout_const=2, cutout_size=4),
      optim=OptimConfig(labeled_batch_size=args.labeled_batch_size,
                        uda_ratio=args.uda_ratio))
  manifest = offline.ensure_prepared(config.data)
  # Before the pipelines too: the plain one's Keras augmentation layers
  # take their seeds when they are made.
  keras.utils.set_random_seed(0)
  make_data = library_data if args.pipeline == 'library' else plain_data
  train, test = make_data(config, manifest, eval_batch=250)

  model = mpl_tf.MetaPseudoLabels(cnn('teacher', 16), cnn('student', 16),
                                  ema_decay=0.95)
  model.compile(
      teacher_optimizer=keras.optimizers.SGD(0.05, momentum=0.9,
                                             nesterov=True),
      student_optimizer=keras.optimizers.SGD(0.05, momentum=0.9,
                                             nesterov=True),
      mpl_config=MplConfig(label_smoothing=0.1, uda_weight=2.0,
                           uda_steps=max(1, args.steps // 3)),
      metrics=['accuracy'])
  model.fit(train, epochs=args.epochs,
            steps_per_epoch=max(1, args.steps // args.epochs), verbose=2,
            callbacks=[
                keras.callbacks.BackupAndRestore(
                    os.path.join(args.out_dir, 'backup'), save_freq=10),
                keras.callbacks.TensorBoard(os.path.join(args.out_dir,
                                                         'logs'))])
  results = model.evaluate(test, verbose=0, return_dict=True)
  path = os.path.join(args.out_dir, 'student.keras')
  model.save(path)
  reloaded = keras.models.load_model(path)
  agree = np.mean(np.argmax(reloaded.predict(test, verbose=0), -1) ==
                  np.argmax(model.predict(test, verbose=0), -1))
  print(f'{args.pipeline} pipeline, {model.step} steps: EMA student test '
        f'accuracy {results["accuracy"]:.3f}, loss {results["loss"]:.3f}')
  print(f'saved the EMA student to {path} ({reloaded.count_params()} '
        f'parameters; its predictions agree with the model\'s: {agree:.0%})')
  return results


if __name__ == '__main__':
  main()
