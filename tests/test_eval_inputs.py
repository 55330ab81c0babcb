"""Evaluation inputs and comparisons: prompt files (with answers), diffusers' caches beside our
plans in one report, and task scores from a model's scorer for the baseline and every run."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from diffusers import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from diffcache.cli import main, read_prompts
from diffcache.errors import DiffCacheError
from diffcache.eval.baselines import OPTIONS, _options, comparison
from diffcache.eval.runner import evaluate
from diffcache.generate import Request
from diffcache.models import ModelEntry, builtin_models, register_model
from diffcache.plan import Plan
from diffcache.testing.toys import unexplained_nulls

if "dit-scored" not in builtin_models():  # dit-tiny with a scorer: bright images "are right"
    register_model(
        ModelEntry(
            name="dit-scored",
            family="dit",
            builder="diffcache.pipelines.dit:build_tiny",
            description="dit-tiny with a toy scorer (tests)",
            defaults={"class_label": 1, "steps": 6, "guidance": 4.0},
            scorer="diffcache.testing.toys:bright",
            prompts=("1", "2", "3"),
        )
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "has no prompts"),
        ("\n  \n", "has no prompts"),
        ("a cat\tcat\na dog\n", "1 of 2 prompts have an answer"),
        ("a cat\tcat\textra\n", r"p.txt:1: expected 'prompt' or 'prompt<TAB>answer'"),
        ("\tanswer\n", "p.txt:1: expected"),
        ("a cat\t \n", "p.txt:1: expected"),
    ],
    ids=["empty", "blank", "some-answers", "two-tabs", "no-prompt", "empty-answer"],
)
def test_bad_prompt_files(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "p.txt").write_text(text)
    with pytest.raises(DiffCacheError, match=match):
        read_prompts(tmp_path / "p.txt")


def test_prompt_files_with_answers(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.txt").write_text("2+2\t4\n\n3+3\t6\n")
    assert read_prompts(tmp_path / "p.txt") == (["2+2", "3+3"], ["4", "6"])
    argv = ["eval", "--model", "dit-tiny", "--plan", "dit-tiny.yaml", "--prompts"]
    assert main([*argv, str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "only text models are checked against" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_diffusers_specs() -> None:
    with pytest.raises(DiffCacheError, match=r"unknown diffusers cache 'fbcahce'.*fbcache"):
        comparison("diffusers:fbcahce")
    with pytest.raises(DiffCacheError, match="expected key=value"):
        comparison("diffusers:fbcache:threshold")
    with pytest.raises(DiffCacheError, match=r"treshold: fbcache has no such option \(did you"):
        comparison("diffusers:fbcache:treshold=0.1")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fbcache:threshold=abc", r"threshold: expected float, got str 'abc'"),
        ("fbcache:threshold=-1", r"threshold: must be >= 0, got -1.0"),
        ("taylorseer:cache_interval=0", r"cache_interval: must be >= 1, got 0"),
        ("taylorseer:cache_interval=1.5", r"cache_interval: expected int, got float 1.5"),
        ("taylorseer:disable_cache_before_step=0", r"disable_cache_before_step: must be >= 1"),
        ("pab:cross_attention_block_skip_range=0", r"cross_attention_block_skip_range: must be >="),
        (
            "pab:spatial_attention_timestep_skip_range=[1]",
            r"spatial_attention_timestep_skip_range: expected a list of 2",
        ),
        ("magcache:mag_ratios=[1.0, -0.5]", r"mag_ratios\[1\]: must be >= 0, got -0.5"),
        ("magcache:retention_ratio=2,calibrate=true", r"retention_ratio: must be <= 1, got 2.0"),
    ],
)
def test_diffusers_cache_options_are_checked_when_parsed(spec: str, match: str, capsys) -> None:
    """Types and ranges of diffusers' cache options are refused at the spec, before any model
    is built (they crashed after the baseline run, or were accepted)."""
    with pytest.raises(DiffCacheError, match=rf"^--plan diffusers:{re.escape(spec)}: {match}"):
        comparison(f"diffusers:{spec}")
    argv = ["eval", "--model", "no-such-model", "--plan", f"diffusers:{spec}", "--out", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffcache: error: --plan diffusers:{spec}: ") and err.count("\n") == 1


def test_diffusers_cache_options_are_fields_of_their_configs() -> None:
    """Every option a spec may set is a field of the diffusers config it builds, and the
    config's own default for it passes the check."""
    classes = {
        "fbcache": FirstBlockCacheConfig,
        "taylorseer": TaylorSeerCacheConfig,
        "pab": PyramidAttentionBroadcastConfig,
        "magcache": MagCacheConfig,
    }
    assert set(classes) == set(OPTIONS)
    for name, options in OPTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(classes[name])}
        assert set(options) <= set(fields), name
        defaults = {k: fields[k].default for k in options}
        assert _options(name, name, defaults) == defaults


def test_diffusers_caches_beside_our_plan(tmp_path: Path) -> None:
    report = evaluate(
        "flux-tiny",
        ["flux-tiny.yaml", "diffusers:fbcache:threshold=0.5"],
        tmp_path,
        prompts=["a cat"],
        request=Request(steps=20, height=64, width=64),
    )
    ours, theirs = report["runs"]
    assert theirs["method"] == "diffusers:fbcache" and theirs["compute_fraction"] is None
    assert "see macs_fraction" in report["notes"]["compute_fraction"]
    assert 0 < ours["compute_fraction"] < 1 and theirs["psnr"] is not None
    # Linear MACs counted in the warm-up runs: a skipped step runs no Linear at all, and
    # FirstBlockCache always runs the first block
    assert ours["macs_fraction"] == pytest.approx(ours["compute_fraction"])
    assert 0 < theirs["macs_fraction"] < 1
    assert not unexplained_nulls(report)


