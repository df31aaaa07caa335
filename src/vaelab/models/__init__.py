"""VAE families: `nn.Module`s only, no training logic."""

from vaelab.models.conv import ConvVAE
from vaelab.models.hierarchical import HierarchicalVAE
from vaelab.models.ladder import ConvLadderVAE, LadderVAE
from vaelab.models.mlp import MLPVAE
from vaelab.models.pixelcnn import PixelCNNPrior
from vaelab.models.priors import StandardNormal, VampPrior
from vaelab.models.vae import VAE
from vaelab.models.vq import VQVAE

__all__ = ["VAE", "MLPVAE", "ConvVAE", "HierarchicalVAE", "LadderVAE", "ConvLadderVAE", "VQVAE",
           "StandardNormal", "VampPrior", "PixelCNNPrior"]
