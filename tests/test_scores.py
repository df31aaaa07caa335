"""Disentanglement scores on synthetic representations whose answers are known."""

import pytest
import torch

from vaelab import scores


class Toy:
    """Ground truth whose "images" are the factors themselves, each scaled to [0, 1]."""

    factor_sizes = (3, 5, 8, 10)

    def sample_factors(self, n, generator=None):
        return torch.stack([torch.randint(s, (n,), generator=generator)
                            for s in self.factor_sizes], dim=1)

    def draw(self, classes):
        return classes.float() / (torch.tensor(self.factor_sizes) - 1)


PERMUTATION = [2, 0, 3, 1]


def identity(x):
    return x


def permuted_and_rescaled(x):
    return x[:, PERMUTATION] * torch.tensor([3.0, -0.5, 10.0, 2.0]) + 7


def noise(x):
    return torch.randn(len(x), 4)


def mixed(x):
    """Factors 0 and 1 summed into one latent: neither can be told from the other any more."""
    return torch.stack([x[:, 0] + x[:, 1], x[:, 2], x[:, 3], torch.randn(len(x))], dim=1)


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    return {f.__name__: scores.evaluate(f, Toy(), seed=0, quick=True)
            for f in (identity, permuted_and_rescaled, noise, mixed)}


@pytest.mark.parametrize("name", scores.NAMES)
def test_the_factors_themselves_score_about_one(results, name):
    assert results["identity"][name] > 0.95, results["identity"]


@pytest.mark.parametrize("name", scores.NAMES)
def test_a_permutation_and_rescaling_scores_the_same(results, name):
    assert results["permuted_and_rescaled"][name] == pytest.approx(results["identity"][name],
                                                                  abs=0.05)


@pytest.mark.parametrize("name, chance", [
    ("mig", 0.0), ("sap", 0.0), ("dci_disentanglement", 0.0), ("dci_completeness", 0.0),
    ("beta_vae", 1 / 4), ("factor_vae", 1 / 4),  # accuracies: chance is 1 / number of factors
])
def test_pure_noise_scores_about_chance(results, name, chance):
    assert results["noise"][name] == pytest.approx(chance, abs=0.15), results["noise"]


@pytest.mark.parametrize("name", scores.NAMES)
def test_one_latent_mixing_two_factors_scores_lower(results, name):
    assert results["mixed"][name] < results["identity"][name] - 0.1, results["mixed"]


def test_mig_by_hand():
    """Two codes: code 0 is factor 0, code 1 half of it (a coarser copy); factor 1 is noise
    to both. MIG of factor 0 = (H - I(code 1)) / H = 1 - log 2 / log 4 = 0.5; factor 1: 0."""
    f0 = torch.arange(4000) % 4
    f1 = torch.randint(2, (4000,), generator=torch.Generator().manual_seed(0))
    codes = torch.stack([f0.float(), (f0 // 2).float()], 1).numpy()
    factors = torch.stack([f0, f1], 1).numpy()
    assert scores.mig(codes, factors) == pytest.approx((0.5 + 0.0) / 2, abs=0.01)
