"""A faster inference form of the InceptionResNetV2 backbone, for frozen use.

`fold_backbone` rewrites the variables of `models.InceptionResNetV2` once, and
`apply_folded` computes the same feature map from them with fewer operations:

- BatchNorm (inference mode) is folded into the convolution before it: the
  kernel is multiplied by 1/sqrt(var + eps) per output channel, and the
  BatchNorm becomes a bias beta - mean/sqrt(var + eps). The folding runs in
  float64.
- The residual scale (0.17, 0.1, 0.2) is multiplied into the kernel and the
  bias of each block's 'up' convolution.
- 1x1 convolutions run as matrix products over the channel axis.

`jit_apply_folded` compiles `apply_folded` with `CPU_COMPILER_OPTIONS`, which
let XLA:CPU fuse the bias addition, the ReLU and the residual sum into its
YNNPACK convolution kernels instead of running them as separate loops, and
`run_concurrently` splits each batch over parallel executions.
`optimize_backbone` combines the three. `docs/benchmarks.md` lists what each
step gained, measured with `benchmarks/backbone_throughput.py`.

The outputs match `models.InceptionResNetV2` to float32 rounding (about 2e-6
of the largest output), because only the order of float operations changes.
The folded form has no training mode: use the Flax module to fine-tune.
"""

import concurrent.futures
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_pet import models

# XLA:CPU options for `jit_apply_folded`. With jaxlib 0.10.2, XLA:CPU sends
# convolutions and dots to YNNPACK by default but runs the elementwise ops
# after them as separate loops. Adding ELTWISE to the fusion list fuses them
# into the YNNPACK calls. The option is an experimental XLA DebugOptions
# field, so another jaxlib version may rename or drop it.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': ','.join([
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
        'LIBRARY_FUSION_TYPE_ELTWISE',
    ]),
}

# Parallel executions per batch in `optimize_backbone`. One execution kept 1.7
# of 2 CPU cores busy. Two executions kept both busy and gave 14% to 20% more
# images/s at batch 16, and four gave no more.
# NOTE: measured on a 2-core CPU only; CPUs with more cores may gain from more
# streams.
DEFAULT_STREAMS = 2

# Residual scales of keras.applications.InceptionResNetV2. The last block8
# ('block8_10') has scale 1.0.
_RESIDUAL_SCALES = {'block35': 0.17, 'block17': 0.1, 'block8': 0.2}

_STEM = ('conv2d_1a', 'conv2d_2a', 'conv2d_2b', 'conv2d_3b', 'conv2d_4a')

# Every block of the network from input to output.
_BLOCKS = (
    *_STEM, 'mixed_5b', *(f'block35_{i}' for i in range(1, 11)), 'mixed_6a',
    *(f'block17_{i}' for i in range(1, 21)), 'mixed_7a',
    *(f'block8_{i}' for i in range(1, 11)), 'conv_7b',
)


def _fold_conv_bn(params: Mapping, stats: Mapping, path: str) -> dict:
  """Fold one ConvBN's BatchNorm into its kernel and a bias (float64)."""
  try:
    kernel = np.asarray(params['conv']['kernel'], np.float64)
    beta = np.asarray(params['bn']['bias'], np.float64)
    mean = np.asarray(stats['bn']['mean'], np.float64)
    variance = np.asarray(stats['bn']['var'], np.float64)
  except KeyError as error:
    raise ValueError(
        f'{path}: missing {error} in the backbone variables. Expected a '
        "ConvBN with params {'conv': {'kernel'}, 'bn': {'bias'}} and "
        "batch_stats {'bn': {'mean', 'var'}}, as models.InceptionResNetV2 has."
    ) from None

  features = kernel.shape[-1]
  if not beta.shape == mean.shape == variance.shape == (features,):
    raise ValueError(
        f'{path}: kernel {kernel.shape} has {features} output channels, but '
        f'the BatchNorm bias, mean and variance have shapes {beta.shape}, '
        f'{mean.shape} and {variance.shape}.'
    )

  inverse_std = 1.0 / np.sqrt(variance + models.BN_EPSILON)
  return {'kernel': kernel * inverse_std, 'bias': beta - mean * inverse_std}


def _fold_block(params: Mapping, stats: Mapping, block_name: str) -> dict:
  if block_name in _STEM or block_name == 'conv_7b':
    return _fold_conv_bn(params, stats, block_name)

  block = {}
  for name in params:
    if name == 'up':
      block_type = block_name.rsplit('_', 1)[0]
      scale = 1.0 if block_name == 'block8_10' else _RESIDUAL_SCALES[block_type]
      block['up'] = {
          'kernel': np.asarray(params['up']['kernel'], np.float64) * scale,
          'bias': np.asarray(params['up']['bias'], np.float64) * scale,
      }
    else:
      block[name] = _fold_conv_bn(
          params[name], stats.get(name, {}), f'{block_name}/{name}'
      )
  return block


