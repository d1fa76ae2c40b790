"""Knockoff inputs for SCOP: second-order Gaussian model-X knockoffs, and batch permutation.

``GaussianKnockoffs.fit(loader, group=...)`` estimates the mean, the per-feature scale and the
correlation matrix Sigma of the flattened inputs; calling the result on a batch ``x`` samples, on
standardised features Z,

    Z~ | Z ~ N(Z - Z Sigma^-1 S,  2S - S Sigma^-1 S),     S = gamma * blockdiag(Sigma_gg),
    gamma = min(1, 2 lambda_min(B^-1/2 Sigma B^-1/2)),    B = blockdiag(Sigma_gg)

the group equicorrelated construction (Dai & Barber 2016; Candes et al. 2018 for single features),
and maps back to the input's scale. For Gaussian X the pair is exactly exchangeable group by group:
cov([Z, Z~]) = [[Sigma, Sigma - S], [Sigma - S, Sigma]]. ``gamma`` is the knockoff scale (``.s``):
0 gives Z~ = Z, 1 the least correlated knockoff the groups allow. The groups (``group=``):

* ``"input"`` (default): the whole input is one group. Then S = Sigma, gamma = 1 and Z~ is an
  independent draw from N(mean, Sigma). This is what the reference code feeds SCOP: a generator's
  sample G(z) with z independent of x (its supplement swaps "multiple pixels as a whole").
* ``"feature"``: every feature is its own group, S = diag(s), s = min(1, 2 lambda_min(Sigma)).
  # NB: on smooth or upsampled images neighbouring pixels are nearly collinear, so s is tiny
  (0.045 on 16x16 digits) and the knockoffs are near copies of the input: the knockoff stage then
  sees almost no contrast.
* an int ``p``: spatial ``p x p`` patches (all channels) of ``[N, C, H, W]`` inputs, or runs of ``p``
  consecutive features otherwise (gamma again small when patches are correlated with each other).

``permute`` is golden-stick's knockoff: the same batch in a random order.

Large inputs: with more than ``max_dim`` features (default 4096) the features are split into
blocks of about ``block_dim`` (default 1024) and each block gets its own knockoff, ignoring the
correlation between blocks (Sigma is replaced by its block-diagonal part). For an image batch
``[N, C, H, W]`` a block is a spatial tile (all channels of a ``t x t`` patch, ``C t^2 <= block_dim``);
for other shapes, consecutive features of the flattened input. With an int ``group`` the blocks are
cut on group boundaries (the tile side ``t`` a multiple of the patch side, a run a multiple of the
run length), so a patch group never spans two blocks; a single group of more than ``block_dim``
features is a block of its own. ``"feature"`` groups never span blocks either. # NB: the
``"input"`` group is the whole input, so it is split: each block is then an independent draw of
its own part of the input, and the knockoff as a whole is a draw from the block-diagonal Gaussian,
not from N(mean, Sigma). Exchangeability holds for the block-diagonal Gaussian; each block costs a
few ``block_dim``-square eigendecompositions at fit time.

Internals:
    * Sigma is shrunk towards the identity before gamma is computed (``shrinkage="ledoit-wolf"``,
      the default: the Ledoit-Wolf intensity on the standardised data; a float in [0, 1] fixes it; 0
      keeps the sample correlation). # NB: without shrinkage an upsampled or otherwise low-rank
      input has lambda_min(Sigma) = 0, hence gamma = 0 and X~ = X for every grouping but "input".
    * Features whose standard deviation is (almost) zero are constants; their knockoff is the feature
      itself, and they are left out of Sigma.
    * The conditional covariance V = 2S - S Sigma^-1 S is singular at the largest gamma: its square
      root is taken by eigendecomposition with negative eigenvalues clipped to 0, not by Cholesky.
    * Everything is computed in float64 and the sample is cast to the input's dtype.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch

from otofx.errors import InputError

log = logging.getLogger("otofx")


def batch_inputs(batch):
    """The model input of a loader batch: ``x`` from ``(x, y, ...)`` or ``x`` itself."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise InputError(f"SCOP: a loader batch must be a tensor or (inputs, targets) with a tensor input; "
                         f"got {type(x).__name__} as the input")
    return x


