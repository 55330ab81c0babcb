"""The ``diffcache`` command, in process: files written, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import diffcache
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
        (
            ["generate", "--model", "flux-tiny", "--prompt", "x", "--frames", "9"],
            "take no --frames",
        ),
        (
            ["generate", "--model", "wan2.1-tiny", "--prompt", "x", "--out", "v.png"],
            "--out v.png: video output is written as .mp4 or .gif",
        ),
        (
            ["generate", "--model", "flux-tiny", "--prompt", "x", "--out", "i.mp4"],
            "--out i.mp4: image output is written as .png",
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
            "--prompts none.txt: no such file",
        ),
    ],
    ids=[
        "model-typo",
        "missing-plan",
        "other-family",
        "valid-for",
        "unsupported-field",
        "suffix",
        "image-suffix",
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


def test_plans_list_columns_align_and_floats_are_rounded(capsys) -> None:
    import re

    from diffcache.plan import Plan
    from diffcache.profiles import bundled_plans

    assert main(["plans", "list"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(bundled_plans())
    starts = [head.index(word) for word in ("family", "method", "options")]
    for row in rows:
        name, family, method = row.split()[:3]
        plan = Plan.load(name, template=True)
        assert (family, method) == (plan.model, plan.method)
        assert [row.index(f" {w} ") + 1 for w in (family, method)] == starts[:2], row
        assert row[starts[2] - 1] == " " and row[starts[2]] != " ", row
    row = next(r for r in rows if r.startswith("dit-digits.yaml "))
    shown = float(re.search(r"threshold=([0-9.e+-]+),", row).group(1))
    full = Plan.load("dit-digits.yaml").options["threshold"]
    assert shown == pytest.approx(full, rel=5e-4) and len(str(shown)) <= len("0.1234")


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
    assert main(["demo", "--model", "dit-tiny", "--out", str(tmp_path / "demo")]) == 0
    for suffix in ("json", "md", "html"):
        assert (tmp_path / "demo" / "dit-tiny" / f"report.{suffix}").stat().st_size > 0
    assert 'id="dit-tiny"' in (tmp_path / "demo" / "report.html").read_text()
    assert "speedup" in capsys.readouterr().out


def _actions_per_step(events: list[dict]) -> list[float]:
    """1.0 where the step's denoiser call was computed, from a whole-step method's trace."""
    return [float(e["action"] == "computed") for e in events]


def test_generate_writes_the_plans_trace(tmp_path: Path, capsys) -> None:
    """One event per denoiser call; its actions are the run's computed steps (--stats-json),
    and every reuse shows the accumulated change below the threshold."""
    trace, stats = tmp_path / "t.json", tmp_path / "s.json"
    argv = [*STATS[:-2], str(tmp_path / "x.png"), "--stats-json", str(stats)]
    assert main([*argv, "--trace", str(trace)]) == 0
    assert f"wrote {trace}" in capsys.readouterr().out
    events, s = json.loads(trace.read_text()), json.loads(stats.read_text())
    assert "trace" not in s and len(events) == s["model_calls"] == s["steps"]
    assert [e["step"] for e in events] == list(range(s["steps"]))
    assert _actions_per_step(events) == s["per_step_compute"] and 0 in s["per_step_compute"]
    for e in events:
        v = e["values"]
        if e["action"] == "reused":
            assert v["acc"] < v["threshold"] == 0.1, e


def test_eval_trace_writes_each_plans_trace_per_request(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ev"
    argv = ["eval", "--model", "dit-tiny", "--plan", "dit-tiny.yaml", "--seeds", "2"]
    assert main([*argv, "--repeats", "1", "--out", str(out), "--trace"]) == 0
    report = load_report(out / "report.json")
    run = report["runs"][0]
    assert run["trace"] == "traces/dit-tiny.yaml.jsonl"
    assert f"trace in {out / run['trace']}" in capsys.readouterr().out
    events = [json.loads(line) for line in (out / run["trace"]).read_text().splitlines()]
    records = [r for r in report["records"] if r["run"] == run["plan"]]
    assert [r["request"] for r in records] == [0, 1]
    for r in records:  # the traced run decided as the timed runs did
        mine = [e for e in events if e["request"] == r["request"]]
        assert _actions_per_step(mine) == r["per_step"]
    assert "trace" not in load_report(out / "report.json")["notes"]


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


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is built or a sample generated."""

    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be refused before any model is built or run")

    monkeypatch.setattr("diffcache.load_model", refuse)
    monkeypatch.setattr("diffcache.generate.generate", refuse)
    monkeypatch.setattr("diffcache.eval.runner.generate", refuse)


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a sample is generated (building the model is allowed)."""

    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be refused before any generation")

    monkeypatch.setattr("diffcache.generate.generate", refuse)
    monkeypatch.setattr("diffcache.eval.runner.generate", refuse)


def _files(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")
    }


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder with a file, folders (one named like a video) and prompts files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    (tmp_path / "d.mp4").mkdir()
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "books.json").write_text('{"step_cache_book": [0, 1], "transformer_cache_book": 3}')
    (tmp_path / "dkv.yaml").write_text("diffcache: 1\nmodel: dit\nmethod: dkv_cache\n")
    return tmp_path


GEN = ["generate", "--model", "wan2.1-tiny", "--prompt", "x"]
DIT = ["generate", "--model", "dit-tiny"]
STATS = [*DIT, "--plan", "dit-tiny.yaml", "--out", "x.png", "--stats-json"]
EVAL = ["eval", "--model", "wan2.1-tiny", "--plan", "wan2.1-tiny.yaml"]
PROFILE = ["profile", "--model", "dit-tiny", "--method", "easycache"]
ARITH = ["generate", "--model", "llada-arith", "--prompt", "1+1="]
NO_STORE = "dkv_cache needs a kv store (position) but dit's adapter provides none"
BAD_INPUT = {
    "profile-a-method-the-family-cannot-run": (
        ["profile", "--model", "llada-arith", "--method", "easycache", "--out", "p.yaml"],
        "--method easycache: easycache needs a latent denoiser but llada's adapter provides a "
        "masked-token denoiser",
    ),
    "generate-a-plan-the-family-cannot-run": (
        [*DIT, "--plan", "dkv.yaml", "--out", "x.png"],
        f"--plan dkv.yaml: {NO_STORE}",
    ),
    "eval-a-plan-the-family-cannot-run": (
        ["eval", "--model", "dit-tiny", "--plan", "dkv.yaml", "--out", "ev"],
        f"--plan dkv.yaml: {NO_STORE}",
    ),
    "plans-check-a-plan-the-family-cannot-run": (
        ["plans", "check", "dkv.yaml", "--model", "dit-tiny"],
        f"dkv.yaml: {NO_STORE}",
    ),
    "out-folder-not-writable": ([*DIT, "--out", "/proc/x.png"], "folder /proc is not writable"),
    "frames-not-4k-plus-1": ([*GEN, "--frames", "4"], "--frames must be a multiple of 4 plus 1"),
    "text-blocks-do-not-divide": (
        [*ARITH, "--gen-length", "10", "--block-length", "4"],
        "gen_length 10 is not a multiple of block_length 4",
    ),
    "text-blocks-from-the-model-default": (  # the user gave no --block-length: say whose it is
        [*ARITH, "--gen-length", "8"],
        "block_length 16 (--block-length 16: llada-arith's default; pass the flag to change it)",
    ),
    "text-steps-do-not-split-over-blocks": (
        [*ARITH, "--steps", "3", "--gen-length", "32", "--block-length", "16"],
        "steps 3 is not divisible by the number of blocks 2",
    ),
    "eval-plan-of-another-family": (
        ["eval", "--model", "llada-arith", "--plan", "flux-tiny.yaml", "--out", "ev"],
        "the plan is for 'flux' but llada-arith is a 'llada' model",
    ),
    "eval-diffusers-cache-on-a-text-model": (
        ["eval", "--model", "llada-arith", "--plan", "diffusers:fbcache:threshold=0.1"]
        + ["--out", "ev"],
        "diffusers caches attach to a diffusers transformer",
    ),
    "eval-diffusers-cache-on-dit": (
        ["eval", "--model", "dit-digits", "--plan", "diffusers:fbcache:threshold=0.1"]
        + ["--out", "ev"],
        "DiTTransformer2DModel (dit-digits) has none",
    ),
    "eval-steps-outside-the-plan": (
        [*EVAL, "--steps", "7", "--out", "ev"],
        "the plan is valid for num_inference_steps=20 but this call runs 7 steps",
    ),
    "plans-check-another-family": (
        ["plans", "check", "flux-tiny.yaml", "--model", "dit-tiny"],
        "the plan is for 'flux' but dit-tiny is a 'dit' model",
    ),
    "plans-import-malformed-books": (
        ["plans", "import", "books.json", "--model", "flux-tiny", "--out", "p.yaml"],
        "books.json: not an InvarDiff book file (transformer_cache_book is not an object",
    ),
    "profile-more-prompts-than-bundled": (
        ["profile", "--model", "flux-tiny", "--method", "easycache", "--num-prompts", "500"]
        + ["--out", "p.yaml"],
        "--num-prompts 500: 64 calibration prompts are bundled",
    ),
    "profile-from-another-family": (
        ["profile", "--model", "dit-tiny", "--from", "flux-hyca.yaml", "--num-prompts", "2"]
        + ["--out", "p.yaml"],
        "--from flux-hyca.yaml: a plan for flux models, and dit-tiny is a dit model",
    ),
    "out-folder-missing": ([*GEN, "--out", "nodir/x.mp4"], "folder nodir does not exist"),
    "out-folder-is-file": ([*GEN, "--out", "afile/x.mp4"], "afile is a file, not a folder"),
    "out-is-folder": ([*GEN, "--out", "adir"], "--out adir: is a folder; give a file name"),
    "out-is-folder-with-suffix": ([*GEN, "--out", "d.mp4"], "--out d.mp4: is a folder"),
    "out-trailing-slash": ([*GEN, "--out", "new.mp4/"], "is a folder; give a file name"),
    "stats-folder-missing": (
        [*STATS, "nodir/s.json"],
        "--stats-json nodir/s.json: folder nodir does not exist",
    ),
    "stats-is-folder": ([*STATS, "adir"], "--stats-json adir: is a folder"),
    "stats-without-plan": ([*DIT, "--stats-json", "s.json"], "--stats-json needs --plan"),
    "trace-without-plan": ([*DIT, "--trace", "t.json"], "--trace t.json needs --plan"),
    "trace-folder-missing": (
        [*STATS[:-1], "--trace", "nodir/t.json"],
        "--trace nodir/t.json: folder nodir does not exist",
    ),
    "trace-is-folder": ([*STATS[:-1], "--trace", "adir"], "--trace adir: is a folder"),
    "eval-out-is-file": ([*EVAL, "--out", "afile"], "--out afile: is a file"),
    "eval-out-uncreatable": (
        [*EVAL, "--out", "afile/report"],
        "--out afile/report: cannot create the folder: afile is a file",
    ),
    "demo-out-uncreatable": (["demo", "--out", "afile/demo"], "cannot create the folder"),
    "height-not-multiple": ([*GEN, "--height", "50"], "--height must be a multiple of 16"),
    "height-zero": ([*GEN, "--height", "0"], "--height must be >= 16, got 0"),
    "class-label-negative": ([*DIT, "--class-label", "-1"], "--class-label must be >= 0"),
    "seed-over-64-bits": (
        [*DIT, "--seed", str(2**64)],
        "--seed must be a whole number in 0..2**64-1",
    ),
    "seed-negative": ([*DIT, "--seed", "-1"], "--seed must be a whole number in 0..2**64-1"),
    "steps-absurd": ([*DIT, "--steps", "100000"], "--steps must be <= 1000"),
    "steps-zero": ([*DIT, "--steps", "0"], "--steps must be >= 1"),
    "guidance-nan": ([*DIT, "--guidance", "nan"], "--guidance must be a finite number"),
    "guidance-inf": ([*DIT, "--guidance", "inf"], "--guidance must be a finite number"),
    "guidance-negative": ([*DIT, "--guidance", "-1"], "--guidance must be >= 0"),
    "seed-not-a-number": ([*DIT, "--seed", "abc"], "generate: argument --seed: invalid int"),
    "eval-prompt-is-not-prompts": (
        [*EVAL, "--prompt", "a cat", "--out", "ev"],
        "eval: unrecognized arguments: --prompt a cat; eval takes no --prompt, give --prompts",
    ),
    "demo-model-without-plan": (
        ["demo", "--model", "wan2.1-1.3b-random", "--out", "demo"],
        "--model wan2.1-1.3b-random: no default plan (wan2.1-1.3b-random.yaml) is bundled",
    ),
    "prompts-empty": ([*EVAL, "--prompts", "empty.txt", "--out", "ev"], "has no prompts"),
    "prompts-missing": ([*EVAL, "--prompts", "none.txt", "--out", "ev"], "no such file"),
    "prompts-folder": ([*EVAL, "--prompts", "adir", "--out", "ev"], "--prompts adir: is a folder"),
    "prompts-not-utf8": ([*EVAL, "--prompts", "latin1.txt", "--out", "ev"], "not UTF-8"),
    "seeds-zero": ([*EVAL, "--seeds", "0", "--out", "ev"], "--seeds must be in 1..10000"),
    "seeds-past-the-last-seed": (  # the second seed, 2**64, was reported as a --seed given
        [*EVAL, "--seed", str(2**64 - 1), "--seeds", "2", "--out", "ev"],
        f"error: --seed {2**64 - 1} with --seeds 2: the seeds run to {2**64}, past 2**64-1",
    ),
    "profile-out-not-yaml": (
        [*PROFILE, "--num-prompts", "2", "--out", "x.txt"],
        "--out x.txt: a plan is written as .yaml",
    ),
    "profile-out-folder-missing": (
        [*PROFILE, "--num-prompts", "2", "--out", "nodir/p.yaml"],
        "folder nodir does not exist",
    ),
    "profile-num-prompts-zero": (
        [*PROFILE, "--num-prompts", "0", "--out", "p.yaml"],
        "--num-prompts must be in 1..10000, got 0",
    ),
    "profile-unknown-method": (
        ["profile", "--model", "dit-tiny", "--method", "easycach", "--num-prompts", "2"]
        + ["--out", "p.yaml"],
        "unknown method 'easycach' (did you mean 'easycache'?)",
    ),
    "profile-both-prompt-sources": (
        [*PROFILE, "--prompts", "empty.txt", "--num-prompts", "2", "--out", "p.yaml"],
        "argument --num-prompts: not allowed with argument --prompts",
    ),
    "profile-target-compute-above-1": (
        [*PROFILE, "--num-prompts", "2", "--target-compute", "1.5", "--out", "p.yaml"],
        "--target-compute must be in (0, 1], got 1.5",
    ),
    "profile-target-compute-nan": (
        [*PROFILE, "--num-prompts", "2", "--target-compute", "nan", "--out", "p.yaml"],
        "--target-compute must be in (0, 1], got nan",
    ),
    "profile-target-speedup-below-1": (
        [*PROFILE, "--num-prompts", "2", "--target-speedup", "0.5", "--out", "p.yaml"],
        "--target-speedup must be a number >= 1",
    ),
    "profile-both-targets": (
        [*PROFILE, "--num-prompts", "2", "--target-compute", "0.5", "--target-speedup", "2"]
        + ["--out", "p.yaml"],
        "not allowed with argument",
    ),
    "profile-warmup-covers-all-steps": (
        [*PROFILE, "--num-prompts", "2", "--steps", "8", "--option", "warmup_steps=8"]
        + ["--out", "p.yaml"],
        "error: --method easycache at --steps 8: options.warmup_steps: easycache with "
        "warmup_steps=8 reuses nothing in 8 steps (it needs at least 10 steps); warmup_steps=6 "
        "would act at 8 steps",
    ),
    "profile-steps-of-the-from-plan": (  # no --method, no --steps: both come from the plan
        ["profile", "--model", "dit-tiny", "--from", "dit-tiny-hyca.yaml", "--num-prompts", "2"]
        + ["--option", "warmup_steps=20", "--out", "p.yaml"],
        "error: --from dit-tiny-hyca.yaml (hyca) at 20 steps: options.warmup_steps: hyca with "
        "warmup_steps=20 reuses nothing in 20 steps",
    ),
    "profile-bad-option-value": (
        [*PROFILE, "--num-prompts", "2", "--option", "warmup_steps=-1", "--out", "p.yaml"],
        "options.warmup_steps: must be >= 0, got -1",
    ),
    "profile-unknown-option": (
        [*PROFILE, "--num-prompts", "2", "--option", "treshold=1", "--out", "p.yaml"],
        "options.treshold: unknown key (did you mean 'threshold'?)",
    ),
    "profile-option-not-key-value": (
        [*PROFILE, "--num-prompts", "2", "--option", "warmup_steps", "--out", "p.yaml"],
        "--option warmup_steps: expected KEY=VALUE",
    ),
    "profile-prompts-not-utf8": (
        [*PROFILE, "--prompts", "latin1.txt", "--out", "p.yaml"],
        "--prompts latin1.txt: not UTF-8",
    ),
}


@pytest.mark.parametrize("argv, match", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_refused_before_the_model_is_built(
    argv: list[str], match: str, workdir: Path, nothing_runs: None, capsys
) -> None:
    before = _files(workdir)
    assert main(argv) == 2
    assert match in _err_line(capsys)
    assert _files(workdir) == before  # nothing written, no folder created


@pytest.mark.parametrize("label", ["1000", "5000"])
def test_class_label_beyond_the_model_is_refused_before_generating(
    label: str, workdir: Path, no_generation: None, capsys
) -> None:
    """The number of classes is read from the loaded model, so this fails after loading."""
    before = _files(workdir)
    assert main([*DIT, "--class-label", label, "--out", "x.png"]) == 2
    assert f"--class-label must be <= 999 for this model, got {label}" in _err_line(capsys)
    assert _files(workdir) == before


def test_default_out_folder_is_not_created_on_bad_input(
    workdir: Path, no_generation: None, capsys
) -> None:
    assert main([*DIT, "--class-label", "1000"]) == 2
    assert "--class-label" in _err_line(capsys) and not (workdir / "out").exists()


def test_profile_with_class_ids_beyond_the_model_is_refused_before_generating(
    workdir: Path, no_generation: None, capsys
) -> None:
    (workdir / "ids.txt").write_text("3\n1000\n")
    argv = [*PROFILE, "--prompts", "ids.txt", "--steps", "8", "--option", "warmup_steps=2"]
    assert main([*argv, "--out", "p.yaml"]) == 2
    assert _err_line(capsys) == (
        "diffcache: error: calibration input must be <= 999 for this model, got 1000"
    )  # the ids came from --prompts: no --class-label was given
    assert not (workdir / "p.yaml").exists()


def test_more_bundled_class_inputs_than_classes_go_round_with_new_seeds(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dit-digits' bundled calibration inputs are its class labels: asking for more of them
    than it has classes goes round the classes again, each copy with the next seeds (the
    issue's `profile --model var-digits --num-prompts 16`)."""
    import diffcache
    from diffcache.generate import Request, expand

    seen = {}

    def record(pipe, config, prompts, seeds=1, **kwargs):
        seen.update(pipe=pipe, prompts=list(prompts), seeds=seeds)
        raise SystemExit(0)

    monkeypatch.setattr(diffcache, "profile", record)
    argv = ["profile", "--model", "dit-digits", "--method", "easycache", "--out", "p.yaml"]
    with pytest.raises(SystemExit):
        main([*argv, "--num-prompts", "12", "--seeds", "2", "--seed", "5"])
    assert seen["prompts"] == [str(i) for i in range(10)] + ["0", "1"]
    adapter = diffcache.registry.find_adapter(seen["pipe"])
    got = [(r.get("class_label"), r.seed) for r in expand(adapter, seen["prompts"], 2, Request(5))]
    want = [(c, s) for c in range(10) for s in (5, 6)] + [(0, 7), (0, 8), (1, 7), (1, 8)]
    assert got == want


