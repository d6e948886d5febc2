"""InceptionResNetV2 backbone and the classifier head, in flax.linen.

The backbone follows `keras.applications.InceptionResNetV2(include_top=False)`
layer for layer, so that RadImageNet's Keras weights load into it unchanged:

    Szegedy, Ioffe, Vanhoucke, Alemi. "Inception-v4, Inception-ResNet and the
    Impact of Residual Connections on Learning", AAAI 2017 (arXiv:1602.07261).

Each of these Keras details changes the output measurably, so all are kept:
- convolutions without bias, followed by BatchNorm without scale (epsilon 1e-3);
- 'valid' padding on every stride-2 layer and in the stem, 'same' elsewhere;
- the average pool in mixed_5b excludes padding from its count;
- residual branches are scaled by 0.17 (block35), 0.1 (block17) and 0.2
  (block8) before the sum, and the last block8 has scale 1.0 and no ReLU.

Why flax.linen rather than flax.nnx: the backbone is a frozen, pure function of
(variables, images), which is exactly what `model.apply` is. Its variables are
a plain pytree that Orbax saves and `jax.sharding` places without wrappers.
Head training then runs as one jitted `lax.scan` over plain arrays. In a CPU
prototype that was about three times faster than `nnx.jit`.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Keras' BatchNormalization defaults, as used by keras.applications.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99

# The smallest input Keras accepts for this network: three stride-2 'valid'
# stages must leave at least one pixel.
MIN_INPUT_SIZE = 75

FEATURE_CHANNELS = 1536


class ConvBN(nn.Module):
  """Convolution without bias, BatchNorm without scale, optional ReLU.

  This is Keras' `conv2d_bn` helper from keras.applications.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int = 1
  padding: str = 'SAME'
  activation: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(
        self.features,
        tuple(self.kernel_size),
        strides=(self.strides, self.strides),
        padding=self.padding,
        use_bias=False,
        dtype=self.dtype,
        name='conv',
    )(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        use_scale=False,
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        dtype=self.dtype,
        name='bn',
    )(x)
    if self.activation:
      x = nn.relu(x)
    return x


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class Mixed5b(nn.Module):
  """Inception-A style block that widens the stem output to 320 channels."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, name: ConvBN(f, k, dtype=self.dtype, name=name)

    branch0 = conv(96, (1, 1), 'branch0')(x, train)

    branch1 = conv(48, (1, 1), 'branch1_0')(x, train)
    branch1 = conv(64, (5, 5), 'branch1_1')(branch1, train)

    branch2 = conv(64, (1, 1), 'branch2_0')(x, train)
    branch2 = conv(96, (3, 3), 'branch2_1')(branch2, train)
    branch2 = conv(96, (3, 3), 'branch2_2')(branch2, train)

    # Keras' AveragePooling2D(padding='same') divides by the number of real
    # pixels under the window, not by 9.
    pool = nn.avg_pool(
        x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False
    )
    pool = conv(64, (1, 1), 'branch_pool')(pool, train)

    return jnp.concatenate([branch0, branch1, branch2, pool], axis=-1)


class Mixed6a(nn.Module):
  """Reduction-A: 35x35x320 to 17x17x1088 at 299 px input."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, name, **kw: ConvBN(f, k, dtype=self.dtype, name=name, **kw)

    branch0 = conv(384, (3, 3), 'branch0', strides=2, padding='VALID')(x, train)

    branch1 = conv(256, (1, 1), 'branch1_0')(x, train)
    branch1 = conv(256, (3, 3), 'branch1_1')(branch1, train)
    branch1 = conv(384, (3, 3), 'branch1_2', strides=2, padding='VALID')(
        branch1, train
    )

    pool = _max_pool_3x3_s2(x)
    return jnp.concatenate([branch0, branch1, pool], axis=-1)


