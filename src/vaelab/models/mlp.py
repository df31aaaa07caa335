"""Fully connected VAE (pytorch/examples' 784-400-20, the seeds' 784-512-256, IWAE's 2x200 tanh)."""

import math
from collections.abc import Sequence

from torch import nn

from vaelab.likelihoods import Likelihood
from vaelab.models.vae import VAE, activation_class, mlp


class MLPVAE(VAE):
    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        likelihood: Likelihood,
        hidden_dims: Sequence[int] = (512, 256),
        activation: str = "relu",
    ):
        act = activation_class(activation)
        n_in = math.prod(data_shape)
        hidden = list(hidden_dims)
        encoder = nn.Sequential(nn.Flatten(), mlp([n_in, *hidden, 2 * latent_dim], act))
        decoder = mlp([latent_dim, *reversed(hidden), n_in], act)
        super().__init__(encoder, decoder, likelihood, latent_dim, data_shape)
