"""``bench/kernel_speed.py --small`` runs every kernel beside its torch backend (the interpreter
on a CPU) and their outputs agree: the GPU script's kernel part cannot rot unnoticed."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from diffcache.kernels import _dispatch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_speed.py"


@pytest.mark.skipif(_dispatch.triton_status() != [], reason="triton cannot run here")
def test_small_table_covers_every_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as `python bench/kernel_speed.py` has it
    rows = runpy.run_path(str(BENCH))["main"](["--small", "--min-time", "0.001", "--rounds", "2"])
    ops = {r["op"] for r in rows}
    assert {spec.name for spec in _dispatch.ops()} <= ops  # every registered kernel is timed
    assert "sampler (float64 -> fused)" in ops
    for r in rows:
        assert r["torch_s"] > 0 and r["triton_s"] > 0, r
        assert r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"], r
        assert r["max_diff"] <= 1e-5, r  # float32 data: the kernels match their references


@pytest.mark.skipif(_dispatch.triton_status() != [], reason="triton cannot run here")
def test_ops_picks_rows_and_refuses_unknown_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    main = runpy.run_path(str(BENCH))["main"]
    rows = main(["--small", "--min-time", "0.001", "--rounds", "1", "--ops", "kv_compact"])
    assert [r["op"] for r in rows] == ["kv_compact"]
    with pytest.raises(SystemExit) as info:
        main(["--small", "--ops", "kv_compact,kv_compat"])
    assert info.value.code == 2
    assert "--ops: not a kernel op: kv_compat (ops: " in capsys.readouterr().err
