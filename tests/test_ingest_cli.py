"""`python -m flax_pet.ingest`: end to end on real PET data, and its failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_pet.ingest import decode_image, read_nifti, read_png16
from flax_pet.ingest.cli import main
from tests.test_ingest_dicom import ACRIN_SLICE, write_series

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def hecktor_dir(data_dir):
  return data_dir / 'nifti' / 'hecktor'


def _z_positions(count):
  return [-278.5 + 3.0 * k for k in range(count)]


def _all_files(folder):
  return sorted(p for p in folder.rglob('*') if p.is_file()) if folder.exists() else []


def test_cli_hecktor_end_to_end(tmp_path, hecktor_dir, capsys):
  import tensorflow as tf  # The class-folder dataset decodes PNGs with TF.

  dst = tmp_path / 'dataset'
  status = main([
      str(hecktor_dir), str(dst),
      '--views', 'coronal_mip', 'sagittal_mip', 'axial:32',
      '--nifti-suv', '--include', '*_pt.nii.gz',
      '--class-name', 'Head neck', '--window', '0', '10',
  ])

  out = capsys.readouterr()
  assert status == 0, out.err
  assert 'Wrote 30 image(s)' in out.out
  class_dir = dst / 'Head neck'
  assert len(list(class_dir.glob('*.png'))) == 30
  assert len(list(class_dir.glob('*.json'))) == 30
  assert '[10/10] Reading NIfTI' in out.err

  png = class_dir / 'CHGJ007_pt_nifti_coronal_mip.png'
  sidecar = json.loads(png.with_suffix('.json').read_text())
  volume = read_nifti(hecktor_dir / 'CHGJ007_pt.nii.gz', values_are_suv=True)
  expected = np.clip(volume.data.max(axis=1), 0, 10)

  assert sidecar['units'] == 'SUVbw'
  assert sidecar['window'] == [0.0, 10.0]
  assert sidecar['view'] == 'coronal_mip'
  assert sidecar['pixel_spacing_mm'] == [3.34375, 3.34375]
  assert sidecar['source_path'].endswith('CHGJ007_pt.nii.gz')
  assert sidecar['ingest_version'] == '1'
  np.testing.assert_allclose(decode_image(png), expected, atol=10 / 65535 / 2 + 1e-6)

  decoded_by_tf = tf.io.decode_png(png.read_bytes(), channels=1, dtype=tf.uint16)
  np.testing.assert_array_equal(decoded_by_tf.numpy()[..., 0], read_png16(png))


def test_cli_dicom_series(tmp_path, data_dir, capsys):
  src = tmp_path / 'src'
  write_series(src / 'patient', data_dir / ACRIN_SLICE, _z_positions(5))
  (src / 'patient' / 'notes.txt').write_text('not an image')
  dst = tmp_path / 'dataset'

  status = main([str(src), str(dst), '--views', 'coronal_mip', 'axial:0'])

  out = capsys.readouterr()
  assert status == 0, out.err
  assert 'Skipped 1 file(s)' in out.out
  assert 'notes.txt: not a DICOM file' in out.out
  pngs = sorted((dst / 'unlabeled').glob('*.png'))
  assert [p.name.split('_')[-1] for p in pngs] == ['axial-0.png', 'mip.png']
  assert all(p.name.startswith('ACRIN-FLT-Breast_029_102-') for p in pngs)

  coronal = next(p for p in pngs if p.name.endswith('coronal_mip.png'))
  sidecar = json.loads(coronal.with_suffix('.json').read_text())
  # Rows are 3 mm slices; 168 columns of 4.07283 mm are resampled to 3 mm.
  assert sidecar['shape'] == [5, 228]
  assert sidecar['pixel_spacing_mm'] == [3.0, 3.0]
  assert sidecar['voxel_spacing_mm'] == pytest.approx([3.0, 4.07283, 4.07283])
  assert sidecar['units'] == 'SUVbw'
  assert sidecar['stored_units'] == 'BQML'
  assert sidecar['suv_scale_factor'] == pytest.approx(0.00059424853, rel=1e-6)
  assert sidecar['decay_time_s'] == pytest.approx(3976.921)
  assert sidecar['patient_id'] == 'ACRIN-FLT-Breast_029'
  assert 'linear interpolation along columns' in sidecar['resampling']
  # The default window ends at the image maximum. Linear resampling lowers
  # this peak (7.13) below the volume's SUVmax (7.19), because the hottest
  # voxel falls between output pixel centers.
  assert sidecar['window'][1] == pytest.approx(sidecar['image_max'])
  assert sidecar['image_max'] < sidecar['volume_max'] - 0.05


def test_cli_nearest_keeps_suvmax(tmp_path, data_dir):
  src = tmp_path / 'src'
  write_series(src, data_dir / ACRIN_SLICE, _z_positions(5))
  dst = tmp_path / 'dataset'

  status = main([str(src), str(dst), '--resample', 'nearest'])

  png = next((dst / 'unlabeled').glob('*_coronal_mip.png'))
  sidecar = json.loads(png.with_suffix('.json').read_text())
  assert status == 0
  assert sidecar['image_max'] == sidecar['volume_max']
  assert decode_image(png).max() == pytest.approx(sidecar['volume_max'], rel=1e-6)


def test_cli_missing_weight_leaves_nothing(tmp_path, data_dir, capsys):
  src = tmp_path / 'src'
  write_series(src / 'good', data_dir / ACRIN_SLICE, _z_positions(3))

  def drop_weight(k, ds):
    del ds.PatientWeight

  write_series(src / 'no_weight', data_dir / ACRIN_SLICE, _z_positions(3), edit=drop_weight)
  dst = tmp_path / 'dataset'

  status = main([str(src), str(dst)])

  err = capsys.readouterr().err
  assert status == 1
  assert 'PatientWeight (0010,1030) is missing' in err
  assert 'no_weight' in err
  assert not dst.exists()

  status = main([str(src), str(dst), '--units', 'raw'])

  assert status == 0
  sidecars = [json.loads(p.read_text()) for p in (dst / 'unlabeled').glob('*.json')]
  assert len(sidecars) == 2
  assert {s['units'] for s in sidecars} == {'BQML'}
  assert {s['suv_scale_factor'] for s in sidecars} == {None}


def test_cli_failure_keeps_existing_dst(tmp_path, data_dir, capsys):
  src = tmp_path / 'src'
  write_series(src, data_dir / ACRIN_SLICE, _z_positions(3))
  dst = tmp_path / 'dataset'
  assert main([str(src), str(dst)]) == 0
  before = _all_files(dst)

  # A view past the last slice fails after the first view was rendered.
  status = main([str(src), str(dst), '--views', 'sagittal_mip', 'axial:3'])

  assert status == 1
  assert 'axial:3 is out of range' in capsys.readouterr().err
  assert _all_files(dst) == before
  assert [p.name for p in dst.iterdir()] == ['unlabeled']


def test_cli_existing_output(tmp_path, data_dir, capsys):
  src = tmp_path / 'src'
  write_series(src, data_dir / ACRIN_SLICE, _z_positions(2))
  dst = tmp_path / 'dataset'
  assert main([str(src), str(dst)]) == 0

  assert main([str(src), str(dst)]) == 1
  assert 'already exists' in capsys.readouterr().err
  assert main([str(src), str(dst), '--overwrite']) == 0


def test_cli_empty_source(tmp_path, capsys):
  src = tmp_path / 'empty'
  src.mkdir()

  status = main([str(src), str(tmp_path / 'dataset')])

  assert status == 1
  assert 'contains no files' in capsys.readouterr().err
  assert not (tmp_path / 'dataset').exists()


def test_cli_nifti_needs_declaration(tmp_path, hecktor_dir, capsys):
  status = main([str(hecktor_dir / 'CHGJ007_pt.nii.gz'), str(tmp_path / 'dataset')])

  assert status == 1
  assert 'NIfTI stores no dose' in capsys.readouterr().err
  assert not (tmp_path / 'dataset').exists()


def test_cli_invalid_view(tmp_path, hecktor_dir, capsys):
  status = main([str(hecktor_dir), str(tmp_path / 'dataset'), '--views', 'oblique'])

  assert status == 1
  assert "Invalid view 'oblique'" in capsys.readouterr().err


def test_cli_invert(tmp_path, hecktor_dir):
  dst = tmp_path / 'dataset'
  status = main([
      str(hecktor_dir / 'CHGJ008_pt.nii.gz'), str(dst), '--nifti-suv', '--invert'
  ])

  png = dst / 'unlabeled' / 'CHGJ008_pt_nifti_coronal_mip.png'
  volume = read_nifti(hecktor_dir / 'CHGJ008_pt.nii.gz', values_are_suv=True)
  assert status == 0
  assert json.loads(png.with_suffix('.json').read_text())['inverted'] is True
  # Dark is hot: the hottest pixel is stored as 0.
  assert read_png16(png).min() == 0
  assert decode_image(png).max() == pytest.approx(float(volume.data.max()), rel=1e-4)


def test_module_entry_point(tmp_path, data_dir):
  dst = tmp_path / 'dataset'
  command = [sys.executable, '-m', 'flax_pet.ingest']
  env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}

  done = subprocess.run(
      command + [str(data_dir / ACRIN_SLICE), str(dst), '--views', 'axial:0'],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
  )
  failed = subprocess.run(
      command + [str(data_dir / ACRIN_SLICE), str(dst), '--views', 'coronal_mip'],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
  )

  assert done.returncode == 0, done.stderr
  assert 'Wrote 1 image(s)' in done.stdout
  assert done.stderr.count('Reading DICOM series') == 1
  assert failed.returncode == 1
  assert 'at least 2 voxels along superior->inferior' in failed.stderr
  assert len(list((dst / 'unlabeled').glob('*.png'))) == 1
