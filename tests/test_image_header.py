"""Image sizes read from headers, before decoding (issue 22).

A small file can announce a huge image: the tester's 1.1 MB PNG was decoded
to 1.2 GB before its size was checked. `image_header` sizes every format
tf.io.decode_image takes; it is compared here with what TensorFlow's own
decoders give (an independent computation) on files written by TensorFlow
and by Pillow, then the folder source of `prepare.py` must refuse an image
over the limit by name, before decoding it. `--mode=predict`'s use of the
same check is tested with the exports in test_export.py.
"""

import io
import os
import struct
from unittest import mock

import numpy as np
import tensorflow as tf
from PIL import Image

from mpl_tf.data import image_header
from mpl_tf.data import prepare
from tests.testing import png_announcing

_HUGE = 20_000   # 400,000,000 pixels: 1.2 GB as RGB


def _pillow(array, image_format, **options):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, image_format, **options)
  return buffer.getvalue()


def _gif_announcing(width, height):
  """Header, screen without colour table, one width x height frame, end."""
  return (b'GIF89a' + struct.pack('<HHBBB', width, height, 0, 0, 0) +
          b'\x2c' + struct.pack('<HHHHB', 0, 0, width, height, 0) +
          b'\x02\x02\x4c\x01\x00\x3b')


def _patched(data, offset, packed):
  return data[:offset] + packed + data[offset + len(packed):]


class ReadHeaderTest(tf.test.TestCase):

  def test_sizes_match_what_the_decoders_give(self):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (13, 21, 3), np.uint8)
    frames = [Image.fromarray(rng.integers(0, 256, (13, 21, 3), np.uint8))
              for _ in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, 'GIF', save_all=True, append_images=frames[1:])
    bmp = _pillow(image, 'BMP')
    files = {
        'png': tf.io.encode_png(image).numpy(),
        'gray png': tf.io.encode_png(image[..., :1]).numpy(),
        'jpeg': tf.io.encode_jpeg(image).numpy(),
        # An APP1 (Exif) segment before the frame header, progressive.
        'jpeg exif': _pillow(image, 'JPEG', progressive=True,
                             exif=b'Exif\x00\x00II*\x00\x08\x00\x00\x00'
                                  b'\x00\x00'),
        'gif': _pillow(image, 'GIF'),
        'animated gif': animated.getvalue(),
        'bmp': bmp,
        # Rows stored top-down: a negative height.
        'bmp top-down': _patched(bmp, 22, struct.pack('<i', -13)),
        'webp lossy': _pillow(image, 'WEBP'),
        'webp lossless': _pillow(image, 'WEBP', lossless=True),
        'webp alpha': _pillow(np.dstack([image, image[..., :1]]), 'WEBP'),
    }
    for name, data in files.items():
      with self.subTest(name):
        header = image_header.read_header(data)
        decoded = tf.io.decode_image(data, expand_animations=False)
        self.assertEqual((header.height, header.width),
                         tuple(decoded.shape[:2]))
        if name.startswith('jpeg'):
          self.assertAllEqual(tf.image.extract_jpeg_shape(data)[:2],
                              [header.height, header.width])
    # Every frame of a GIF is held in memory while it is decoded.
    self.assertEqual(image_header.read_header(files['animated gif']).pixels,
                     3 * 13 * 21)
    self.assertIsNone(image_header.read_header(b'not an image at all'))
    with self.assertRaisesRegex(ValueError, 'PNG header cannot be read'):
      image_header.read_header(b'\x89PNG\r\n\x1a\n broken')

  def test_a_huge_image_is_refused_by_name_size_and_limit(self):
    jpeg = tf.io.encode_jpeg(np.zeros([8, 8, 3], np.uint8)).numpy()
    frame = jpeg.index(b'\xff\xc0')   # TF writes a baseline frame header
    huge = struct.pack('>HH', _HUGE, _HUGE)
    webp = _pillow(np.zeros([8, 8, 4], np.uint8), 'WEBP')
    self.assertEqual(webp[12:16], b'VP8X')
    files = {
        'PNG': png_announcing(_HUGE, _HUGE),
        'JPEG': _patched(jpeg, frame + 5, huge),
        'GIF': _gif_announcing(_HUGE, _HUGE),
        'BMP': _patched(_pillow(np.zeros([8, 8, 3], np.uint8), 'BMP'), 18,
                        struct.pack('<ii', _HUGE, _HUGE)),
        'WebP': _patched(webp, 24, 2 * (_HUGE - 1).to_bytes(3, 'little')),
    }
    # TensorFlow's own header reader sees the patched JPEG as huge too.
    self.assertAllEqual(tf.image.extract_jpeg_shape(files['JPEG'])[:2],
                        [_HUGE, _HUGE])
    for image_format, data in files.items():
      with self.subTest(image_format):
        with self.assertRaisesRegex(
            ValueError,
            f'^Cannot use image file big.x: its {image_format} header gives '
            f'20000x20000 pixels \\(400,000,000 to decode\\), more than the '
            f'limit of 89,478,485 pixels .* refused before decoding'):
          image_header.check(data, 'big.x')
    self.assertEqual(image_header.check(files['PNG'], 'big.x',
                                        max_pixels=_HUGE**2).pixels, _HUGE**2)


def _write_folder(root):
  """root/train/class_<c>/<i>.png: 3 classes of four 8x8 images."""
  rng = np.random.default_rng(1)
  for label in range(3):
    os.makedirs(os.path.join(root, 'train', f'class_{label}'))
    for i in range(4):
      image = rng.integers(0, 256, (8, 8, 3), np.uint8)
      tf.io.write_file(os.path.join(root, 'train', f'class_{label}',
                                    f'{i}.png'), tf.io.encode_png(image))


class FolderSourceTest(tf.test.TestCase):

  def _prepare(self, root):
    return prepare.prepare(prepare.PrepareConfig(
        source='folder', train_dir=os.path.join(root, 'train'),
        split_rule='custom', labeled_per_class=1, validation_per_class=1,
        num_test=3, out_dir=os.path.join(root, 'prepared')))

  def test_an_image_over_the_limit_is_named_and_never_decoded(self):
    root = self.get_temp_dir()
    _write_folder(root)
    huge = os.path.join(root, 'train', 'class_1', 'huge.png')
    with open(huge, 'wb') as f:
      f.write(png_announcing(_HUGE, _HUGE))
    with self.assertRaisesRegex(
        ValueError, f'^Cannot use image file {huge}: its PNG header gives '
                    f'20000x20000 pixels .*limit of 89,478,485 pixels'):
      self._prepare(root)
    self.assertEqual(sorted(os.listdir(root)), ['train'])
    # Decodable images over a (lowered) limit: the limit refuses them, not
    # a decoder's failure.
    os.remove(huge)
    with mock.patch.object(image_header, 'MAX_IMAGE_PIXELS', 63):
      with self.assertRaisesRegex(
          ValueError, r'^Cannot use image file \S+/class_\d/\d.png: its PNG '
                      r'header gives 8x8 pixels \(64 to decode\), more than '
                      r'the limit of 63 pixels'):
        self._prepare(root)
    self.assertEqual(sorted(os.listdir(root)), ['train'])
    self.assertEqual(self._prepare(root)['counts']['test'], 3)


if __name__ == '__main__':
  tf.test.main()
