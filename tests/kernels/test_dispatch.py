"""Backend selection: explicit, auto, the env override, the registry and describe()."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import diffcache.kernels as kernels
from diffcache.errors import DiffCacheError
from diffcache.kernels import Backend, KernelUnavailableError, _dispatch, l1_change, pick
from diffcache.kernels._dispatch import OpSpec
from diffcache.testing.kernels import needs_interpreter

SPEC = next(s for s in kernels.ops() if s.name == "l1_change")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_OVERRIDE, raising=False)


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine with triton but neither CUDA nor the interpreter."""
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: False)
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: None)


def test_backend_enum() -> None:
    assert [b.value for b in Backend] == ["auto", "torch", "triton"]
    assert Backend("triton") is Backend.TRITON
    assert Backend.TORCH == "torch"


def test_error_class() -> None:
    assert issubclass(KernelUnavailableError, DiffCacheError)
    assert issubclass(KernelUnavailableError, NotImplementedError)


@pytest.mark.parametrize("backend", ["torch", Backend.TORCH, " Torch "], ids=["str", "enum", "ws"])
def test_explicit_torch_always_torch(backend: str | Backend) -> None:
    t = torch.zeros(3, dtype=torch.float64)  # unsupported by the kernel: torch does not care
    assert pick(SPEC, backend, t, t) is Backend.TORCH


def test_unknown_backend_raises_value_error() -> None:
    with pytest.raises(ValueError, match="'cuda' is not a kernel backend"):
        pick(SPEC, "cuda", torch.zeros(2))


def test_triton_status_reasons(monkeypatch: pytest.MonkeyPatch, no_interpreter: None) -> None:
    assert _dispatch.triton_status() == [
        "no CUDA device is available and TRITON_INTERPRET is not 1"
    ]
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: "ImportError: no triton")
    reasons = _dispatch.triton_status()
    assert len(reasons) == 2 and "triton is not importable (ImportError: no triton)" in reasons
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: True)
    assert _dispatch.triton_status() == ["triton is not importable (ImportError: no triton)"]


def test_explicit_triton_lists_every_reason(no_interpreter: None) -> None:
    a = torch.zeros(2, 3)
    b = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(KernelUnavailableError) as info:
        pick(SPEC, "triton", a, b)
    msg = str(info.value)
    assert "'l1_change'" in msg
    assert "input 0: shape=(2, 3) dtype=float32 device=cpu" in msg
    assert "input 1: shape=(2, 3) dtype=float64 device=cpu" in msg
    reasons = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(reasons) == 4, msg
    assert "TRITON_INTERPRET is not 1" in reasons[0]
    assert "input 0 is on cpu" in reasons[1]
    assert "input 1 is on cpu" in reasons[2]
    assert "input 1 has dtype float64; the kernel supports float32, float16, bfloat16" in reasons[3]
    assert "backend='auto'" in msg and "backend='torch'" in msg


def test_explicit_triton_names_missing_triton(
    monkeypatch: pytest.MonkeyPatch, no_interpreter: None
) -> None:
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: "ImportError: no triton")
    with pytest.raises(KernelUnavailableError, match="triton is not importable"):
        pick(SPEC, Backend.TRITON, torch.zeros(2), torch.zeros(2))


@needs_interpreter
def test_explicit_triton_under_interpreter() -> None:
    t = torch.zeros(4, dtype=torch.float16)
    assert SPEC.not_supported_reasons(t, t) == []
    assert pick(SPEC, "triton", t, t) is Backend.TRITON


@needs_interpreter
def test_bf16_cpu_reason_names_bf16() -> None:
    t = torch.zeros(4, dtype=torch.bfloat16)
    reasons = SPEC.not_supported_reasons(t)
    assert reasons == [
        "input 0 has dtype bfloat16, which the Triton interpreter cannot run on cpu "
        "(it supports float32, float16)"
    ]


def test_mismatched_devices_reason() -> None:
    a = torch.zeros(4)
    b = torch.zeros(4, device="meta")
    reasons = SPEC.not_supported_reasons(a, b)
    assert "inputs are on different devices (cpu, meta)" in reasons
    assert any("input 1 is on meta" in r for r in reasons)


def test_requires_grad_reason() -> None:
    t = torch.zeros(4, requires_grad=True)
    assert any("requires grad" in r for r in SPEC.not_supported_reasons(t))
    with torch.no_grad():
        assert not any("requires grad" in r for r in SPEC.not_supported_reasons(t))


@pytest.mark.parametrize("interpret", [True, False], ids=["interp", "no_interp"])
def test_auto_on_cpu_is_torch_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, interpret: bool
) -> None:
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: interpret)
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    t = torch.zeros(4)
    with caplog.at_level(logging.INFO, logger=_dispatch.__name__):
        assert pick(SPEC, "auto", t, t) is Backend.TORCH
        assert pick(SPEC, Backend.AUTO, t, t) is Backend.TORCH
    records = [r for r in caplog.records if r.name == _dispatch.__name__]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "l1_change" in records[0].getMessage()


