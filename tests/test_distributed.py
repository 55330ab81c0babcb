"""Beyond one process: ``accelerate launch`` splits eval requests and profiling prompts across
2 CPU processes, and the merged results equal the single-process ones record for record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffcache import distributed
from diffcache.cli import main


@pytest.mark.parametrize(("world", "want"), [(None, 1), ("", 1), ("0", 1), ("1", 1), ("3", 3)])
def test_the_process_count_is_the_launchers_world_size(world, want, monkeypatch) -> None:
    """Unset, empty or 0 (no launcher): one process."""
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    assert distributed.size() == want


def test_each_process_takes_every_size_th_item_from_its_rank(monkeypatch) -> None:
    """Rank 1 of 2, then of 3 (accelerate's process index, faked): items 1, 3, 5, 7, then 1, 4,
    7 of 0..7; in one process the rank is 0 without asking accelerate, and the share is
    everything."""
    monkeypatch.setattr(distributed, "_state", lambda: SimpleNamespace(process_index=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.is_main()) == (1, False)
    assert distributed.shard(list(range(8))) == [1, 3, 5, 7]
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.shard(list(range(8))) == [1, 4, 7]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert (distributed.rank(), distributed.is_main()) == (0, True)
    assert distributed.shard(list(range(8))) == list(range(8))


def test_gather_hands_accelerate_a_list_of_this_process_object(monkeypatch) -> None:
    """gather_object concatenates every process's list in rank order; in one process gather
    is the object alone, without accelerate."""
    import accelerate.utils

    sent = []
    monkeypatch.setattr(distributed, "_state", lambda: None)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda x: sent.append(x) or [*x, "b"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.gather("a") == ["a"] and sent == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.gather("a") == ["a", "b"] and sent == [["a"]]


LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",  # accelerate's multi-process launcher; on CPU the processes use gloo
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "diffcache.cli",
]


def _launch(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([*LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"accelerate launch failed:\n{res.stdout}\n{res.stderr[-3000:]}"
    return res.stdout


def _without_timing(report: dict) -> dict:
    timing = {"latency_s", "speedup", "speedup_spread", "latency_repeats", "speedup_repeats"}
    report = {k: v for k, v in report.items() if k not in ("environment", "baseline")}
    report["notes"] = {k: v for k, v in report["notes"].items() if k != "speedup"}
    report["runs"] = [{k: v for k, v in r.items() if k not in timing} for r in report["runs"]]
    report["records"] = [{k: v for k, v in r.items() if k not in timing} for r in report["records"]]
    return report


@pytest.mark.parametrize(
    "macs",
    [pytest.param("first", marks=pytest.mark.slow), "all"],  # 20 s each: one by default
)
def test_two_process_eval_equals_one_process(tmp_path: Path, monkeypatch, macs: str) -> None:
    (tmp_path / "ids.txt").write_text("1\n2\n3\n")
    args = ["eval", "--model", "dit-tiny", "--plan", "dit-tiny.yaml", "--prompts", "ids.txt"]
    args += ["--seeds", "2", "--macs", macs]
    printed = _launch([*args, "--out", "two"], tmp_path)
    assert printed.count("wrote ") == 1, "only the main process reports"
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out", "one"]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    assert len(two["records"]) == 12 and [r["request"] for r in two["records"]][:4] == [0, 0, 1, 1]
    assert _without_timing(two) == _without_timing(one)
    assert all(("macs" in r) == (macs == "all") for r in two["records"])


def test_two_process_profile_writes_the_single_process_plan(tmp_path: Path, monkeypatch) -> None:
    args = ["profile", "--model", "dit-tiny", "--method", "easycache", "--num-prompts", "4"]
    args += ["--steps", "8", "--option", "warmup_steps=2", "--target-compute", "0.5"]
    _launch([*args, "--out", "two.yaml"], tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out", "one.yaml"]) == 0
    assert (tmp_path / "two.yaml").read_text() == (tmp_path / "one.yaml").read_text()
