"""The ``diffcache`` command, in process: files written, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from diffcache.cli import main
from diffcache.eval.report import load_report


def _err_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffcache: error: "), err
    return err


def test_generate_video_with_plan_and_stats(tmp_path: Path, capsys) -> None:
    out, stats = tmp_path / "cat.mp4", tmp_path / "s.json"
    rc = main(
        [
            "generate",
            "--model",
            "wan2.1-tiny",
            "--plan",
            "wan2.1-tiny.yaml",
            "--prompt",
            "a cat surfing",
            "--out",
            str(out),
            "--stats-json",
            str(stats),
        ]
    )
    assert rc == 0 and out.stat().st_size > 0
    s = json.loads(stats.read_text())
    assert s["method"] == "easycache" and s["steps"] == 20 and s["model_calls"] == 40
    assert 0 < s["compute_fraction"] < 1 and "wrote" in capsys.readouterr().out


def test_generate_gif_and_png(tmp_path: Path) -> None:
    assert (
        main(
            [
                "generate",
                "--model",
                "cogvideox-tiny",
                "--prompt",
                "a fox",
                "--steps",
                "3",
                "--out",
                str(tmp_path / "fox.gif"),
            ]
        )
        == 0
    )
    assert (tmp_path / "fox.gif").read_bytes()[:3] == b"GIF"
    assert (
        main(
            [
                "generate",
                "--model",
                "dit-tiny",
                "--class-label",
                "3",
                "--steps",
                "4",
                "--out",
                str(tmp_path / "d.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--model", "wan2.1-tyni", "--prompt", "x"], "did you mean 'wan2.1-tiny'"),
        (
            ["generate", "--model", "wan2.1-tiny", "--plan", "nope.yaml", "--prompt", "x"],
            "no such plan file",
        ),
        (
            ["generate", "--model", "wan2.1-tiny", "--plan", "flux-tiny.yaml", "--prompt", "x"],
            "plan is for 'flux'",
        ),
        (
            [
                "generate",
                "--model",
                "wan2.1-tiny",
                "--plan",
                "wan2.1-tiny.yaml",
                "--prompt",
                "x",
                "--steps",
                "4",
            ],
            "num_inference_steps=20 but this call runs 4",
        ),
        (["generate", "--model", "flux-tiny", "--prompt", "x", "--frames", "9"], "take no frames"),
        (
            ["generate", "--model", "wan2.1-tiny", "--prompt", "x", "--out", "v.png"],
            "video is written as .mp4 or .gif",
        ),
        (["generate", "--model", "wan2.1-tiny"], "--prompt is required"),
        (
            ["generate", "--model", "wan2.1-tiny", "--prompt", "x", "--steps", "0"],
            "--steps must be",
        ),
        (["plans", "show", "wan22.yaml"], "did you mean 'wan21.yaml'"),
        (
            [
                "eval",
                "--model",
                "wan2.1-tiny",
                "--plan",
                "wan21.yaml",
                "--prompts",
                "none.txt",
                "--out",
                "o",
            ],
            "no such prompts file",
        ),
    ],
    ids=[
        "model-typo",
        "missing-plan",
        "other-family",
        "valid-for",
        "unsupported-field",
        "suffix",
        "no-prompt",
        "steps",
        "show-typo",
        "prompts-file",
    ],
)
def test_errors_are_one_line_exit_2(argv: list[str], match: str, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in _err_line(capsys)


def test_plans_list_show_check(tmp_path: Path, capsys) -> None:
    assert main(["plans", "list"]) == 0
    listing = capsys.readouterr().out
    assert "wan21.yaml" in listing and "hunyuanvideo.yaml" in listing and "easycache" in listing
    assert main(["plans", "show", "wan21.yaml"]) == 0
    assert "threshold: 0.05" in capsys.readouterr().out
    assert main(["plans", "check", "hunyuanvideo-tiny.yaml", "--model", "hunyuanvideo-tiny"]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = tmp_path / "my.yaml"
    bad.write_text("diffcache: 1\nmodel: wan2.1\nmethod: easycache\noptions: {treshold: 0.1}\n")
    assert main(["plans", "check", str(bad), "--model", "wan2.1-tiny"]) == 2
    assert "options.treshold" in _err_line(capsys)


def test_models_and_info(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in (
        "wan2.1-tiny",
        "wan2.1-1.3b-random",
        "flux-tiny",
        "qwenimage-tiny",
        "dit-tiny",
        "cogvideox-tiny",
        "hunyuanvideo-tiny",
        "WanPipeline",
        "DiTPipeline",
    ):
        assert name in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "l1_change" in out and "add_residual" in out and "easycache" in out


def test_eval_and_demo_write_reports(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\na dog\n")
    assert (
        main(
            [
                "eval",
                "--model",
                "qwenimage-tiny",
                "--plan",
                "qwenimage-tiny.yaml",
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    report = load_report(tmp_path / "ev" / "report.json")
    run = report["runs"][0]
    assert report["model"] == "qwenimage-tiny" and run["samples"] == 2
    assert 0 < run["compute_fraction"] < 1 and run["psnr"] > 10 and 0 < run["ssim"] <= 1
    assert run["lpips"] is None and "LPIPS" in report["notes"]["lpips"]
    assert len(run["per_step_compute"]) == 20
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    for suffix in ("json", "md", "html"):
        assert (tmp_path / "demo" / f"report.{suffix}").stat().st_size > 0
    assert "speedup" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    exe = shutil.which("diffcache") or str(Path(__file__).parents[1] / ".venv/bin/diffcache")
    res = subprocess.run([exe, "plans", "list"], capture_output=True, text=True)
    assert res.returncode == 0 and "wan21.yaml" in res.stdout


def test_eval_rejects_a_plan_for_another_family_before_generating(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ev"
    assert main(["eval", "--model", "dit-tiny", "--plan", "flux-tiny.yaml", "--out", str(out)]) == 2
    assert "plan is for 'flux'" in _err_line(capsys) and not out.exists()


def test_eval_seeds_start_at_seed(tmp_path: Path) -> None:
    assert (
        main(
            [
                "eval",
                "--model",
                "dit-tiny",
                "--plan",
                "dit-tiny.yaml",
                "--seed",
                "7",
                "--seeds",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    seeds = [r["seed"] for r in load_report(tmp_path / "report.json")["requests"]]
    assert seeds == [7, 8]
