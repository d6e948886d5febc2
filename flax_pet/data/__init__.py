"""Class-folder PET image datasets: decoding, TFDS storage, splits, manifest, augmentation."""

import tensorflow as tf

# TensorFlow only reads and decodes data here. Without this it would reserve
# GPU memory that JAX needs.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialized its devices elsewhere.
  pass

from flax_pet.data.augment import (
    adjust_contrast,
    augment,
    rotate,
    translate,
    zoom_images,
)
from flax_pet.data.builder import ClassFolderBuilder, ClassFolderConfig
from flax_pet.data.dataset import (
    SPLIT_MODES,
    PetDataset,
    PreparedClassFolder,
    Split,
    load_class_folder,
    prepare_class_folder,
)
from flax_pet.data.decode import (
    DecodedFiles,
    DecodeError,
    decode_files,
    decode_image,
    decode_image_bytes,
)
from flax_pet.data.folders import FolderScan, SourceFile, scan_class_folder
from flax_pet.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestRow,
    read_manifest,
    write_manifest,
)
from flax_pet.data.patients import resolve_patient_ids
from flax_pet.data.splits import (
    PatientLeakError,
    check_no_patient_leak,
    seed_compatible_split,
    stratified_group_split,
)

__all__ = [
    'MANIFEST_COLUMNS',
    'SPLIT_MODES',
    'ClassFolderBuilder',
    'ClassFolderConfig',
    'DecodeError',
    'DecodedFiles',
    'FolderScan',
    'ManifestRow',
    'PatientLeakError',
    'PetDataset',
    'PreparedClassFolder',
    'SourceFile',
    'Split',
    'adjust_contrast',
    'augment',
    'check_no_patient_leak',
    'decode_files',
    'decode_image',
    'decode_image_bytes',
    'load_class_folder',
    'prepare_class_folder',
    'read_manifest',
    'resolve_patient_ids',
    'rotate',
    'scan_class_folder',
    'seed_compatible_split',
    'stratified_group_split',
    'translate',
    'write_manifest',
    'zoom_images',
]