def permute(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch in a random order (golden-stick's ``KfCallback`` knockoff)."""
    return x[torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)]


def ledoit_wolf(z: torch.Tensor) -> float:
    """Ledoit-Wolf shrinkage intensity of standardised data ``z`` [n, d] towards mu * I."""
    n, d = z.shape
    s = z.T @ z / n
    mu = float(torch.diagonal(s).mean())
    delta = float(((s - mu * torch.eye(d, dtype=s.dtype)) ** 2).sum()) / d
    if delta <= 0:
        return 0.0
    # beta^2 = 1/n^2 sum_k ||z_k z_k^T - S||_F^2 / d, with ||z z^T||_F^2 = ||z||^4
    sq = (z * z).sum(1)
    beta = float((sq ** 2).sum() / n - (s ** 2).sum()) / (n * d)
    return min(max(beta / delta, 0.0), 1.0)


@dataclass(frozen=True)
class _Block:
    index: torch.Tensor  # feature positions (into the non-constant features)
    mean_map: torch.Tensor  # A = I - Sigma^-1 S: E[Z~ | Z] = Z A
    root: torch.Tensor  # R with R R^T = V: Z~ = Z A + N(0, I) R^T
    s: float  # gamma, the knockoff scale: S = gamma * blockdiag(Sigma_gg)
    sigma: torch.Tensor  # the (shrunk) correlation of the block
    groups: tuple  # the block's groups, as positions into ``index``

    @property
    def s_matrix(self) -> torch.Tensor:
        """S = gamma * blockdiag(Sigma_gg): cov(Z, Z~) = Sigma - S."""
        out = torch.zeros_like(self.sigma)
        for g in self.groups:
            out[g[:, None], g[None, :]] = self.s * self.sigma[g[:, None], g[None, :]]
        return out


def _tiles(shape: tuple, block_dim: int, group="input") -> list:
    """Feature positions of each block of a flattened input of per-sample ``shape``.

    For an int ``group`` (p x p patches of an image, runs of p features otherwise) the blocks are cut
    on group boundaries, so a group never spans two blocks; a single group larger than ``block_dim``
    is a block of its own."""
    d = math.prod(shape)
    g = group if isinstance(group, int) and not isinstance(group, bool) and group >= 1 else 1
    if len(shape) == 3:
        c, h, w = shape
        p = max(int(math.isqrt(max(block_dim // c, 1))), 1)
        p = max(p // g, 1) * g  # NB: a tile side that is a multiple of the patch side keeps every patch whole
        grid = torch.arange(d).reshape(c, h, w)
        return [grid[:, i:i + p, j:j + p].reshape(-1) for i in range(0, h, p) for j in range(0, w, p)]
    step = max(block_dim // g, 1) * g
    return [torch.arange(a, min(a + step, d)) for a in range(0, d, step)]


def _group_ids(shape: tuple, group) -> torch.Tensor:
    """The group of every feature of a flattened input of per-sample ``shape`` (see the module docstring)."""
    d = math.prod(shape)
    if group == "feature":
        return torch.arange(d)
    if group == "input":
        return torch.zeros(d, dtype=torch.long)
    if isinstance(group, int) and not isinstance(group, bool) and group >= 1:
        if len(shape) == 3:
            c, h, w = shape
            rows = torch.arange(h)[:, None] // group
            cols = torch.arange(w)[None, :] // group
            return (rows * (-(-w // group)) + cols).expand(c, h, w).reshape(-1).clone()
        return torch.arange(d) // group
    raise InputError(f"SCOP knockoffs: group={group!r}: use 'input' (one group: an independent draw), 'feature' "
                     "(every feature its own group) or a patch size >= 1")


class GaussianKnockoffs:
    """Second-order Gaussian model-X knockoffs of the flattened input (see the module docstring)."""

    def __init__(self, shape: tuple, mean: torch.Tensor, scale: torch.Tensor, active: torch.Tensor, blocks: list,
                 shrinkage: float):
        self.shape = tuple(shape)
        self.mean, self.scale, self.active, self.blocks = mean, scale, active, blocks
        self.shrinkage = shrinkage

    @property
    def s(self) -> tuple:
        """The knockoff scale gamma of every block (S = gamma * blockdiag(Sigma_gg))."""
        return tuple(b.s for b in self.blocks)

    @classmethod
    def fit(cls, loader, *, group="input", max_samples: int = 20000, shrinkage="ledoit-wolf", max_dim: int = 4096,
            block_dim: int = 1024) -> "GaussianKnockoffs":
        xs, n, shape = [], 0, None
        _group_ids((1,), group)  # NB: a bad group is reported before the loader is read
        for batch in loader:
            x = batch_inputs(batch).detach()
            if not (x.is_floating_point() or x.is_complex()):
                raise InputError(f"SCOP's Gaussian knockoffs model a real-valued input; the loader gives {x.dtype} "
                                 "(token ids?). Use knockoff='permute' (the other samples of the batch) or a callable "
                                 "x -> knockoff of x")
            x = x.to("cpu", torch.float64)
            if shape is None:
                shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != shape:
                raise InputError(f"SCOP knockoffs: the loader's inputs change shape ({shape} then {tuple(x.shape[1:])})")
            xs.append(x.reshape(x.shape[0], -1))
            n += x.shape[0]
            if n >= max_samples:
                break
        if shape is None or n < 2:
            raise InputError("SCOP knockoffs: the loader gave fewer than 2 samples; Gaussian knockoffs need the "
                             "input distribution")
        x = torch.cat(xs)[:max_samples]
        mean, scale = x.mean(0), x.std(0)
        active = scale > 1e-6 * max(float(scale.max()), 1e-300)
        z = (x[:, active] - mean[active]) / scale[active]
        d = z.shape[1]
        pos = torch.full((math.prod(shape),), -1, dtype=torch.long)
        pos[active] = torch.arange(d)
        if math.prod(shape) <= max_dim:
            parts = [torch.arange(d)]
        else:
            parts = [pos[t][pos[t] >= 0] for t in _tiles(shape, block_dim, group)]
            parts = [p for p in parts if len(p)]
        gid = _group_ids(shape, group)[active]
        blocks = []
        lw = []
        for idx in parts:
            zb = z[:, idx]
            a = ledoit_wolf(zb) if shrinkage == "ledoit-wolf" else float(shrinkage)
            if not 0.0 <= a <= 1.0:
                raise InputError(f"SCOP knockoffs: shrinkage={shrinkage!r} must be 'ledoit-wolf' or in [0, 1]")
            lw.append(a)
            local = gid[idx]
            groups = tuple(torch.nonzero(local == v).reshape(-1) for v in torch.unique(local))
            blocks.append(cls._block(zb, idx, a, groups))
        log.info("scop: Gaussian knockoffs (group=%r) of %d features (%d constant) from %d samples: %d block(s), "
                 "knockoff scale in [%.3g, %.3g], shrinkage %.3g", group, math.prod(shape), int((~active).sum()),
                 len(x), len(blocks), min(b.s for b in blocks), max(b.s for b in blocks), max(lw))
        return cls(shape, mean, scale, active, blocks, max(lw))

    @staticmethod
    def _block(zb: torch.Tensor, idx: torch.Tensor, shrink: float, groups: tuple) -> _Block:
        d = zb.shape[1]
        cov = zb.T @ zb / zb.shape[0]
        sd = torch.diagonal(cov).clamp_min(1e-12).sqrt()
        corr = cov / sd[:, None] / sd[None, :]
        eye = torch.eye(d, dtype=corr.dtype)
        sigma = (1 - shrink) * corr + shrink * eye
        sigma = 0.5 * (sigma + sigma.T)
        if len(groups) == 1:
            gamma = 1.0  # B = Sigma: B^-1/2 Sigma B^-1/2 = I exactly
        elif all(len(g) == 1 for g in groups):
            gamma = min(1.0, 2.0 * max(float(torch.linalg.eigvalsh(sigma)[0]), 0.0))  # B = I (a correlation)
        else:
            b_inv_half = torch.zeros_like(sigma)
            for g in groups:
                w, u = torch.linalg.eigh(sigma[g[:, None], g[None, :]])
                b_inv_half[g[:, None], g[None, :]] = (u * w.clamp_min(1e-12).rsqrt()) @ u.T
            m = b_inv_half @ sigma @ b_inv_half
            gamma = min(1.0, 2.0 * max(float(torch.linalg.eigvalsh(0.5 * (m + m.T))[0]), 0.0))
        s_mat = torch.zeros_like(sigma)
        for g in groups:
            s_mat[g[:, None], g[None, :]] = gamma * sigma[g[:, None], g[None, :]]
        inv = torch.linalg.inv(sigma)
        mean_map = eye - inv @ s_mat
        v = 2 * s_mat - s_mat @ inv @ s_mat
        w, u = torch.linalg.eigh(0.5 * (v + v.T))
        root = u * w.clamp_min(0).sqrt()
        return _Block(idx, mean_map, root, gamma, sigma, groups)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise InputError(f"SCOP knockoffs were fitted on inputs of shape {self.shape}, got {tuple(x.shape[1:])}")
        flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
        out = flat.clone()
        act = self.active
        z = (flat[:, act] - self.mean[act]) / self.scale[act]
        zk = torch.empty_like(z)
        for b in self.blocks:
            zb = z[:, b.index]
            noise = torch.randn(zb.shape, generator=generator, dtype=zb.dtype)
            zk[:, b.index] = zb @ b.mean_map + noise @ b.root.T
        out[:, act] = zk * self.scale[act] + self.mean[act]
        return out.reshape(x.shape).to(x.dtype).to(x.device)


def check_kwargs(knockoff, kwargs) -> dict:
    """``knockoff_kwargs`` checked against :meth:`GaussianKnockoffs.fit`'s keywords (an InputError naming
    the unknown ones); they only apply to ``knockoff="gaussian"``."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InputError(f"scop: knockoff_kwargs={kwargs!r} must be a dict of GaussianKnockoffs.fit keywords or None")
    if not kwargs:
        return {}
    allowed = [name for name in inspect.signature(GaussianKnockoffs.fit).parameters if name not in ("cls", "loader")]
    if not (isinstance(knockoff, str) and knockoff == "gaussian"):
        raise InputError(f"scop: knockoff_kwargs={kwargs!r} only apply to knockoff='gaussian' (keywords of "
                         f"GaussianKnockoffs.fit: {', '.join(allowed)}); knockoff={knockoff!r} takes none")
    bad = sorted(k for k in kwargs if k not in allowed)
    if bad:
        raise InputError(f"scop: knockoff_kwargs has unknown keyword(s) {', '.join(map(repr, bad))}; "
                         f"GaussianKnockoffs.fit takes {', '.join(allowed)}")
    return dict(kwargs)


def make(knockoff, loader, **kw):
    """The knockoff sampler ``fn(x, generator) -> x~`` for ``knockoff`` ("gaussian", "permute" or a callable)."""
    if callable(knockoff):
        def user(x, generator=None):
            return knockoff(x)
        return user
    if knockoff == "gaussian":
        return GaussianKnockoffs.fit(loader, **kw)
    if knockoff == "permute":
        return permute
    raise InputError(f"knockoff={knockoff!r}: use 'gaussian', 'permute' or a callable x -> knockoff of x")


__all__ = ["GaussianKnockoffs", "permute", "ledoit_wolf", "make", "check_kwargs", "batch_inputs"]
