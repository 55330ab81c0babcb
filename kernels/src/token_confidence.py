"""Fused per-token confidence statistics of the LM head's logits.

Text diffusion samplers turn each needed row of logits ``[N, V]`` into a few numbers: the argmax
token and its probability (LLaDA ``low_confidence``, Fast-dLLM thresholds, Dream ``maskgit_plus``),
the second-largest probability (Dream ``topk_margin`` = p1 - p2) and ``sum p log p`` (Dream
``entropy``). The references build a float64 softmax over the whole ``[N, V]`` for this. The
kernel reads each row once, tile by tile, with an online max / sum-exp / top-2 / ``sum p (x - m)``
accumulation in float32, and writes four numbers per row (research/dlm.md §6.3 item 1).

With ``m`` the running max, ``s = sum exp(x - m)`` and ``u = sum exp(x - m) (x - m)``, a new max
``m'`` rescales ``s' = a s`` and ``u' = a (u + (m - m') s)``, ``a = exp(m - m')``; at the end
``p1 = 1 / s``, ``p2 = exp(x2 - m) / s`` and ``sum p log p = u / s - log s``. Entries at ``-inf``
(e.g. LLaDA's ``logits_eos_inf``) have ``p = 0`` and add nothing (``0 log 0 = 0``).

Ties: the argmax is the **lowest** index among equal maxima, as ``torch.argmax`` documents (and
does on CPU and CUDA); tied maxima give ``p2 == p1`` (the second entry of a descending sort, as
Dream's ``topk_margin`` computes it). ``V == 1`` gives ``p2 = 0``. NaN logits give unspecified
results.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ._dispatch import FLOATS, Backend, OpSpec, _record, pick, register_op, tl, triton

SPEC = register_op(
    OpSpec(
        name="token_confidence",
        description="per-row argmax, p1, p2 and sum p log p over the vocab in one pass, fp32",
        dtypes=FLOATS,
    )
)

_MAX_BLOCK_V = 4096
# The reference works in float64 on at most this many elements at a time (64 MiB), so the CPU
# fallback never builds the full [N, V] float64 softmax the upstream samplers do.
_REF_CHUNK = 1 << 23


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(
            f"token_confidence: logits must be [N, V] with V >= 1, got shape {tuple(logits.shape)}"
        )
    if not logits.dtype.is_floating_point:
        raise ValueError(f"token_confidence: logits must be floating point, got {logits.dtype}")


def _ref_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.double()
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    logp = x - lse
    p = logp.exp()
    top1 = x.argmax(dim=1)
    p1 = p.gather(1, top1[:, None])[:, 0]
    if x.shape[1] >= 2:
        p2 = p.topk(2, dim=1).values[:, 1]
    else:
        p2 = torch.zeros_like(p1)
    neg_entropy = torch.where(p > 0, p * logp, 0.0).sum(dim=1)
    return top1, p1.float(), p2.float(), neg_entropy.float()


def token_confidence_ref(
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference (the oracle): softmax statistics computed in float64, cast to float32.

    Args:
        logits: ``[N, V]``, any float dtype.

    Returns:
        ``(top1_id, p1, p2, neg_entropy)``: int64 ``[N]`` argmax (lowest index on ties), and
        float32 ``[N]`` top-1 probability, second-largest probability and ``sum p log p``.

    Raises:
        ValueError: ``logits`` is not ``[N, V]`` floating point with ``V >= 1``.
    """
    _check(logits)
    n, v = logits.shape
    step = max(1, _REF_CHUNK // v)
    if n <= step:
        return _ref_rows(logits)
    parts = [_ref_rows(logits[i : i + step]) for i in range(0, n, step)]
    top1, p1, p2, ent = (torch.cat(cols) for cols in zip(*parts, strict=True))
    return top1, p1, p2, ent


if triton is not None:

    @triton.jit
    def _token_confidence_kernel(
        x_ptr,
        top1_ptr,
        p1_ptr,
        p2_ptr,
        ent_ptr,
        V,
        stride_n,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: online max, sum-exp, top-2 and sum p (x - m) over vocab tiles."""
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride_n
        lanes = tl.arange(0, BLOCK_V)
        neg_inf = float("-inf")
        m = tl.full((), neg_inf, tl.float32)  # running max == best value
        i1 = tl.full((), 0, tl.int64)  # its lowest index
        b2 = tl.full((), neg_inf, tl.float32)  # second-largest value (with multiplicity)
        s = tl.full((), 0.0, tl.float32)
        u = tl.full((), 0.0, tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=neg_inf).to(tl.float32)
            # tile top-2: the max, its lowest index, then the max with that one lane removed
            t1 = tl.max(x, axis=0)
            j1 = tl.min(tl.where(mask & (x == t1), offs, V), axis=0).to(tl.int64)
            t2 = tl.max(tl.where(offs == j1, neg_inf, x), axis=0)
            b2 = tl.maximum(tl.minimum(m, t1), tl.maximum(b2, t2))
            i1 = tl.where(t1 > m, j1, i1)  # ties keep the earlier tile's (lower) index
            m_new = tl.maximum(m, t1)
            # rescale the sums to the new max; guards: nothing seen yet, or an all -inf row
            alpha = tl.where(s > 0, tl.exp(m - m_new), 0.0)
            shift = tl.where(s > 0, m - m_new, 0.0)
            valid = mask & (x > neg_inf)  # masked lanes and -inf logits: p = 0, 0 log 0 = 0
            d = tl.where(valid, x - m_new, 0.0)
            e = tl.where(valid, tl.exp(d), 0.0)
            u = alpha * (u + shift * s) + tl.sum(e * d, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            m = m_new
        p1 = 1.0 / s
        p2 = tl.exp(b2 - m) / s
        tl.store(top1_ptr + row, i1)
        tl.store(p1_ptr + row, p1)
        tl.store(p2_ptr + row, p2)
        tl.store(ent_ptr + row, u / s - tl.log(s))


def _token_confidence_triton(
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, v = logits.shape
    dev = logits.device
    top1 = torch.empty(n, dtype=torch.int64, device=dev)
    p1, p2, ent = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
    if n == 0:
        return top1, p1, p2, ent
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = min(triton.next_power_of_2(v), _MAX_BLOCK_V)
    warps = 8 if block >= 2048 else 4
    _token_confidence_kernel[(n,)](
        logits, top1, p1, p2, ent, v, logits.stride(0), BLOCK_V=block, num_warps=warps
    )
    return top1, p1, p2, ent


def token_confidence(
    logits: torch.Tensor,
    backend: str | Backend = "auto",
    record: MutableMapping[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row confidence statistics of ``logits [N, V]`` in one pass, float32 accumulation.

    Args:
        logits: ``[N, V]`` (float32, float16 or bfloat16 for the Triton kernel); rows may be
            strided, the vocab axis is made unit-stride if it is not.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; see :mod:`diffcache.kernels`.
        record: Where to write ``record[op] = "torch" | "triton"``, the backend that ran.

    Returns:
        ``(top1_id, p1, p2, neg_entropy)`` on ``logits``' device: int64 ``[N]`` argmax (lowest
        index on ties), float32 ``[N]`` softmax probability of the argmax, second-largest
        probability (``p1 - p2`` is Dream's ``topk_margin``; equal to ``p1`` on a tie) and
        ``sum p log p`` (Dream's ``entropy`` confidence, <= 0).

    Raises:
        ValueError: ``logits`` is not ``[N, V]`` floating point with ``V >= 1``.
        KernelUnavailableError: ``backend="triton"`` cannot run on these inputs.
    """
    _check(logits)
    chosen = pick(SPEC, backend, logits)
    if chosen is Backend.TRITON:
        out = _token_confidence_triton(logits)
    else:
        out = token_confidence_ref(logits)
    _record(SPEC, chosen, record)
    return out
