"""A few-minute end-to-end run on generated images, for a first look.

NOTE: the images are synthetic (bright blobs on noise, two classes), written
into the workdir, and the backbone is random unless `weights` is set: the
metrics only show that the pipeline runs, not anything about PET.

Usage:
  python train.py --config configs/demo.py --workdir runs/demo
"""

from configs import seed


def get_config():
  config = seed.get_config()
  config.demo_images_per_class = 40
  config.image_size = 96
  config.focal_alpha = (0.5, 0.5)
  config.split_mode = 'stratified'
  config.split_ratios = (0.6, 0.2, 0.2)
  config.num_epochs = 8
  config.augmented_views = 2
  config.batch_size = 8
  # A faster rate than the recipe's so that the few demo epochs show learning.
  config.lr_table = ((0, 1e-3),)
  return config