def fold_backbone(variables: Mapping) -> dict:
  """Fold BatchNorm and the residual scales into the convolution weights.

  Args:
    variables: `{'params', 'batch_stats'}` of `models.InceptionResNetV2`, as
      `pretrained.load_pretrained` or `models.random_backbone_variables`
      return them.

  Returns:
    A pytree of float32 arrays for `apply_folded`, with the module's block
    and layer names: each convolution is `{'kernel': HWIO, 'bias': O}`. The
    input variables are not modified.

  Raises:
    ValueError: if `variables` lacks a block or a layer of the backbone, or a
      BatchNorm does not fit its convolution.
  """
  if 'params' not in variables or 'batch_stats' not in variables:
    raise ValueError(
        'Expected backbone variables with "params" and "batch_stats", got '
        f'keys {sorted(variables)}. Pass the inference variables of '
        'models.InceptionResNetV2.'
    )
  params, stats = variables['params'], variables['batch_stats']
  missing = [name for name in _BLOCKS if name not in params or name not in stats]
  if missing:
    raise ValueError(
        f'Backbone variables lack the blocks {missing}. Expected the variables '
        'of models.InceptionResNetV2.'
    )

  folded = {name: _fold_block(params[name], stats[name], name) for name in _BLOCKS}
  return jax.tree.map(lambda array: jnp.asarray(array, jnp.float32), folded)


def _conv(x, conv, strides: int = 1, padding: str = 'SAME', relu: bool = True):
  kernel = conv['kernel']
  if kernel.shape[:2] == (1, 1) and strides == 1:
    # With 1x1 convolutions as dots, the whole network ran 4% to 11% faster
    # through XLA:CPU's YNNPACK path.
    y = jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0])
  else:
    y = jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
  y = y + conv['bias']
  return nn.relu(y) if relu else y


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def _mixed_5b(x, block):
  branch0 = _conv(x, block['branch0'])

  branch1 = _conv(x, block['branch1_0'])
  branch1 = _conv(branch1, block['branch1_1'])

  branch2 = _conv(x, block['branch2_0'])
  branch2 = _conv(branch2, block['branch2_1'])
  branch2 = _conv(branch2, block['branch2_2'])

  # Keras' 'same' average pool divides by the real pixels under the window.
  pool = nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)
  pool = _conv(pool, block['branch_pool'])
  return jnp.concatenate([branch0, branch1, branch2, pool], axis=-1)


def _mixed_6a(x, block):
  branch0 = _conv(x, block['branch0'], strides=2, padding='VALID')

  branch1 = _conv(x, block['branch1_0'])
  branch1 = _conv(branch1, block['branch1_1'])
  branch1 = _conv(branch1, block['branch1_2'], strides=2, padding='VALID')
  return jnp.concatenate([branch0, branch1, _max_pool_3x3_s2(x)], axis=-1)


def _mixed_7a(x, block):
  branch0 = _conv(x, block['branch0_0'])
  branch0 = _conv(branch0, block['branch0_1'], strides=2, padding='VALID')

  branch1 = _conv(x, block['branch1_0'])
  branch1 = _conv(branch1, block['branch1_1'], strides=2, padding='VALID')

  branch2 = _conv(x, block['branch2_0'])
  branch2 = _conv(branch2, block['branch2_1'])
  branch2 = _conv(branch2, block['branch2_2'], strides=2, padding='VALID')
  return jnp.concatenate([branch0, branch1, branch2, _max_pool_3x3_s2(x)], axis=-1)


def _residual_block(x, block, relu: bool = True):
  branches = [_conv(x, block['branch0'])]
  branch1 = _conv(x, block['branch1_0'])
  branch1 = _conv(branch1, block['branch1_1'])
  if 'branch1_2' in block:  # block17 and block8
    branch1 = _conv(branch1, block['branch1_2'])
  branches.append(branch1)
  if 'branch2_0' in block:  # block35
    branch2 = _conv(x, block['branch2_0'])
    branch2 = _conv(branch2, block['branch2_1'])
    branches.append(_conv(branch2, block['branch2_2']))

  # The residual scale is already in the 'up' weights.
  mixed = jnp.concatenate(branches, axis=-1)
  x = x + _conv(mixed, block['up'], relu=False)
  return nn.relu(x) if relu else x