def test_class_ids_out_of_range_in_a_prompt_file(workdir: Path, no_generation: None, capsys):
    classes = 10  # trained on scikit-learn's digits 0..9
    (workdir / "ids.txt").write_text(f"3\n{classes}\n")
    argv = ["eval", "--model", "dit-digits", "--plan", "dit-digits.yaml", "--out", "ev"]
    assert main([*argv, "--prompts", "ids.txt"]) == 2
    assert _err_line(capsys) == (
        f"diffcache: error: evaluation input must be <= {classes - 1} for this model, got {classes}"
    )
    assert not (workdir / "ev").exists()


@pytest.mark.parametrize(
    "argv, name",
    [
        (["generate", "--model", "llada-arith", "--prompt", "12+3 ≈ héllo"], "--prompt"),
        (
            ["eval", "--model", "llada-arith", "--plan", "llada-tiny-dkv_cache.yaml", "--prompts"]
            + ["p.txt", "--out", "ev"],
            "evaluation input",
        ),  # fmt: skip
        (
            ["profile", "--model", "llada-arith", "--method", "dkv_cache", "--prompts", "p.txt"]
            + ["--out", "p.yaml"],
            "calibration input",
        ),  # fmt: skip
    ],
    ids=["generate", "eval", "profile"],
)
def test_prompts_outside_a_text_models_alphabet_are_refused_before_it_runs(
    argv: list[str], name: str, workdir: Path, no_generation: None, monkeypatch, capsys
) -> None:
    """llada-arith's character tokenizer knows newline and printable ASCII: a prompt with
    other characters ended in a traceback from the tokenizer inside the generation."""
    from diffcache.pipelines.dlm_pipeline import DiffusionLMPipeline

    monkeypatch.setattr(DiffusionLMPipeline, "__call__", lambda *a, **k: pytest.fail("ran"))
    (workdir / "p.txt").write_text("12+3=\n12+3 ≈ héllo\n")
    before = _files(workdir)
    assert main(argv) == 2
    assert _err_line(capsys) == (
        f"diffcache: error: {name} '12+3 ≈ héllo': character(s) '≈', 'é' not in this model's "
        "alphabet (its character tokenizer has newline and printable ASCII)"
    )
    assert _files(workdir) == before


