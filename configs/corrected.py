"""The reference recipe with the corrections a careful researcher wants.

Same model, loss and optimizer as `configs/seed.py`, but:
- pixels mapped as RadImageNet's own training code did ('radimagenet':
  BGR, caffe means subtracted, / 255) instead of x / 255;
- a stratified split grouped by patient (set `patient_ids`), so no patient
  appears in two splits;
- the reduce-on-plateau schedule that the notebook defined but never used,
  applied after a 5-epoch warmup at 5e-5.
"""

from configs import seed


def get_config():
  config = seed.get_config()
  config.input_convention = 'radimagenet'
  config.split_mode = 'stratified'
  config.lr_schedule = 'plateau'
  return config
