"""Re-implementations of the public reference code, used only as the benchmark's baseline.

They follow the algorithms and the memory behaviour (temporaries, explicit inverse) of:

- SparseGPT: IST-DASLab/sparsegpt ``sparsegpt.py`` (``SparseGPT.add_batch`` and
  ``fasterprune``), as vendored by the Wanda and ADMM repositories;
- Wanda: locuslab/wanda ``lib/layerwrapper.py`` (``WrappedGPT.add_batch``) and the
  unstructured/N:M branch of ``lib/prune.py``;
- ADMM / ADMM-Grad: fmfi-compbio/admm-pruning ``lib/admm.py`` (``AdmmPruner``), Boza 2024,
  "Fast and Effective Weight Update for Pruned Large Language Models", with the defaults
  its ``prune_admm`` uses (``percdamp=0.1``, ``iterative_prune=15``, ``iters=20``,
  whole-matrix selection).

Their known defects are kept on purpose (a baseline must behave as published): SparseGPT
and magnitude threshold with ``<=`` (ties and one extra weight pruned), ADMM's default
branch re-selects at the *final* sparsity in every gradual step instead of ``s_t``, its
N:M branch is hard-wired to 2:4 and thresholds with ``>=``. Printing and the
``nn.Module`` plumbing are left out. Topiary's own methods are in ``modules/``.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- statistics


def ref_sparsegpt_hessian(batches: list[torch.Tensor]) -> torch.Tensor:
    """``H`` as ``SparseGPT.add_batch`` builds it: running mean of ``2 x x^T`` per sample."""
    cols = batches[0].shape[-1]
    H = torch.zeros(cols, cols)
    nsamples = 0
    for inp in batches:
        inp = inp.reshape(-1, cols).t()
        H *= nsamples / (nsamples + 1)
        nsamples += 1
        inp = math.sqrt(2 / nsamples) * inp.float()
        H += inp.matmul(inp.t())
    return H


def ref_admm_gram(batches: list[torch.Tensor]) -> torch.Tensor:
    """``XX`` as ``AdmmPruner.add_batch`` builds it: ``sum x^T x``."""
    cols = batches[0].shape[-1]
    XX = torch.zeros(cols, cols)
    for inp in batches:
        X = inp.reshape(-1, cols).float()
        XX += X.T.matmul(X)
    return XX


def ref_wanda_scaler(batches: list[torch.Tensor]) -> torch.Tensor:
    """``scaler_row`` as ``WrappedGPT.add_batch`` builds it: running mean of ``||x_j||^2``."""
    cols = batches[0].shape[-1]
    scaler = torch.zeros(cols)
    nsamples = 0
    for inp in batches:
        inp = inp.reshape(-1, cols).t()
        scaler *= nsamples / (nsamples + 1)
        nsamples += 1
        inp = inp.type(torch.float32)
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    return scaler


# ----------------------------------------------------------------------------- pruning


@torch.no_grad()
def ref_magnitude(W: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Wanda repository's ``prune_magnitude``: whole-matrix ``<=`` threshold, or N:M loop."""
    W = W.clone()
    W_metric = torch.abs(W)
    if prune_n != 0:
        W_mask = torch.zeros_like(W) == 1
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity)]
        W_mask = W_metric <= thresh
    W[W_mask] = 0
    return W


@torch.no_grad()
def ref_wanda(
    W: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Wanda repository's ``prune_wanda`` for one linear (no alpha variant)."""
    W = W.clone()
    W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
        W_mask.scatter_(1, indices, True)
    W[W_mask] = 0
    return W


@torch.no_grad()
def ref_sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """``SparseGPT.fasterprune`` (no quantiser): Cholesky, full inverse, Cholesky again, then
    the column loop with one rank-1 update per column over the rest of the block.

    ``H`` is consumed (modified in place), as in the reference.
    """
    W = W.clone().float()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    mask = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                hd = torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))
                tmp = W1[:, i : (i + prunem)] ** 2 / hd**2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@torch.no_grad()
def ref_admm(
    W: torch.Tensor,
    XX: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    percdamp: float = 0.1,
    iterative_prune: int = 15,
    iters: int = 20,
    per_out: bool = False,
) -> torch.Tensor:
    """``AdmmPruner.fasterprune``: normalise, dampen, explicit ``torch.inverse``, ADMM loop.

    ``iterative_prune=15`` (the default of ``prune_admm``) is ADMM-Grad as published;
    ``iterative_prune=0`` with a mask is not offered by the reference (it selects by
    ``|W|`` in the normalised space, i.e. Wanda's score, whole-matrix unless ``per_out``).
    """
    norm = torch.diag(XX).sqrt() + 1e-8
    XX = XX / norm
    XX = (XX.T / norm).T
    W = (W.float().detach() * norm).T
    rho0 = percdamp * torch.diag(XX).mean()
    diag = torch.arange(XX.shape[0], device=XX.device)
    XX[diag, diag] += rho0
    mask = None
    if iterative_prune == 0:
        if prune_n != 0:
            WT = W.T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
            mask = torch.zeros_like(WT)
            sort_inds = WT.sort(dim=1)[1]
            mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
            mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
            mask = mask.reshape(W.T.shape).T
        elif per_out:
            thres = (W).abs().sort(dim=0)[0][int(W.shape[0] * sparsity)]
            mask = (W).abs() >= thres.unsqueeze(0)
            del thres
        else:
            topk = torch.topk(W.abs().flatten(), k=int(W.numel() * sparsity), largest=False)
            mask = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
            mask[topk.indices] = 0
            mask = mask.reshape(W.shape)
            del topk
    if iters == 0:
        Z = (W) * mask
        return (Z.T / norm).contiguous()
    rho = 1
    XY = XX.matmul(W)
    XX[diag, diag] += rho
    XXinv = torch.inverse(XX)
    del XX
    U = torch.zeros_like(W)
    for itt in range(iters):
        if iterative_prune > 0 and itt < iterative_prune:
            if prune_n != 0:
                sparsity = 0.5
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                WT = (W + U).T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
                mask = torch.zeros(WT.shape, dtype=torch.bool)
                sort_inds = WT.sort(dim=1)[1]
                mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
                mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
                mask = mask.reshape(W.T.shape).T
                Z2 = (W + U).abs()
                Z2[mask] = torch.inf
                thres = Z2.flatten().kthvalue(int(W.numel() * cur_sparsity) + 1)[0]
                mask = Z2 >= thres
                del thres
            else:
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                if per_out:
                    thres = (W + U).abs().sort(dim=0)[0][int(W.shape[0] * cur_sparsity)]
                    mask = (W + U).abs() >= thres.unsqueeze(0)
                    del thres
                else:
                    topk = torch.topk((W + U).abs().flatten(), k=int(W.numel() * sparsity), largest=False)
                    mask = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
                    mask[topk.indices] = 0
                    mask = mask.reshape(W.shape)
                    del topk
        Z = (W + U) * mask
        U = U + (W - Z)
        W = XXinv.matmul(XY + rho * (Z - U))
    Z = (W + U) * mask
    return (Z.T / norm).contiguous()
