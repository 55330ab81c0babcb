"""Mutation testing of the generation rules with mutmut (issue 21), run by ``make mutation``.

Each module of ``bench/mutation_targets.tsv`` is mutated on its own, against the tests listed
beside it: mutmut (pinned in pyproject.toml's ``mutation`` extra) writes every mutant of a
function into the module behind a switch, runs the tests once to learn which tests call which
function, then forks one child per mutant that runs only the tests calling the mutated function.

mutmut derives a module's import name from its path, and ``diffcache.kernels`` lives in
``kernels/src`` (pyproject.toml's ``package-dir``), so each module runs in a staging copy of the
installed layout, ``out/mutation/work/<module>/`` (``diffcache/`` with the mapped folders moved in,
``tests/``, and ``bench/`` for the tests that run its scripts). Lines that only record traces or
Stats are not mutated (``SKIP_LINES``).

Resumable: a module whose report matches its current source and tests is not run again; an
interrupted module resumes where mutmut stopped (it keeps every verdict as it goes). A changed
module or test file starts that module afresh. Results: ``out/mutation/<module>.json`` per module
and ``out/mutation/survivors.md`` for all of them (counts, then each survivor's line and diff).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest brings tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "bench" / "mutation_targets.tsv"
OUT = ROOT / "out" / "mutation"
SKIP_LINES = [r"\.trace\(", r"\.explain\(", r"\.stats\.kernels\["]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def targets() -> dict[str, list[str]]:
    """The campaign, in order: module path -> its test paths (from ``TARGETS``)."""
    rows = [line.split("\t") for line in TARGETS.read_text().splitlines()]
    return {r[0]: r[1].split() for r in rows if r[0] and not r[0].startswith("#")}


def package_dirs() -> dict[str, str]:
    """Checkout folder -> installed folder (``kernels/src`` -> ``diffcache/kernels``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {folder: name.replace(".", "/") for name, folder in mapping.items()}


def installed_path(module: str) -> str:
    """The module's path in the staging copy."""
    for folder, target in package_dirs().items():
        if module.startswith(folder + "/"):
            return target + module[len(folder) :]
    return module


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def fingerprint(module: str, tests: list[str]) -> str:
    """Hash of the module, every file of its tests (a folder, a file or a pytest node id
    ``file::test[param]``) and each conftest.py above them: a change restarts the module."""
    files = [ROOT / module]
    for t in tests:
        p = ROOT / t.split("::")[0]
        files += [d / "conftest.py" for d in reversed(p.parents) if (d / "conftest.py").exists()]
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    files = list(dict.fromkeys(files))
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def stage(module: str, tests: list[str], work: Path) -> None:
    """A fresh copy of the installed layout with a pyproject.toml configuring mutmut."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "diffcache", work / "diffcache", ignore=IGNORE)
    for folder, target in package_dirs().items():
        shutil.copytree(ROOT / folder, work / target, ignore=IGNORE)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=IGNORE)
    shutil.copytree(ROOT / "bench", work / "bench", ignore=IGNORE)  # tests that run its scripts
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    pytest_ini = pytest_ini["ini_options"] | {"testpaths": tests}
    pytest_ini["addopts"] += " -p no:cacheprovider"
    (work / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in pytest_ini.items())
        + "[tool.mutmut]\n"
        'source_paths = ["diffcache"]\n'
        'also_copy = ["bench/"]\n'
        f"only_mutate = {json.dumps([installed_path(module)])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        f"do_not_mutate_patterns = {json.dumps(SKIP_LINES)}\n"
    )


def source_line(source: list[str], original: list[str], mutant: list[str]) -> int:
    """1-based line of the source where the mutant's function first differs from the original."""
    pairs = zip(original + [""], mutant + [""], strict=False)
    first = next(i for i, (a, b) in enumerate(pairs) if a != b)
    want = [line.strip() for line in original]
    have = [line.strip() for line in source]
    for start in range(len(have) - len(want) + 1):
        if have[start : start + len(want)] == want:
            return start + first + 1
    return 0


def report(module: str, work: Path, seconds: float, stamp: str) -> dict:
    """Counts and survivors of one module (from mutmut's verdicts), written to its JSON file."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    path = installed_path(module)
    meta = json.loads((work / "mutants" / (path + ".meta")).read_text())
    source = (ROOT / module).read_text().splitlines()
    counts: dict[str, int] = {}
    survivors = []
    cwd = os.getcwd()
    os.chdir(work)  # mutmut reads its mutants relative to the working directory
    try:
        for name, code in sorted(meta["exit_code_by_key"].items()):
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status == "killed":
                continue
            diff = get_diff_for_mutant(name, path=path)
            minus = [line[1:] for line in diff.splitlines()[2:] if not line.startswith(("+", "@"))]
            plus = [line[1:] for line in diff.splitlines()[2:] if not line.startswith(("-", "@"))]
            changed = [d for d in difflib.ndiff(minus, plus) if d[:1] in "-+"]
            survivors.append(
                {
                    "mutant": name,
                    "status": status,
                    "line": source_line(source, minus, plus),
                    "change": [c.rstrip() for c in changed],
                }
            )
    finally:
        os.chdir(cwd)
    result = {
        "module": module,
        "fingerprint": stamp,
        "seconds": round(seconds),
        "counts": counts,
        "survivors": survivors,
    }
    (OUT / f"{slug(module)}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_module(module: str, tests: list[str], again: bool) -> dict:
    """Mutate one module (resuming or skipping it when its report is current) and report it."""
    stamp = fingerprint(module, tests)
    done = OUT / f"{slug(module)}.json"
    if not again and done.exists() and json.loads(done.read_text())["fingerprint"] == stamp:
        print(f"{module}: up to date ({done.relative_to(ROOT)})")
        return json.loads(done.read_text())
    work = OUT / "work" / slug(module)
    if again or not (work / "fingerprint").exists() or (work / "fingerprint").read_text() != stamp:
        stage(module, tests, work)
        (work / "fingerprint").write_text(stamp)
    print(f"{module}: mutmut with {' '.join(tests)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    mutmut = Path(sys.executable).with_name("mutmut")
    log = work / "mutmut.log"
    with log.open("a") as f:
        code = subprocess.call(
            [str(mutmut), "run", "--max-children", "1"], cwd=work, env=env, stdout=f, stderr=f
        )
    if code != 0:
        raise SystemExit(f"{module}: mutmut exited with {code}; see {log.relative_to(ROOT)}")
    result = report(module, work, time.perf_counter() - start, stamp)
    print(f"{module}: {result['counts']} in {result['seconds']} s", flush=True)
    return result


def summary(results: list[dict]) -> str:
    """Markdown: one line of counts per module, then every survivor with its line and change."""
    lines = [
        "| module | mutants | killed | survived | other | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["counts"]
        n, killed, survived = sum(c.values()), c.get("killed", 0), c.get("survived", 0)
        other = n - killed - survived
        lines.append(f"| {r['module']} | {n} | {killed} | {survived} | {other} | {r['seconds']} |")
    for r in results:
        for s in r["survivors"]:
            lines += ["", f"{r['module']}:{s['line']} {s['status']} `{s['mutant']}`", "```diff"]
            lines += s["change"] + ["```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", help="one module of bench/mutation_targets.tsv (default: all)")
    p.add_argument("--again", action="store_true", help="rerun even when the report is current")
    args = p.parse_args(argv)
    campaign = targets()
    if args.module is not None and args.module not in campaign:
        p.error(f"--module {args.module} is not in {TARGETS.relative_to(ROOT)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for module in [args.module] if args.module else campaign:
        run_module(module, campaign[module], args.again)
    done = [OUT / f"{slug(m)}.json" for m in campaign]
    results = [json.loads(f.read_text()) for f in done if f.exists()]
    (OUT / "survivors.md").write_text(summary(results))
    print(f"survivors of {len(results)} modules: {(OUT / 'survivors.md').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
