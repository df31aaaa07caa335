"""Disentanglement scores: how well each latent captures one ground-truth factor.

The definitions follow disentanglement_lib (Locatello et al., 2019), with the representation
being the posterior mean. `data` is anything with `factor_sizes`, `sample_factors(n, generator)`
and `draw(classes)` (the dSprites DataModule); `encode` maps images to codes [N, D].

Where vaelab departs from disentanglement_lib, on purpose:
- Sample counts are smaller by default, so that a 2-core CPU scores a model in about two minutes:
  BetaVAE and FactorVAE scores use 1000 training and 500 evaluation votes (disentanglement_lib:
  10000 and 5000), DCI fits its gradient-boosted trees on 2000 points and tests on 1000 (10000
  and 5000). MIG and SAP use disentanglement_lib's 10000 points.
- SAP uses the R^2 of each code for each factor (see `sap`), not a linear SVM's accuracy.
- The FactorVAE score drops codes whose standard deviation over the data is below 0.05 (units
  collapsed to the prior, whose posterior means barely move); disentanglement_lib's default
  threshold is 0 (its `prune_dims.threshold`, which some of its configs set to 0.05).
The accuracy-based scores (BetaVAE, FactorVAE, DCI informativeness) are accuracies: pure noise
gets the chance level 1/number of factors, not 0.

sklearn is imported where a score needs it: it added 0.3 s to the start of every run.
"""

import math
from collections.abc import Callable

import numpy as np
import torch

Encode = Callable[[torch.Tensor], torch.Tensor]
NAMES = ("beta_vae", "factor_vae", "mig", "sap", "dci_disentanglement", "dci_completeness",
         "dci_informativeness")


