"""Every DiT method on quantized transformers: torchao weight-only int8 (``quantize_`` and
diffusers' ``TorchAoConfig`` on a saved folder), a GGUF file written here with the ``gguf``
package (diffusers' ``from_single_file``) and bitsandbytes 8-bit / nf4 (``quantize_bnb``:
diffusers' loader needs a GPU). Counts: a plan-driven method decides as on the float
model; EasyCache's decisions follow its rule on the values it measured. ``remove`` gives the
quantized pipeline's own output bit for bit; a calibrated plan records the weights it was
profiled on and refuses others."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import diffcache
from diffcache.adapter import Target
from diffcache.cli import main
from diffcache.errors import AlreadyAcceleratedError, DiffCacheError, PlanError
from diffcache.generate import generate
from diffcache.models import load_model
from diffcache.plan import Plan
from diffcache.quant import gguf_problems, load_gguf, quantize_bnb, quantize_int8
from diffcache.registry import find_adapter
from diffcache.testing.golden import default_request
from diffcache.testing.toys import clean
from diffcache.weights import weights

torchao = pytest.importorskip("torchao")
gguf = pytest.importorskip("gguf")

METHODS = ("easycache", "ertacache", "invardiff", "hyca")


def _plan(model: str, method: str) -> Plan:
    """The bundled plan of ``method`` for ``model`` without its ``valid_for.weights`` (float32:
    the bundled plans are profiled on the float models and refuse quantized ones)."""
    plan = Plan.load(f"{model}.yaml" if method == "easycache" else f"{model}-{method}.yaml")
    valid_for = {k: v for k, v in plan.valid_for.items() if k != "weights"}
    return dataclasses.replace(plan, valid_for=valid_for)


def _stats(pipe: Any) -> dict[str, Any]:
    return {
        k: v for k, v in diffcache.stats(pipe).as_dict().items() if k not in ("wall_s", "trace")
    }


def _expected_easycache(trace: list[dict[str, Any]]) -> list[str]:
    """EasyCache's rule replayed on the values each decision recorded: computed on warm-up, the
    last step and before ``k`` exists, otherwise reused iff the accumulated change ``acc`` is
    under ``threshold``; the other CFG branches of a step follow its first branch."""
    out, first = [], {}
    for event in trace:
        v, step = event["values"], (event["step"], event["substep"])
        if event["branch"]:
            out.append(first[step])
            continue
        first[step] = "computed" if "reason" in v or not v["acc"] < v["threshold"] else "reused"
        out.append(first[step])
    return out


def _run_each_method(quant: Any, plain: Any, model: str, method: str) -> None:
    """The checks of one method on a quantized pipeline ``quant`` (``plain``: its float twin)."""
    request = default_request(model)
    plan = _plan(model, method)
    base = generate(quant, request)  # the quantized pipeline, never accelerated
    diffcache.accelerate(quant, plan, trace=True)
    try:
        cached = generate(quant, request)
        got, trace = _stats(quant), diffcache.stats(quant).trace
    finally:
        diffcache.remove(quant)
    assert clean(quant.transformer, quant.scheduler)
    assert np.array_equal(generate(quant, request), base), f"{method}: remove() is not exact"
    assert np.isfinite(cached).all() and got["skipped"] > 0, got
    if method == "easycache":  # adaptive: the counts follow the rule on the measured values
        actions = [e["action"] for e in trace]
        assert actions == _expected_easycache(trace)
        assert got["computed"] == actions.count("computed") and got["skipped"] == actions.count(
            "reused"
        )
    else:  # plan-driven: the same decisions, so the same counts, as on the float model
        diffcache.accelerate(plain, plan)
        try:
            generate(plain, request)
            assert got == _stats(plain)
        finally:
            diffcache.remove(plain)


@pytest.fixture(scope="module")
def dit() -> Any:
    return load_model("dit-tiny")


@pytest.fixture(scope="module", params=["quantize_", "TorchAoConfig"])
def dit_int8(request: pytest.FixtureRequest, dit: Any, tmp_path_factory: Any) -> Any:
    pipe = load_model("dit-tiny")
    if request.param == "quantize_":
        return quantize_int8(pipe)
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    folder = tmp_path_factory.mktemp("dit")
    pipe.transformer.save_pretrained(folder)
    config = TorchAoConfig(Int8WeightOnlyConfig())
    pipe.transformer = type(pipe.transformer).from_pretrained(
        folder, quantization_config=config, torch_dtype=torch.float32
    )
    return pipe


def test_torchao_routes_quantize_the_same(dit_int8: Any) -> None:
    """Both routes store int8 weights and give the same output bit for bit."""
    ref = quantize_int8(load_model("dit-tiny"))
    request = default_request("dit-tiny")
    assert weights([dit_int8.transformer]) == "torchao:Int8Tensor"
    assert np.array_equal(generate(dit_int8, request), generate(ref, request))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_torchao_int8(dit_int8: Any, dit: Any, method: str) -> None:
    _run_each_method(dit_int8, dit, "dit-tiny", method)


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_bnb])
def test_quantizing_refuses_an_accelerated_pipeline(dit: Any, quantize: Any) -> None:
    diffcache.accelerate(dit, "dit-tiny.yaml")
    try:
        with pytest.raises(AlreadyAcceleratedError) as e:
            quantize(dit)
    finally:
        diffcache.remove(dit)
    assert str(e.value) == (
        "DiTPipeline is accelerated; call diffcache.remove(), quantize, then accelerate."
    )
    assert weights([dit.transformer]) == "float32"


def test_sites_are_found_on_int8_models(dit_int8: Any, dit: Any) -> None:
    """quantize_ swaps Linear weights for tensor subclasses: the block and module sites (and the
    modules they wrap) are those of the float model."""
    quant, plain = (Target.resolve(find_adapter(p), p) for p in (dit_int8, dit))
    for kind in ("block", "module"):
        names = [s.name for s in plain.sites(kind)]
        assert names and [s.name for s in quant.sites(kind)] == names
        assert [type(s.module) for s in quant.sites(kind)] == [
            type(s.module) for s in plain.sites(kind)
        ]


def test_int8_changes_the_output(dit: Any) -> None:
    """The quantization is real: weights and output differ from the float model's."""
    request = default_request("dit-tiny")
    quant = quantize_int8(copy.deepcopy(dit))
    assert weights([dit.transformer]) == "float32"
    assert not np.array_equal(generate(quant, request), generate(dit, request))


