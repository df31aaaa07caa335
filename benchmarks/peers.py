"""The peers of vaelab's whole-run benchmark (`throughput.py --whole-run`), each a whole command
that imports only what it needs, as its users would run it: the pytorch/examples VAE (MLP
784-400-20, Bernoulli, batch 128, Adam 1e-3) in pythae's own trainer, and in a plain in-memory
PyTorch loop. Prints one JSON line: training time (and epoch times) and the test -ELBO in nats.

    python benchmarks/peers.py pythae --data-dir ../shared/data --epochs 3
    python benchmarks/peers.py plain --data-dir ../shared/data --epochs 3
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mnist(data_dir: str, train: bool) -> torch.Tensor:
    """MNIST's IDX images as one float tensor [N, 1, 28, 28] in [0, 1]."""
    name = "train-images-idx3-ubyte" if train else "t10k-images-idx3-ubyte"
    raw = np.fromfile(Path(data_dir) / "MNIST" / "raw" / name, dtype=np.uint8, offset=16)
    return torch.from_numpy(raw.reshape(-1, 1, 28, 28).copy()).float().div_(255)


def split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """59,000 images to train on and 1,000 held out, as vaelab's MNIST config splits them."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[1000:]], images[order[:1000]]


def encoder() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 40))


def decoder() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 784))


def plain_loss(enc: nn.Module, dec: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pytorch/examples' loss summed over the batch: BCE of the decoded logits + analytic KL."""
    mu, logvar = enc(x).chunk(2, dim=-1)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    bce = F.binary_cross_entropy_with_logits(dec(z).view_as(x), x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def plain(data_dir: str, epochs: int) -> dict:
    """The floor: tensors in memory, a shuffled slice per batch, no framework."""
    torch.manual_seed(0)
    enc, dec = encoder(), decoder()
    train, _ = split(mnist(data_dir, True))
    optimizer = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    epoch_s = []
    for _ in range(epochs):
        start = time.perf_counter()
        for rows in torch.randperm(len(train)).split(128):
            optimizer.zero_grad()
            (plain_loss(enc, dec, train[rows]) / len(rows)).backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - start)
    with torch.no_grad():
        test = mnist(data_dir, False)
        nelbo = sum(plain_loss(enc, dec, x).item() for x in test.split(1000)) / len(test)
    return {"epoch_s": epoch_s, "train_s": sum(epoch_s), "test_nelbo": nelbo}


def pythae(data_dir: str, epochs: int) -> dict:
    """pythae 0.1.2's VAE through its TrainingPipeline, with the same nets (its decoder ends in a
    sigmoid: pythae's BCE takes probabilities); its trainer evaluates the 1,000 held-out images
    every epoch and saves the final model, as it does by default."""
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = encoder()

        def forward(self, x):
            mu, logvar = self.net(x).chunk(2, dim=-1)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = decoder()

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).view(-1, 1, 28, 28))

    train, val = split(mnist(data_dir, True))
    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=20, reconstruction_loss="bce"),
                encoder=Encoder(), decoder=Decoder())
    with tempfile.TemporaryDirectory() as out:
        config = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=1e-3,
                                   per_device_train_batch_size=128,
                                   per_device_eval_batch_size=1000, no_cuda=True)
        started = time.perf_counter()  # pythae reports no epoch times: its training as a whole
        TrainingPipeline(training_config=config, model=model)(train_data=train.numpy(),
                                                              eval_data=val.numpy())
        train_s = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        test = mnist(data_dir, False)
        nelbo = sum(model({"data": x}).loss.item() * len(x) for x in test.split(1000)) / len(test)
    return {"train_s": train_s, "test_nelbo": nelbo}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=["pythae", "plain"])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps((pythae if args.peer == "pythae" else plain)(args.data_dir, args.epochs)))
