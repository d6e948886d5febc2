"""Flax-side test helpers shared by several test files."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_pet import models


def random_backbone_variables(image_size, seed=0):
  """Random IRV2 variables like Flax's LeCun-normal init, without compiling init."""
  model = models.InceptionResNetV2()
  shapes = jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jnp.zeros((1, image_size, image_size, 3)),
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(
          np.float32)
    if name == 'var':
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)