def test_weights_of_plain_models() -> None:
    """Linear layers' dtype; without linear layers, all parameters'; nothing: ``none``."""
    layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert weights([layers]) == "float32"
    assert weights([torch.nn.Linear(4, 4).to(torch.bfloat16), layers]) == "bfloat16+float32"
    assert weights([torch.nn.LayerNorm(4).to(torch.float16)]) == "float16"
    assert weights([torch.nn.ReLU()]) == "none"


# ---------------------------------------------------------------------------- GGUF
def write_gguf(module: torch.nn.Module, path: Path) -> None:
    """``module``'s state dict as a GGUF file: Q8_0 for the matrices whose rows hold whole
    32-value blocks, float32 for the rest."""
    writer = gguf.GGUFWriter(str(path), "diffcache-test")
    for name, tensor in module.state_dict().items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quantize(array, q8)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q8)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def flux_gguf(tmp_path_factory: Any) -> tuple[Any, Any, Path, Path]:
    """(flux-tiny, flux-tiny with its transformer from a Q8_0 GGUF file, the file, the config)."""
    plain, quant = load_model("flux-tiny"), load_model("flux-tiny")
    folder = tmp_path_factory.mktemp("flux")
    plain.transformer.save_pretrained(folder)
    path = folder / "transformer-q8_0.gguf"
    write_gguf(plain.transformer, path)
    quant.transformer = load_gguf(path, type(plain.transformer), folder)
    return plain, quant, path, folder


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_gguf(flux_gguf: tuple[Any, Any, Path, Path], method: str) -> None:
    plain, quant, _, _ = flux_gguf
    assert weights([quant.transformer]) == "gguf:Q8_0"  # every linear weight written as Q8_0
    _run_each_method(quant, plain, "flux-tiny", method)


def test_gguf_that_does_not_match_the_config_is_one_line(
    flux_gguf: tuple[Any, Any, Path, Path], tmp_path: Path
) -> None:
    plain, _, path, folder = flux_gguf
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    config["num_layers"] += 1  # one more double-stream block than the file holds
    config["joint_attention_dim"] *= 2  # context_embedder takes a wider text embedding
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffCacheError) as e:
        load_gguf(path, type(plain.transformer), other)
    message = str(e.value)
    want = list(plain.transformer.context_embedder.weight.shape)
    wider = [want[0], want[1] * 2]
    assert "\n" not in message and str(path) in message and str(other) in message
    assert f"context_embedder.weight is {want} in the file, {wider} in the config" in message
    n = len([k for k in plain.transformer.state_dict() if k.startswith("transformer_blocks.0.")])
    assert f"{n} missing from the file (transformer_blocks.{config['num_layers'] - 1}." in message
    assert "pass config= the folder of the model the file was made from" in message


