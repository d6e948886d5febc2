"""Shared test fixtures: the real PET data folder and Keras oracle models."""

import os

# Keras is the numerical oracle; it must use TensorFlow, and TF must not grab
# all threads' attention with its start-up logs.
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data'


@pytest.fixture(scope='session')
def data_dir() -> Path:
  """The real PET data folder beside the repository, or skip."""
  if not DATA_DIR.is_dir():
    pytest.skip(f'real PET data not found at {DATA_DIR}')
  return DATA_DIR