def test_an_op_records_its_backend_in_the_record_it_is_given_only() -> None:
    """The backend that ran goes to the caller's record; nothing is kept in the package."""
    record = {"add_residual": "triton"}
    l1_change(torch.ones(3), torch.zeros(3), record=record)
    assert record == {"add_residual": "triton", "l1_change": "torch"}
    l1_change(torch.ones(3), torch.zeros(3))  # no record: nothing noted anywhere
    assert record == {"add_residual": "triton", "l1_change": "torch"}


def test_env_override_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_OVERRIDE, "torch")
    t = torch.zeros(4)
    assert pick(SPEC, "auto", t) is Backend.TORCH
    record: dict[str, str] = {}
    l1_change(t, t, record=record)
    assert record == {"l1_change": "torch"}


@needs_interpreter
def test_env_override_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_OVERRIDE, "triton")
    t = torch.ones(4)
    record: dict[str, str] = {}
    l1_change(t, t, record=record)
    assert record == {"l1_change": "triton"}
    with pytest.raises(KernelUnavailableError, match="bfloat16"):
        l1_change(t.bfloat16(), t.bfloat16(), record=record)
    assert record == {"l1_change": "triton"}  # a call that raised records nothing
    # An explicit backend wins over the override.
    l1_change(t, t, backend="torch", record=record)
    assert record == {"l1_change": "torch"}


def test_env_override_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_OVERRIDE, "fast")
    with pytest.raises(ValueError, match="DIFFCACHE_KERNELS='fast'"):
        pick(SPEC, "auto", torch.zeros(2))


def test_registry_lists_both_ops() -> None:
    names = [s.name for s in kernels.ops()]
    assert "l1_change" in names and "add_residual" in names


def test_register_op_replaces_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_REGISTRY", dict(_dispatch._REGISTRY))
    spec = _dispatch.OpSpec("demo", "a demo op", (torch.float32,))
    assert _dispatch.register_op(spec) is spec
    _dispatch.register_op(_dispatch.OpSpec("demo", "replaced", (torch.float32,)))
    demos = [s for s in kernels.ops() if s.name == "demo"]
    assert [s.description for s in demos] == ["replaced"]


def test_describe_lists_both_ops() -> None:
    rows = {row["name"]: row for row in kernels.describe()}
    assert {"l1_change", "add_residual"} <= set(rows)
    for row in rows.values():
        assert set(row) >= {"name", "description", "auto_on_cuda", "cpu", "interpreter"}
        assert row["cpu"] == "torch"
        assert row["auto_on_cuda"] in ("torch", "triton")
        assert row["dtypes"] == ["float32", "float16", "bfloat16"]


def test_describe_on_a_cuda_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: None)
    for row in kernels.describe():
        assert row["auto_on_cuda"] == "triton" and row["auto_on_cuda_reasons"] == []
        assert row["interpreter"] is False


def test_describe_without_cuda(no_interpreter: None) -> None:
    for row in kernels.describe():
        assert row["auto_on_cuda"] == "torch"
        assert any("CUDA" in r for r in row["auto_on_cuda_reasons"])


def test_import_without_triton() -> None:
    """The package imports and falls back to torch when triton cannot be imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from diffcache.kernels import KernelUnavailableError, describe, l1_change
        from diffcache.kernels import add_residual
        a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 2.0])
        record = {}
        assert l1_change(a, b, record=record).tolist() == [2.5, 1.5, 1.0]
        assert add_residual(a, b, record=record).tolist() == [1.0, 0.0]
        assert record == {"l1_change": "torch", "add_residual": "torch"}, record
        assert all(row["auto_on_cuda"] == "torch" for row in describe())
        try:
            l1_change(a, b, backend="triton")
        except KernelUnavailableError as e:
            assert "triton is not importable" in str(e), str(e)
        else:
            raise AssertionError("expected KernelUnavailableError")
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(_dispatch.ENV_OVERRIDE, None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_per_input_dtype_rules() -> None:
    """An op with an index input: that input must be int64, the others follow ``dtypes``, and
    integer inputs are not refused by the interpreter's float rule."""
    spec = OpSpec(
        name="gather_rows",
        description="x[index]",
        dtypes=(torch.float32, torch.float16),
        input_dtypes={1: (torch.int64,)},
    )
    x = torch.zeros(4, 2)
    assert spec.not_supported_reasons(x, torch.arange(2)) == []
    reasons = spec.not_supported_reasons(x, torch.arange(2, dtype=torch.int32))
    assert reasons == ["input 1 has dtype int32; the kernel supports int64"]
    reasons = spec.not_supported_reasons(torch.arange(2), torch.arange(2))
    assert reasons == ["input 0 has dtype int64; the kernel supports float32, float16"]


