"""The code stays as legible as it reads today: ruff's lint and format pass, and the script keeps
small functions (at most 80 lines, at most 8 parameters) with no function defined inside another."""

import ast
import shutil
import subprocess

import pytest
from conftest import ROOT, SCRIPT

RUFF = ["--isolated", "--line-length", "120", "--target-version", "py310"]
LINT = ["--select", "E,F,W,I,B,UP", "--ignore", "B905"]
LINT += ["--config", "lint.per-file-ignores = {'tests/*' = ['E731', 'E741', 'B023']}"]  # tests' small lambdas


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by requirements.txt")
@pytest.mark.parametrize("command", [["check", *RUFF, *LINT], ["format", "--check", *RUFF]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    proc = subprocess.run(["ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_function_of_the_script_is_short_narrow_and_flat():
    tree = ast.parse(SCRIPT.read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    for f in functions:
        a = f.args
        parameters = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
        assert f.end_lineno - f.lineno + 1 <= 80 and parameters <= 8, f.name
        assert not any(isinstance(inner, ast.FunctionDef) for inner in ast.walk(f) if inner is not f), f.name
