"""FID, KID and k-NN precision/recall between two feature sets (float64, no SciPy).

FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr((S1 S2)^1/2) computed as the
sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so `eigh` is exact and stable).
KID (Bińkowski et al. 2018): the unbiased estimate of the squared MMD with the kernel (x.y / d + 1)^3, averaged
over random subsets. Unlike FID it has no bias that depends on the number of images, so small sets compare.
Precision and recall (Kynkäänniemi et al. 2019): a sample is on a set's manifold if it lies within the
distance of some member to that member's k-th nearest neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


@dataclass(frozen=True)
class Gaussian:
    """Mean, covariance and covariance square root of a feature set: FID against one fixed set (the
    reference) computes them once, however many sets (bootstrap resamples) it is compared with."""

    mean: torch.Tensor
    cov: torch.Tensor
    cov_root: torch.Tensor

    @staticmethod
    def of(feats: torch.Tensor) -> Gaussian:
        mean, cov = _mean_cov(feats)
        return Gaussian(mean, cov, _sqrt_psd(cov))

    def fid(self, feats: torch.Tensor) -> float:
        mu, cov = _mean_cov(feats)
        cross = torch.linalg.eigvalsh(self.cov_root @ cov @ self.cov_root).clamp_min(0).sqrt().sum()
        return float((self.mean - mu).square().sum() + self.cov.trace() + cov.trace() - 2 * cross)


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    return Gaussian.of(feats_a).fid(feats_b)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1).pow(3)


def _within_mean(k: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """The mean kernel between two different samples of one set (the diagonal left out).

    With `groups` (the class each sample was generated for): the mean of the per-class-pair means. A set made
    with the same number of images per class has fewer same-class pairs among its distinct pairs than
    independent draws from the class mixture would, (m/C - 1)/(m - 1) against 1/C; as same-class samples
    are closer, the plain mean reads low and KID negative. Weighting every class pair equally removes that.
    """
    off_diagonal = k - torch.diag(k.diagonal())
    m = k.shape[0]
    if groups is None:
        return off_diagonal.sum() / (m * (m - 1))
    one_hot = torch.nn.functional.one_hot(torch.unique(groups, return_inverse=True)[1]).to(k.dtype)
    per_class = one_hot.sum(dim=0)
    if per_class.min() < 2:  # a class with one sample has no same-class pair to average
        return off_diagonal.sum() / (m * (m - 1))
    pairs = per_class[:, None] * per_class[None, :] - torch.diag(per_class)
    return (one_hot.T @ off_diagonal @ one_hot / pairs).mean()


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, x_groups: torch.Tensor | None = None) -> float:
    """The unbiased squared MMD: within-set kernel means leave out each sample's kernel with itself; `x_groups`:
    x's classes, for a set generated class by class (_within_mean)."""
    within_x = _within_mean(_polynomial_kernel(x, x), x_groups)
    within_y = _within_mean(_polynomial_kernel(y, y), None)
    return float(within_x + within_y - 2 * _polynomial_kernel(x, y).mean())


def kid(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    groups_a: torch.Tensor | None = None,
) -> tuple[float, float]:
    """KID and its standard error: the mean and std / sqrt(subsets) of the unbiased MMD^2 over `subsets` random
    pairs of subsets of `subset_size` (or the smaller set's size). `groups_a`: the class each of a's samples
    was generated for, when a holds the same number per class. The subsets overlap, so the standard error
    is that of the subset average, not of drawing new images: the noise floor and the bootstrap measure that."""
    if subsets < 2:
        raise ValueError("KID's standard error needs at least 2 subsets")
    a, b = feats_a.double(), feats_b.double()
    size = min(subset_size, a.shape[0], b.shape[0])
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        pick_a, pick_b = (torch.randperm(n, generator=gen)[:size] for n in (a.shape[0], b.shape[0]))
        values.append(mmd2_unbiased(a[pick_a], b[pick_b], None if groups_a is None else groups_a[pick_a]))
    spread = torch.tensor(values)
    return float(spread.mean()), float(spread.std() / math.sqrt(subsets))


def _kth_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, members: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = []
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i : i + chunk], members)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Precision: share of fake samples on the real manifold; recall: share of real samples on the fake one."""
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _kth_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_radii(fake, k, chunk), chunk)
    return precision, recall
