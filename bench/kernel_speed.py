"""Each fused kernel beside its torch reference at the sizes it serves, in one process.

For every op the torch backend (what ``kernels: torch`` runs) and the Triton kernel run on the
same tensors: once each (the warm-up, whose outputs are compared), then ``--rounds`` rounds that
time a block of calls of each backend back to back, in an order rotated by the round
(``diffcache.eval.timing``; CUDA synchronised around each block). The table prints both median
times, their paired ratio (torch / triton in the same round: above 1 the kernel is faster) as
the median and its spread (lowest-highest over the rounds), the kernel's effective bandwidth
(the bytes it must read and write over its median time: compare with the device's peak, e.g.
about 4.8 TB/s on an H200) and the largest difference between the two outputs (equal
infinities agree). One more line times what a user sees in the text samplers: LLaDA's
low-confidence candidates through the references' float64 softmax against the fused statistics.

Sizes (default, for a GPU): Wan2.1-1.3B at 480x832 and 81 frames (latents 16x21x60x104,
32,760 tokens of width 1536) for the DiT ops; LLaDA-8B (32 heads of 128, a 1,280-token sequence,
a 32-token block, the 126,464-token vocabulary) for the text ops; Infinity-2B's last scale (CFG
batch 2, 16 heads of 128, 6,425 history rows + the 64x64 map, float32 keys) for the VAR KV ops;
bfloat16 data, float32 cached residuals as the methods keep them. ``--small`` shrinks every
size so that the Triton interpreter can run the table on a CPU in seconds (set on CPU machines
before the kernels are defined); interpreter times say nothing about speed, only that the path
works. ``--ops`` times only the named ops. Nothing is asserted.

    python bench/kernel_speed.py                  # on a CUDA machine
    python bench/kernel_speed.py --small          # anywhere: a smoke run
    python bench/kernel_speed.py --ops kv_compact,window_scores
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

if not torch.cuda.is_available():  # the interpreter reads this when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from arg_types import listed, positive, positive_seconds  # noqa: E402

from diffcache import kernels  # noqa: E402
from diffcache.errors import KernelUnavailableError  # noqa: E402
from diffcache.eval.timing import paired_speedups, rotated, summary, timed  # noqa: E402


@dataclass
class Case:
    """One op on fixed tensors: ``run(backend)`` returns its output; ``nbytes`` is the least
    traffic the op needs (inputs read once, output written once)."""

    op: str
    where: str
    run: Callable[[str], Any]
    nbytes: int


def _bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cases(small: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The ops at Wan2.1-1.3B and LLaDA-8B sizes (``small``: a few thousand elements each)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device).to(dt)

    latent = (1, 4, 2, 6, 8) if small else (1, 16, 21, 60, 104)
    tokens, width = (96, 64) if small else (32760, 1536)
    heads, seq, block, hd = (4, 80, 16, 32) if small else (32, 1280, 32, 128)
    vocab = 3000 if small else 126464
    f32 = torch.float32

    x, x_prev, r = randn(*latent), randn(*latent), randn(*latent, dt=f32)
    scale, shift = randn(latent[1], dt=f32), randn(latent[1], dt=f32)
    h = randn(1, tokens, width)
    history = randn(3, 1, tokens, width, dt=f32)
    weights = randn(3, width, dt=f32)
    values = [randn(1, tokens, width) for _ in range(3)]
    gates = [randn(1, 1, width), None, randn(1, 1, width)]
    store = randn(1, heads, seq, hd)
    rows = torch.randperm(seq, generator=g, device=device)[:block].sort().values[None]
    kv = randn(1, heads, block, hd)
    # Infinity-2B at 1024x1024: CFG batch 2, 16 heads of 128, 6,425 history rows + the 64x64
    # map; fp32 keys (cosine attention) beside 16-bit values; ScaleKV keeps about 10%
    var_b, var_h, var_old, var_new, var_d = (
        (2, 2, 40, 64, 32) if small else (2, 16, 6425, 4096, 128)
    )
    hist_k = randn(var_b, var_h, var_old, var_d, dt=f32)
    new_k = randn(var_b, var_h, var_new, var_d, dt=f32)
    hist_v, new_v = randn(var_b, var_h, var_old, var_d), randn(var_b, var_h, var_new, var_d)
    var_total = var_old + var_new
    var_m = var_total // 10
    scores = torch.rand(var_b, var_h, var_total, generator=g, device=device)
    keep = scores.argsort(dim=-1)[..., :var_m].sort(dim=-1).values  # a random subset per head
    # the scale's 16 window queries (bf16, as the model projects them; picked from the new map's
    # queries) score every fp32 key; the window: the 4x4 patch centroids of the new map
    # (research/var.md §2.1.3)
    side = round(var_new**0.5)
    axis = torch.arange(4, device=device) * (side // 4) + (side // 4 - 1) // 2
    window = var_old + (axis[:, None] * side + axis[None, :]).flatten()
    var_q = randn(var_b, var_h, var_new, var_d)
    var_keys = torch.cat((hist_k, new_k), dim=2)
    win_scale = var_d**-0.5
    infinity = f"Infinity-2B: {var_b}x{var_h} heads, {var_old} + {var_new} rows of {var_d}"
    kept_rows = var_b * var_h * var_m * var_d * (hist_k.element_size() + hist_v.element_size())
    logits = (4 * randn(block, vocab, dt=f32)).to(dtype)
    wan = f"latents {'x'.join(map(str, latent))}"
    hidden = f"hidden {tokens}x{width}"
    llada = f"K or V {heads} heads x {seq} x {hd}, {block} rows"

    stores = {b: store.clone() for b in ("torch", "triton")}  # in place, the same rows each time

    def scatter(backend: str) -> torch.Tensor:
        kernels.kv_scatter(stores[backend], rows, kv, backend=backend)
        return stores[backend]

    def sampler(backend: str) -> Any:
        from diffcache.pipelines.sampling.llada import llada_candidates

        ids = dict(eos_id=vocab - 2, eot_id=vocab - 1)  # LLaDA's are 126081 and 126348
        return llada_candidates(logits[None], 0.0, "low_confidence", backend=backend, **ids)

    out_h = _bytes(h)
    return [
        Case("l1_change", f"EasyCache: {wan}", lambda b: kernels.l1_change(x, x_prev, b),
             _bytes(x, x_prev)),
        Case("add_residual", f"EasyCache: {wan}", lambda b: kernels.add_residual(
            x, r, backend=b), _bytes(x, r, x)),
        Case("rectified_residual", f"ERTACache: {wan}", lambda b: kernels.rectified_residual(
            x, r, scale, shift, 1, backend=b), _bytes(x, r, x)),
        Case("forecast", f"HyCa: {hidden}, 3 past residuals", lambda b: kernels.forecast(
            h, history, weights, backend=b), _bytes(h, history) + out_h),
        Case("gated_apply", f"InvarDiff: {hidden}, 3 terms", lambda b: kernels.gated_apply(
            h, values, gates, backend=b), _bytes(h, *values) + out_h),
        Case("kv_gather", llada, lambda b: kernels.kv_gather(store, rows, backend=b),
             2 * _bytes(kv)),
        Case("kv_scatter", llada, scatter, 2 * _bytes(kv)),
        Case("kv_compact", f"{infinity}, keep {var_m}, K fp32", lambda b: kernels.kv_compact(
            hist_k, hist_v, new_k, new_v, keep, backend=b), 2 * kept_rows + _bytes(keep)),
        Case("window_scores", f"ScaleKV released (logits, max 5): {infinity}",
             lambda b: kernels.window_scores(var_q, var_keys, window, win_scale, backend=b),
             _bytes(var_q[:, :, :16], var_keys, window) + 4 * var_keys[..., 0].numel()),
        Case("window_scores softmax", f"ScaleKV paper (softmax, avg 5): {infinity}",
             lambda b: kernels.window_scores(var_q, var_keys, window, win_scale, True, "avg",
                                             backend=b),
             _bytes(var_q[:, :, :16], var_keys, window) + 4 * var_keys[..., 0].numel()),
        Case("token_confidence", f"logits {block} x {vocab}",
             lambda b: kernels.token_confidence(logits, backend=b), _bytes(logits)),
        Case("sampler (float64 -> fused)", f"LLaDA low_confidence, {block} x {vocab}",
             sampler, _bytes(logits)),
    ]  # fmt: skip


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference over the outputs' tensors (ids compare as numbers)."""
    pairs = zip(_tensors(a), _tensors(b), strict=True)
    return max(float(_diff(s, t).abs().max()) if s.numel() else 0.0 for s, t in pairs)


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` in float64, 0 where they are equal (equal infinities agree)."""
    return torch.where(a == b, 0.0, a.double() - b.double())


def paired_seconds(
    run: Callable[[str], Any], device: torch.device, min_time: float, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each backend in each of ``rounds`` rounds: a round times a block of
    calls of each backend back to back, in an order rotated by the round (``run`` was called
    once per backend before: the warm-up), so that drifting load hits both alike."""
    backends = ("torch", "triton")
    once = max(timed(lambda b=b: run(b), device)[1] for b in backends)
    calls = max(1, math.ceil(min_time / rounds / max(once, 1e-9)))
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(rounds):
        for b in rotated(backends, i):
            times[b].append(timed(lambda b=b: [run(b) for _ in range(calls)], device)[1] / calls)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="smoke sizes (the interpreter on a CPU)")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"],
        help="data dtype (default: bfloat16 on CUDA; float32 elsewhere, as the interpreter needs)",
    )  # fmt: skip
    p.add_argument(
        "--min-time", type=positive_seconds, default=0.5, help="seconds of timing per backend"
    )
    p.add_argument("--rounds", type=positive, default=9, help="interleaved timed rounds per op")
    p.add_argument(
        "--ops", type=listed(str), default=[],
        help="comma-separated ops to time (e.g. kv_compact,window_scores; default: all)",
    )  # fmt: skip
    args = p.parse_args(argv)
    known = {spec.name for spec in kernels.ops()}
    if unknown := [op for op in args.ops if op not in known]:
        p.error(f"--ops: not a kernel op: {', '.join(unknown)} (ops: {', '.join(sorted(known))})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {args.dtype}"
        + (" | Triton interpreter: times are not speeds" if interp else "")
    )
    cols = f"{'torch us':>10} {'triton us':>10} {'ratio':>6} {'spread':>11} {'GB/s':>7}"
    print(f"{'op':<27} {cols} {'max|diff|':>9}  size")
    rows = []
    for case in cases(args.small, device, dtype):
        if args.ops and case.op.split()[0] not in args.ops:
            continue
        try:
            want, got = case.run("torch"), case.run("triton")
        except KernelUnavailableError as e:
            reasons = [line.strip(" -") for line in str(e).splitlines() if line.startswith("  - ")]
            print(f"{case.op:<27} n/a: {'; '.join(dict.fromkeys(reasons)) or e}")
            continue
        times = paired_seconds(case.run, device, args.min_time, args.rounds)
        t_ref, t_ker = statistics.median(times["torch"]), statistics.median(times["triton"])
        ratio, lo, hi = summary(paired_speedups(times["torch"], times["triton"]))
        row = dict(op=case.op, torch_s=t_ref, triton_s=t_ker, ratio=ratio, ratio_lo=lo,
                   ratio_hi=hi, gbps=case.nbytes / t_ker / 1e9,
                   max_diff=max_diff(want, got))  # fmt: skip
        rows.append(row)
        print(
            f"{case.op:<27} {t_ref * 1e6:10.1f} {t_ker * 1e6:10.1f} {ratio:6.2f} "
            f"{f'{lo:.2f}-{hi:.2f}':>11} {row['gbps']:7.1f} {row['max_diff']:9.2e}  {case.where}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