def test_resolve_backend_checks_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffcache.errors import DiffCacheError
    from diffcache.kernels import resolve_backend

    monkeypatch.setenv("DIFFCACHE_KERNELS", "torch")
    assert resolve_backend("auto") == "torch" and resolve_backend("triton") == "triton"
    monkeypatch.setenv("DIFFCACHE_KERNELS", "bogus")
    with pytest.raises(DiffCacheError, match=r"DIFFCACHE_KERNELS='bogus'.*'auto', 'torch'"):
        resolve_backend("auto")
    with pytest.raises(DiffCacheError, match=r"kernels='cuda'"):
        resolve_backend("cuda")


@pytest.mark.parametrize(
    "value,expected",
    [("1", True), (" True ", True), ("ON", True), ("yes", True), ("0", False), (None, False)],
)
def test_interpret_env_without_triton(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    """Without triton, TRITON_INTERPRET is read from the environment like Triton reads it."""
    monkeypatch.setattr(_dispatch, "triton", None)
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _dispatch._read_interpret_env() is expected


@needs_interpreter
def test_interpret_env_from_triton() -> None:
    """With triton importable, its own setting is read (conftest turns the interpreter on)."""
    assert _dispatch._read_interpret_env() is True


def test_bad_backend_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^backend='cuda' is not a kernel backend"):
        pick(SPEC, "cuda", torch.zeros(2))


def test_resolve_backend_without_override() -> None:
    from diffcache.kernels import resolve_backend

    assert [resolve_backend(b) for b in ("auto", "torch", "triton")] == ["auto", "torch", "triton"]


@pytest.mark.parametrize("interpret", [True, False], ids=["interp", "no_interp"])
def test_auto_on_cpu_logs_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, interpret: bool
) -> None:
    """The one log line of auto on cpu gives the op and every reason, '; '-joined."""
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: interpret)
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    t = torch.zeros(4)
    with caplog.at_level(logging.INFO, logger=_dispatch.__name__):
        pick(SPEC, "auto", t, t)
    (message,) = [r.getMessage() for r in caplog.records if r.name == _dispatch.__name__]
    if interpret:  # the inputs could run in the interpreter: auto's own reason
        reasons = ["inputs are not CUDA tensors (auto never picks the interpreter)"]
    else:
        cpu = "input {} is on cpu; the Triton kernel needs a CUDA tensor (cpu runs only under "
        reasons = _dispatch.triton_status() + [
            cpu.format(i) + "TRITON_INTERPRET=1)" for i in (0, 1)
        ]
    assert message == "kernel 'l1_change': using torch backend; " + "; ".join(reasons)


def test_explicit_triton_error_lists_inputs_and_remedy(no_interpreter: None) -> None:
    t = torch.zeros(4)
    with pytest.raises(KernelUnavailableError) as err:
        pick(SPEC, "triton", t, t)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines[2:4]] == ["  input 0", "  input 1"]
    assert lines[-1] == "Remedy: use backend='auto' (falls back to torch) or backend='torch'."


def test_cuda_input_without_cuda_under_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_interpret_enabled", lambda: True)
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: False)
    monkeypatch.setattr(_dispatch, "triton_status", lambda: [])
    reasons = SPEC._reasons_for([("input 0", "cuda", torch.float32, False)])
    assert reasons == ["input 0 is on cuda but torch sees no CUDA device"]
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: True)
    assert SPEC._reasons_for([("input 0", "cuda", torch.float32, False)]) == []


@needs_interpreter
def test_describe_under_interpreter_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On this CPU machine under the interpreter: explicit triton runs here, auto on cuda
    would not (no CUDA device)."""
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: False)
    for row in kernels.describe():
        assert row["interpreter"] is True
        assert row["auto_on_cuda"] == "torch"
        assert row["auto_on_cuda_reasons"] == [
            "a float16 input is on cuda but torch sees no CUDA device"
        ]


@needs_interpreter
def test_describe_with_cuda_under_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: True)
    for row in kernels.describe():
        assert row["auto_on_cuda_reasons"] == [
            "TRITON_INTERPRET=1 (auto never picks the interpreter)"
        ]


def test_out_dtype_reasons() -> None:
    cpu = torch.device("cpu")
    assert SPEC.out_dtype_reasons(torch.float16, cpu) == []
    assert SPEC.out_dtype_reasons(torch.int32, cpu) == [
        "out_dtype int32 is not supported; the kernel writes float32, float16, bfloat16"
    ]
    assert SPEC.out_dtype_reasons(torch.bfloat16, cpu) == [
        "out_dtype bfloat16 cannot be written by the Triton interpreter on cpu"
    ]
    assert SPEC.out_dtype_reasons(torch.bfloat16, torch.device("meta")) == []
