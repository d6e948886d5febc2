"""Train a PET image classifier: `python train.py --config CONFIG --workdir DIR`.

Config values can be overridden on the command line, e.g.
`--config.data_dir=PATH --config.weights=WEIGHTS --config.num_epochs=20`.
Running the same command again resumes from the workdir's latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import flax_pet
from flax_pet import experiment

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and logs.')
config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  flax_pet.setup_logging()
  experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