def codes_of(encode: Encode, data, classes: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Codes [N, D] of the images of factor classes [N, F], `batch` images at a time."""
    with torch.no_grad():
        return torch.cat([encode(data.draw(part)).float().cpu()
                          for part in classes.split(batch)]).numpy()


def sample(encode: Encode, data, n: int, generator: torch.Generator):
    classes = data.sample_factors(n, generator)
    return codes_of(encode, data, classes), classes.numpy()


def beta_vae_score(encode: Encode, data, generator: torch.Generator, batch_size: int = 64,
                   num_train: int = 1000, num_eval: int = 500) -> float:
    """Higgins et al. (2017): fix one factor in `batch_size` pairs of images, average the pairs'
    absolute code differences; a linear classifier must tell which factor was fixed. Score:
    its accuracy on held-out votes."""
    def votes(n):
        features, labels = [], []
        for _ in range(n):
            k = int(torch.randint(len(data.factor_sizes), (1,), generator=generator))
            first = data.sample_factors(batch_size, generator)
            second = data.sample_factors(batch_size, generator)
            second[:, k] = first[:, k]
            difference = codes_of(encode, data, first) - codes_of(encode, data, second)
            features.append(np.abs(difference).mean(0))
            labels.append(k)
        return np.stack(features), np.array(labels)

    x_train, y_train = votes(num_train)
    x_eval, y_eval = votes(num_eval)
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return float(classifier.score(x_eval, y_eval))


def factor_vae_score(encode: Encode, data, generator: torch.Generator, batch_size: int = 64,
                     num_train: int = 1000, num_eval: int = 500,
                     num_variance_estimate: int = 10_000) -> float:
    """Kim & Mnih (2018): fix one factor in a batch, normalise each code's variance by its
    variance over the data, and vote (code with the least variance -> fixed factor); a
    majority-vote classifier from codes to factors. Score: its accuracy on held-out votes."""
    codes, _ = sample(encode, data, num_variance_estimate, generator)
    scale = codes.std(0)
    active = scale >= 0.05
    if not active.any():
        return 0.0
    factors = len(data.factor_sizes)

    def votes(n):
        table = np.zeros((int(active.sum()), factors), dtype=np.int64)
        for _ in range(n):
            k = int(torch.randint(factors, (1,), generator=generator))
            classes = data.sample_factors(batch_size, generator)
            classes[:, k] = classes[0, k]
            local = codes_of(encode, data, classes)[:, active] / scale[active]
            table[np.argmin(local.var(0)), k] += 1
        return table

    train, evaluation = votes(num_train), votes(num_eval)
    majority = train.argmax(1)
    return float(evaluation[np.arange(len(majority)), majority].sum() / evaluation.sum())


def discretize(codes: np.ndarray, bins: int = 20) -> np.ndarray:
    """Each code into `bins` equal-width bins over its range (disentanglement_lib's histogram
    discretization)."""
    out = np.zeros_like(codes, dtype=np.int64)
    for i in range(codes.shape[1]):
        edges = np.histogram(codes[:, i], bins)[1][:-1]
        out[:, i] = np.digitize(codes[:, i], edges)
    return out


def mutual_information(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """I(code_i; factor_j) in nats [D, F], codes discretized."""
    from sklearn.metrics import mutual_info_score

    binned = discretize(codes)
    return np.array([[mutual_info_score(factors[:, j], binned[:, i])
                      for j in range(factors.shape[1])] for i in range(codes.shape[1])])


def mig(codes: np.ndarray, factors: np.ndarray) -> float:
    """Chen et al. (2018): for each factor, the gap between the two codes most informative
    about it, over the factor's entropy; averaged over factors."""
    from sklearn.metrics import mutual_info_score

    information = np.sort(mutual_information(codes, factors), axis=0)[::-1]
    entropy = np.array([mutual_info_score(f, f) for f in factors.T])
    second = information[1] if len(information) > 1 else 0.0
    return float(np.mean((information[0] - second) / entropy))


def sap(codes: np.ndarray, factors: np.ndarray) -> float:
    """Kumar et al. (2018), for ordinal factors: the R^2 of a linear fit of each factor on each
    code alone (its squared correlation); per factor, the gap between the two best codes;
    averaged. (disentanglement_lib's `continuous_factors=True`; its default, a linear SVM per
    code, cannot separate the middle classes of a 32-valued factor from one number and scores the
    true factors far below 1.)"""
    c = (codes - codes.mean(0)) / np.maximum(codes.std(0), 1e-12)
    f = (factors - factors.mean(0)) / np.maximum(factors.std(0), 1e-12)
    r2 = (c.T @ f / len(c)) ** 2  # [D, F]
    ranked = np.sort(r2, axis=0)[::-1]
    second = ranked[1] if len(ranked) > 1 else 0.0
    return float(np.mean(ranked[0] - second))


def dci(codes: np.ndarray, factors: np.ndarray, test_codes: np.ndarray,
        test_factors: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Eastwood & Williams (2018) with gradient-boosted trees: R[i, j] = importance of code i for
    predicting factor j. Disentanglement: 1 - entropy (base F) of each code's importances over
    factors, weighted by the code's share of all importance; completeness: the same per factor
    over codes (base D); informativeness: the trees' mean test accuracy."""
    from sklearn.ensemble import GradientBoostingClassifier

    importance = np.zeros((codes.shape[1], factors.shape[1]))
    accuracy = []
    for j in range(factors.shape[1]):
        trees = GradientBoostingClassifier(random_state=seed).fit(codes, factors[:, j])
        importance[:, j] = np.abs(trees.feature_importances_)
        accuracy.append(trees.score(test_codes, test_factors[:, j]))

    def weighted_purity(matrix: np.ndarray) -> float:
        """sum_i rho_i (1 - H_base(P_i)), rows i of `matrix`, entropy base = its columns."""
        if matrix.shape[1] < 2 or matrix.sum() == 0:
            return 0.0
        p = matrix / np.maximum(matrix.sum(1, keepdims=True), 1e-11)
        entropy = -(p * np.log(np.maximum(p, 1e-11))).sum(1) / math.log(matrix.shape[1])
        return float(((1 - entropy) * matrix.sum(1) / matrix.sum()).sum())

    return {"dci_disentanglement": weighted_purity(importance),
            "dci_completeness": weighted_purity(importance.T),
            "dci_informativeness": float(np.mean(accuracy))}


def evaluate(encode: Encode, data, seed: int = 0, quick: bool = False) -> dict[str, float]:
    """Every score of the representation `encode` on `data`, from seeded samples. `quick`: a
    tenth of the samples (tests, smoke runs; noisier)."""
    generator = torch.Generator().manual_seed(seed)
    n = 10 if quick else 1
    codes, factors = sample(encode, data, 10_000 // n, generator)
    test_codes, test_factors = sample(encode, data, 5_000 // n, generator)
    results = {
        "beta_vae": beta_vae_score(encode, data, generator, num_train=1000 // n,
                                   num_eval=500 // n),
        "factor_vae": factor_vae_score(encode, data, generator, num_train=1000 // n,
                                       num_eval=500 // n, num_variance_estimate=10_000 // n),
        "mig": mig(codes, factors),
        "sap": sap(codes, factors),
    }
    results.update(dci(codes[:2000 // n], factors[:2000 // n], test_codes[:1000 // n],
                       test_factors[:1000 // n], seed))
    return results


def of_model(vae, data, seed: int = 0, quick: bool = False) -> dict[str, float]:
    """`disentanglement/<score>` of a VAE's posterior means on ground-truth `data`."""
    was_training = vae.training
    vae.eval()
    try:
        results = evaluate(lambda x: vae.encode(x.to(vae.device)).mean, data, seed, quick)
    finally:
        vae.train(was_training)
    return {f"disentanglement/{name}": value for name, value in results.items()}


def has_factors(data) -> bool:
    """Whether `data` knows its ground-truth factors (and can draw images of any of them)."""
    return all(hasattr(data, name) for name in ("factor_sizes", "sample_factors", "draw"))
