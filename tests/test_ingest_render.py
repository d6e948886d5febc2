"""NIfTI volumes, views, square pixels and the 16-bit window mapping."""

import io

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from flax_pet.ingest import (
    IngestError,
    PetVolume,
    parse_view,
    read_nifti,
    render_view,
    uint16_to_values,
    window_to_uint16,
)
from flax_pet.ingest.writer import encode_png16

HECKTOR_GLOB = 'CHGJ*_pt.nii.gz'


@pytest.fixture(scope='module')
def hecktor_paths(data_dir):
  paths = sorted((data_dir / 'nifti' / 'hecktor').glob(HECKTOR_GLOB))
  assert len(paths) == 10
  return paths


def _volume(data, spacing=(1.0, 1.0, 1.0)):
  return PetVolume(
      data=np.asarray(data, dtype=np.float32),
      spacing_mm=spacing,
      units='SUVbw',
      patient_id='p',
      series_label='s',
      source_path='memory',
      source_format='nifti',
      source_axis_codes='IPL',
  )


def _png_roundtrip(pixels):
  with Image.open(io.BytesIO(encode_png16(pixels))) as image:
    return image.mode, np.asarray(image).astype(np.uint16)


def test_hecktor_mip_keeps_volume_max(hecktor_paths):
  for path in hecktor_paths:
    volume = read_nifti(path, values_are_suv=True)
    volume_max = float(volume.data.max())
    hottest = np.unravel_index(np.argmax(volume.data), volume.data.shape)

    for view, kept_axes in (('coronal_mip', (0, 2)), ('sagittal_mip', (0, 1))):
      rendered = render_view(volume, parse_view(view))
      pixels, window = window_to_uint16(rendered.image)
      mode, decoded_pixels = _png_roundtrip(pixels)
      decoded = uint16_to_values(decoded_pixels, window)
      half_step = (window[1] - window[0]) / 65535 / 2

      assert mode == 'I;16', path.name
      assert decoded.max() == pytest.approx(volume_max, abs=half_step), (path.name, view)
      assert np.unravel_index(np.argmax(decoded), decoded.shape) == tuple(
          hottest[a] for a in kept_axes
      ), (path.name, view)


def test_hecktor_canonical_matches_nibabel(hecktor_paths):
  path = hecktor_paths[0]
  # nibabel's closest canonical is RAS+ (x toward right, y anterior, z
  # superior); the ingest canonical is (superior->inferior,
  # anterior->posterior, right->left), i.e. every axis reversed and x, z swapped.
  ras = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)

  volume = read_nifti(path, values_are_suv=True)

  assert volume.source_axis_codes == 'LPS'
  np.testing.assert_array_equal(volume.data, ras.transpose(2, 1, 0)[::-1, ::-1, ::-1])
  assert volume.spacing_mm == pytest.approx((3.34375,) * 3)


def test_nifti_anisotropic_affine(tmp_path):
  # RAS+ affine: voxel axis i runs toward patient left (2 mm), j superior
  # (5 mm), k anterior (3 mm). One hot voxel at (i, j, k) = (1, 2, 3).
  data = np.zeros((4, 6, 8), dtype=np.float32)
  data[1, 2, 3] = 9.0
  affine = np.array(
      [[-2.0, 0, 0, 10], [0, 0, 3.0, -5], [0, 5.0, 0, 7], [0, 0, 0, 1]]
  )
  path = tmp_path / 'volume.nii.gz'
  nib.save(nib.Nifti1Image(data, affine), path)

  volume = read_nifti(path)

  assert volume.units == 'unknown'
  assert volume.source_axis_codes == 'LSA'
  assert volume.data.shape == (6, 8, 4)
  assert volume.spacing_mm == pytest.approx((5.0, 3.0, 2.0))
  # Canonical index: j reversed (superior first: 5 - 2), k reversed
  # (anterior first: 7 - 3), i kept (it already runs right to left).
  assert volume.data[3, 4, 1] == 9.0


def test_nifti_4d_single_frame(tmp_path):
  path = tmp_path / 'frame.nii'
  nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 1), np.float32), np.eye(4)), path)

  assert read_nifti(path).data.shape == (5, 4, 3)


def test_nifti_4d_rejected(tmp_path):
  path = tmp_path / 'dynamic.nii'
  nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 2), np.float32), np.eye(4)), path)

  with pytest.raises(IngestError, match=r'dynamic.nii: expected a 3D volume, got shape \(3, 4, 5, 2\)'):
    read_nifti(path)


def test_nifti_nan_rejected(tmp_path):
  data = np.ones((3, 4, 5), np.float32)
  data[0, 0, 0] = np.nan
  path = tmp_path / 'nan.nii'
  nib.save(nib.Nifti1Image(data, np.eye(4)), path)

  with pytest.raises(IngestError, match='1 voxel'):
    read_nifti(path)


def test_nifti_corrupt_rejected(tmp_path):
  path = tmp_path / 'broken.nii.gz'
  path.write_bytes(b'not gzip data at all')

  with pytest.raises(IngestError, match='broken.nii.gz: cannot be read as NIfTI'):
    read_nifti(path)


