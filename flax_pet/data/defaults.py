"""Default settings of the class-folder dataset, in one place.

The defaults reproduce the reference Keras notebook: 224 px images, a
0.9/0.05/0.05 train/val/test split with seed 101, and its four augmentation
layers. Training configs override them through the keyword arguments of
`load_class_folder` and `augment`.
"""

# Model input size in pixels, as (height, width) or one int for a square.
IMAGE_SIZE = 224

# 'stretch' resizes to the model size without keeping the aspect ratio, as the
# reference notebook did; 'pad' keeps it and pads with the background value.
RESIZE = 'stretch'
RESIZE_MODES = ('stretch', 'pad')

# False reproduces the notebook's tf.image.resize(method='bilinear'), which
# reads only the two nearest source rows and columns per output pixel. True
# filters over every source pixel when shrinking, which keeps small lesions in
# tall whole-body MIPs but no longer matches the notebook's pixels.
ANTIALIAS = False

# Fractions of each class that go to train/val/test, and the split seed.
SPLIT_RATIOS = (0.9, 0.05, 0.05)
SPLIT_SEED = 101

# Folder names that mark a pre-split dataset, as `splitfolders` writes them,
# in the order the fractions in SPLIT_RATIOS refer to.
SPLIT_NAMES = ('train', 'val', 'test')

# File name extensions (lower case) that are decoded. Other files in a class
# folder are listed in the manifest as skipped.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')

# Augmentation factors, in the units of the Keras layers they reproduce:
# rotation as a fraction of a full turn, zoom and translation as fractions of
# the image size, contrast as the deviation of the contrast factor from 1.
AUGMENT_ROTATION = 0.2
AUGMENT_ZOOM = 0.2
AUGMENT_CONTRAST = 0.2
AUGMENT_TRANSLATION = 0.1
