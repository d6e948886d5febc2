"""Tests for flax_pet.explain: Grad-CAM, overlays, mask geometry, pointing game."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from flax_pet import explain
from flax_pet import metrics
from flax_pet import models
from flax_pet.data import decode
from tests.flax_helpers import random_backbone_variables

# 139 px is the smallest input with a 3x3 feature grid, so the heatmap has a
# location; 75 to 106 px give a 1x1 grid.
GRID_IMAGE_SIZE = 139
FEATURES = models.FEATURE_CHANNELS


def one_channel_head(channel, num_features, target=1, num_classes=2):
  """Head whose `target` logit is ReLU(mean of one feature channel)."""
  hidden = np.zeros((num_features, 1), np.float32)
  hidden[channel, 0] = 1.0
  logits = np.zeros((1, num_classes), np.float32)
  logits[0, target] = 1.0
  return {
      'hidden': {'kernel': hidden, 'bias': np.zeros(1, np.float32)},
      'logits': {'kernel': logits, 'bias': np.zeros(num_classes, np.float32)},
  }


def sum_of_channels_head(num_features):
  """Head whose class-1 logit is the sum of ReLU(mean) over every channel."""
  return {
      'hidden': {'kernel': np.eye(num_features, dtype=np.float32),
                 'bias': np.zeros(num_features, np.float32)},
      'logits': {
          'kernel': np.stack([np.zeros(num_features), np.ones(num_features)],
                             axis=1).astype(np.float32),
          'bias': np.zeros(2, np.float32),
      },
  }


# Grad-CAM on feature maps with a known result.


def test_feature_gradcam_known_hot_cell():
  features = np.full((2, 5, 5, 4), 0.1, np.float32)
  features[0, 1, 3, 0] = 2.0
  features[1, 4, 0, 0] = 3.0
  # Hotter cells in channels the head ignores.
  features[:, 2, 2, 1] = 9.0
  features[:, 0, 0, 3] = 7.0
  head = one_channel_head(channel=0, num_features=4)

  result = explain.feature_gradcam(head, jnp.asarray(features),
                                   jnp.array([1, 1]), (45, 45))

  # score = mean(A_0), so w_0 = 1/25, the others 0, and cam = A_0 / 25.
  expected_weights = np.zeros((2, 4), np.float32)
  expected_weights[:, 0] = 1 / 25
  np.testing.assert_allclose(result.channel_weights, expected_weights,
                             atol=1e-7)
  np.testing.assert_allclose(result.cams, features[..., 0] / 25, rtol=1e-6)

  # With half-pixel centres, feature cell i is centred on input pixel 9 i + 4.
  assert explain.heatmap_peak(result.heatmaps[0]) == (13, 31)
  # Pixels left of the edge cell's centre hold its value, up to rounding.
  row, col = explain.heatmap_peak(result.heatmaps[1])
  assert row == 40
  assert col <= 4
  np.testing.assert_allclose(result.heatmaps[1][40, :5], 1.0, rtol=1e-6)
  assert result.heatmaps.shape == (2, 45, 45)
  np.testing.assert_allclose(result.heatmaps.min(axis=(1, 2)), 0.0)
  np.testing.assert_allclose(result.heatmaps.max(axis=(1, 2)), 1.0)
  assert not np.any(result.flat)


def test_channel_weights_match_formula():
  rng = np.random.default_rng(1)
  num_features, hidden_units, num_classes = 8, 6, 3
  head = {
      'hidden': {
          'kernel': rng.normal(size=(num_features, hidden_units)),
          'bias': rng.normal(size=hidden_units) * 0.1,
      },
      'logits': {
          'kernel': rng.normal(size=(hidden_units, num_classes)),
          'bias': rng.normal(size=num_classes),
      },
  }
  head = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), head)
  features = rng.uniform(0, 2, size=(3, 4, 5, num_features)).astype(np.float32)
  targets = np.array([0, 2, 1])

  result = explain.feature_gradcam({'params': head}, jnp.asarray(features),
                                   jnp.asarray(targets), (4, 5))

  # d logit_t / d A_k(i, j) = (1 / hw) sum_j W2[j, t] [hidden_j > 0] W1[k, j].
  pooled = features.astype(np.float64).mean(axis=(1, 2))
  hidden = pooled @ head['hidden']['kernel'] + head['hidden']['bias']
  active = hidden > 0
  for n, target in enumerate(targets):
    d_pooled = head['hidden']['kernel'] @ (
        active[n] * head['logits']['kernel'][:, target])
    expected = d_pooled / (4 * 5)
    np.testing.assert_allclose(result.channel_weights[n], expected, rtol=1e-5,
                               atol=1e-7)
    cam = np.maximum(features[n] @ expected, 0.0)
    np.testing.assert_allclose(result.cams[n], cam, rtol=1e-5, atol=1e-7)


def test_feature_gradcam_default_target_predicted():
  rng = np.random.default_rng(2)
  features = rng.uniform(0, 1, size=(4, 3, 3, 5)).astype(np.float32)
  head = {
      'hidden': {'kernel': rng.normal(size=(5, 7)).astype(np.float32),
                 'bias': np.zeros(7, np.float32)},
      'logits': {'kernel': rng.normal(size=(7, 3)).astype(np.float32),
                 'bias': np.zeros(3, np.float32)},
  }

  result = explain.feature_gradcam(head, jnp.asarray(features),
                                   jnp.array([-1, -1, 2, -1]), (9, 9))

  predicted = np.argmax(result.probabilities, axis=1)
  assert int(result.targets[0]) == predicted[0]
  assert int(result.targets[1]) == predicted[1]
  assert int(result.targets[2]) == 2
  assert int(result.targets[3]) == predicted[3]
  np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_feature_gradcam_flat_grid():
  features = np.full((2, 1, 1, 4), 0.5, np.float32)
  head = one_channel_head(channel=0, num_features=4)
  # Image 1 has no positive evidence: the target logit ignores every channel.
  result = explain.feature_gradcam(head, jnp.asarray(features),
                                   jnp.array([1, 0]), (80, 80))

  assert result.flat.tolist() == [True, True]
  assert np.all(np.asarray(result.heatmaps) == 0.0)


# Grad-CAM through a random-weight InceptionResNetV2.


@pytest.fixture(scope='module')
def irv2_variables():
  return random_backbone_variables(GRID_IMAGE_SIZE)


@pytest.fixture(scope='module')
def perturbed_result(irv2_variables):
  """Grad-CAM of a plain image and of a bright square in two corners."""
  size = GRID_IMAGE_SIZE
  pixels = np.full((3, size, size, 3), 100.0, np.float32)
  pixels[1, 10:40, 10:40] = 255.0
  pixels[2, 99:129, 99:129] = 255.0
  head = sum_of_channels_head(FEATURES)
  # batch_size 2 pads the last batch, so the third image checks padding too.
  result = explain.gradcam(irv2_variables, head, pixels, 'unit', targets=1,
                           batch_size=2)
  return pixels, result


def test_gradcam_irv2_shapes_and_range(perturbed_result):
  pixels, result = perturbed_result
  assert result.heatmaps.shape == (3, GRID_IMAGE_SIZE, GRID_IMAGE_SIZE)
  assert result.cams.shape == (3, 3, 3)
  assert result.channel_weights.shape == (3, FEATURES)
  assert result.probabilities.shape == (3, 2)
  assert result.targets.tolist() == [1, 1, 1]
  assert not result.flat.any()
  np.testing.assert_allclose(result.heatmaps.min(axis=(1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(result.heatmaps.max(axis=(1, 2)), 1.0, atol=1e-6)


def test_gradcam_irv2_follows_perturbation(perturbed_result):
  _, result = perturbed_result
  half = GRID_IMAGE_SIZE // 2

  row, col = explain.heatmap_peak(result.heatmaps[1])
  assert row < half
  assert col < half

  row, col = explain.heatmap_peak(result.heatmaps[2])
  assert row > half
  assert col > half

  # The change against the plain image is largest in the square's cell.
  change = np.abs(result.cams[1:] - result.cams[0])
  assert np.unravel_index(np.argmax(change[0]), (3, 3)) == (0, 0)
  assert np.unravel_index(np.argmax(change[1]), (3, 3)) == (2, 2)


def test_gradcam_small_input_flat(irv2_variables):
  # NOTE: variables built for 139 px also fit 96 px, because IRV2's
  # parameters do not depend on the input size.
  pixels = np.full((1, 96, 96, 3), 100.0, np.float32)
  pixels[0, 5:30, 5:30] = 255.0
  result = explain.gradcam(irv2_variables, sum_of_channels_head(FEATURES),
                           pixels, 'unit', targets=1)
  assert result.cams.shape == (1, 1, 1)
  assert result.flat.tolist() == [True]
  assert np.all(result.heatmaps == 0.0)


def test_gradcam_rejects_bad_targets(irv2_variables):
  pixels = np.zeros((2, 96, 96, 3), np.float32)
  head = sum_of_channels_head(FEATURES)
  with pytest.raises(ValueError, match='targets must be in'):
    explain.gradcam(irv2_variables, head, pixels, 'unit', targets=[0, 2])
  with pytest.raises(ValueError, match='Got 3 targets for 2 images'):
    explain.gradcam(irv2_variables, head, pixels, 'unit', targets=[0, 1, 1])
  with pytest.raises(ValueError, match='too small'):
    explain.gradcam(irv2_variables, head, np.zeros((1, 74, 96, 3)), 'unit')


# Overlays.


def test_save_overlay_writes_png(tmp_path):
  pixels = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (48, 1))
  pixels = np.repeat(pixels[..., None], 3, axis=-1)
  heatmap = np.zeros((48, 64), np.float32)
  heatmap[10:20, 40:50] = 1.0
  mask = np.zeros((48, 64), bool)
  mask[12:18, 42:48] = True

  path = explain.save_overlay(
      tmp_path / 'sub' / 'overlay.png', pixels, heatmap, true_class='Cancer',
      predicted_class='No cancer', probability=0.75, target_class='Cancer',
      mask=mask,
  )

  with Image.open(path) as image:
    assert image.format == 'PNG'
    rgb = np.asarray(image.convert('RGB'), np.int32)
  # The jet colormap adds coloured pixels to the grayscale image.
  colourful = np.abs(rgb[..., 0] - rgb[..., 2]) > 60
  assert colourful.sum() > 100


def test_save_overlay_rejects_size_mismatch(tmp_path):
  with pytest.raises(ValueError, match='differ in size'):
    explain.save_overlay(tmp_path / 'x.png', np.zeros((10, 10, 3)),
                         np.zeros((10, 12)))


def test_save_overlays_names_and_collisions(tmp_path):
  pixels = np.zeros((2, 20, 20, 3), np.float32)
  result = explain.GradCamResult(
      heatmaps=np.random.default_rng(0).random((2, 20, 20)),
      cams=np.zeros((2, 1, 1)), channel_weights=np.zeros((2, 4)),
      probabilities=np.array([[0.2, 0.8], [0.9, 0.1]]),
      targets=np.array([1, 0]), flat=np.array([False, False]),
  )

  paths = explain.save_overlays(tmp_path, ['Cancer/p 1.png', 'No cancer/p1.png'],
                                pixels, result, ['No cancer', 'Cancer'],
                                labels=[1, 0])
  assert [p.name for p in paths] == ['Cancer_p_1_gradcam.png',
                                     'No_cancer_p1_gradcam.png']
  assert all(p.is_file() for p in paths)

  with pytest.raises(ValueError, match='same overlay file'):
    explain.save_overlays(tmp_path, ['a b.png', 'a_b.png'], pixels, result,
                          ['No cancer', 'Cancer'])


# Mask geometry.


@pytest.mark.parametrize('source_shape', [(300, 400), (991, 400), (457, 400)])
@pytest.mark.parametrize('resize', ['pad', 'stretch'])
def test_image_region_matches_decode(tmp_path, source_shape, resize):
  path = tmp_path / 'white.png'
  Image.fromarray(np.full(source_shape, 255, np.uint8)).save(path)
  decoded = decode.decode_image(path, (224, 200), resize, pad_value=0.0)

  top, left, height, width = explain.image_region(source_shape, (224, 200),
                                                  resize)

  rows = np.flatnonzero(decoded[..., 0].max(axis=1) > 0)
  cols = np.flatnonzero(decoded[..., 0].max(axis=0) > 0)
  assert (top, top + height - 1) == (rows[0], rows[-1])
  assert (left, left + width - 1) == (cols[0], cols[-1])


def test_resize_mask_nearest_blocks():
  mask = np.zeros((4, 4), bool)
  mask[1, 2] = True

  resized, region = explain.resize_mask(mask, 8, 'stretch')
  expected = np.zeros((8, 8), bool)
  expected[2:4, 4:6] = True
  np.testing.assert_array_equal(resized, expected)
  assert region.all()

  # A 2:1 tall mask padded into a square keeps its aspect ratio.
  tall = np.zeros((8, 4), bool)
  tall[7, 0] = True
  resized, region = explain.resize_mask(tall, 8, 'pad')
  assert region[:, 2:6].all()
  assert not region[:, :2].any()
  assert not region[:, 6:].any()
  assert np.argwhere(resized).tolist() == [[7, 2]]


def test_resize_mask_matches_pillow(data_dir):
  masks = sorted((data_dir / 'pet-mip-masks').glob('*.png'))[:5]
  for path in masks:
    mask = explain.load_mask(path)
    top, left, height, width = explain.image_region(mask.shape, 224, 'pad')
    resized, _ = explain.resize_mask(mask, 224, 'pad')

    pillow = Image.fromarray(mask.astype(np.int32)).resize(
        (width, height), Image.Resampling.NEAREST)
    pillow = np.asarray(pillow) > 0
    inner = resized[top:top + height, left:left + width]
    # Pillow rounds exact half-way source coordinates in float, so a few
    # boundary rows or columns may pick the other neighbour.
    assert np.mean(inner != pillow) < 0.002, path.name
    assert not resized[:, :left].any(), path.name
    assert not resized[:, left + width:].any(), path.name


def test_load_mask_formats(tmp_path, data_dir):
  real = data_dir / 'pet-mip-masks' / 'patient_001.png'
  mask = explain.load_mask(real)
  with Image.open(real) as image:
    values = np.asarray(image)
  assert mask.shape == values.shape[:2]
  np.testing.assert_array_equal(mask, values[..., 0] == 255)

  labels = np.zeros((6, 5), np.uint16)
  labels[2:4, 1:3] = 1
  Image.fromarray(labels).save(tmp_path / 'labels16.png')
  np.testing.assert_array_equal(explain.load_mask(tmp_path / 'labels16.png'),
                                labels == 1)

  with pytest.raises(FileNotFoundError):
    explain.load_mask(tmp_path / 'absent.png')


# Pointing game on real masks.

SCORED = 8


@pytest.fixture(scope='module')
def real_cases(data_dir):
  """Eight Cancer images with their masks, mapped to 224 px with padding."""
  image_dir = data_dir / 'pet-mip' / 'Cancer'
  mask_dir = data_dir / 'pet-mip-masks'
  image_paths = sorted(image_dir.glob('*.png'))[:SCORED]
  masks = [explain.resize_mask(explain.load_mask(mask_dir / p.name), 224,
                               'pad') for p in image_paths]
  return image_paths, mask_dir, masks


def peaked_heatmap(shape, row, col, width=6.0):
  rows, cols = np.indices(shape)
  return np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * width ** 2))


def nearest_mask_pixel(mask, point):
  pixels = np.argwhere(mask)
  return pixels[np.argmin(((pixels - point) ** 2).sum(axis=1))]


def farthest_region_corner(mask, region):
  rows, cols = np.nonzero(region)
  corners = [(rows.min(), cols.min()), (rows.min(), cols.max()),
             (rows.max(), cols.min()), (rows.max(), cols.max())]
  pixels = np.argwhere(mask)
  return max(corners, key=lambda c: ((pixels - c) ** 2).sum(axis=1).min())


def test_pointing_game_centroid_hits(real_cases):
  image_paths, mask_dir, masks = real_cases
  heatmaps = []
  for mask, _ in masks:
    centroid = np.argwhere(mask).mean(axis=0)
    # A multi-lesion mask's centroid can fall between lesions.
    row, col = nearest_mask_pixel(mask, centroid)
    heatmaps.append(peaked_heatmap(mask.shape, row, col))

  result = explain.pointing_game(np.stack(heatmaps), image_paths, mask_dir,
                                 224, 'pad')

  assert result['n_scored'] == SCORED
  assert result['hit_rate']['successes'] == SCORED
  assert result['hit_rate']['value'] == 1.0
  expected = metrics.proportion_ci(SCORED, SCORED)
  assert result['hit_rate']['ci_low'] == pytest.approx(expected['ci_low'])
  assert result['hit_rate']['ci_high'] == pytest.approx(expected['ci_high'])
  assert result['missing_masks'] == []
  assert result['empty_masks'] == []
  assert result['tolerance_px'] == 0.0


def test_pointing_game_far_corner_misses(real_cases):
  image_paths, mask_dir, masks = real_cases
  heatmaps = []
  for mask, region in masks:
    row, col = farthest_region_corner(mask, region)
    assert not mask[row, col]
    heatmaps.append(peaked_heatmap(mask.shape, row, col))

  result = explain.pointing_game(np.stack(heatmaps), image_paths, mask_dir,
                                 224, 'pad')

  assert result['hit_rate']['successes'] == 0
  assert result['hit_rate']['n'] == SCORED
  assert result['hit_rate']['ci_high'] > 0.0
  assert result['peak_on_padding'] == []


def test_pointing_game_baseline_is_mask_fraction(real_cases, data_dir):
  image_paths, mask_dir, masks = real_cases
  heatmaps = np.stack([peaked_heatmap(m.shape, 0, 0) for m, _ in masks])

  result = explain.pointing_game(heatmaps, image_paths, mask_dir, 224, 'pad')

  fractions = [mask[region].mean() for mask, region in masks]
  baseline = result['baseline']
  assert baseline['value'] == pytest.approx(np.mean(fractions))
  assert baseline['n'] == SCORED
  assert baseline['ci_low'] <= baseline['value'] <= baseline['ci_high']
  assert baseline['min'] == pytest.approx(min(fractions))

  # Nearest-neighbour resizing keeps the area: the source masks' mean
  # fraction agrees within a few percent.
  source = [explain.load_mask(mask_dir / p.name).mean() for p in image_paths]
  assert baseline['value'] == pytest.approx(np.mean(source), rel=0.05)


def test_pointing_game_tolerance(real_cases):
  image_paths, mask_dir, masks = real_cases
  mask, region = masks[0]
  near = explain._within_tolerance(mask, 3)
  # A pixel 2 to 3 px from the mask: outside it, inside its 3 px band.
  candidates = np.argwhere(near & ~explain._within_tolerance(mask, 1.5)
                           & region)
  row, col = candidates[0]
  heatmap = peaked_heatmap(mask.shape, row, col)[None]

  strict = explain.pointing_game(heatmap, image_paths[:1], mask_dir, 224,
                                 'pad')
  tolerant = explain.pointing_game(heatmap, image_paths[:1], mask_dir, 224,
                                   'pad', tolerance=3)

  assert strict['hit_rate']['successes'] == 0
  assert tolerant['hit_rate']['successes'] == 1
  assert tolerant['baseline']['value'] > strict['baseline']['value']


def test_pointing_game_lists_exclusions(real_cases, data_dir, tmp_path):
  image_paths, mask_dir, masks = real_cases
  local_masks = tmp_path / 'masks'
  local_masks.mkdir()
  for path in image_paths[:2]:
    shutil.copy(mask_dir / path.name, local_masks / path.name)
  # Image 2 gets an empty mask of the right size; image 3 has none.
  with Image.open(image_paths[2]) as image:
    size = image.size
  Image.new('L', size, 0).save(local_masks / image_paths[2].name)
  healthy = sorted((data_dir / 'pet-mip' / 'No cancer').glob('*.png'))[0]

  paths = [*image_paths[:4], healthy]
  heatmaps = np.zeros((5, 224, 224), np.float32)
  mask, _ = masks[0]
  heatmaps[0] = peaked_heatmap((224, 224), *nearest_mask_pixel(mask, (0, 0)))
  # Heatmap 1 stays flat: a miss, not an exclusion.

  result = explain.pointing_game(heatmaps, paths, local_masks, 224, 'pad')

  assert result['n_images'] == 5
  assert result['n_scored'] == 2
  assert result['hit_rate']['successes'] == 1
  assert result['empty_masks'] == [str(image_paths[2])]
  assert result['missing_masks'] == [str(image_paths[3]), str(healthy)]
  assert result['flat_heatmaps'] == [str(image_paths[1])]
  assert [r['hit'] for r in result['per_image']] == [True, False]

  with pytest.raises(FileNotFoundError, match='No mask for'):
    explain.pointing_game(heatmaps, paths, local_masks, 224, 'pad',
                          require_masks=True)


def test_pointing_game_rejects_mismatches(real_cases, tmp_path):
  image_paths, mask_dir, _ = real_cases
  wrong = tmp_path / 'wrong'
  wrong.mkdir()
  Image.new('L', (10, 12), 255).save(wrong / image_paths[0].name)
  heatmaps = np.zeros((1, 224, 224), np.float32)

  with pytest.raises(ValueError, match='must have its image'):
    explain.pointing_game(heatmaps, image_paths[:1], wrong, 224, 'pad')
  with pytest.raises(ValueError, match='shape'):
    explain.pointing_game(heatmaps, image_paths[:1], mask_dir, 299, 'pad')
  with pytest.raises(ValueError, match='one path per heatmap'):
    explain.pointing_game(heatmaps, image_paths[:2], mask_dir, 224, 'pad')