def apply_folded(folded: Mapping, images: jax.Array) -> jax.Array:
  """Compute the backbone's feature map from folded variables.

  Args:
    folded: the output of `fold_backbone`.
    images: float NHWC images of at least 75x75 pixels, preprocessed as for
      `models.InceptionResNetV2`.

  Returns:
    The last feature map, equal to `models.InceptionResNetV2().apply` up to
    float32 rounding: [N, 5, 5, 1536] for 224x224 input.

  Raises:
    ValueError: if `images` is not NHWC with 3 channels or is too small.
  """
  models.check_input_shape(images)
  x = images.astype(jnp.float32)

  x = _conv(x, folded['conv2d_1a'], strides=2, padding='VALID')
  x = _conv(x, folded['conv2d_2a'], padding='VALID')
  x = _conv(x, folded['conv2d_2b'])
  x = _max_pool_3x3_s2(x)
  x = _conv(x, folded['conv2d_3b'], padding='VALID')
  x = _conv(x, folded['conv2d_4a'], padding='VALID')
  x = _max_pool_3x3_s2(x)

  x = _mixed_5b(x, folded['mixed_5b'])
  for i in range(1, 11):
    x = _residual_block(x, folded[f'block35_{i}'])

  x = _mixed_6a(x, folded['mixed_6a'])
  for i in range(1, 21):
    x = _residual_block(x, folded[f'block17_{i}'])

  x = _mixed_7a(x, folded['mixed_7a'])
  for i in range(1, 10):
    x = _residual_block(x, folded[f'block8_{i}'])
  x = _residual_block(x, folded['block8_10'], relu=False)

  return _conv(x, folded['conv_7b'])


def jit_apply_folded(compiler_options: Mapping | None = None) -> Callable:
  """Return `apply_folded` jit-compiled with XLA options for the backend.

  Args:
    compiler_options: XLA options for `jax.jit`. Defaults to
      `CPU_COMPILER_OPTIONS` when the default backend is the CPU, and to none
      elsewhere, because those options name XLA:CPU fields only.

  Returns:
    A jitted `apply_fn(folded, images)` with the signature of `apply_folded`.
  """
  if compiler_options is None:
    compiler_options = CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else {}
  return jax.jit(apply_folded, compiler_options=dict(compiler_options) or None)


def run_concurrently(apply_fn: Callable, num_streams: int = DEFAULT_STREAMS) -> Callable:
  """Split each batch into chunks and run `apply_fn` on them in parallel threads.

  One XLA:CPU execution of the backbone leaves cores idle between its
  operations. Executions started from different Python threads run at the
  same time and fill those gaps. Executions dispatched one after another from
  a single thread ran one at a time in the measurements.

  Args:
    apply_fn: a jitted `apply_fn(folded, images)`, such as the result of
      `jit_apply_folded`.
    num_streams: the number of chunks and threads. A batch with fewer images
      runs as one chunk per image.

  Returns:
    `fn(folded, images)`, returning what `apply_fn` returns for the whole
    batch. Chunks of different sizes compile separately, so a batch size
    that `num_streams` does not divide costs two compilations.

  Raises:
    ValueError: if `num_streams` is less than 1.
  """
  if num_streams < 1:
    raise ValueError(f'num_streams must be at least 1, got {num_streams}.')
  executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=num_streams, thread_name_prefix='backbone-stream'
  )

  def run_chunk(folded, chunk):
    return apply_fn(folded, chunk).block_until_ready()

  def apply_in_streams(folded, images):
    streams = min(num_streams, images.shape[0])
    if streams <= 1:
      return apply_fn(folded, images)
    # np.array_split's chunk sizes: the first chunks get one image more.
    chunks = np.array_split(np.arange(images.shape[0]), streams)
    futures = [
        executor.submit(run_chunk, folded, images[chunk[0]:chunk[-1] + 1])
        for chunk in chunks
    ]
    return jnp.concatenate([future.result() for future in futures], axis=0)

  return apply_in_streams


def optimize_backbone(
    variables: Mapping,
    num_streams: int = DEFAULT_STREAMS,
    compiler_options: Mapping | None = None,
) -> tuple[Callable, dict]:
  """Fold backbone variables and return a fast inference function for them.

  The result has the contract of `pretrained.load_backbone`'s result:

    apply_fn, folded = optimize_backbone(variables)
    features = apply_fn(folded, images)  # [N, 5, 5, 1536] at 224 px

  Args:
    variables: `{'params', 'batch_stats'}` of `models.InceptionResNetV2`.
    num_streams: parallel executions per batch (see `run_concurrently`). With
      1, each batch runs as one execution.
    compiler_options: XLA options (see `jit_apply_folded`).

  Returns:
    `(apply_fn, folded)`: `apply_fn(folded, images)` takes preprocessed float
    NHWC images and returns the last feature map.
  """
  apply_fn = jit_apply_folded(compiler_options)
  if num_streams > 1:
    apply_fn = run_concurrently(apply_fn, num_streams)
  return apply_fn, fold_backbone(variables)
