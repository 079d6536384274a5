"""Compressors: DeepIoT and the field's other methods behind one interface, and export.

Every method is a :class:`BaseCompressor` built from its frozen settings dataclass and found
by name in :data:`REGISTRY`; :func:`run_pipeline` chains them (checked by
:func:`check_pipeline`) and :func:`export_graph` writes the result, with the quantisers' weight
encodings, in the artifact format the device runtime reads.
"""

from __future__ import annotations

from deepfleet.compressors._binary import Binary, BinaryConfig, SignActivation
from deepfleet.compressors._calibrate import (
    RDeepSense,
    RDeepSenseConfig,
    Temperature,
    TemperatureConfig,
    TemperatureScale,
)
from deepfleet.compressors._codebook import (
    KMeans,
    KMeansConfig,
    ProductConfig,
    ProductQuantiser,
    ResidualConfig,
    ResidualQuantiser,
)
from deepfleet.compressors._compose import PipelineResult, run_pipeline
from deepfleet.compressors._deepiot import DeepIoTConfig
from deepfleet.compressors._encoding import Encoding
from deepfleet.compressors._export import Exported, export_graph
from deepfleet.compressors._fixedpoint import FixedPoint, FixedPointConfig, QuantAct
from deepfleet.compressors._lowrank import LowRank, LowRankConfig
from deepfleet.compressors._registry import (
    REGISTRY,
    check_pipeline,
    compressor_class,
    compressor_names,
    make_compressor,
    parse_methods,
)
from deepfleet.compressors._sparse import DNS, DNSConfig, Magnitude, MagnitudeConfig
from deepfleet.compressors._sparsesep import SparseSep, SparseSepConfig
from deepfleet.compressors._structured import L1, DeepIoT, L1Config
from deepfleet.compressors.base import STAGES, BaseCompressor, Compressed, Context, Options

__all__ = [
    "STAGES",
    "BaseCompressor",
    "Compressed",
    "Context",
    "Options",
    "Encoding",
    "REGISTRY",
    "compressor_class",
    "compressor_names",
    "make_compressor",
    "parse_methods",
    "check_pipeline",
    "run_pipeline",
    "PipelineResult",
    "export_graph",
    "Exported",
    "DeepIoT",
    "DeepIoTConfig",
    "L1",
    "L1Config",
    "LowRank",
    "LowRankConfig",
    "Magnitude",
    "MagnitudeConfig",
    "DNS",
    "DNSConfig",
    "FixedPoint",
    "FixedPointConfig",
    "QuantAct",
    "KMeans",
    "KMeansConfig",
    "ProductQuantiser",
    "ProductConfig",
    "ResidualQuantiser",
    "ResidualConfig",
    "Binary",
    "BinaryConfig",
    "SignActivation",
    "SparseSep",
    "SparseSepConfig",
    "Temperature",
    "TemperatureConfig",
    "TemperatureScale",
    "RDeepSense",
    "RDeepSenseConfig",
]
