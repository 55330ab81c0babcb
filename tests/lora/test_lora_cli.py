"""``--lora PATH[:WEIGHT]`` on generate, profile and eval: the files load as the Python calls
would (diffusers' ``load_lora_weights`` + ``set_adapters``, peft for DiT), bad input is one
line before any model is built, plans record and check the LoRA state."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffcache
from diffcache.cli import main
from diffcache.generate import Request, generate
from diffcache.lora import adapter_state
from diffcache.models import load_model
from diffcache.pipelines.digits.lora import HERE, set_weight
from diffcache.plan import Plan
from diffcache.testing.lora import inject_lora, write_lora

pytest.importorskip("peft")

STEPS = "6"


def _dit_lora(path: Path, seed: int) -> Path:
    """A random LoRA for dit-tiny's transformer, saved by peft's state dict as a file."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    scratch = copy.deepcopy(load_model("dit-tiny").transformer)
    inject_lora(scratch, "w", seed, targets=("to_q", "to_v", "net.2"))
    save_file(get_peft_model_state_dict(scratch, adapter_name="w"), str(path))
    return path


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _saved(pipe, req: Request, path: Path) -> np.ndarray:
    """What ``generate`` writes for ``req`` on ``pipe``, read back as the CLI's file is."""
    from diffcache.generate import save_output

    save_output(generate(pipe, req), path)
    return _image(path)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffcache: error: "), err
    return err[0]


def test_generate_dit_lora_file_equals_the_builtin_lora_model(tmp_path: Path) -> None:
    """dit-digits + the class-shift LoRA's file (config read off its tensors) draws what the
    built-in dit-digits-lora (its own peft config) draws, and the state hash is the same."""
    out = tmp_path / "a.png"
    lora = str(HERE / "adapter.safetensors")
    argv = ["generate", "--model", "dit-digits", "--lora", lora, "--class-label", "3"]
    assert main([*argv, "--steps", STEPS, "--out", str(out)]) == 0
    want = _saved(
        load_model("dit-digits-lora"), Request(class_label=3, steps=6), tmp_path / "b.png"
    )
    assert np.array_equal(_image(out), want)
    plain = _saved(load_model("dit-digits"), Request(class_label=3, steps=6), tmp_path / "c.png")
    assert not np.array_equal(want, plain)


def test_generate_two_flux_loras_at_weights(tmp_path: Path) -> None:
    """Two folders at 0.8 and 1: the same image as load_lora_weights twice + set_adapters."""
    pipe = load_model("flux-tiny")
    folders = [write_lora(pipe, tmp_path / f"l{i}", seed=i) for i in range(2)]
    out = tmp_path / "cli.png"
    argv = ["generate", "--model", "flux-tiny", "--prompt", "a cat", "--steps", STEPS]
    argv += ["--height", "32", "--width", "32", "--out", str(out)]
    assert main([*argv, "--lora", f"{folders[0]}:0.8", "--lora", str(folders[1])]) == 0
    pipe.load_lora_weights(folders[0], adapter_name="a")
    pipe.load_lora_weights(folders[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, 1.0])
    req = Request(prompt="a cat", steps=6, height=32, width=32)
    assert np.array_equal(_image(out), _saved(pipe, req, tmp_path / "py.png"))
    pipe.set_adapters(["a", "b"], [1.0, 1.0])  # the weight given is the weight used
    assert not np.array_equal(_image(out), _saved(pipe, req, tmp_path / "py1.png"))


