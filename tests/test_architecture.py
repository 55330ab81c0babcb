"""The house rules of the code (issue 22, House v3), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffcache"
#: the core engine, and the front doors on it that every family goes through
CORE = ("api", "session", "drivers", "runstate", "hooks", "sites", "adapter", "registry", "plan")
CORE += ("options", "yamlio", "request", "generate", "profile")
#: what one family or another calls its request fields and outputs: adapters declare them
VOCABULARY = {"prompt", "class_label", "class_labels", "frames", "images", "texts", "generator"}
VOCABULARY |= {"output_type", "negative_prompt", "gen_length", "num_frames"}


@pytest.mark.parametrize("module", CORE)
def test_the_core_names_no_family_request_field_or_output(module: str) -> None:
    """Request fields and outputs end in the adapters (``Field.input``, ``Adapter.output``,
    ``call_args``, ``seed_arg``): no string constant, attribute or keyword of the core is one
    of a family's field or output names (docstrings and comments may mention them)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    named = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            if isinstance(node.value, str) and node.value in VOCABULARY:
                named.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Attribute) and node.attr in VOCABULARY:
            named.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.keyword) and node.arg in VOCABULARY:
            named.append((node.lineno, f"{node.arg}="))
    assert named == [], f"diffcache/{module}.py names family vocabulary at {named}"
