"""An image file's pixel count, read from its header, before decoding.

A decoder allocates what the header announces: a 1.1 MB PNG of 20,000 x
20,000 flat pixels decodes to 1.2 GB. TensorFlow's decoders refuse only
above 2**29 pixels (PNG: "size too large for int"), far beyond what this
project needs, so every image file mpl_tf decodes (a folder source of
`prepare.py`, `--mode=predict`) is first sized here from its header, and
refused above MAX_IMAGE_PIXELS without being decoded.

The formats are the ones tf.io.decode_image accepts, recognised by the same
leading bytes: JPEG (its first SOF segment), PNG (IHDR), GIF (every frame's
descriptor: giflib holds all frames in memory, and TF's canvas is the
largest frame), BMP (the 32-bit width and height TF's decoder reads) and
WebP (VP8, VP8L or VP8X). Bytes of another format are left to the decoder,
which refuses them without allocating; a recognised format whose header
cannot be read is refused here.
"""

from typing import NamedTuple, Optional

# A quarter GiB of 3-channel pixels (1024**3 // 4 // 3), the number Pillow
# also uses as its default decompression-bomb limit: 48-megapixel photos and
# every ImageNet image pass, an image whose pixels alone fill memory does not.
MAX_IMAGE_PIXELS = 89_478_485

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_MAGIC = b'\xff\xd8\xff'
# Start-of-frame markers (the ones that carry the image size): C0..CF but
# C4 (Huffman tables), C8 (reserved) and CC (arithmetic coding tables).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..7, SOI.
_JPEG_STANDALONE = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])


class ImageHeader(NamedTuple):
  """What a header announces: format, size and the pixels it decodes to."""
  format: str
  height: int
  width: int
  pixels: int   # height * width; for a GIF, at least every frame's sum


def _int(data: bytes, start: int, size: int, order: str = 'big') -> int:
  if start + size > len(data):
    raise IndexError('truncated header')
  return int.from_bytes(data[start:start + size], order)


def _png(data: bytes) -> ImageHeader:
  if data[12:16] != b'IHDR':
    raise IndexError('no IHDR chunk first')
  width, height = _int(data, 16, 4), _int(data, 20, 4)
  return ImageHeader('PNG', height, width, height * width)


def _jpeg(data: bytes) -> ImageHeader:
  """The first SOF segment, found as libjpeg finds markers.

  Bytes between segments are skipped up to the next 0xFF (libjpeg warns of
  "extraneous bytes" and goes on), so a file the decoder would read is
  sized too.
  """
  position = 2
  while True:
    while position < len(data) and data[position] != 0xFF:
      position += 1
    while position < len(data) and data[position] == 0xFF:
      position += 1
    if position >= len(data):
      raise IndexError('no SOF segment')
    marker = data[position]
    position += 1
    if marker == 0 or marker in _JPEG_STANDALONE:
      continue
    if marker in (0xD9, 0xDA):   # EOI or a scan before any frame header
      raise IndexError('no SOF segment before the image data')
    if marker in _JPEG_SOF:
      height, width = _int(data, position + 3, 2), _int(data, position + 5, 2)
      return ImageHeader('JPEG', height, width, height * width)
    position += _int(data, position, 2)


def _skip_sub_blocks(data: bytes, position: int) -> int:
  """Past a GIF data block: sub-blocks of (length, bytes) up to length 0."""
  while True:
    length = _int(data, position, 1)
    position += 1 + length
    if not length:
      return position


def _gif(data: bytes) -> ImageHeader:
  flags = _int(data, 10, 1)
  position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
  width = height = total = 0
  while position < len(data):
    block = data[position]
    position += 1
    if block == 0x3B:    # trailer
      break
    if block == 0x21:    # extension: a label, then sub-blocks
      position = _skip_sub_blocks(data, position + 1)
    elif block == 0x2C:  # image descriptor: x, y, width, height, flags
      frame_width = _int(data, position + 4, 2, 'little')
      frame_height = _int(data, position + 6, 2, 'little')
      frame_flags = _int(data, position + 8, 1)
      position += 9
      if frame_flags & 0x80:
        position += 3 << ((frame_flags & 7) + 1)
      position = _skip_sub_blocks(data, position + 1)  # after LZW code size
      width, height = max(width, frame_width), max(height, frame_height)
      total += frame_width * frame_height
    else:
      break              # giflib stops at an unknown block with an error
  if not width:
    raise IndexError('no image descriptor')
  return ImageHeader('GIF', height, width, max(width * height, total))


def _bmp(data: bytes) -> ImageHeader:
  if len(data) < 26:
    raise IndexError('truncated header')
  width = abs(int.from_bytes(data[18:22], 'little', signed=True))
  height = abs(int.from_bytes(data[22:26], 'little', signed=True))
  return ImageHeader('BMP', height, width, height * width)


def _webp(data: bytes) -> ImageHeader:
  chunk = data[12:16]
  if chunk == b'VP8X':
    width = 1 + _int(data, 24, 3, 'little')
    height = 1 + _int(data, 27, 3, 'little')
  elif chunk == b'VP8L':
    bits = _int(data, 21, 4, 'little')
    width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
  elif chunk == b'VP8 ':
    width = _int(data, 26, 2, 'little') & 0x3FFF
    height = _int(data, 28, 2, 'little') & 0x3FFF
  else:
    raise IndexError(f'unknown WebP chunk {chunk!r}')
  return ImageHeader('WebP', height, width, height * width)


def _format(data: bytes) -> Optional[str]:
  """The format tf.io.decode_image would take the bytes for, or None."""
  if data.startswith(_JPEG_MAGIC):
    return 'JPEG'
  if data.startswith(_PNG_MAGIC):
    return 'PNG'
  if data.startswith(b'GIF'):
    return 'GIF'
  if data.startswith(b'BM'):
    return 'BMP'
  if data.startswith(b'RIFF') and data[8:12] == b'WEBP':
    return 'WebP'
  return None


_READERS = {'JPEG': _jpeg, 'PNG': _png, 'GIF': _gif, 'BMP': _bmp,
            'WebP': _webp}


def read_header(data: bytes) -> Optional[ImageHeader]:
  """The header of encoded image bytes; None for a format TF cannot decode.

  Raises:
    ValueError: a format TF decodes, whose header is damaged or cut off.
  """
  image_format = _format(data)
  if image_format is None:
    return None
  try:
    return _READERS[image_format](data)
  except IndexError as error:
    raise ValueError(f'its {image_format} header cannot be read ({error}): '
                     f'the file is damaged or cut off') from None


def check(data: bytes, name: str,
          max_pixels: Optional[int] = None) -> Optional[ImageHeader]:
  """The header of an image file about to be decoded; ValueError if too big.

  The message names the file, its size and the limit. Returns None for bytes
  of no format TF decodes (its decoder then says so).
  """
  limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    header = read_header(data)
  except ValueError as error:
    raise ValueError(f'Cannot use image file {name}: {error}.') from None
  if header is not None and header.pixels > limit:
    raise ValueError(
        f'Cannot use image file {name}: its {header.format} header gives '
        f'{header.width}x{header.height} pixels ({header.pixels:,} to '
        f'decode), more than the limit of {limit:,} pixels (about '
        f'{limit * 3 / 2**20:,.0f} MiB as RGB); it was refused before '
        f'decoding. Downscale it or remove it, then run the command again.')
  return header
