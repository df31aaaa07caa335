"""Fully connected VAE (pytorch/examples' 784-400-20, the seeds' 784-512-256, IWAE's 2x200 tanh)."""

import math
from collections.abc import Sequence

from torch import nn

from vaelab.likelihoods import Likelihood
from vaelab.models.vae import VAE, Conditioned, activation_class, conditional_classes, mlp


class MLPVAE(VAE):
    """`conditional`: a CVAE, the one-hot label joins the flattened image and the latent."""

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        likelihood: Likelihood,
        hidden_dims: Sequence[int] = (512, 256),
        activation: str = "relu",
        conditional: bool = False,
        num_classes: int | None = None,
        prior=None,
    ):
        act = activation_class(activation)
        classes = conditional_classes(conditional, num_classes)
        n_in, hidden, c = math.prod(data_shape), list(hidden_dims), classes or 0
        encoder = Conditioned(nn.Flatten(), mlp([n_in + c, *hidden, 2 * latent_dim], act))
        n_out = math.prod(likelihood.param_shape(data_shape))
        decoder = mlp([latent_dim + c, *reversed(hidden), n_out], act)
        super().__init__(encoder, decoder, likelihood, latent_dim, data_shape, prior, classes)