class Mixed7a(nn.Module):
  """Reduction-B: 17x17x1088 to 8x8x2080 at 299 px input."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, name, **kw: ConvBN(f, k, dtype=self.dtype, name=name, **kw)

    branch0 = conv(256, (1, 1), 'branch0_0')(x, train)
    branch0 = conv(384, (3, 3), 'branch0_1', strides=2, padding='VALID')(
        branch0, train
    )

    branch1 = conv(256, (1, 1), 'branch1_0')(x, train)
    branch1 = conv(288, (3, 3), 'branch1_1', strides=2, padding='VALID')(
        branch1, train
    )

    branch2 = conv(256, (1, 1), 'branch2_0')(x, train)
    branch2 = conv(288, (3, 3), 'branch2_1')(branch2, train)
    branch2 = conv(320, (3, 3), 'branch2_2', strides=2, padding='VALID')(
        branch2, train
    )

    pool = _max_pool_3x3_s2(x)
    return jnp.concatenate([branch0, branch1, branch2, pool], axis=-1)


# Branch layouts of the three residual block types, as (name, features,
# kernel) in Keras' creation order. Branches are concatenated in the order of
# their first layer.
_BLOCK_BRANCHES = {
    'block35': (
        ('branch0', 32, (1, 1)),
        ('branch1_0', 32, (1, 1)),
        ('branch1_1', 32, (3, 3)),
        ('branch2_0', 32, (1, 1)),
        ('branch2_1', 48, (3, 3)),
        ('branch2_2', 64, (3, 3)),
    ),
    'block17': (
        ('branch0', 192, (1, 1)),
        ('branch1_0', 128, (1, 1)),
        ('branch1_1', 160, (1, 7)),
        ('branch1_2', 192, (7, 1)),
    ),
    'block8': (
        ('branch0', 192, (1, 1)),
        ('branch1_0', 192, (1, 1)),
        ('branch1_1', 224, (1, 3)),
        ('branch1_2', 256, (3, 1)),
    ),
}


class InceptionResNetBlock(nn.Module):
  """Residual Inception block: x + scale * up(concat(branches)), then ReLU.

  Attributes:
    block_type: 'block35', 'block17' or 'block8'.
    scale: factor on the residual branch (Keras: 0.17, 0.1, 0.2; 1.0 for the
      final block8).
    activation: whether to apply ReLU after the sum (False only for the final
      block8).
  """

  block_type: str
  scale: float
  activation: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    branches = {}
    for name, features, kernel in _BLOCK_BRANCHES[self.block_type]:
      # 'branch1_1' continues from 'branch1_0'; 'branch0' and 'branchN_0'
      # start from the block input.
      branch_id = name.split('_')[0]
      source = branches.get(branch_id, x)
      branches[branch_id] = ConvBN(
          features, kernel, dtype=self.dtype, name=name
      )(source, train)

    mixed = jnp.concatenate(list(branches.values()), axis=-1)
    up = nn.Conv(
        x.shape[-1], (1, 1), use_bias=True, dtype=self.dtype, name='up'
    )(mixed)
    x = x + self.scale * up
    if self.activation:
      x = nn.relu(x)
    return x


class InceptionResNetV2(nn.Module):
  """InceptionResNetV2 without its top, as in keras.applications.

  Takes float NHWC images already preprocessed (see `flax_pet.preprocessing`),
  of at least 75x75 pixels, and returns the last feature map: 5x5x1536 for
  224x224 input, 8x8x1536 for 299x299.

  Attributes:
    dtype: computation dtype. Parameters stay float32; bfloat16 is for
      GPU/TPU and loses about two decimal digits of the feature values.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_input_shape(x)
    x = x.astype(self.dtype)
    conv = lambda f, k, name, **kw: ConvBN(f, k, dtype=self.dtype, name=name, **kw)

    # Stem: 299 -> 35 (224 -> 25).
    x = conv(32, (3, 3), 'conv2d_1a', strides=2, padding='VALID')(x, train)
    x = conv(32, (3, 3), 'conv2d_2a', padding='VALID')(x, train)
    x = conv(64, (3, 3), 'conv2d_2b')(x, train)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), 'conv2d_3b', padding='VALID')(x, train)
    x = conv(192, (3, 3), 'conv2d_4a', padding='VALID')(x, train)
    x = _max_pool_3x3_s2(x)

    x = Mixed5b(dtype=self.dtype, name='mixed_5b')(x, train)
    for i in range(1, 11):
      x = InceptionResNetBlock(
          'block35', 0.17, dtype=self.dtype, name=f'block35_{i}'
      )(x, train)

    x = Mixed6a(dtype=self.dtype, name='mixed_6a')(x, train)
    for i in range(1, 21):
      x = InceptionResNetBlock(
          'block17', 0.1, dtype=self.dtype, name=f'block17_{i}'
      )(x, train)

    x = Mixed7a(dtype=self.dtype, name='mixed_7a')(x, train)
    for i in range(1, 10):
      x = InceptionResNetBlock(
          'block8', 0.2, dtype=self.dtype, name=f'block8_{i}'
      )(x, train)
    x = InceptionResNetBlock(
        'block8', 1.0, activation=False, dtype=self.dtype, name='block8_10'
    )(x, train)

    return conv(FEATURE_CHANNELS, (1, 1), 'conv_7b')(x, train)


