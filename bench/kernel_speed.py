"""Each fused kernel beside its torch reference at the sizes it serves, in one process.

For every op the torch backend (what ``kernels: torch`` runs) and the Triton kernel run on the
same tensors; each is timed with ``torch.utils.benchmark`` (``blocked_autorange``, median, CUDA
synchronised) and the table prints both times, their ratio (torch / triton: above 1 the kernel
is faster), the kernel's effective bandwidth (the bytes it must read and write over its time:
compare with the device's peak, e.g. about 4.8 TB/s on an H200) and the largest difference
between the two outputs. One more line times what a user sees in the text samplers: LLaDA's
low-confidence candidates through the references' float64 softmax against the fused statistics.

Sizes (default, for a GPU): Wan2.1-1.3B at 480x832 and 81 frames (latents 16x21x60x104,
32,760 tokens of width 1536) for the DiT ops; LLaDA-8B (32 heads of 128, a 1,280-token sequence,
a 32-token block, the 126,464-token vocabulary) for the text ops; bfloat16 data, float32 cached
residuals as the methods keep them. ``--small`` shrinks every size so that the Triton
interpreter can run the table on a CPU in seconds (set on CPU machines before the kernels are
defined); interpreter times say nothing about speed, only that the path works. Nothing is
asserted.

    python bench/kernel_speed.py                  # on a CUDA machine
    python bench/kernel_speed.py --small          # anywhere: a smoke run
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

if not torch.cuda.is_available():  # the interpreter reads this when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from arg_types import positive_seconds  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from diffcache import kernels  # noqa: E402
from diffcache.errors import KernelUnavailableError  # noqa: E402


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
        (2, 2, 40, 24, 32) if small else (2, 16, 6425, 4096, 128)
    )
    hist_k = randn(var_b, var_h, var_old, var_d, dt=f32)
    new_k = randn(var_b, var_h, var_new, var_d, dt=f32)
    hist_v, new_v = randn(var_b, var_h, var_old, var_d), randn(var_b, var_h, var_new, var_d)
    var_total = var_old + var_new
    var_m = var_total // 10
    scores = torch.rand(var_b, var_h, var_total, generator=g, device=device)
    keep = scores.argsort(dim=-1)[..., :var_m].sort(dim=-1).values  # a random subset per head
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
    return max(float((s.double() - t.double()).abs().max()) if s.numel() else 0.0 for s, t in pairs)


def seconds(fn: Callable[[], Any], min_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark synchronises CUDA around its blocks)."""
    fn()  # compile / warm up outside the measurement
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_time).median


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
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {args.dtype}"
        + (" | Triton interpreter: times are not speeds" if interp else "")
    )
    cols = f"{'torch us':>10} {'triton us':>10} {'ratio':>6} {'GB/s':>7} {'max|diff|':>9}"
    print(f"{'op':<27} {cols}  size")
    rows = []
    for case in cases(args.small, device, dtype):
        try:
            want, got = case.run("torch"), case.run("triton")
        except KernelUnavailableError as e:
            reasons = [line.strip(" -") for line in str(e).splitlines() if line.startswith("  - ")]
            print(f"{case.op:<27} n/a: {'; '.join(dict.fromkeys(reasons)) or e}")
            continue
        t_ref = seconds(lambda c=case: c.run("torch"), args.min_time)
        t_ker = seconds(lambda c=case: c.run("triton"), args.min_time)
        row = dict(op=case.op, torch_s=t_ref, triton_s=t_ker, ratio=t_ref / t_ker,
                   gbps=case.nbytes / t_ker / 1e9, max_diff=max_diff(want, got))  # fmt: skip
        rows.append(row)
        print(
            f"{case.op:<27} {t_ref * 1e6:10.1f} {t_ker * 1e6:10.1f} {row['ratio']:6.2f} "
            f"{row['gbps']:7.1f} {row['max_diff']:9.2e}  {case.where}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
