"""Text models through the generic request / output path: the CLI prints text or writes .txt,
and plans for their family check the family's own valid_for keys (gen_length)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffcache.cli import main
from diffcache.models import ModelEntry, builtin_models, register_model

if "toy-text" not in builtin_models():
    register_model(
        ModelEntry(
            name="toy-text",
            family="toy-text",
            builder="diffcache.testing.toys_seq:toy_text_pipeline",
            description="the toy masked-diffusion text pipeline (tests)",
            defaults={"gen_length": 8, "steps": 4},
        )
    )


def test_generate_prints_text_and_writes_txt(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", "toy-text", "--prompt", "abc"]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed) == 8 and set(printed) <= set("_abcdefghijklmno")
    out = tmp_path / "t.txt"
    argv = ["generate", "--model", "toy-text", "--prompt", "abc", "--out", str(out)]
    assert main(argv) == 0
    assert out.read_text().strip() == printed and f"wrote {out}" in capsys.readouterr().out
    assert main([*argv[:-1], str(tmp_path / "t.png")]) == 2
    assert "text output is written as .txt" in capsys.readouterr().err


def test_text_plan_checks_gen_length(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "kv.yaml"
    plan.write_text(
        "diffcache: 1\nmodel: toy-text\nmethod: toy_kv\noptions: {refresh_every: 2}\n"
        "valid_for: {num_inference_steps: 4, gen_length: 8}\n"
    )
    base = ["generate", "--model", "toy-text", "--prompt", "abc", "--plan", str(plan)]
    assert main(base) == 0
    out = capsys.readouterr()
    assert len(out.out.strip()) == 8 and "toy_kv: computed" in out.err
    assert main([*base, "--gen-length", "4"]) == 2
    err = capsys.readouterr().err
    assert "gen_length=8 but this call has gen_length=4" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--gen-length", "--steps"])
def test_text_fields_are_checked(flag: str, capsys) -> None:
    assert main(["generate", "--model", "toy-text", "--prompt", "abc", flag, "0"]) == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err