def test_gguf_problems_name_three_keys_of_each_kind_and_count_them(
    flux_gguf: tuple[Any, Any, Path, Path], tmp_path: Path
) -> None:
    """Configs with one block fewer, one more, and a wider text embedding than the file: each
    kind of problem counts its keys and names the first three (then "..."); a file that does
    not exist is one line."""
    plain, _, path, folder = flux_gguf
    cls, config = type(plain.transformer), json.loads((folder / "config.json").read_text())
    last = config["num_layers"] - 1
    block = [
        k for k in plain.transformer.state_dict() if k.startswith(f"transformer_blocks.{last}.")
    ]
    new = [
        k.replace(f"transformer_blocks.{last}.", f"transformer_blocks.{last + 1}.") for k in block
    ]
    want = list(plain.transformer.context_embedder.weight.shape)
    shape = f"context_embedder.weight is {want} in the file, {[want[0], want[1] * 2]} in the config"

    def problems(*most: int, **changes: int) -> list[str]:
        other = tmp_path / "-".join(f"{k}{v}" for k, v in changes.items())
        other.mkdir()
        (other / "config.json").write_text(json.dumps(config | changes))
        return gguf_problems(path, cls, other, *most)

    assert len(block) > 3
    assert problems(num_layers=last) == [
        f"{len(block)} not in the model ({block[0]}, {block[1]}, {block[2]}, ...)"
    ]
    wider = config["joint_attention_dim"] * 2
    assert problems(num_layers=last + 2, joint_attention_dim=wider) == [
        f"1 other shapes ({shape})",
        f"{len(block)} missing from the file ({new[0]}, {new[1]}, {new[2]}, ...)",
    ]
    assert problems(1, joint_attention_dim=wider) == [f"1 other shapes ({shape})"]
    with pytest.raises(DiffCacheError) as e:
        gguf_problems(tmp_path / "none.gguf", cls, folder)
    assert str(e.value) == f"{tmp_path / 'none.gguf'}: no such GGUF file"


def test_load_gguf_joins_the_problems_in_one_line(
    flux_gguf: tuple[Any, Any, Path, Path], tmp_path: Path
) -> None:
    plain, _, path, folder = flux_gguf
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] += 1
    config["joint_attention_dim"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffCacheError) as e:
        load_gguf(path, type(plain.transformer), tmp_path)
    found = gguf_problems(path, type(plain.transformer), tmp_path)
    assert len(found) == 2 and str(e.value) == (
        f"{path}: the GGUF file does not match the FluxTransformer2DModel configuration in "
        f"{tmp_path}: {found[0]}; {found[1]}; pass config= the folder of the model the file "
        "was made from."
    )


def test_load_gguf_computes_in_the_dtype_asked_for(flux_gguf: tuple[Any, Any, Path, Path]) -> None:
    """``compute_dtype`` reaches diffusers' GGUF config: the unquantized parameters (norms,
    biases) are held in it; float32 by default."""
    plain, quant, path, folder = flux_gguf
    half = load_gguf(path, type(plain.transformer), folder, compute_dtype=torch.bfloat16)
    assert half.hf_quantizer.quantization_config.compute_dtype == torch.bfloat16
    assert quant.transformer.hf_quantizer.quantization_config.compute_dtype == torch.float32
    assert half.context_embedder.bias.dtype == torch.bfloat16
    assert quant.transformer.context_embedder.bias.dtype == torch.float32


def test_a_pipeline_folder_with_two_gguf_files_for_one_component_is_refused(
    tmp_path: Path,
) -> None:
    from diffcache.quant import gguf_components

    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "transformer").mkdir()
    for name in ("b.gguf", "a.gguf"):
        (tmp_path / "transformer" / name).write_bytes(b"")
    with pytest.raises(DiffCacheError) as e:
        gguf_components(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'transformer'}: 2 GGUF files (a.gguf, b.gguf); keep the one the pipeline "
        "should load."
    )


