"""The notebook flow as the README writes it, in a real Jupyter kernel: the whole file pasted as
one cell runs the default experiment, the README's next call chooses other settings, and a
misspelt flag is one error line, never a traceback."""

import re

import nbformat
import numpy as np
import pytest
from conftest import ROOT, SCRIPT, synthetic_arrays
from nbclient import NotebookClient


def readme_notebook_call() -> str:
    """The main([...]) call the README's notebook section tells users to run in a later cell."""
    section = (ROOT / "README.md").read_text().split("**In a notebook")[1].split("\n## ")[0]
    calls = re.findall(r"^main\(\[.*\]\)$", section, flags=re.M)
    assert calls, "the README's notebook section shows no main([...]) call"
    return calls[0]


def outputs(cell) -> tuple[str, str, str]:
    """(stdout, stderr, the cell's value) of an executed cell."""
    text = {"stdout": "", "stderr": ""}
    value = ""
    for out in cell.outputs:
        if out.output_type == "stream":
            text[out.name] += out.text
        elif out.output_type == "execute_result":
            value = out.data["text/plain"]
        elif out.output_type == "error":
            pytest.fail(f"cell raised {out.ename}: {out.evalue}")
    return text["stdout"], text["stderr"], value


def test_pasted_cell_then_the_readme_call_then_a_bad_flag_in_a_real_kernel(tmp_path):
    # The notebook's folder holds a tiny synthetic data/mnist.npz (2 steps an epoch), so the
    # pasted cell's full default run (21 rounds x 20 epochs) takes seconds.
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "mnist.npz", **synthetic_arrays())
    call = readme_notebook_call()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (SCRIPT.read_text(), call, 'main(["--trails", "3"])')]
    env = {"TQDM_DISABLE": "1"}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    pasted, readme, bad = (outputs(c) for c in nb.cells)

    assert "| Round | Weights Remaining | Ticket | Control |" in pasted[0]  # the default run's table
    assert (tmp_path / "results" / "results.csv").exists() and "error" not in pasted[1]
    assert any("image/png" in o.get("data", {}) for o in nb.cells[0].outputs)  # figures shown inline

    assert readme[2] == "0", readme[1]  # works after the earlier run, the first time
    out = re.search(r'"--out", "([^"]+)"', call)[1]
    assert (tmp_path / out / "results.csv").exists()

    assert bad[2] == "2"
    assert bad[1].strip().splitlines() == [
        "lot_improved: error: unrecognised argument '--trails'; did you mean --trials?"
    ]