def check_input_shape(x):
  """Raise ValueError unless x is NHWC with 3 channels and at least 75x75 px."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(
        f'Expected NHWC images with 3 channels, got shape {x.shape}. '
        'Repeat grayscale images to 3 channels before the backbone.'
    )
  height, width = x.shape[1:3]
  if min(height, width) < MIN_INPUT_SIZE:
    raise ValueError(
        f'Input of {height}x{width} pixels is too small for '
        f'InceptionResNetV2; it needs at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}.'
    )


class ClassifierHead(nn.Module):
  """The reference recipe's head on the backbone's feature map.

  GlobalAveragePooling -> Dense(hidden, ReLU) -> Dropout -> Dense(classes).
  Returns logits; apply `jax.nn.softmax` for probabilities. The L2 penalty of
  the recipe on the hidden kernel is part of the loss, not of this module.
  """

  num_classes: int
  hidden_units: int = 1024
  dropout_rate: float = 0.7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    if features.ndim == 4:
      features = jnp.mean(features, axis=(1, 2))
    # Keras' Dense default initializer, so a fresh head starts as the
    # reference notebook's does (Flax's own default is LeCun normal).
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.glorot_uniform()
    )
    x = dense(self.hidden_units, name='hidden')(features)
    x = nn.relu(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(self.num_classes, name='logits')(x)
    return x.astype(jnp.float32)


def unwrap_head_params(head_params: dict) -> dict:
  """Return ClassifierHead parameters, unwrapping a {'params': ...} dict."""
  if 'params' in head_params and 'hidden' not in head_params:
    return head_params['params']
  return head_params


def head_shape(head_params: dict) -> tuple[int, int]:
  """Return (num_classes, hidden_units) from ClassifierHead parameter shapes.

  Raises:
    ValueError: if the parameters are not those of a ClassifierHead.
  """
  try:
    hidden_units = head_params['hidden']['kernel'].shape[1]
    num_classes = head_params['logits']['kernel'].shape[1]
  except (KeyError, TypeError, AttributeError, IndexError) as error:
    raise ValueError(
        'head_params must be ClassifierHead parameters with '
        "['hidden']['kernel'] and ['logits']['kernel'], got keys "
        f'{list(head_params)}.'
    ) from error
  return num_classes, hidden_units


class Classifier(nn.Module):
  """Backbone and head in one module: images in, logits out."""

  num_classes: int
  hidden_units: int = 1024
  dropout_rate: float = 0.7
  dtype: Dtype = jnp.float32

  def setup(self):
    self.backbone = InceptionResNetV2(dtype=self.dtype)
    self.head = ClassifierHead(
        self.num_classes, self.hidden_units, self.dropout_rate, dtype=self.dtype
    )

  def __call__(self, images, train: bool = False):
    return self.head(self.backbone(images, train), train)

  def features(self, images, train: bool = False):
    return self.backbone(images, train)


def random_backbone_variables(seed: int) -> dict:
  """Return seeded random backbone variables without compiling `init`.

  Kernels are LeCun normal, like Flax's default initializer but without its
  truncation; biases and BatchNorm means are 0 and variances 1. Compiling
  `InceptionResNetV2.init` takes about a minute on a 2-core CPU; this takes
  about a second.

  Returns:
    {'params', 'batch_stats'} for `InceptionResNetV2` (any input size).
  """
  shapes = jax.eval_shape(
      InceptionResNetV2().init, jax.random.key(0),
      jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3)),
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)
    if name == 'var':
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)
