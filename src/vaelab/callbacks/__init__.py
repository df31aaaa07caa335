"""Lightning callbacks: what users look at in TensorBoard while a model trains."""

from vaelab.callbacks.clock import EpochClock
from vaelab.callbacks.codebook import CodebookStats
from vaelab.callbacks.layers import LayerStats
from vaelab.callbacks.pictures import (
    EmbeddingProjector,
    Interpolations,
    LatentManifold,
    LatentScatter,
    PriorSamples,
    Reconstructions,
    Traversals,
)

__all__ = ["Reconstructions", "PriorSamples", "LatentManifold", "LatentScatter",
           "Interpolations", "EmbeddingProjector", "Traversals",
           "EpochClock", "LayerStats", "CodebookStats"]
