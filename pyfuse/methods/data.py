"""Deprecated: `pyfuse.methods.data_aware` (renamed so that `pyfuse.data`, the datasets, is the only "data"
module); this alias goes in the next release."""

import warnings

from .data_aware import DataMethod, SourceTensors, TaskDataMethod, as_source, expected_shape  # noqa: F401

warnings.warn("pyfuse.methods.data is now pyfuse.methods.data_aware", DeprecationWarning, stacklevel=2)
