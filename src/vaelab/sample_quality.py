"""Sample quality: FID (Heusel et al., 2017) and KID (Bińkowski et al., 2018) of a model's prior
samples against a split's images, through torchmetrics (whose Inception-v3 is torch-fidelity's
port of the TensorFlow FID network, the one papers use). The weights are downloaded on first use
into torch's hub folder; offline, the error names the file and where to put it."""

from pathlib import Path

import torch

from vaelab.errors import MissingFile

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)


def inception_metrics(kid_subset: int, feature=2048):
    """torchmetrics' FID and KID on the same Inception features (`feature`: 2048, the papers'
    pool layer, or a module of one's own), with a clear message where the weights cannot be
    fetched."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    try:
        fid = FrechetInceptionDistance(feature=feature, normalize=True)
        kid = KernelInceptionDistance(feature=feature, subset_size=kid_subset, normalize=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        where = Path(torch.hub.get_dir()) / "checkpoints"
        raise MissingFile(
            f"FID and KID need the Inception-v3 weights {INCEPTION_FILE}, which could not be "
            f"downloaded ({type(err).__name__}: {err}). Download {INCEPTION_URL} on a machine "
            f"with internet and put it in {where}/ (torch.hub's folder; TORCH_HOME moves it), "
            f"then run again.") from err
    return fid, kid


def rgb(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] with 3 channels (greyscale repeated), as the Inception net takes them."""
    x = x.float().clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def fid_kid(vae, batches, n: int, seed: int = 0, feature=2048,
            metrics=None) -> dict[str, float]:
    """FID and KID between the first `n` images of `batches` and `n` prior samples (the mean of
    p(x|z) at z ~ p(z); a conditional model draws each sample for the label of the real image
    in its place, so the classes balance). `metrics`: the (FID, KID) pair of
    `inception_metrics`, where it was built already (the weights are loaded once)."""
    subset = min(1000, n)
    fid, kid = metrics or inception_metrics(subset, feature)
    kid.subset_size = subset
    fid, kid = fid.to(vae.device), kid.to(vae.device)
    generator, seen = torch.Generator().manual_seed(seed), 0
    for x, y, *_ in batches:
        x, y = x[: n - seen].to(vae.device), y[: n - seen].to(vae.device)
        context = y if vae.conditional else None
        z = vae.sample_latents(len(x), context, generator=generator)
        real, fake = rgb(x), rgb(vae.decode(z, context).mean)
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        seen += len(x)
        if seen >= n:
            break
    if seen < 2:
        raise ValueError("FID needs at least 2 images of the split")
    kid_mean, kid_std = kid.compute()
    return {"eval/fid": fid.compute().item(), "eval/kid": kid_mean.item(),
            "eval/kid_std": kid_std.item(), "eval/fid_images": seen,
            "eval/fid_setup": (f"torchmetrics FID/KID, Inception-v3 pool3 ({INCEPTION_FILE}), "
                               f"{seen} samples against {seen} images of the split, images "
                               f"resized to 299 x 299, KID subsets of {min(1000, seen)}")
            if feature == 2048 else f"torchmetrics FID/KID, custom features, {seen} images"}