def test_diffusers_cache_on_dit_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr("diffcache.load_model", refuse)
    with pytest.raises(DiffCacheError, match=r"DiTTransformer2DModel \(dit-tiny\) has none"):
        evaluate("dit-tiny", ["diffusers:fbcache"], tmp_path / "x", prompts=["1"])


def test_pab_default_is_announced_once_per_eval(tmp_path: Path, caplog, capfd) -> None:
    """diffusers warns of PAB's default skip range at every attach (the check, the warm-up, each
    request); the comparison fills in that default and says so once."""
    report = evaluate(
        "wan2.1-tiny", ["diffusers:pab"], tmp_path, prompts=["a cat"], seeds=2,
        request=Request(steps=4),
    )  # fmt: skip
    assert report["runs"][0]["method"] == "diffusers:pab"
    ours = [r for r in caplog.records if "no attention skip range given" in r.getMessage()]
    assert len(ours) == 1 and "spatial_attention_block_skip_range=2" in ours[0].getMessage()
    assert "Pyramid Attention Broadcast requires" not in capfd.readouterr().err


def test_macs_counted_on_every_request(tmp_path: Path) -> None:
    """``macs="all"``: each record carries its own Linear MACs, and a run's fraction is the mean
    of its per-request fractions; for a step cache each equals the request's compute fraction."""
    plan = Plan.load("flux-tiny.yaml").to_dict()
    plan["options"] = {**plan["options"], "threshold": 0.8}  # reuses more on one prompt
    report = evaluate(
        "flux-tiny",
        [plan, "diffusers:fbcache:threshold=0.5"],
        tmp_path,
        prompts=["a cat", "a red fox running through fresh snow at dawn"],
        request=Request(steps=20, height=64, width=64),
        macs="all",
    )
    base = {r["request"]: r["macs"] for r in report["records"] if r["run"] == "baseline"}
    ours = [r for r in report["records"] if r["run"] == report["runs"][0]["plan"]]
    fractions = [r["macs"] / base[r["request"]] for r in ours]
    assert fractions[0] != fractions[1]  # the first request alone would misreport the run
    assert fractions == pytest.approx([r["compute_fraction"] for r in ours])
    assert report["runs"][0]["macs_fraction"] == pytest.approx(sum(fractions) / 2)
    assert all("macs" in r for r in report["records"])
    with pytest.raises(DiffCacheError, match="macs must be 'first' or 'all'"):
        evaluate("flux-tiny", [plan], tmp_path / "x", macs="every")


def test_task_scores_for_baseline_and_runs(tmp_path: Path) -> None:
    report = evaluate(
        "dit-scored",
        [
            {
                "diffcache": 1,
                "model": "dit",
                "method": "easycache",
                "options": {"threshold": 1e6, "warmup_steps": 2},
            }
        ],
        tmp_path,
        seeds=2,
    )
    records = report["records"]
    assert len(records) == 3 * 2 * 2 and {r["task_score"] for r in records} <= {0.0, 1.0}
    base = [r["task_score"] for r in records if r["run"] == "baseline"]
    assert report["baseline"]["task_score"] == pytest.approx(sum(base) / len(base))
    assert report["runs"][0]["task_score"] is not None and "task_score" not in report["notes"]
    page = (tmp_path / "report.html").read_text()
    assert page.count('class="sample"') == 2 * 4  # samples of the first 4 requests, 2 columns
    plain = evaluate("dit-tiny", ["dit-tiny.yaml"], tmp_path / "plain", prompts=["1"])
    assert plain["baseline"]["task_score"] is None
    assert "dit-tiny has no task scorer" in plain["notes"]["task_score"]


def test_magcache_needs_ratios_and_takes_them_as_a_list() -> None:
    with pytest.raises(DiffCacheError, match=r"mag_ratios.*magcache\(pipe, inputs, request\)"):
        comparison("diffusers:magcache:threshold=0.1")
    spec = "diffusers:magcache:num_inference_steps=3,mag_ratios=[1.0, 0.9, 0.8],threshold=0.1"
    assert comparison(spec).method == "diffusers:magcache"


def test_magcache_calibrated_on_the_model(tmp_path: Path) -> None:
    from diffcache.eval.baselines import magcache, magcache_ratios
    from diffcache.generate import generate
    from diffcache.models import load_model

    pipe = load_model("wan2.1-tiny")  # separate CFG: cond and uncond contexts both log ratios
    req = Request(steps=8, height=32, width=32).merged(builtin_models()["wan2.1-tiny"].defaults)
    ratios = magcache_ratios(pipe, ["a cat", "a dog"], req)
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(0 < r < 10 for r in ratios)
    assert not getattr(pipe.transformer, "is_cache_enabled", False)
    one = req.replace(prompt="a cat")
    base = generate(pipe, one)
    outs = {}
    for threshold in (0.0, 10.0):  # nothing / as much as max_skip_steps allows is skipped
        c = magcache(pipe, ["a cat", "a dog"], req, threshold=threshold)
        assert c.name == f"diffusers:magcache:threshold={threshold}"
        c.setup(pipe)
        try:
            outs[threshold] = generate(pipe, one)
        finally:
            c.teardown(pipe)
    assert np.array_equal(outs[0.0], base) and not np.array_equal(outs[10.0], base)
    report = evaluate("wan2.1-tiny", [c], tmp_path, prompts=["a cat"], request=req)
    assert report["runs"][0]["method"] == "diffusers:magcache"
    assert report["runs"][0]["psnr"] is not None
