"""Tests of image decoding on files built in tmp_path: bit depths, modes, EXIF, alpha, resizing."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFile, ImageOps

from flax_pet.data.decode import (
    DecodeError,
    _apply_orientation,
    decode_files,
    decode_image,
    decode_image_bytes,
)


def _save(array_or_image, path, **kwargs):
  image = (
      array_or_image
      if isinstance(array_or_image, Image.Image)
      else Image.fromarray(array_or_image)
  )
  image.save(path, **kwargs)
  return path


def _ramp_16bit(height=20, width=30, low=1000, high=1100):
  """Return a uint16 image whose values rise from low to high along the rows."""
  values = np.linspace(low, high, height * width).reshape(height, width)
  return np.round(values).astype(np.uint16)


def _tiff_16bit_rgb(array: np.ndarray) -> bytes:
  """Write an uncompressed 16-bit RGB TIFF by hand (Pillow cannot write one)."""
  height, width, _ = array.shape
  pixels = array.astype('<u2').tobytes()
  # (tag, type, count, value); types: 3 = SHORT, 4 = LONG.
  entries = [
      (256, 3, 1, width),
      (257, 3, 1, height),
      (258, 3, 3, None),  # BitsPerSample, stored after the IFD.
      (259, 3, 1, 1),
      (262, 3, 1, 2),
      (273, 4, 1, None),  # StripOffsets, the pixel data.
      (277, 3, 1, 3),
      (278, 3, 1, height),
      (279, 4, 1, len(pixels)),
      (284, 3, 1, 1),
  ]
  ifd_offset = 8
  bits_offset = ifd_offset + 2 + 12 * len(entries) + 4
  data_offset = bits_offset + 6
  out = b'II*\x00' + struct.pack('<I', ifd_offset) + struct.pack('<H', len(entries))
  for tag, kind, count, value in entries:
    if tag == 258:
      out += struct.pack('<HHII', tag, kind, count, bits_offset)
    elif tag == 273:
      out += struct.pack('<HHII', tag, kind, count, data_offset)
    elif kind == 3:
      out += struct.pack('<HHIHH', tag, kind, count, value, 0)
    else:
      out += struct.pack('<HHII', tag, kind, count, value)
  return out + struct.pack('<I', 0) + struct.pack('<HHH', 16, 16, 16) + pixels


def test_16bit_png_keeps_contrast(tmp_path):
  ramp = _ramp_16bit()
  path = _save(ramp, tmp_path / 'ramp.png')
  assert Image.open(path).mode == 'I;16'

  image = decode_image(path, ramp.shape, 'stretch')

  assert image.shape == (20, 30, 3)
  assert image.dtype == np.float32
  assert image.min() == 0.0
  assert image.max() == pytest.approx(255.0)
  expected = (ramp.astype(np.float64) - 1000) * 255 / 100
  np.testing.assert_allclose(image[..., 0], expected, atol=1e-3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_16bit_tiff_keeps_contrast(tmp_path):
  ramp = _ramp_16bit()
  path = _save(ramp, tmp_path / 'ramp.tif')

  image = decode_image(path, ramp.shape)

  assert image.min() == 0.0
  assert image.max() == pytest.approx(255.0)
  assert len(np.unique(image)) == len(np.unique(ramp))


def test_16bit_rgb_png_keeps_low_byte(tmp_path):
  ramp = _ramp_16bit()
  rgb = np.stack([ramp, ramp, ramp], axis=-1)
  path = tmp_path / 'rgb16.png'
  path.write_bytes(tf.io.encode_png(rgb).numpy())

  image = decode_image(path, ramp.shape)

  # Pillow alone would keep only the high byte: 3 or 4 distinct levels here.
  assert len(np.unique(image)) == len(np.unique(ramp))
  expected = (ramp.astype(np.float64) - 1000) * 255 / 100
  np.testing.assert_allclose(image[..., 1], expected, atol=1e-3)


def test_16bit_rgba_png_translucent_rejected(tmp_path):
  ramp = _ramp_16bit()
  alpha = np.full_like(ramp, 65535)
  alpha[0, 0] = 1000
  path = tmp_path / 'rgba16.png'
  path.write_bytes(tf.io.encode_png(np.stack([ramp] * 3 + [alpha], -1)).numpy())

  with pytest.raises(DecodeError, match='alpha channel is not fully opaque'):
    decode_image(path, 20)


def test_16bit_rgb_tiff_rejected(tmp_path):
  path = tmp_path / 'rgb16.tif'
  path.write_bytes(_tiff_16bit_rgb(np.stack([_ramp_16bit()] * 3, axis=-1)))

  with pytest.raises(DecodeError, match='16-bit colour TIFF'):
    decode_image(path, 20)


def test_constant_16bit_rejected(tmp_path):
  path = _save(np.full((8, 8), 1234, np.uint16), tmp_path / 'flat.png')

  with pytest.raises(DecodeError, match='every pixel has the value 1234'):
    decode_image(path, 8)


def test_8bit_values_unchanged(tmp_path):
  gray = np.arange(100, 160, dtype=np.uint8).reshape(6, 10)
  path = _save(gray, tmp_path / 'gray.png')

  image = decode_image(path, gray.shape)

  np.testing.assert_array_equal(image, np.repeat(gray[..., None], 3, -1).astype(np.float32))


def test_exif_rotated_jpeg_upright(tmp_path):
  # Upright: 40 rows x 60 columns, bright block in the top-left corner.
  upright = np.full((40, 60, 3), 20, np.uint8)
  upright[:10, :15] = 230
  # Orientation 6 means "rotate 90 degrees clockwise to display", so the
  # stored pixels are the upright image turned counterclockwise.
  stored = np.rot90(upright, k=1)
  exif = Image.Exif()
  exif[0x0112] = 6
  path = _save(stored, tmp_path / 'rotated.jpg', exif=exif, quality=95)
  assert Image.open(path).size == (40, 60)

  image = decode_image(path, (40, 60))

  assert image.shape == (40, 60, 3)
  assert image[:10, :15].mean() > 200
  assert image[10:, 15:].mean() < 40
  assert image[-10:, -15:].mean() < 40


@pytest.mark.parametrize('orientation', range(1, 9))
def test_orientation_matches_pillow(orientation):
  pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  exif = Image.Exif()
  exif[0x0112] = orientation
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG', exif=exif)
  expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))

  np.testing.assert_array_equal(_apply_orientation(pixels, orientation), expected)


def test_palette_decoded_to_colours(tmp_path):
  image = Image.new('P', (4, 3))
  image.putpalette([0, 0, 0, 50, 100, 150] + [0] * 762)
  image.putdata([0, 1] * 6)
  path = _save(image, tmp_path / 'palette.png')

  decoded = decode_image(path, (3, 4))

  np.testing.assert_array_equal(decoded[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(decoded[0, 1], [50, 100, 150])


def test_palette_transparency_rejected(tmp_path):
  image = Image.new('P', (4, 3))
  image.putpalette([0, 0, 0, 50, 100, 150] + [0] * 762)
  image.putdata([0, 1] * 6)
  path = _save(image, tmp_path / 'palette_alpha.png', transparency=0)

  with pytest.raises(DecodeError, match='alpha channel is not fully opaque'):
    decode_image(path, 4)


def test_gray_colour_key_rejected(tmp_path):
  gray = np.full((4, 4), 90, np.uint8)
  gray[0, 0] = 7
  path = _save(gray, tmp_path / 'key.png', transparency=7)

  with pytest.raises(DecodeError, match='transparent colour'):
    decode_image(path, 4)


def test_rgba_translucent_rejected(tmp_path):
  rgba = np.full((6, 6, 4), 128, np.uint8)
  rgba[..., 3] = 255
  rgba[2, 3, 3] = 254
  path = _save(rgba, tmp_path / 'translucent.png')

  with pytest.raises(DecodeError, match=r'\(1 of 36 pixels'):
    decode_image(path, 6)


def test_rgba_opaque_alpha_dropped(tmp_path):
  rgba = np.zeros((6, 6, 4), np.uint8)
  rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
  path = _save(rgba, tmp_path / 'opaque.png')

  image = decode_image(path, 6)

  assert image.shape == (6, 6, 3)
  np.testing.assert_array_equal(image[0, 0], [10, 20, 30])


def test_gray_alpha_opaque_repeated(tmp_path):
  la = np.zeros((5, 5, 2), np.uint8)
  la[..., 0] = np.arange(25, dtype=np.uint8).reshape(5, 5)
  la[..., 1] = 255
  path = _save(Image.fromarray(la, mode='LA'), tmp_path / 'la.png')

  image = decode_image(path, 5)

  np.testing.assert_array_equal(image[..., 0], la[..., 0])
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_bmp_and_32bit_tiff(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  bmp = _save(rgb, tmp_path / 'image.bmp')
  np.testing.assert_array_equal(decode_image(bmp, (7, 9)), rgb.astype(np.float32))

  values = np.arange(63, dtype=np.int32).reshape(7, 9) * 1000 - 5000
  tiff = _save(values, tmp_path / 'int32.tif')
  image = decode_image(tiff, (7, 9))
  assert image.min() == 0.0
  assert image.max() == pytest.approx(255.0)


def test_stretch_matches_tf_resize(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (301, 123, 3), dtype=np.uint8)
  path = _save(rgb, tmp_path / 'tall.png')

  for size in [(224, 224), (500, 64)]:
    expected = tf.image.resize(rgb, size, method='bilinear').numpy()
    np.testing.assert_allclose(decode_image(path, size), expected, atol=1e-3)

  expected = tf.image.resize(rgb, (64, 64), method='bilinear', antialias=True).numpy()
  antialiased = decode_image(path, 64, antialias=True)
  np.testing.assert_allclose(antialiased, expected, atol=0.05)


def test_pad_keeps_aspect_ratio(tmp_path):
  # 90 rows x 30 columns: content 200 on a border of 10.
  tall = np.full((90, 30), 200, np.uint8)
  tall[0, :] = tall[-1, :] = tall[:, 0] = tall[:, -1] = 10
  path = _save(tall, tmp_path / 'tall.png')

  image = decode_image(path, 60, 'pad')

  # The 3:1 image becomes 60x20, centred in columns 20..39.
  assert image.shape == (60, 60, 3)
  assert np.all(image[:, :20] == 10)
  assert np.all(image[:, 40:] == 10)
  assert image[5:55, 22:38].min() > 150
  stretched = decode_image(path, 60, 'stretch')
  assert stretched[5:55, 5:55].min() > 150


def test_pad_value_overrides_border(tmp_path):
  path = _save(np.full((40, 20), 77, np.uint8), tmp_path / 'flat.png')

  image = decode_image(path, (40, 40), 'pad', pad_value=0.0)

  assert np.all(image[:, :10] == 0)
  assert np.all(image[:, 10:30] == 77)
  assert np.all(image[:, 30:] == 0)


@pytest.mark.parametrize(
    'content, reason',
    [
        (b'', 'file is empty'),
        (b'patient notes, not an image\n', 'not an image in a supported format'),
    ],
)
def test_unreadable_file_rejected(tmp_path, content, reason):
  path = tmp_path / 'bad.png'
  path.write_bytes(content)

  with pytest.raises(DecodeError, match=reason) as raised:
    decode_image(path, 8)
  assert raised.value.path == str(path)


def test_truncated_png_rejected(tmp_path):
  full = _save(
      np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8),
      tmp_path / 'full.png',
  )
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])

  with pytest.raises(DecodeError, match='corrupt or truncated PNG'):
    decode_image(truncated, 8)


@pytest.mark.parametrize('image_format', ['JPEG', 'BMP', 'TIFF'])
def test_truncated_rejected_despite_pillow_flag(image_format, monkeypatch):
  buffer = io.BytesIO()
  pixels = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
  Image.fromarray(pixels).save(buffer, format=image_format)
  truncated = buffer.getvalue()[: len(buffer.getvalue()) - 40]
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)

  with pytest.raises(DecodeError, match=f'corrupt or truncated {image_format}'):
    decode_image_bytes(truncated, 8, name='cut')
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_multiframe_tiff_rejected(tmp_path):
  frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (1, 2)]
  path = tmp_path / 'stack.tif'
  frames[0].save(path, save_all=True, append_images=frames[1:])

  with pytest.raises(DecodeError, match='has 2 frames'):
    decode_image(path, 4)


def test_invalid_options_rejected(tmp_path):
  path = _save(np.zeros((4, 4), np.uint8), tmp_path / 'black.png')

  with pytest.raises(ValueError, match="resize='crop' is invalid"):
    decode_image(path, 4, 'crop')
  with pytest.raises(ValueError, match='image_size=0 is invalid'):
    decode_image(path, 0)
  with pytest.raises(ValueError, match='pad_value=300 is invalid'):
    decode_image(path, 4, 'pad', pad_value=300)


def test_decode_files_skips_and_strict(tmp_path):
  good = _save(np.full((8, 8), 50, np.uint8), tmp_path / 'good.png')
  empty = tmp_path / 'empty.png'
  empty.write_bytes(b'')
  other = _save(np.full((8, 8), 60, np.uint8), tmp_path / 'other.png')

  decoded = decode_files([good, empty, other], 8, progress=False)

  assert decoded.images.shape == (2, 8, 8, 3)
  assert decoded.paths == [str(good), str(other)]
  assert [e.path for e in decoded.errors] == [str(empty)]
  assert decoded.images[1, 0, 0, 0] == 60
  with pytest.raises(DecodeError, match='empty.png: file is empty'):
    decode_files([good, empty], 8, strict=True, progress=False)