def _unwritable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make creating a file in ``folder`` fail (root passes real permission checks)."""
    import tempfile

    real = tempfile.TemporaryFile

    def create(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", create)


@pytest.mark.parametrize(
    "argv, match",
    [
        ([*GEN, "--out", "ro/x.mp4"], "--out ro/x.mp4: folder ro is not writable"),
        ([*STATS, "ro/s.json"], "--stats-json ro/s.json: folder ro is not writable"),
        ([*EVAL, "--out", "ro"], "--out ro: folder is not writable"),
        ([*EVAL, "--out", "ro/ev"], "--out ro/ev: cannot create the folder: ro is not writable"),
        ([*PROFILE, "--num-prompts", "1", "--out", "ro/p.yaml"], "folder ro is not writable"),
    ],
    ids=["generate", "stats-json", "eval", "eval-subfolder", "profile"],
)
def test_unwritable_folder_is_refused(
    argv: list[str], match: str, workdir: Path, nothing_runs: None, monkeypatch, capsys
) -> None:
    (workdir / "ro").mkdir()
    _unwritable(monkeypatch, workdir / "ro")
    assert main(argv) == 2
    assert match in _err_line(capsys)
    assert list((workdir / "ro").iterdir()) == []


def test_unwritable_folder_is_refused_by_real_permissions(
    workdir: Path, nothing_runs: None, capsys
) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root passes permission checks; the monkeypatched variant covers the logic")
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main([*GEN, "--out", "ro/x.mp4"]) == 2
        assert "folder ro is not writable" in _err_line(capsys)
        assert main([*EVAL, "--out", "ro/ev"]) == 2
        assert "cannot create the folder: ro is not writable" in _err_line(capsys)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_eval_out_file_fails_before_generating_and_leaves_no_report(
    workdir: Path, no_generation: None, capsys
) -> None:
    """Through the runner's own check too (the API refuses the folder before loading)."""
    from diffcache.errors import DiffCacheError
    from diffcache.eval.runner import evaluate

    with pytest.raises(DiffCacheError, match="is a file"):
        evaluate("dit-tiny", ["dit-tiny.yaml"], workdir / "afile")
    assert (workdir / "afile").read_text() == "not a folder"
    assert not list(workdir.glob("**/report.*"))