@pytest.mark.parametrize(
    'text, plane, index, name',
    [
        ('coronal_mip', 'coronal', None, 'coronal_mip'),
        ('sagittal_mip', 'sagittal', None, 'sagittal_mip'),
        ('axial_mip', 'axial', None, 'axial_mip'),
        ('axial:40', 'axial', 40, 'axial-40'),
        (' sagittal:0 ', 'sagittal', 0, 'sagittal-0'),
    ],
)
def test_view_parse(text, plane, index, name):
  view = parse_view(text)

  assert (view.plane, view.index, view.name) == (plane, index, name)


@pytest.mark.parametrize('text', ['coronal', 'axial:-1', 'axial:x', 'oblique_mip', 'mip'])
def test_view_parse_invalid(text):
  with pytest.raises(IngestError, match='Invalid view'):
    parse_view(text)


def test_view_geometry():
  data = np.zeros((4, 5, 6), np.float32)
  data[1, 2, 3] = 7.0
  volume = _volume(data)

  coronal = render_view(volume, parse_view('coronal_mip'))
  sagittal = render_view(volume, parse_view('sagittal_mip'))
  axial = render_view(volume, parse_view('axial:1'))

  assert coronal.image.shape == (4, 6)
  assert coronal.image[1, 3] == 7.0
  assert (coronal.row_axis, coronal.column_axis) == ('superior->inferior', 'right->left')
  assert sagittal.image.shape == (4, 5)
  assert sagittal.image[1, 2] == 7.0
  assert (sagittal.row_axis, sagittal.column_axis) == ('superior->inferior', 'anterior->posterior')
  assert axial.image.shape == (5, 6)
  assert axial.image[2, 3] == 7.0
  assert 'slice 1 of 4' in axial.description


def test_view_slice_out_of_range():
  with pytest.raises(IngestError, match=r'axial:4 is out of range.*indices 0 to 3'):
    render_view(_volume(np.zeros((4, 5, 6))), parse_view('axial:4'))


def test_view_single_slice_coronal_rejected():
  with pytest.raises(IngestError, match='at least 2 voxels along superior->inferior'):
    render_view(_volume(np.ones((1, 5, 6))), parse_view('coronal_mip'))


def test_square_pixels_linear():
  # 5 mm slices, 2 mm columns: the coronal rows are resampled to 2 mm.
  data = np.zeros((4, 3, 6), np.float32)
  data[:, :, :] = np.arange(4, dtype=np.float32)[:, None, None]
  volume = _volume(data, spacing=(5.0, 2.0, 2.0))

  rendered = render_view(volume, parse_view('coronal_mip'))

  assert rendered.image.shape == (10, 6)
  assert rendered.pixel_spacing_mm == 2.0
  assert 'linear interpolation along rows from 5.0000 mm to 2.0000 mm' in rendered.resampling
  # Output row 2 is centered at 5 mm, i.e. source index 0.5: halfway.
  assert rendered.image[2, 0] == pytest.approx(0.5)
  assert rendered.image[0, 0] == 0.0
  assert rendered.image[-1, 0] == 3.0
  assert np.all(np.diff(rendered.image[:, 0]) >= 0)


def test_square_pixels_nearest_keeps_values():
  rng = np.random.default_rng(0)
  data = rng.uniform(0, 10, size=(7, 5, 9)).astype(np.float32)
  volume = _volume(data, spacing=(3.0, 4.07283, 4.07283))

  rendered = render_view(volume, parse_view('sagittal_mip'), resample='nearest')

  # Sagittal: rows superior->inferior (3 mm), columns anterior->posterior
  # (4.07 mm) upsampled to 3 mm: round(5 * 4.07283 / 3) = 7 columns.
  assert rendered.image.shape == (7, 7)
  source = data.max(axis=2)
  assert set(np.unique(rendered.image)) == set(np.unique(source))


def test_window_roundtrip():
  image = np.array([[0.0, 2.5], [7.25, 10.0]], np.float32)

  pixels, window = window_to_uint16(image)

  assert window == (0.0, 10.0)
  assert pixels.dtype == np.uint16
  assert pixels[1, 1] == 65535
  assert pixels[0, 0] == 0
  np.testing.assert_allclose(uint16_to_values(pixels, window), image, atol=10 / 65535 / 2)


def test_window_user_clips():
  image = np.array([[-1.0, 3.0, 12.0]], np.float32)

  pixels, window = window_to_uint16(image, window=(0.0, 6.0))

  assert window == (0.0, 6.0)
  assert pixels.tolist() == [[0, 32768, 65535]]


def test_window_invert():
  image = np.array([[0.0, 4.0]], np.float32)

  pixels, window = window_to_uint16(image, invert=True)

  assert pixels.tolist() == [[65535, 0]]
  np.testing.assert_allclose(uint16_to_values(pixels, window, invert=True), image)


def test_window_constant_image_rejected():
  with pytest.raises(IngestError, match=r'Invalid window \[0.0, 0.0\].*--window'):
    window_to_uint16(np.zeros((3, 3), np.float32))


def test_png_is_16_bit_gray():
  pixels = np.array([[0, 1, 65535]], np.uint16)

  data = encode_png16(pixels)

  # IHDR: bit depth 16, colour type 0 (grayscale).
  assert data[24] == 16
  assert data[25] == 0
  assert _png_roundtrip(pixels)[1].tolist() == [[0, 1, 65535]]
