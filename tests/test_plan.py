"""Plan: strict validation, did-you-mean, round trips, bundled plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffcache import Plan
from diffcache.errors import PlanError
from diffcache.profiles import bundled_plans
from diffcache.yamlio import dump_yaml, read_yaml

GOOD = {
    "diffcache": 1,
    "model": "wan2.1",
    "method": "easycache",
    "options": {"threshold": 0.05, "warmup_steps": 10},
    "valid_for": {"num_inference_steps": 50},
    "provenance": {"source": "test"},
}
#: a text family's runs have no scheduler (our own pipeline drives them)
TEXT_STEPS = {"num_inference_steps": 64, "scheduler": "DDIMScheduler"}


def test_load_dict_and_config() -> None:
    plan = Plan.load(GOOD)
    assert plan.config.threshold == 0.05 and plan.config.warmup_steps == 10
    assert plan.kernels == "auto"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({**GOOD, "optoins": {}}, r"optoins: unknown key \(did you mean 'options'\?\)"),
        (
            {**GOOD, "options": {"treshold": 0.1}},
            r"options.treshold: unknown key .*did you mean 'threshold'",
        ),
        ({**GOOD, "options": {"threshold": "high"}}, r"options.threshold: expected float, got str"),
        ({**GOOD, "options": {"warmup_steps": 2.5}}, r"options.warmup_steps: expected int"),
        ({**GOOD, "options": {"warmup_steps": True}}, r"options.warmup_steps: expected int"),
        ({**GOOD, "options": {"threshold": -0.1}}, r"options.threshold: must be >= 0.0"),
        ({**GOOD, "options": {"threshold": float("nan")}}, r"finite"),
        (
            {**GOOD, "method": "easycahce"},
            r"unknown method 'easycahce' \(did you mean 'easycache'\?\)",
        ),
        (
            {**GOOD, "diffcache": 2},
            r"^<dict>: diffcache: schema version 2 is not supported "
            r"\(this diffcache reads version 1\)\.$",
        ),
        ({k: v for k, v in GOOD.items() if k != "model"}, r"model: required key is missing"),
        (
            {**GOOD, "kernels": "cuda"},
            r"kernels: expected one of 'auto', 'torch', 'triton', got 'cuda'$",
        ),
        ({**GOOD, "valid_for": {"steps": 50}}, r"valid_for.steps: wan2.1 plans have no such key"),
        ({**GOOD, "valid_for": {"num_inference_steps": "50"}}, r"expected int"),
        ({**GOOD, "calibration": {"step_set": [1, 2]}}, r"takes no calibration; remove it"),
        ({**GOOD, "options": [1, 2]}, r"options: expected a mapping"),
        ({**GOOD, "options": []}, r"options: expected a mapping, got a list of 0 items$"),
        ({**GOOD, "options": 0}, r"options: expected a mapping, got int 0$"),
        ({**GOOD, "options": ""}, r"options: expected a mapping, got str ''$"),
        ({**GOOD, "diffcache": 1.0}, r"^<dict>: diffcache: expected int, got float 1.0$"),
        (
            {**GOOD, "options": {"warmup_steps": 50}},
            r"easycache with warmup_steps=50 reuses nothing in 50 steps \(it needs at least 52",
        ),
        ({**GOOD, "valid_for": {"scheduler": ""}}, r"valid_for.scheduler: must not be empty"),
        ({**GOOD, "valid_for": {"num_inference_steps": 0}}, r"must be >= 1"),
        ({**GOOD, "model": "wan21"}, r"unknown model family 'wan21' \(did you mean 'wan2.1'\?\)"),
        (
            {**GOOD, "valid_for": {"gen_length": 64}},
            r"valid_for.gen_length: wan2.1 plans have no such key; allowed: num_inference_steps, "
            r"fingerprint, weights, scheduler, lora$",
        ),
        (
            {"diffcache": 1, "model": "llada", "method": "dkv_cache", "valid_for": TEXT_STEPS},
            r"valid_for.scheduler: llada plans have no such key; allowed: num_inference_steps, "
            r"fingerprint, weights, gen_length, block_length$",
        ),
    ],
    ids=[
        "top-typo",
        "option-typo",
        "wrong-type",
        "float-for-int",
        "bool-for-int",
        "negative",
        "nan",
        "method-typo",
        "schema",
        "missing-model",
        "kernels",
        "valid-for-key",
        "valid-for-type",
        "calibration",
        "options-list",
        "options-empty-list",
        "options-zero",
        "options-empty-string",
        "schema-float",
        "warmup-covers-all",
        "empty-scheduler",
        "zero-steps",
        "model-family-typo",
        "valid-for-other-family",
        "valid-for-scheduler-of-text-family",
    ],
)
def test_bad_plans_raise_plan_error(bad: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        Plan.load(bad)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(PlanError) as e:
        Plan.load({**GOOD, "options": {"treshold": 1, "warmup_steps": -1}})
    assert "treshold" in str(e.value) and "warmup_steps" in str(e.value)


def test_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("diffcache: 1\nmodel: wan2.1\nmethod: easycache\noptions: {treshold: 1}\n")
    with pytest.raises(PlanError, match=r"my.yaml: options.treshold"):
        Plan.load(path)
    with pytest.raises(PlanError, match=r"no such plan file.*shows the \d+ bundled plans"):
        Plan.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.load(tmp_path / "bad.yaml")


def test_round_trip_is_byte_identical(tmp_path) -> None:
    first = Plan.load(GOOD).save(tmp_path / "a.yaml")
    second = Plan.load(first).save(tmp_path / "b.yaml")
    assert first.read_bytes() == second.read_bytes()
    assert Plan.load(second) == Plan.load(GOOD)


def test_bundled_plans_load_and_round_trip(tmp_path) -> None:
    plans = bundled_plans()
    assert {"wan21.yaml", "hunyuanvideo.yaml", "wan2.1-tiny.yaml"} <= set(plans)
    for name, path in plans.items():
        plan = Plan.load(name, template=True)
        assert plan.source == str(path)
        assert plan.dumps() == path.read_text(), f"{name} is not in canonical form"


def test_published_settings_in_bundled_plans() -> None:
    wan, hy = Plan.load("wan21.yaml"), Plan.load("hunyuanvideo.yaml")
    assert (wan.config.threshold, wan.config.warmup_steps) == (0.05, 10)
    assert (hy.config.threshold, hy.config.warmup_steps) == (0.025, 5)
    assert wan.valid_for["num_inference_steps"] == 50 and hy.valid_for["num_inference_steps"] == 50
    lam = {
        n: Plan.load(f"{n}-ertacache.yaml", template=True) for n in ("wan21", "flux", "cogvideox")
    }
    assert [p.config.threshold for p in lam.values()] == [0.08, 0.6, 0.3]  # dit.md 1.2.3
    assert [p.valid_for["num_inference_steps"] for p in lam.values()] == [50, 30, 50]
    hyca = {n: Plan.load(f"{n}-hyca.yaml", template=True).config for n in ("flux", "qwenimage")}
    assert (hyca["flux"].interval, hyca["flux"].warmup_steps) == (5, 3)  # dit.md 1.4.4
    assert (hyca["qwenimage"].interval, hyca["qwenimage"].warmup_steps) == (6, 3)


@pytest.mark.parametrize(
    "text, match",
    [
        ("diffcache: 1\nmodel: wan2.1\nmethod: easycache\nmodel: flux\n", r"model: duplicate key"),
        (
            "diffcache: 1\nmodel: wan2.1\nmethod: easycache\noptions:\n  threshold: 1\n"
            "  threshold: 2\n",
            r"options.threshold: duplicate key \(lines 5 and 6\)",
        ),
        (
            "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n",
            r"anchors and aliases are not allowed",
        ),
    ],
    ids=["duplicate-top", "duplicate-nested", "alias-bomb"],
)
def test_bad_plan_files(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PlanError, match=match):
        Plan.load(path)


def test_plan_file_edge_cases(tmp_path) -> None:
    (tmp_path / "latin.yaml").write_bytes("diffcache: 1\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PlanError, match=r"latin.yaml: not UTF-8 text \(byte offset"):
        Plan.load(tmp_path / "latin.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(PlanError, match="is a directory"):
        Plan.load(tmp_path / "dir.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("diffcache: 1\n" + "# padding\n" * 200_000)
    with pytest.raises(PlanError, match="over the"):
        Plan.load(big)


def test_exponent_floats_are_numbers(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("diffcache: 1\nmodel: wan2.1\nmethod: easycache\noptions: {threshold: 5e-2}\n")
    assert Plan.load(path).config.threshold == 0.05


def _plan_with_sidecar(folder: Path, name: str) -> Path:
    """dit-tiny-ertacache.yaml written into ``folder`` with its sidecar named ``name``."""
    source = bundled_plans()["dit-tiny-ertacache.yaml"]
    data = read_yaml(source)
    data["calibration"]["sidecar"]["file"] = name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.yaml"
    path.write_text(dump_yaml(data))
    return path


def test_sidecars_stay_in_the_plan_folder(tmp_path, monkeypatch) -> None:
    """A sidecar named outside the plan's folder (``..``, an absolute path, a symlink out of
    it) is refused before any file is opened; one beside the plan, or below it, loads."""
    blob = bundled_plans()["dit-tiny-ertacache.yaml"].with_suffix(".safetensors").read_bytes()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(blob)  # the right bytes: only where it lies is wrong
    plans = tmp_path / "plans" / "a"
    (plans / "sub").mkdir(parents=True)
    (plans / "sub" / "side.safetensors").write_bytes(blob)
    (plans / "link.safetensors").symlink_to(outside)
    assert Plan.load(_plan_with_sidecar(plans, "sub/side.safetensors")).tensors
    assert Plan.load(_plan_with_sidecar(plans, "sub/../sub/side.safetensors")).tensors
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    for name in ("../../outside.safetensors", str(outside), "link.safetensors"):
        with pytest.raises(PlanError, match=r"calibration.sidecar: file .* is outside the plan"):
            Plan.load(_plan_with_sidecar(plans, name))