@pytest.fixture(scope="module")
def gguf_folder(flux_gguf: tuple[Any, Any, Path, Path], tmp_path_factory: Any) -> Path:
    """flux-tiny saved as a diffusers folder whose transformer is the Q8_0 GGUF file."""
    plain, _, path, _ = flux_gguf
    folder = tmp_path_factory.mktemp("flux-pipe")
    plain.save_pretrained(folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.copy(path, folder / "transformer" / path.name)
    return folder


def test_pipeline_folder_with_a_gguf_transformer(
    flux_gguf: tuple[Any, Any, Path, Path],
    gguf_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """load_model (and so --model) reads the .gguf transformer: the same pipeline as loading
    the file by hand; the CLI generates with a plan on it."""
    _, quant, _, _ = flux_gguf
    loaded = load_model(gguf_folder)
    request = default_request("flux-tiny")
    assert weights([loaded.transformer]) == "gguf:Q8_0"
    assert np.array_equal(generate(loaded, request), generate(quant, request))
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(gguf_folder), "--prompt", "a cat", "--out", str(out)]
    sizes = ["--height", "128", "--width", "128", "--steps", "20"]
    assert main([*args, *sizes, "--plan", "flux-tiny.yaml"]) == 0 and out.is_file()
    out.unlink()  # a calibrated plan profiled on the float model: refused, one line
    assert main([*args, *sizes, "--plan", "flux-tiny-ertacache.yaml"]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "calibrated on float32 weights but this model's are gguf:Q8_0" in err
    )


def test_cli_gguf_folder_that_does_not_match_is_one_line(
    gguf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "other"
    shutil.copytree(gguf_folder, folder)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_layers"] += 1
    config_file.write_text(json.dumps(config))
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--out", str(out)]
    assert main(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("diffcache: error: ") and err.count("\n") == 1
    assert "does not match the FluxTransformer2DModel configuration" in err
    assert "missing from the file (transformer_blocks." in err


# ---------------------------------------------------------------------------- plans
QUANTIZED = {  # how to quantize dit-tiny, and what its plans record
    "torchao:Int8Tensor": quantize_int8,
    "bitsandbytes:Int8Params": quantize_bnb,
    "bitsandbytes:nf4": lambda pipe: quantize_bnb(pipe, _nf4()),
}


@pytest.mark.parametrize("kind", QUANTIZED)
def test_calibrated_plan_records_and_requires_its_weights(
    dit: Any, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Profiled on quantized weights: the plan says so (provenance and valid_for.weights), runs
    on the quantized pipeline and is refused on the float one (one line, the fix), which stays
    clean."""
    if kind.startswith("bitsandbytes"):
        pytest.importorskip("bitsandbytes")
    quant = QUANTIZED[kind](load_model("dit-tiny"))
    request = default_request("dit-tiny")
    plan = diffcache.profile(quant, "ertacache", prompts=["1"], request=request)
    assert plan.provenance["weights"] == plan.valid_for["weights"] == kind
    diffcache.accelerate(quant, plan)
    diffcache.remove(quant)
    with pytest.raises(PlanError) as e:
        diffcache.accelerate(dit, plan)
    message = str(e.value)
    assert "valid_for.weights" in message and "\n" not in message
    assert f"calibrated on {kind} weights but this model's are float32" in message
    assert "diffcache profile" in message
    assert clean(dit.transformer, dit.scheduler) and not diffcache.is_accelerated(dit)
    out = tmp_path / "x.png"  # the CLI's float dit-tiny: exit 2, the same line, no image
    args = ["generate", "--model", "dit-tiny", "--plan", str(plan.save(tmp_path / "q.yaml"))]
    assert main([*args, "--out", str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("diffcache: error: ") and err.count("\n") == 1
    assert "valid_for.weights" in err


def test_uncalibrated_plan_records_weights_in_provenance_only(dit: Any) -> None:
    plan = diffcache.profile(dit, "easycache", prompts=["1"], request=default_request("dit-tiny"))
    assert plan.provenance["weights"] == "float32" and "weights" not in plan.valid_for


# ---------------------------------------------------------------------------- bitsandbytes
def _nf4() -> Any:
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def _bnb_by_hand(module: torch.nn.Module, four_bit: bool) -> torch.nn.Module:
    """Every ``nn.Linear`` of ``module`` swapped for a bitsandbytes layer the way bitsandbytes'
    own docs build one: the float weights loaded into it, then quantized by ``.to(device)``."""
    import bitsandbytes as bnb

    for name, linear in [(n, m) for n, m in module.named_modules() if type(m) is torch.nn.Linear]:
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        layer = (
            bnb.nn.Linear4bit(  # no double quantization: BitsAndBytesConfig's default
                *shape, torch.float32, compress_statistics=False, quant_type="nf4"
            )
            if four_bit
            else bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False)
        )
        layer.load_state_dict(linear.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.to("cpu"))
    return module


@pytest.mark.parametrize("four_bit", [False, True], ids=["int8", "nf4"])
def test_quantize_bnb_is_bitsandbytes_layers_by_hand(four_bit: bool) -> None:
    """quantize_bnb (diffusers' replacement, on CPU) gives the pipeline built from bitsandbytes
    layers by hand, bit for bit; the weights are named by their bitsandbytes kind and the
    output is not the float model's."""
    pytest.importorskip("bitsandbytes")
    request = default_request("flux-tiny")
    plain, quant, by_hand = (load_model("flux-tiny") for _ in range(3))
    quantize_bnb(quant, _nf4() if four_bit else None)
    _bnb_by_hand(by_hand.transformer, four_bit)
    kind = "bitsandbytes:nf4" if four_bit else "bitsandbytes:Int8Params"
    assert weights([quant.transformer]) == weights([by_hand.transformer]) == kind
    got = generate(quant, request)
    assert np.array_equal(got, generate(by_hand, request))
    assert not np.array_equal(got, generate(plain, request))


def test_quantize_bnb_leaves_the_quantizer_from_pretrained_leaves() -> None:
    """The model keeps its quantizer as diffusers' loader leaves it: ``dequantize()`` gives back
    float Linear layers, each weight within one int8 step (its row's absmax / 127) of the
    original."""
    pytest.importorskip("bitsandbytes")
    pipe = load_model("flux-tiny")
    before = pipe.transformer.context_embedder.weight.detach().clone()
    quantize_bnb(pipe)
    assert type(pipe.transformer.context_embedder).__name__ == "Linear8bitLt"
    pipe.transformer.dequantize()
    after = pipe.transformer.context_embedder
    assert type(after) is torch.nn.Linear and after.weight.dtype == torch.float32
    step = before.abs().amax(dim=1, keepdim=True) / 127
    assert ((after.weight - before).abs() <= step).all()


def test_quantize_bnb_names_a_wrong_config() -> None:
    from diffusers import BitsAndBytesConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    pipe = load_model("dit-tiny")
    wrong = {
        "sets neither load_in_8bit=True nor load_in_4bit=True": BitsAndBytesConfig(),
        "config is a TorchAoConfig, not a diffusers BitsAndBytesConfig": TorchAoConfig(
            Int8WeightOnlyConfig()
        ),
    }
    for want, config in wrong.items():
        with pytest.raises(DiffCacheError) as e:
            quantize_bnb(pipe, config)
        assert "\n" not in str(e.value) and want in str(e.value)
    assert weights([pipe.transformer]) == "float32"


@pytest.fixture(scope="module", params=["flux-tiny-int8", "wan2.1-tiny-nf4"])
def bnb_pipes(request: pytest.FixtureRequest) -> tuple[Any, Any, str]:
    """(the float pipeline, its bitsandbytes twin, the model name)."""
    pytest.importorskip("bitsandbytes")
    model, _, kind = request.param.rpartition("-")
    quant = quantize_bnb(load_model(model), _nf4() if kind == "nf4" else None)
    return load_model(model), quant, model


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_bitsandbytes(bnb_pipes: tuple[Any, Any, str], method: str) -> None:
    plain, quant, model = bnb_pipes
    assert weights([quant.transformer]).startswith("bitsandbytes:")
    _run_each_method(quant, plain, model, method)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bitsandbytes_through_diffusers_needs_a_gpu(dit: Any, tmp_path: Path) -> None:
    """diffusers' BitsAndBytesConfig loader refuses without a GPU, even with device_map="cpu":
    quantize_bnb is the CPU route."""
    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig

    dit.transformer.save_pretrained(tmp_path)
    for config in (BitsAndBytesConfig(load_in_8bit=True), _nf4()):
        for device_map in (None, "cpu"):
            with pytest.raises(RuntimeError, match="No GPU found"):
                type(dit.transformer).from_pretrained(
                    tmp_path, quantization_config=config, device_map=device_map
                )
