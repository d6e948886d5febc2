"""Two-class whole-body FDG-PET MIP folders (e.g. 'Cancer' / 'No cancer').

The reference recipe adapted to two classes. Focal alpha needs one entry per
class (sorted folder order). MIPs are two to three times taller than wide, so
they are padded to a square instead of stretched. Pixels are mapped with the
input convention stored with the weights.

Usage:
  python train.py --config configs/pet_mip.py --workdir runs/pet_mip \
      --config.data_dir=PATH/pet-mip --config.weights=WEIGHTS
"""

from configs import seed


def get_config():
  config = seed.get_config()
  config.focal_alpha = (0.5, 0.5)
  # Use the input convention stored with the weights ('radimagenet' for
  # converted RadImageNet weights) instead of the notebook's x / 255.
  config.input_convention = ''
  config.resize = 'pad'
  config.split_mode = 'stratified'
  config.augmented_views = 2
  return config
