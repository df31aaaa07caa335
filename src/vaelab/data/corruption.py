"""What the encoder of a denoising VAE sees (Im et al., 2017): the clean image with noise added,
while the likelihood still scores the clean image. `data.corruption` picks the noise and
`data.corruption_strength` its amount; training images get fresh noise each time they are
served, validation and test images one seeded draw each, so their numbers compare.
"""

import torch

from vaelab.errors import BadValue

KINDS = ("gaussian", "saltpepper", "mask")


class Corruption:
    """A noise process on batches of images with values in [0, 1], shaped N x C x H x W:
    `gaussian` adds strength x N(0, 1) and clips to [0, 1]; `saltpepper` sets a fraction
    `strength` of the values to 0 or 1 (half each); `mask` sets a fraction `strength` of the
    pixels to 0 in every channel (masking noise)."""

    def __init__(self, kind: str, strength: float):
        if kind not in KINDS:
            raise BadValue(f"data.corruption={kind!r} is unknown; choose one of "
                           f"{sorted(KINDS)} (or null for none)")
        if not strength > 0 or (kind != "gaussian" and strength >= 1):
            raise BadValue(f"data.corruption_strength={strength} is out of range: a noise "
                           f"std > 0 for gaussian, a fraction in (0, 1) for {kind}")
        self.kind, self.strength = kind, float(strength)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        def uniform(shape):
            return torch.rand(shape, generator=generator, device=x.device)

        if self.kind == "gaussian":
            noise = torch.empty_like(x).normal_(generator=generator)
            return (x + self.strength * noise).clamp_(0, 1)
        if self.kind == "saltpepper":
            hit, salt = uniform(x.shape) < self.strength, uniform(x.shape) < 0.5
            return torch.where(hit, salt.to(x.dtype), x)
        keep = uniform((x.shape[0], 1, *x.shape[2:])) >= self.strength
        return x * keep


def from_config(kind: str | None, strength: float) -> Corruption | None:
    """The data config's corruption, or None."""
    return None if kind in (None, "none") else Corruption(kind, strength)
