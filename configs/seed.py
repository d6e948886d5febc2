"""The reference Keras notebook's recipe, reproduced as closely as possible.

Frozen InceptionResNetV2 with RadImageNet weights fed x / 255 pixels, a head
of Dense(1024, ReLU, L2 1e-3) -> Dropout(0.7) -> Dense(classes), focal loss
with alpha (0.5, 0.3, 0.2) and gamma 2 times balanced class weights, Adam with
the notebook's epoch table, batch 16, up to 50 epochs with early stopping on
the validation loss, and a per-image random 0.9/0.05/0.05 split (seed 101).

Usage:
  python train.py --config configs/seed.py --workdir runs/seed \
      --config.data_dir=PATH --config.weights=RadImageNet-IRV2_notop.h5
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data: a class-folder image dataset (one subfolder per class, or
  # train/ val/ test/ folders that each contain the class subfolders).
  config.data_dir = ''
  # > 0: generate this many synthetic images per class into WORKDIR/demo_data
  # and train on them instead of data_dir (configs/demo.py).
  config.demo_images_per_class = 0
  config.image_size = 224
  config.resize = 'stretch'  # 'stretch' (the notebook) or 'pad' (keep aspect ratio)
  # 'per_image_seed_compatible' reproduces the notebook's splitfolders split;
  # 'stratified' groups by patient when patient ids are given.
  config.split_mode = 'per_image_seed_compatible'
  config.split_ratios = (0.9, 0.05, 0.05)
  config.split_seed = 101
  # Regular expression whose first group is the patient id in a file name, or
  # a CSV file with columns 'file' and 'patient_id'; '' for none.
  config.patient_ids = ''
  config.strict_decoding = False  # True: an undecodable file stops the run

  # Backbone weights: a converted folder or a Keras .h5 file. '' trains on a
  # seeded random backbone, which gives meaningless results.
  config.weights = ''
  # Pixel mapping before the backbone; '' uses the one stored with the weights.
  config.input_convention = 'unit'

  # Head.
  config.hidden_units = 1024
  config.dropout_rate = 0.7
  config.l2 = 1e-3  # Keras L2 on the hidden kernel: l2 * sum(w ** 2)

  # Loss: focal loss (Lin et al. 2017) times balanced class weights. alpha
  # needs one entry per class, in the sorted class-folder order.
  config.focal_alpha = (0.5, 0.3, 0.2)
  config.focal_gamma = 2.0
  config.class_weights = 'balanced'  # 'balanced' or 'none'
  config.focal_clip_epsilon = 1e-7  # the notebook clips probabilities; 0 disables

  # Optimizer and schedule. lr_table rows are (first epoch, rate).
  config.optimizer = 'adam'
  config.lr_schedule = 'table'  # 'table', or 'plateau' (warmup + reduce-on-plateau)
  config.lr_table = ((0, 5e-5), (5, 1e-4), (15, 5e-5), (25, 1e-5))
  config.plateau = ml_collections.ConfigDict(dict(
      base_lr=1e-4, warmup_epochs=5, warmup_lr=5e-5, factor=0.5, patience=2,
      min_delta=1e-4, cooldown=0, min_lr=1e-5,
  ))
  config.batch_size = 16
  config.num_epochs = 50
  config.early_stopping_patience = 5  # on val loss, best weights restored

  # Augmentation of training images (Keras preprocessing-layer factors).
  config.augment = True
  config.rotation = 0.2  # fraction of a full turn
  config.zoom = 0.2
  config.contrast = 0.2
  config.translation = 0.1
  # The backbone is frozen, so features are computed once per image and per
  # augmented view; epoch e trains on view e % augmented_views.
  config.augmented_views = 4

  # 'cached_features' (fast, frozen backbone) or 'full_network' (backbone run
  # every step; needed to fine-tune). unfreeze_top_blocks > 0 fine-tunes that
  # many of the last block8 modules plus conv_7b, in 'full_network' mode only.
  config.mode = 'cached_features'
  config.unfreeze_top_blocks = 0
  config.backbone_lr_multiplier = 0.1  # learning-rate factor of unfrozen blocks

  config.compute_dtype = 'float32'  # 'bfloat16' for GPU/TPU backbone compute
  config.feature_batch_size = 16
  config.seed = 0
  config.log_every_epochs = 1
  return config
