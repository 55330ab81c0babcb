"""InvarDiff's block skip is the plan option ``fuse_blocks`` (it was a module-global switch):
validated like every option, on by default, and recorded by the profiled bundled plans (the
skip itself, fused against run, is compared in test_invardiff.py)."""

from __future__ import annotations

from pathlib import Path

from diffcache.cli import main
from diffcache.methods.invardiff import InvarDiffConfig
from diffcache.plan import Plan
from diffcache.profiles import bundled_plans


def test_fuse_blocks_is_refused_in_one_line_unless_a_boolean(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "mine.yaml"
    plan.write_text("diffcache: 1\nmodel: dit\nmethod: invardiff\noptions: {fuse_blocks: 'no'}\n")
    assert main(["plans", "check", str(plan)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffcache: error: {plan}: options.fuse_blocks: expected bool, got str 'no'"]


def test_fuse_blocks_is_on_by_default_and_profiled_plans_record_it() -> None:
    assert InvarDiffConfig().fuse_blocks is True
    assert InvarDiffConfig.from_options({"fuse_blocks": False}).fuse_blocks is False
    plans = [Plan.load(n, template=True) for n in bundled_plans() if n.endswith("-invardiff.yaml")]
    profiled = [p for p in plans if not p.is_template]
    assert len(profiled) >= 8
    assert all(p.options["fuse_blocks"] is True for p in profiled)
    assert all(p.config.fuse_blocks for p in plans)  # templates take the default
