"""Flax-side test helpers shared by several test files."""

from flax_pet import models


def random_backbone_variables(image_size, seed=0):
  """Random IRV2 variables (LeCun normal kernels) without compiling init."""
  del image_size  # The variables fit any input size.
  return models.random_backbone_variables(seed)