def _plan_file(folder: Path, threshold: float) -> Path:
    folder.mkdir()
    path = folder / "p.yaml"
    path.write_text(
        "diffcache: 1\nmodel: dit\nmethod: easycache\n"
        f"options: {{threshold: {threshold}, warmup_steps: 1}}\n"
    )
    return path


def test_eval_plans_with_the_same_file_name_stay_apart(tmp_path: Path) -> None:
    a, b = _plan_file(tmp_path / "a", 0.0), _plan_file(tmp_path / "b", 5.0)
    out = tmp_path / "ev"
    argv = ["eval", "--model", "dit-tiny", "--plan", str(a), "--plan", str(b), "--steps", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    report = load_report(out / "report.json")
    assert [r["plan"] for r in report["runs"]] == ["a/p.yaml", "b/p.yaml"]
    same, reused = report["runs"]
    assert same["compute_fraction"] == 1.0 and reused["compute_fraction"] < 1.0
    assert same["psnr"] is None and "psnr is null for a/p.yaml" in report["notes"]["psnr"]
    md = (out / "report.md").read_text()
    assert "| a/p.yaml |" in md and "| b/p.yaml |" in md


def test_profile_writes_a_plan_that_generate_uses(tmp_path: Path, capsys) -> None:
    plan, png, stats = tmp_path / "p.yaml", tmp_path / "x.png", tmp_path / "s.json"
    argv = [*PROFILE, "--num-prompts", "2", "--steps", "8", "--target-compute", "0.5"]
    assert main([*argv, "--option", "warmup_steps=2", "--out", str(plan)]) == 0
    assert f"wrote {plan}: easycache" in capsys.readouterr().out
    import yaml

    data = yaml.safe_load(plan.read_text())
    assert data["options"]["threshold"] > 0 and data["options"]["warmup_steps"] == 2
    assert data["valid_for"]["num_inference_steps"] == 8
    assert data["provenance"]["measured"]["compute_fraction"] <= 0.5
    argv = [*DIT, "--plan", str(plan), "--steps", "8", "--out", str(png)]
    assert main([*argv, "--stats-json", str(stats)]) == 0
    s = json.loads(stats.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert s["method"] == "easycache" and s["steps"] == 8 and s["compute_fraction"] < 1
    assert main([*DIT, "--plan", str(plan), "--steps", "6", "--out", str(png)]) == 2
    assert "num_inference_steps=8 but this call runs 6" in _err_line(capsys)


def test_profile_without_a_prompt_source_calibrates_on_bundled_inputs(
    tmp_path: Path, capsys
) -> None:
    """The issue's `profile --model dit-digits --method hyca --target-speedup 3` form (no
    --prompts, no --num-prompts): the bundled calibration inputs, 8 of them."""
    plan = tmp_path / "p.yaml"
    assert main([*PROFILE, "--steps", "8", "--option", "warmup_steps=2", "--out", str(plan)]) == 0
    assert "on 8 prompt(s) x 1 seed(s)" in capsys.readouterr().out
    import yaml

    assert yaml.safe_load(plan.read_text())["provenance"]["prompts"] == 8


def test_profile_a_checkpoint_folder_on_20_bundled_prompts(tmp_path: Path, capsys) -> None:
    """The issue's `profile --model /models/Wan2.1-T2V-1.3B-Diffusers --method ertacache
    --num-prompts 20` form, on a Wan folder: 20 distinct bundled prompts (16 were once all), and
    the published Wan2.1 settings to start from (λ 0.08, no timestep adjustment: Wan's diffusers
    checkpoints sample with UniPC, where the method defaults would be refused)."""
    folder, plan = tmp_path / "Wan2.1-T2V-Diffusers", tmp_path / "wan21-ertacache.yaml"
    diffcache.load_model("wan2.1-tiny").save_pretrained(folder)
    argv = ["profile", "--model", str(folder), "--method", "ertacache", "--num-prompts", "20"]
    small = ["--steps", "6", "--height", "32", "--width", "32", "--frames", "5"]
    assert main([*argv, *small, "--out", str(plan)]) == 0
    out, err = capsys.readouterr()
    assert "on 20 prompt(s) x 1 seed(s)" in out
    assert "starting from wan21-ertacache.yaml, the published ertacache settings" in err
    import yaml

    data = yaml.safe_load(plan.read_text())
    assert data["provenance"]["prompts"] == 20
    assert data["options"]["time_adjust"] is False and data["options"]["threshold"] == 0.08
    assert data["valid_for"]["num_inference_steps"] == 6


def test_profile_of_a_folder_gives_the_plan_python_gives(tmp_path: Path) -> None:
    """One front door: ``diffcache profile --model FOLDER --method ertacache`` and
    ``diffcache.profile(pipe, "ertacache", prompts)`` on that folder loaded in Python start from
    the same published settings and write the same plan (options, valid_for, calibration
    tensors, provenance)."""
    from diffcache.generate import Request
    from diffcache.profiles import calibration_prompts

    folder, path = tmp_path / "Wan2.1-T2V-Diffusers", tmp_path / "cli.yaml"
    diffcache.load_model("wan2.1-tiny").save_pretrained(folder)
    argv = ["profile", "--model", str(folder), "--method", "ertacache", "--num-prompts", "2"]
    small = {"steps": 6, "height": 32, "width": 32, "frames": 5}
    flags = [x for k, v in small.items() for x in (f"--{k}", str(v))]
    assert main([*argv, *flags, "--out", str(path)]) == 0
    pipe = diffcache.load_model(str(folder))
    ours = diffcache.profile(pipe, "ertacache", calibration_prompts()[:2], request=Request(**small))
    cli = diffcache.Plan.load(path)
    assert ours == cli and ours.options["threshold"] == 0.08  # every field but the tensors
    assert ours.tensors.keys() == cli.tensors.keys() and ours.tensors
    assert all(torch.equal(ours.tensors[k], cli.tensors[k]) for k in ours.tensors)


def test_profile_checks_a_folders_options_against_its_published_plan(tmp_path: Path) -> None:
    """A folder's step check waits for its published plan: HunyuanVideo's EasyCache warm-up is
    5 steps, so --steps 10 profiles (the method's default warm-up of 10 would cover them all)."""
    folder, plan = tmp_path / "HunyuanVideo", tmp_path / "p.yaml"
    diffcache.load_model("hunyuanvideo-tiny").save_pretrained(folder)
    argv = ["profile", "--model", str(folder), "--method", "easycache", "--num-prompts", "1"]
    small = ["--steps", "10", "--height", "32", "--width", "32", "--frames", "5"]
    assert main([*argv, *small, "--out", str(plan)]) == 0
    import yaml

    assert yaml.safe_load(plan.read_text())["options"]["warmup_steps"] == 5


def test_profile_starts_from_the_models_plan_for_the_method(tmp_path: Path) -> None:
    """A built-in model's bundled plan of the method gives the options: wan2.1-tiny's
    ERTACache plan has no timestep adjustment (UniPC), so profiling it is not refused."""
    plan = tmp_path / "p.yaml"
    argv = ["profile", "--model", "wan2.1-tiny", "--method", "ertacache", "--num-prompts", "2"]
    assert main([*argv, "--steps", "6", "--out", str(plan)]) == 0
    import yaml

    options = yaml.safe_load(plan.read_text())["options"]
    assert options["time_adjust"] is False and options["rectify"] == "channel"


def test_profile_starts_from_the_models_default_plan(tmp_path: Path, capsys) -> None:
    """The issue's command as written: dit-tiny's bundled plan gives the warm-up (4 of 20)."""
    plan = tmp_path / "p.yaml"
    argv = [*PROFILE, "--num-prompts", "2", "--target-compute", "0.5", "--out", str(plan)]
    assert main(argv) == 0
    import yaml

    data = yaml.safe_load(plan.read_text())
    assert data["options"]["warmup_steps"] == 4 and data["valid_for"]["num_inference_steps"] == 20
    assert data["provenance"]["measured"]["compute_fraction"] <= 0.5
    assert "compute_fraction 0.5" in capsys.readouterr().out


def _prompts_hash(prompts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def test_profile_calibrates_llada_arith_on_its_own_training_tasks(tmp_path: Path, capsys) -> None:
    """llada-arith is profiled on prompts of its tasks (the generic prose was once used), taken
    from the training split: none of them is a held-out evaluation task."""
    from diffcache.pipelines.arith import data

    plan = tmp_path / "p.yaml"
    argv = ["profile", "--model", "llada-arith", "--method", "dkv_cache", "--num-prompts", "4"]
    assert main([*argv, "--out", str(plan)]) == 0
    import yaml

    used = yaml.safe_load(plan.read_text())["provenance"]["prompts_sha256"]
    own = list(diffcache.models.model_entry("llada-arith").calibration_prompts())
    assert used == _prompts_hash(own[:4])
    held_out = {line.split("\t")[0] for line in data.TASK_FILE.read_text().splitlines()}
    assert len(own) == 64 and not set(own) & held_out
    assert not any(data.is_held_out(p) for p in own)
    assert [data.task_of(p) for p in own[:4]] == ["add", "sort", "copy", "word"]
    assert main([*argv[:-1], "65", "--out", str(plan)]) == 2
    assert "--num-prompts 65: llada-arith has 64 calibration prompts" in _err_line(capsys)


def test_profile_calibrates_wan_shapes_on_its_calibration_prompts(tmp_path: Path) -> None:
    """wan-shapes is profiled on its own calibration captions (pipelines/shapes), which are
    none of its evaluation prompts."""
    from diffcache.pipelines import shapes

    plan = tmp_path / "p.yaml"
    argv = ["profile", "--model", "wan-shapes", "--method", "easycache", "--num-prompts", "2"]
    assert main([*argv, "--steps", "6", "--out", str(plan)]) == 0
    import yaml

    text = (shapes.HERE / "calibration-prompts.txt").read_text().splitlines()
    used = yaml.safe_load(plan.read_text())["provenance"]["prompts_sha256"]
    assert used == _prompts_hash(text[:2])
    assert not set(text) & set(shapes.PROMPTS)
