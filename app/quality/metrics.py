"""FID and k-NN precision/recall between two feature sets (float64, no SciPy).

FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr((S1 S2)^1/2) computed as the
sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so `eigh` is exact and stable).
Precision and recall (Kynkäänniemi et al. 2019): a sample is on a set's manifold if it lies within the
distance of some member to that member's k-th nearest neighbour.
"""

from __future__ import annotations

import torch


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    mu_a, cov_a = _mean_cov(feats_a)
    mu_b, cov_b = _mean_cov(feats_b)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


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