@pytest.mark.parametrize(
    ("lora", "model", "words"),
    [
        ("{tmp}/nope.safetensors", "dit-tiny", "nope.safetensors: no such file"),
        ("{tmp}/nope.safetensors:0.5", "dit-tiny", "no such file '{tmp}/nope.safetensors'"),
        ("{lora}:strong", "dit-tiny", "the weight 'strong' is not a number"),
        ("{lora}:nan", "dit-tiny", "the weight must be a finite number"),
        ("{tmp}/text.safetensors", "dit-tiny", "not a safetensors file"),
        ("{tmp}/plain.safetensors", "dit-tiny", "holds no LoRA tensors"),
        ("{tmp}", "dit-tiny", "a folder must hold one .safetensors file"),
        ("{lora}", "llada-tiny", "llada-tiny (llada) has no LoRA loader"),
        ("{lora}", "var-tiny", "var-tiny (var) has no LoRA loader"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "profile", "eval"])
def test_bad_lora_is_one_line_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch, command: str, lora: str, model: str, words: str
) -> None:
    from safetensors.torch import save_file

    lora_file = tmp_path / "sub" / "w.safetensors"
    lora_file.parent.mkdir()
    save_file({"a.lora_A.weight": torch.ones(2, 2), "a.lora_B.weight": torch.ones(2, 2)}, lora_file)
    (tmp_path / "text.safetensors").write_text("not tensors")
    save_file({"a.weight": torch.ones(2)}, tmp_path / "plain.safetensors")

    def built(name):
        raise AssertionError(f"{name} was built")

    monkeypatch.setattr(diffcache, "load_model", built)
    given = lora.format(tmp=tmp_path, lora=lora_file)
    argv = {
        "generate": ["generate", "--out", str(tmp_path / "x.png")],
        "profile": ["profile", "--method", "easycache", "--out", str(tmp_path / "p.yaml")],
        "eval": ["eval", "--plan", "dit-tiny.yaml", "--out", str(tmp_path / "ev")],
    }[command]
    if command == "generate" and model == "llada-tiny":
        argv += ["--prompt", "x"]  # a text model's required input, given
    assert main([*argv, "--model", model, "--lora", given]) == 2
    line = _error(capsys)
    assert f"--lora {given}" in line or "--lora:" in line
    assert words.format(tmp=tmp_path) in line


@pytest.mark.parametrize("command", ["generate", "profile", "eval"])
def test_folder_without_lora_loader_is_refused_before_it_loads(
    tmp_path: Path, capsys, monkeypatch, command: str
) -> None:
    """A model folder's family is read off its files (config.json naming LLaDA; a diffusers
    folder's model_index.json ``_class_name``): --lora on one with no LoRA loader is one line
    before the folder is loaded, and a folder whose family has one goes on to load."""
    from safetensors.torch import save_file

    from diffcache import lora_files

    lora = tmp_path / "w.safetensors"
    save_file({"a.lora_A.weight": torch.ones(2, 2), "a.lora_B.weight": torch.ones(2, 2)}, lora)
    llada = tmp_path / "llada"
    llada.mkdir()
    (llada / "config.json").write_text(json.dumps({"model_type": "llada"}))
    dit = tmp_path / "dit"
    load_model("dit-tiny").save_pretrained(dit)

    def built(name):
        raise AssertionError(f"{name} was built")

    monkeypatch.setattr(diffcache, "load_model", built)
    argv = {
        "generate": ["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")],
        "profile": ["profile", "--method", "easycache", "--out", str(tmp_path / "p.yaml")],
        "eval": ["eval", "--plan", "dit-tiny.yaml", "--out", str(tmp_path / "ev")],
    }[command]
    argv += ["--lora", str(lora)]
    assert main([*argv, "--model", str(llada)]) == 2
    assert f"--lora: {llada} (llada) has no LoRA loader" in _error(capsys)
    with pytest.raises(AssertionError, match=f"{dit} was built"):  # DiT loads LoRAs with peft
        main([*argv, "--model", str(dit)])
    monkeypatch.setattr(lora_files, "PEFT_FAMILIES", ())  # DiTPipeline has no load_lora_weights
    assert main([*argv, "--model", str(dit)]) == 2
    assert f"--lora: {dit} (dit) has no LoRA loader" in _error(capsys)


