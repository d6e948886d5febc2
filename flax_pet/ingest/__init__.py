"""PET volumes (DICOM, NIfTI) to 2D 16-bit PNG views in body-weight SUV.

Typical use:

    from flax_pet.ingest import IngestOptions, ingest
    ingest('dicom_folder', 'dataset', IngestOptions(views=['coronal_mip']))

or `python -m flax_pet.ingest SRC DST --views coronal_mip sagittal_mip`.
Each PNG has a JSON sidecar with the window that maps pixels back to values
(`decode_image` applies it).
"""

from flax_pet.ingest.dicom import read_dicom_series
from flax_pet.ingest.errors import IngestError
from flax_pet.ingest.nifti import read_nifti
from flax_pet.ingest.pipeline import IngestOptions, IngestSummary, ingest
from flax_pet.ingest.render import (
    RenderedView,
    ViewSpec,
    parse_view,
    render_view,
    uint16_to_values,
    window_to_uint16,
)
from flax_pet.ingest.sources import SourceInventory, scan_source
from flax_pet.ingest.suv import (
    SuvFactors,
    SuvHeader,
    compute_suv_bw_factors,
    suv_header_from_dataset,
    suv_header_from_mapping,
)
from flax_pet.ingest.volume import PetVolume
from flax_pet.ingest.writer import INGEST_VERSION, decode_image, read_png16

__all__ = [
    'INGEST_VERSION',
    'IngestError',
    'IngestOptions',
    'IngestSummary',
    'PetVolume',
    'RenderedView',
    'SourceInventory',
    'SuvFactors',
    'SuvHeader',
    'ViewSpec',
    'compute_suv_bw_factors',
    'decode_image',
    'ingest',
    'parse_view',
    'read_dicom_series',
    'read_nifti',
    'read_png16',
    'render_view',
    'scan_source',
    'suv_header_from_dataset',
    'suv_header_from_mapping',
    'uint16_to_values',
    'window_to_uint16',
]
