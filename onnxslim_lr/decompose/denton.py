"""Denton et al. (2014) clustering approximations: monochromatic and biclustering convs.

Weights use the ONNX layout ``W: (F, C, kh, kw)``; ``P = kh*kw``. Every factor is returned
already shaped as the ONNX Conv weight it becomes; the graph surgery lives in the pass.

Monochromatic (Denton 3.2.1; first layer, few input colours)
-----------------------------------------------------------
For each output filter ``f`` take ``W_f: C x P`` and its rank-1 SVD
``W_f ~ s_f u_f v_f^T`` (``u_f`` is the filter's colour, unit length, sign fixed so its
largest-magnitude component is positive). The ``F`` colours are clustered into ``C'``
clusters of equal size ``F/C'`` with the sign-invariant subspace distance
``1 - (u . U)^2`` (balanced k-means, :mod:`.cluster`); the centre ``U_c`` of a cluster is
the unit vector closest to all its members' lines. Each filter is then refitted to its
cluster colour: ``min_b ||W_f - U_c b^T||_F`` is solved by the projection
``b_f = W_f^T U_c`` (``U_c`` unit), which is never worse than Denton's ``s_f v_f`` and equals
it when ``u_f = U_c``. So ``W_hat_f = U_c b_f^T`` and the layer becomes

    1x1 Conv C -> C' (rows U_c)  ->  grouped kh x kw Conv, group = C', C' -> F
    (output channel i, in cluster order, is filter ``order[i]``, reading colour ``i // (F/C')``)

Cost (Table 1, ``N x M`` input, ``Ho x Wo`` output): ``C' C N M + P F Ho Wo``.

Biclustering (Denton 3.3)
-------------------------
Input channels are clustered into ``G`` equal groups by balanced Euclidean k-means on the
rows of ``W_C: C x (P F)`` (similar channels together), output channels into ``H`` equal
groups on the rows of ``W_F^T: F x (C P)``, independently. Each block ``W_gh``
(``F/H x C/G x kh x kw``, input group ``g``, output group ``h``) is approximated by

* ``mode="svd"``, ranks ``(K1, K2)``: Tucker-2 ``W_gh[f,c,p] ~ sum A[f,b] core[b,a,p] B[c,a]``
  with orthonormal ``B: C/G x K1``, ``A: F/H x K2`` (HOOI started from the truncated
  HOSVD). Graph: 1x1 ``C/G -> K1``, kh x kw ``K1 -> K2``, 1x1 ``K2 -> F/H``. Exact at
  ``K1 = C/G, K2 = F/H``. (Denton computes it with two successive SVDs; HOOI fits at least
  as well for the same structure.)
* ``mode="cp"``, rank ``K``: ``W_gh[f,c,p] ~ sum_k A[f,k] B[c,k] S[p,k]`` (outer-product
  decomposition, eq. 6-7). Graph: 1x1 ``C/G -> K``, depthwise kh x kw on the ``K`` maps,
  1x1 ``K -> F/H``. Computed by CP-ALS from two starts (a generalised-eigenvalue /
  Jennrich start, exact for generic tensors of rank ``<= K`` when ``K`` is at most the
  second-largest of ``F/H, C/G, kh*kw``, and an HOSVD start); after a short trial the
  better one is run to convergence (beyond that size condition ALS is only a local
  method and exactness is not guaranteed). Denton's greedy rank-1 deflation (eq. 7) is
  not used: it is not exact for CP rank > 1 in general.

Output group ``h`` is the sum over ``g`` of block ``(g, h)`` applied to input group ``g``.
As standard ops (see :class:`Bicluster` for exact shapes and groups): gather inputs into
group order -> grouped 1x1 (groups=G, outputs ordered (g, h, k)) -> channel shuffle
(g, h, k) -> (h, g, k) -> grouped kh x kw (groups=G*H, or depthwise for cp) -> grouped 1x1
(groups=H, summing over g) -> restore the original output order.

Costs (Table 1; ``Delta`` = stride, so ``N M Delta^-2 = Ho Wo``):

* SVD: ``G H (C/G K1 N M + K1 P K2 Ho Wo + K2 F/H Ho Wo)``
* CP:  ``G H K (C/G N M + P Ho Wo + F/H Ho Wo)``

The paper's Table 1 prints the SVD row as ``G H N M (C/G K1 + K1 X Y K2 Delta^{-D/2} +
K2 F/H)``, i.e. with the last 1x1 stage at input resolution. Here every stage is priced
where the graph runs it: the last 1x1 runs on the strided output, so it is ``Ho Wo``, the
same as in the paper's outer-product row.

Data metric (Denton 3.1, eq. 3)
-------------------------------
With the covariance ``Sigma`` of the layer's input, the error that matters is the output
error ``E||(W - W_hat) x||^2 = ||(W - W_hat) Sigma^{1/2}||_F^2`` rather than the Frobenius
norm. The channel covariance ``Sigma_C`` (``C x C``) keeps the factor structure: whiten the
input mode of a block, ``W'_gh = W_gh x_c Sigma_gg^{1/2}``, decompose ``W'_gh`` with the
Frobenius algorithms above, and map the input factor back, ``B = Sigma_gg^{-1/2} B'``.
Three documented simplifications keep this a per-block problem:

* the clustering itself stays in the Frobenius metric (whitening mixes channels, so
  whitened rows no longer belong to single channels);
* the cross-covariances between different input groups are ignored (``Sigma`` is used
  block-diagonally, ``Sigma_gg`` per group), since the blocks are fitted independently;
* a patch covariance (``C*P x C*P``, CONTRIBUTING's convention, index ``c*P + p``) is
  reduced to its channel part averaged over kernel positions,
  ``Sigma_C[c, d] = mean_p Sigma[(c,p), (d,p)]``; this is exact when the input pixels are
  spatially uncorrelated, and is what lets the 1x1 input stage stay a 1x1.

``rel_error`` is then reported in the full data metric (the whole ``Sigma`` as given):
``||(W - W_hat) Sigma^{1/2}|| / ||W Sigma^{1/2}||``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..cost import conv_macs
from .cluster import balanced_kmeans, fix_sign

__all__ = [
    "mono_data",
    "Mono",
    "Bicluster",
    "monochromatic",
    "bicluster",
    "mono_macs",
    "mono_speedup",
    "bicluster_svd_macs",
    "bicluster_cp_macs",
]

# CP-ALS / HOOI controls. Blocks are small (at most a few hundred per side), so generous
# iteration caps cost little; the tolerances stop as soon as the fit stops moving.
_ALS_TRIAL_ITER = 25   # iterations from each start before keeping the better one
_ALS_MAX_ITER = 300
_ALS_TOL = 1e-9
_HOOI_MAX_ITER = 30
_HOOI_TOL = 1e-13
_WHITEN_EPS = 1e-8  # eigenvalue floor (relative to the largest) when taking Sigma^{-1/2}


# --------------------------------------------------------------------------- MAC model


def mono_macs(C: int, F: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
              n_colors: int) -> int:
    """Monochromatic: 1x1 colour projection at input resolution, then one colour per filter."""
    return n_colors * C * H * W + kh * kw * F * Ho * Wo


def mono_speedup(C: int, F: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
                 n_colors: int) -> float:
    """Theoretical speedup ``conv_macs / mono_macs`` (Denton Table 3).

    Table 3 (C=3, F=96, 7x7, stride 2, 224x224 input) is reproduced to the two printed
    decimals for every C' in {6, 8, 12, 16, 24, 48, 96} with a 110x110 output, i.e. the
    ONNX floor rule with one pixel of padding per side, ``floor((224 + 2 - 7) / 2) + 1``
    (equivalently the ceil rule without padding). A 109x109 output (floor, no padding)
    gives 2.38 instead of 2.39 at C'=96.
    """
    return conv_macs(F, C, kh, kw, Ho, Wo) / mono_macs(C, F, kh, kw, H, W, Ho, Wo, n_colors)


def _check_groups(C: int, F: int, n_in_groups: int, n_out_groups: int) -> None:
    if n_in_groups < 1 or C % n_in_groups:
        raise ValueError(f"biclustering needs the {C} input channels to split into "
                         f"n_in_groups={n_in_groups} equal groups (C % G = "
                         f"{C % n_in_groups if n_in_groups >= 1 else 'n/a'})")
    if n_out_groups < 1 or F % n_out_groups:
        raise ValueError(f"biclustering needs the {F} output channels to split into "
                         f"n_out_groups={n_out_groups} equal groups (F % H = "
                         f"{F % n_out_groups if n_out_groups >= 1 else 'n/a'})")


def bicluster_svd_macs(C: int, F: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
                       n_in_groups: int, n_out_groups: int, K1: int, K2: int) -> int:
    """Biclustering + SVD: ``G Hg (C/G K1 H W + K1 kh kw K2 Ho Wo + K2 F/Hg Ho Wo)``.

    ``G``/``Hg`` are the NUMBERS of input/output clusters and ``K1``/``K2`` the per-block
    ranks; ``H, W`` is the input size. The three terms are the three grouped convs of the
    rewritten graph (see the module docstring on the paper's printed formula).
    """
    _check_groups(C, F, n_in_groups, n_out_groups)
    G, Hg = n_in_groups, n_out_groups
    return G * Hg * ((C // G) * K1 * H * W + K1 * kh * kw * K2 * Ho * Wo
                     + K2 * (F // Hg) * Ho * Wo)


def bicluster_cp_macs(C: int, F: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
                      n_in_groups: int, n_out_groups: int, K: int) -> int:
    """Biclustering + outer product: ``G Hg K (C/G H W + kh kw Ho Wo + F/Hg Ho Wo)`` (Table 1)."""
    _check_groups(C, F, n_in_groups, n_out_groups)
    G, Hg = n_in_groups, n_out_groups
    return G * Hg * K * ((C // G) * H * W + kh * kw * Ho * Wo + (F // Hg) * Ho * Wo)


# --------------------------------------------------------------------------- helpers


def _as_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"expected a conv weight (F, C, kh, kw), got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"empty conv weight {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("conv weight has non-finite values")
    return w


def _rel(num: float, den: float) -> float:
    """sqrt(num/den); ``num`` may come out a hair below 0 from cancellation: clamp it."""
    num = max(num, 0.0)
    return float(np.sqrt(num / den)) if den > 0 else float(num > 0)


def _leading_basis(M: np.ndarray, k: int) -> np.ndarray:
    """``k`` leading left singular vectors of ``M`` (orthonormal, completed if rank < k)."""
    # eigenvectors of the (rows x rows) Gram: a complete orthonormal basis whatever the rank,
    # and no right singular vectors (an SVD of the wide unfolding computed them and took 47 s
    # of 57 s for bicluster on ZFNet's 512x512 conv)
    _, vecs = np.linalg.eigh(M @ M.T)
    return vecs[:, ::-1][:, :k]


# --------------------------------------------------------------------------- monochromatic


@dataclass(frozen=True, eq=False)
class Mono:
    """Monochromatic factors, shaped as the ONNX weights of the two-conv rewrite.

    Graph: ``Conv(x, projection)`` (1x1, group 1, no pads/stride) -> ``Conv(., grouped,
    group=n_colors)`` (original kernel, strides, pads, dilations, bias permuted by
    ``order``) -> outputs in cluster order; ``y_original = y_cluster[:, inverse]``.

    Attributes:
        projection: ``(C', C, 1, 1)``; row ``c`` is the unit colour ``U_c``.
        grouped: ``(F, 1, kh, kw)``, in CLUSTER order: channels ``c*F/C' .. (c+1)*F/C'-1``
            are the filters of cluster ``c`` (ascending original index within a cluster).
        order: ``(F,)`` original filter index of each output channel (cluster order).
        inverse: ``(F,)`` ``argsort(order)``; ``out_original = out_cluster[:, inverse]``.
        labels: ``(F,)`` cluster of each ORIGINAL filter.
        rel_error: ``||W - W_hat||_F / ||W||_F`` in original order.
        n_colors: ``C'``.
    """

    projection: np.ndarray
    grouped: np.ndarray
    order: np.ndarray
    inverse: np.ndarray
    labels: np.ndarray
    rel_error: float
    n_colors: int

    @property
    def group(self) -> int:
        """ONNX ``group`` attribute of the spatial conv (= ``C'``)."""
        return self.n_colors

    def reconstruct(self) -> np.ndarray:
        """Effective dense weight ``(F, C, kh, kw)`` in the original filter order."""
        F = self.grouped.shape[0]
        colours = self.projection[:, :, 0, 0][self.labels]          # (F, C) per original f
        spatial = self.grouped[self.inverse, 0]                      # (F, kh, kw) original order
        assert spatial.shape[0] == F
        return np.einsum("fc,fij->fcij", colours, spatial)

    def macs(self, H: int, W: int, Ho: int, Wo: int) -> int:
        """MACs of the rewrite for an ``H x W`` input and ``Ho x Wo`` output."""
        C = self.projection.shape[1]
        F, _, kh, kw = self.grouped.shape
        return mono_macs(C, F, kh, kw, H, W, Ho, Wo, self.n_colors)


def monochromatic(w: np.ndarray, n_colors: int, seed: int = 0) -> Mono:
    """Monochromatic approximation of a conv with few input channels (Denton 3.2.1).

    Meant for the first layer, whose filters' colour components are close to rank 1 and
    share a handful of colour directions: then C' intermediate colour maps replace the C
    input channels and each output filter becomes a single-channel 2-D filter. Equal
    cluster sizes (``F % n_colors == 0``) are required because the second conv is grouped.
    """
    w = _as_weight(w)
    F, C, kh, kw = w.shape
    if not 1 <= n_colors <= F:
        raise ValueError(f"n_colors={n_colors} must be in [1, F={F}]")
    if F % n_colors:
        raise ValueError(f"monochromatic needs the {F} output filters to split into "
                         f"n_colors={n_colors} equal clusters (F % C' = {F % n_colors})")
    P = kh * kw
    Wm = w.reshape(F, C, P)
    U = np.linalg.svd(Wm, full_matrices=False)[0]   # batched: (F, C, min(C, P))
    colours = fix_sign(U[:, :, 0])                  # (F, C), unit, sign-fixed
    clus = balanced_kmeans(colours, n_colors, metric="subspace", seed=seed)
    centres = clus.centers                          # (C', C) unit rows
    labels = clus.labels
    spatial = np.einsum("fc,fcp->fp", centres[labels], Wm)  # best b_f given U_c (projection)
    order = np.argsort(labels, kind="stable")
    inverse = np.argsort(order, kind="stable")
    W_hat = np.einsum("fc,fp->fcp", centres[labels], spatial)
    err = float(((Wm - W_hat) ** 2).sum())
    return Mono(
        projection=centres.reshape(n_colors, C, 1, 1).copy(),
        grouped=spatial[order].reshape(F, 1, kh, kw).copy(),
        order=order,
        inverse=inverse,
        labels=labels,
        rel_error=_rel(err, float((Wm ** 2).sum())),
        n_colors=n_colors,
    )


# --------------------------------------------------------------------------- biclustering


@dataclass(frozen=True, eq=False)
class Bicluster:
    """Biclustering factors, shaped as the ONNX weights of the standard-op rewrite.

    Notation: ``G = n_in_groups``, ``H = n_out_groups``, ``Cg = C/G``, ``Fh = F/H``,
    ``(K1, K2) = ranks`` (cp mode: ``K1 = K2 = K``). Graph, input ``x: (N, C, Hi, Wi)``:

    1. ``x1 = Gather(x, in_perm, axis=1)`` - input channels in group order (group ``g`` =
       channels ``g*Cg .. (g+1)*Cg-1`` of ``x1``). Skip when ``in_perm`` is the identity.
    2. ``y1 = Conv(x1, stage1, group=G)``, 1x1, no pads/stride. ``stage1: (G*H*K1, Cg, 1, 1)``;
       output channel ``(g*H + h)*K1 + a`` is rank-``a`` input map of block ``(g, h)``.
    3. Channel shuffle ``(g, h, a) -> (h, g, a)``: ``Reshape(N, G, H, K1*Hi*Wi)`` ->
       ``Transpose(0, 2, 1, 3)`` -> ``Reshape(N, H*G*K1, Hi, Wi)`` (or, equivalently,
       ``Gather(y1, shuffle_perm, axis=1)``, which needs no spatial sizes) -> ``shuffled``.
    4. ``y2 = Conv(shuffled, stage2, group=stage2_group)`` with the ORIGINAL kernel,
       strides, pads, dilations.
       svd: ``stage2: (H*G*K2, K1, kh, kw)``, ``group = G*H``; output channel
       ``(h*G + g)*K2 + b`` reads the ``K1`` maps of block ``(g, h)``.
       cp:  ``stage2: (H*G*K, 1, kh, kw)``, ``group = H*G*K`` (depthwise).
    5. ``y = Conv(y2, stage3, group=H)``, 1x1, no pads/stride, original bias permuted by
       ``out_order``. ``stage3: (F, G*K2, 1, 1)``; output channel ``h*Fh + i`` is original
       filter ``out_order[h*Fh + i]`` and sums over ``g`` the ``K2`` maps of blocks ``(g, h)``.
    6. ``y_original = Gather(y, out_inverse, axis=1)`` (or fold into the consumers).

    Attributes:
        mode: ``"svd"`` or ``"cp"``.
        n_in_groups, n_out_groups: ``G``, ``H``.
        ranks: ``(K1, K2)`` (cp: ``(K, K)``).
        in_perm: ``(C,)`` original channel index of each group-ordered input channel.
        stage1, stage2, stage3: see above.
        out_order: ``(F,)`` original filter index of each output channel of stage 3.
        out_inverse: ``(F,)`` ``argsort(out_order)``.
        in_labels, out_labels: ``(C,)``, ``(F,)`` cluster of each original channel / filter.
        rel_error: relative error of ``reconstruct()`` vs ``W``, in the data metric when a
            covariance was given (see the module docstring), else Frobenius.
    """

    mode: str
    n_in_groups: int
    n_out_groups: int
    ranks: tuple[int, int]
    in_perm: np.ndarray
    stage1: np.ndarray
    stage2: np.ndarray
    stage3: np.ndarray
    out_order: np.ndarray
    out_inverse: np.ndarray
    in_labels: np.ndarray
    out_labels: np.ndarray
    rel_error: float

    @property
    def stage1_group(self) -> int:
        return self.n_in_groups

    @property
    def stage2_group(self) -> int:
        G, H = self.n_in_groups, self.n_out_groups
        return G * H if self.mode == "svd" else G * H * self.ranks[0]

    @property
    def stage3_group(self) -> int:
        return self.n_out_groups

    @property
    def shuffle_shape(self) -> tuple[int, int, int]:
        """``(G, H, K1)``: stage-1 channels are ``(g, h, a)``; swap the first two axes."""
        return (self.n_in_groups, self.n_out_groups, self.ranks[0])

    @property
    def shuffle_perm(self) -> np.ndarray:
        """``(G*H*K1,)``: shuffled channel ``j`` is stage-1 channel ``shuffle_perm[j]``."""
        G, H, K1 = self.shuffle_shape
        return np.arange(G * H * K1).reshape(G, H, K1).transpose(1, 0, 2).reshape(-1)

    @property
    def in_perm_is_identity(self) -> bool:
        return bool(np.array_equal(self.in_perm, np.arange(self.in_perm.size)))

    @property
    def params(self) -> int:
        return int(self.stage1.size + self.stage2.size + self.stage3.size)

    def macs(self, H: int, W: int, Ho: int, Wo: int) -> int:
        """MACs of the rewrite for an ``H x W`` input and ``Ho x Wo`` output (Table 1)."""
        C = self.in_perm.size
        F = self.out_order.size
        kh, kw = self.stage2.shape[2:]
        G, Hg = self.n_in_groups, self.n_out_groups
        if self.mode == "svd":
            return bicluster_svd_macs(C, F, kh, kw, H, W, Ho, Wo, G, Hg, *self.ranks)
        return bicluster_cp_macs(C, F, kh, kw, H, W, Ho, Wo, G, Hg, self.ranks[0])

    def reconstruct(self) -> np.ndarray:
        """Effective dense weight ``(F, C, kh, kw)`` in the ORIGINAL channel orders.

        Read back from the stage weights by the same index arithmetic the graph uses, so
        a test that simulates the graph and compares it with a dense conv by this weight
        checks the layout end to end.
        """
        G, Hg = self.n_in_groups, self.n_out_groups
        K1, K2 = self.ranks
        C, F = self.in_perm.size, self.out_order.size
        Cg, Fh = C // G, F // Hg
        kh, kw = self.stage2.shape[2:]
        Wg = np.zeros((F, C, kh, kw))
        for g in range(G):
            for h in range(Hg):
                B = self.stage1[(g * Hg + h) * K1:(g * Hg + h + 1) * K1, :, 0, 0]  # (K1, Cg)
                core = self.stage2[(h * G + g) * K2:(h * G + g + 1) * K2]          # (K2, ., kh, kw)
                A = self.stage3[h * Fh:(h + 1) * Fh, g * K2:(g + 1) * K2, 0, 0]    # (Fh, K2)
                if self.mode == "svd":
                    block = np.einsum("fb,baij,ac->fcij", A, core, B, optimize=True)
                else:
                    block = np.einsum("fk,kij,kc->fcij", A, core[:, 0], B, optimize=True)
                Wg[h * Fh:(h + 1) * Fh, g * Cg:(g + 1) * Cg] = block
        W_hat = np.empty_like(Wg)
        W_hat[np.ix_(self.out_order, self.in_perm)] = Wg
        return W_hat


def _channel_covariance(sigma: np.ndarray | None, C: int, P: int) -> np.ndarray | None:
    """Validate ``sigma`` and reduce it to the ``C x C`` channel covariance (module docstring)."""
    if sigma is None:
        return None
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape == (C, C):
        out = s
    elif s.shape == (C * P, C * P):
        out = np.einsum("apbp->ab", s.reshape(C, P, C, P)) / P
    else:
        raise ValueError(f"sigma must be the input channel covariance ({C}, {C}) or the patch "
                         f"covariance ({C * P}, {C * P}), got {s.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError("sigma has non-finite values")
    return 0.5 * (out + out.T)


def _data_error(D: np.ndarray, sigma: np.ndarray | None) -> float:
    """``||D Sigma^{1/2}||^2`` for ``D: (F, C, kh, kw)`` with the covariance as given."""
    F, C = D.shape[:2]
    if sigma is None:
        return float((D ** 2).sum())
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape == (C, C):
        Dm = D.reshape(F, C, -1)
        return float(np.einsum("fcp,cd,fdp->", Dm, s, Dm, optimize=True))
    Dm = D.reshape(F, -1)
    return float(np.einsum("fi,ij,fj->", Dm, s, Dm, optimize=True))


def _whitener(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S^{1/2}, S^{-1/2})`` of a PSD matrix, eigenvalues floored at ``eps * max``.

    The floor keeps the inverse finite when a channel is (nearly) constant; directions the
    data never excites are then fitted almost in the Frobenius metric, which is harmless.
    """
    vals, vecs = np.linalg.eigh(S)
    top = float(vals.max()) if vals.size else 0.0
    if top <= 0.0:
        n = S.shape[0]
        return np.eye(n), np.eye(n)
    vals = np.maximum(vals, _WHITEN_EPS * top)
    r = np.sqrt(vals)
    return (vecs * r) @ vecs.T, (vecs / r) @ vecs.T


def _tucker2(T: np.ndarray, K1: int, K2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of ``T: (Fo, Ci, P)`` on the output and input modes, by HOOI.

    Returns ``A: (Fo, K2)``, ``core: (K2, K1, P)``, ``B: (Ci, K1)`` with ``A``, ``B``
    orthonormal and ``T ~ einsum('fb,bap,ca->fcp', A, core, B)``. Full ranks give square
    orthogonal factors, hence an exact reconstruction.
    """
    Fo, Ci, P = T.shape
    B = _leading_basis(T.transpose(1, 0, 2).reshape(Ci, Fo * P), K1)
    prev = -1.0
    A = np.zeros((Fo, K2))
    for _ in range(_HOOI_MAX_ITER):
        Y = np.einsum("fcp,ca->fap", T, B, optimize=True)
        A = _leading_basis(Y.reshape(Fo, K1 * P), K2)
        Z = np.einsum("fcp,fb->cbp", T, A, optimize=True)
        B = _leading_basis(Z.reshape(Ci, K2 * P), K1)
        core = np.einsum("cbp,ca->bap", Z, B, optimize=True)
        fit = float((core ** 2).sum())  # = ||T||^2 - error^2, non-decreasing
        if fit - prev <= _HOOI_TOL * max(fit, 1e-300):
            break
        prev = fit
    core = np.einsum("fcp,fb,ca->bap", T, A, B, optimize=True)
    return A, core, B


def _cp_error(T: np.ndarray, A: np.ndarray, B: np.ndarray, S: np.ndarray) -> float:
    return float(np.linalg.norm(T - np.einsum("ik,jk,lk->ijl", A, B, S, optimize=True)))


def _solve_gram(M: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``M G^+`` for a symmetric PSD Gram ``G`` (least squares, robust to rank deficiency)."""
    return np.linalg.lstsq(G, M.T, rcond=None)[0].T


def _khatri_rao(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Column-wise Kronecker product, rows ordered ``(x_row, y_row)``: ``(I*J, K)``."""
    return (X[:, None, :] * Y[None, :, :]).reshape(-1, X.shape[1])


def _als(T: np.ndarray, A: np.ndarray, B: np.ndarray, S: np.ndarray, max_iter: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """CP-ALS refinement of ``T ~ sum_k A[:,k] o B[:,k] o S[:,k]``; returns factors and error.

    Each update is the exact least-squares solve for one factor (unfolding times the
    Khatri-Rao product of the other two, divided by the Hadamard product of their Grams).
    The per-iteration error comes from Grams, ``||T||^2 - 2<T, T_hat> + ||T_hat||^2``,
    which is cheap but only accurate to ~1e-8 relative; near zero the exact residual is
    used instead, so exact (rank <= K) fits are recognised as such.
    """
    I, J, L = T.shape
    T1 = T.reshape(I, J * L)
    T2 = T.transpose(1, 0, 2).reshape(J, I * L)
    T3 = T.transpose(2, 0, 1).reshape(L, I * J)
    nt2 = float((T * T).sum())
    nt = np.sqrt(nt2)
    prev = np.inf
    for _ in range(max_iter):
        A = _solve_gram(T1 @ _khatri_rao(B, S), (B.T @ B) * (S.T @ S))
        B = _solve_gram(T2 @ _khatri_rao(A, S), (A.T @ A) * (S.T @ S))
        M = T3 @ _khatri_rao(A, B)
        S = _solve_gram(M, (A.T @ A) * (B.T @ B))
        e2 = nt2 - 2.0 * float((S * M).sum()) + float(((A.T @ A) * (B.T @ B) * (S.T @ S)).sum())
        err = np.sqrt(max(e2, 0.0))
        # keep B and S unit-norm, scale in A: avoids over/underflow drift between factors
        nb = np.linalg.norm(B, axis=0)
        ns = np.linalg.norm(S, axis=0)
        nb[nb == 0] = 1.0
        ns[ns == 0] = 1.0
        B, S, A = B / nb, S / ns, A * (nb * ns)
        if err <= 1e-6 * nt:
            err = _cp_error(T, A, B, S)
            if err <= 1e-13 * nt:
                break
        if abs(prev - err) <= _ALS_TOL * nt:
            break
        prev = err
    return A, B, S, _cp_error(T, A, B, S)


def _padded_basis(M: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Leading ``k`` left singular vectors of ``M``, padded with random columns if ``k > rows``."""
    U = _leading_basis(M, min(k, M.shape[0]))
    if U.shape[1] < k:
        U = np.concatenate([U, rng.standard_normal((M.shape[0], k - U.shape[1]))], axis=1)
    return U


def _hosvd_start(T: np.ndarray, K: int, rng: np.random.Generator) -> list[np.ndarray]:
    I, J, L = T.shape
    return [
        _padded_basis(T.reshape(I, J * L), K, rng),
        _padded_basis(T.transpose(1, 0, 2).reshape(J, I * L), K, rng),
        _padded_basis(T.transpose(2, 0, 1).reshape(L, I * J), K, rng),
    ]


def _gevd_start(T: np.ndarray, K: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Jennrich / generalised-eigenvalue start: exact for a generic tensor of rank ``<= K``.

    Needs two modes of size ``>= K`` (their factors must have full column rank) and a third
    of size ``>= 2`` (two independent slice mixtures). With ``T = sum a_k o b_k o c_k``
    compressed to ``K x K x L``, the mixtures ``M_i = A D_i B^T`` give
    ``M1 M2^{-1} = A (D1 D2^{-1}) A^{-1}`` and ``M1^T M2^{-T} = B (D1 D2^{-1}) B^{-1}``;
    eigenvectors sorted by eigenvalue give paired ``a_k``, ``b_k``, then ``c_k`` by least
    squares. Returns ``None`` when not applicable or numerically singular.
    """
    dims = T.shape
    order = sorted(range(3), key=lambda m: (-dims[m], m))
    a, b, c = order
    if dims[b] < K or dims[c] < 2:
        return None
    Tt = np.transpose(T, (a, b, c))
    Ia, Ib, _ = Tt.shape
    Ua = _leading_basis(Tt.reshape(Ia, -1), K)
    Ub = _leading_basis(Tt.transpose(1, 0, 2).reshape(Ib, -1), K)
    Tc = np.einsum("abc,ak,bl->klc", Tt, Ua, Ub, optimize=True)
    w1, w2 = rng.standard_normal(Tt.shape[2]), rng.standard_normal(Tt.shape[2])
    M1, M2 = Tc @ w1, Tc @ w2
    try:
        M2inv = np.linalg.inv(M2)
        ea, Ea = np.linalg.eig(M1 @ M2inv)
        eb, Eb = np.linalg.eig(M1.T @ M2inv.T)
    except np.linalg.LinAlgError:
        return None
    if not (np.all(np.isfinite(ea)) and np.all(np.isfinite(eb))):
        return None
    ia = np.lexsort((ea.imag, ea.real))
    ib = np.lexsort((eb.imag, eb.real))
    Fa = Ua @ Ea[:, ia].real
    Fb = Ub @ Eb[:, ib].real
    Fc = _solve_gram(np.einsum("abc,ak,bk->ck", Tt, Fa, Fb, optimize=True), (Fa.T @ Fa) * (Fb.T @ Fb))
    out: list[np.ndarray] = [np.empty(0)] * 3
    out[a], out[b], out[c] = Fa, Fb, Fc
    return out


def _cp(T: np.ndarray, K: int, rng: np.random.Generator
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``K`` CP of ``T: (Fo, Ci, P)``: ``A: (Fo, K)``, ``B: (Ci, K)``, ``S: (P, K)``."""
    nt = float(np.linalg.norm(T))
    if nt == 0.0:
        return np.zeros((T.shape[0], K)), np.zeros((T.shape[1], K)), np.zeros((T.shape[2], K))
    best: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None
    for start in (_gevd_start, _hosvd_start):
        init = start(T, K, rng)
        if init is None:
            continue
        cand = _als(T, *init, max_iter=_ALS_TRIAL_ITER)
        if np.all(np.isfinite(cand[0])) and (best is None or cand[3] < best[3]):
            best = cand
        if best is not None and best[3] <= 1e-12 * nt:
            break
    assert best is not None
    if best[3] > 1e-12 * nt:  # only the more promising start is run to convergence
        best = _als(T, best[0], best[1], best[2], max_iter=_ALS_MAX_ITER)
    return best[0], best[1], best[2]


def bicluster(w: np.ndarray, n_in_groups: int, n_out_groups: int, mode: str = "svd",
              ranks: tuple[int, int] | None = None, rank: int | None = None,
              sigma: np.ndarray | None = None, seed: int = 0, *, n_init: int = 4,
              max_iter: int = 50) -> Bicluster:
    """Biclustering approximation (Denton 3.3) of a conv, factors in standard-op layout.

    Clustering first makes each block hold similar channels, so a low rank per block fits
    better than the same total rank over the whole tensor; the equal group sizes are what
    let the blocks run as grouped convs. ``mode="svd"`` takes ``ranks=(K1, K2)`` with
    ``1 <= K1 <= C/G`` and ``1 <= K2 <= F/H``; ``mode="cp"`` takes ``rank=K >= 1``.
    ``sigma`` (``C x C`` channel or ``C*kh*kw`` square patch covariance of the layer
    input) switches to the data metric (module docstring). ``seed``, ``n_init`` and
    ``max_iter`` go to the balanced k-means (and seed the CP starts).
    """
    w = _as_weight(w)
    F, C, kh, kw = w.shape
    P = kh * kw
    G, Hg = n_in_groups, n_out_groups
    _check_groups(C, F, G, Hg)
    Cg, Fh = C // G, F // Hg
    if mode == "svd":
        if rank is not None or ranks is None or len(ranks) != 2:
            raise ValueError("mode='svd' takes ranks=(K1, K2) and no rank")
        K1, K2 = int(ranks[0]), int(ranks[1])
        if not (1 <= K1 <= Cg and 1 <= K2 <= Fh):
            raise ValueError(f"svd ranks must satisfy 1 <= K1 <= C/G={Cg} and "
                             f"1 <= K2 <= F/H={Fh}, got ({K1}, {K2})")
    elif mode == "cp":
        if ranks is not None or rank is None:
            raise ValueError("mode='cp' takes rank=K and no ranks")
        K1 = K2 = int(rank)
        if K1 < 1:
            raise ValueError(f"cp rank must be >= 1, got {rank}")
    else:
        raise ValueError(f"unknown bicluster mode {mode!r}; expected 'svd' or 'cp'")
    sig_c = _channel_covariance(sigma, C, P)

    in_labels = balanced_kmeans(w.transpose(1, 2, 3, 0).reshape(C, P * F), G,
                                metric="euclidean", n_init=n_init, max_iter=max_iter,
                                seed=seed).labels
    out_labels = balanced_kmeans(w.reshape(F, C * P), Hg, metric="euclidean",
                                 n_init=n_init, max_iter=max_iter, seed=seed).labels
    in_perm = np.argsort(in_labels, kind="stable")
    out_order = np.argsort(out_labels, kind="stable")

    rng = np.random.default_rng(seed)
    Wg = w[np.ix_(out_order, in_perm)].reshape(F, C, P)  # group-ordered, (F, C, P)
    stage1 = np.zeros((G * Hg * K1, Cg, 1, 1))
    stage2 = np.zeros((Hg * G * K2, K1 if mode == "svd" else 1, kh, kw))
    stage3 = np.zeros((F, G * K2, 1, 1))
    for g in range(G):
        cin = slice(g * Cg, (g + 1) * Cg)
        if sig_c is not None:
            idx = in_perm[cin]
            half, inv_half = _whitener(sig_c[np.ix_(idx, idx)])
        for h in range(Hg):
            T = Wg[h * Fh:(h + 1) * Fh, cin]                      # (Fh, Cg, P)
            if sig_c is not None:
                T = np.einsum("fcp,cd->fdp", T, half, optimize=True)             # whiten the input mode
            s1 = slice((g * Hg + h) * K1, (g * Hg + h + 1) * K1)
            s2 = slice((h * G + g) * K2, (h * G + g + 1) * K2)
            s3 = (slice(h * Fh, (h + 1) * Fh), slice(g * K2, (g + 1) * K2))
            if mode == "svd":
                A, core, B = _tucker2(T, K1, K2)                  # core (K2, K1, P)
                stage2[s2] = core.reshape(K2, K1, kh, kw)
            else:
                A, B, S = _cp(T, K1, rng)                         # S (P, K)
                stage2[s2] = S.T.reshape(K1, 1, kh, kw)
            if sig_c is not None:
                B = inv_half @ B                                  # un-whiten the input factor
            stage1[s1] = B.T.reshape(K1, Cg, 1, 1)
            stage3[s3[0], s3[1], 0, 0] = A
    res = Bicluster(
        mode=mode, n_in_groups=G, n_out_groups=Hg, ranks=(K1, K2), in_perm=in_perm,
        stage1=stage1, stage2=stage2, stage3=stage3, out_order=out_order,
        out_inverse=np.argsort(out_order, kind="stable"), in_labels=in_labels,
        out_labels=out_labels, rel_error=float("nan"),
    )
    D = w - res.reconstruct()  # measured on the stage weights themselves, as exported
    return replace(res, rel_error=_rel(_data_error(D, sigma), _data_error(w, sigma)))


# ---- data metric for the monochromatic approximation ------------------------------------



def _sqrt_psd(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S^{1/2}, S^{-1/2})`` with eigenvalues floored at ``1e-8 * max`` (as in decompose.denton)."""
    vals, vecs = np.linalg.eigh(0.5 * (S + S.T))
    top = float(vals.max()) if vals.size else 0.0
    if top <= 0.0:
        n = S.shape[0]
        return np.eye(n), np.eye(n)
    vals = np.maximum(vals, 1e-8 * top)
    r = np.sqrt(vals)
    return (vecs * r) @ vecs.T, (vecs / r) @ vecs.T


def mono_data(w: np.ndarray, n_colors: int, sigma: np.ndarray, seed: int = 0) -> Mono:
    """Monochromatic factors in the data metric (module docstring): whiten, cluster, refit.

    ``sigma`` is the patch second moment ``(C*P, C*P)`` (index ``c*P + p``) of the layer input.
    """
    w = np.asarray(w, dtype=np.float64)
    F, C, kh, kw = w.shape
    P = kh * kw
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.shape != (C * P, C * P):
        raise ValueError(f"patch covariance must be ({C * P}, {C * P}), got {sig.shape}")
    sig_c = np.einsum("apbp->ab", sig.reshape(C, P, C, P)) / P
    half, inv_half = _sqrt_psd(sig_c)
    white = monochromatic(np.einsum("dc,fcij->fdij", half, w, optimize=True), n_colors, seed=seed)
    proj = inv_half @ white.projection[:, :, 0, 0].T  # (C, C'): column c is the colour of cluster c
    proj = proj.T  # (C', C)
    labels = white.labels
    Wm = w.reshape(F, C * P)
    spatial = np.empty((F, P))
    eye = np.eye(P)
    for f in range(F):
        A = np.kron(proj[labels[f]].reshape(C, 1), eye)  # (C*P, P): vec(U b^T) = A b
        SA = sig @ A
        M = A.T @ SA
        rhs = SA.T @ Wm[f]
        try:
            spatial[f] = np.linalg.solve(M + 1e-12 * np.trace(M) / P * eye, rhs)
        except np.linalg.LinAlgError:
            spatial[f] = np.linalg.lstsq(M, rhs, rcond=None)[0]
    W_hat = np.einsum("fc,fp->fcp", proj[labels], spatial).reshape(F, C * P)
    D = Wm - W_hat
    err = _rel(float(np.einsum("fi,ij,fj->", D, sig, D, optimize=True)), float(np.einsum("fi,ij,fj->", Wm, sig, Wm)))
    return replace(white, projection=proj.reshape(n_colors, C, 1, 1).copy(),
                   grouped=spatial[white.order].reshape(F, 1, kh, kw).copy(), rel_error=err)