def test_lora_for_another_model_is_refused(tmp_path: Path, capsys) -> None:
    """The digits LoRA names modules flux-tiny has not: one line naming the file."""
    lora = str(HERE / "adapter.safetensors")
    argv = ["generate", "--model", "flux-tiny", "--prompt", "x", "--lora", lora]
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    assert f"--lora {lora}: none of its tensors fit" in _error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_profile_records_the_lora_and_generate_checks_it(tmp_path: Path, capsys) -> None:
    """profile --lora writes the state of the LoRA'd model as provenance.lora; a plan that
    requires it runs under the same --lora and is refused under another weight, the message
    naming the profile command with --lora."""
    lora = _dit_lora(tmp_path / "style.safetensors", seed=3)
    plan_file = tmp_path / "p.yaml"
    argv = ["profile", "--model", "dit-tiny", "--method", "ertacache", "--num-prompts", "2"]
    argv += ["--target-compute", "0.6", "--steps", "20", "--lora", f"{lora}:0.5"]
    assert main([*argv, "--out", str(plan_file), "--repeats", "1"]) == 0
    pipe = load_model("dit-tiny")
    inject_lora(pipe.transformer, "style", 3, targets=("to_q", "to_v", "net.2"))
    set_weight(pipe.transformer, 0.5, "style")
    want = adapter_state([pipe.transformer])
    plan = Plan.load(str(plan_file))
    assert plan.provenance["lora"] == want and want["adapters"] == {"style": 0.5}

    valid_for = {**plan.valid_for, "lora": want["sha256"]}  # the plan, requiring its LoRA
    required = dataclasses.replace(plan, valid_for=valid_for).save(tmp_path / "required.yaml")
    capsys.readouterr()
    run = ["generate", "--model", "dit-tiny", "--plan", str(required), "--class-label", "1"]
    run += ["--out", str(tmp_path / "ok.png")]
    assert main([*run, "--lora", f"{lora}:0.5"]) == 0
    assert main([*run, "--lora", str(lora)]) == 2
    line = _error(capsys)
    assert f"valid for LoRA state {want['sha256']}" in line and "style=1.0" in line
    assert "diffcache profile --model dit-tiny --method ertacache" in line
    assert line.endswith(f"--lora {lora}).")


def test_eval_runs_every_configuration_with_the_lora(tmp_path: Path) -> None:
    """eval --lora: the report names the LoRA state every configuration ran with, the state of
    the model given the same LoRA in Python."""
    lora = _dit_lora(tmp_path / "w.safetensors", seed=1)
    argv = ["eval", "--model", "dit-tiny", "--plan", "dit-tiny.yaml", "--lora", f"{lora}:0.7"]
    argv += ["--repeats", "1", "--out", str(tmp_path / "ev")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    pipe = load_model("dit-tiny")
    inject_lora(pipe.transformer, "w", 1, targets=("to_q", "to_v", "net.2"))
    set_weight(pipe.transformer, 0.7, "w")
    assert report["lora"] == adapter_state([pipe.transformer])
    assert report["runs"][0]["compute_fraction"] < 1
    md = (tmp_path / "ev" / "report.md").read_text()
    assert f"- adapters: LoRA w=0.7 [{report['lora']['sha256']}]" in md


def test_dit_lora_config_is_read_off_the_tensors() -> None:
    """Ranks differing per module (peft's rank_pattern): injecting the state dict alone makes
    the model peft's own config made, output and state hash alike."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from diffcache.lora_files import inject_lora_state

    ranks = {"r": 4, "rank_pattern": {"to_v": 2}, "alpha_pattern": {"to_v": 2}}
    config = LoraConfig(lora_alpha=4, target_modules=["to_q", "to_v"], **ranks)
    config.init_lora_weights = False
    want, got = load_model("dit-tiny"), load_model("dit-tiny")
    torch.manual_seed(0)
    inject_adapter_in_model(config, want.transformer, adapter_name="a")
    inject_lora_state(
        got.transformer, get_peft_model_state_dict(want.transformer, adapter_name="a"), "a"
    )
    req = Request(class_label=1, steps=4)
    assert np.array_equal(generate(got, req), generate(want, req))
    assert adapter_state([got.transformer]) == adapter_state([want.transformer])


def test_a_flux_lora_on_dit_names_what_is_missing(tmp_path: Path, capsys) -> None:
    folder = write_lora(load_model("flux-tiny"), tmp_path / "flux-lora")
    argv = ["generate", "--model", "dit-tiny", "--lora", str(folder), "--class-label", "1"]
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    line = _error(capsys)
    assert f"--lora {folder}: does not fit this model (" in line
    assert "modules it names are not in the model, e.g. single_transformer_blocks." in line
