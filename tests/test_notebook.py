"""The notebook flow as the README writes it, in a real Jupyter kernel: the whole file pasted as
one cell runs the default experiment, the README's next call chooses other settings, and a
misspelt flag is one error line, never a traceback."""

import json
import os
import re
import shutil

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, SCRIPT, synthetic_arrays
from nbclient import NotebookClient

# The parent's environment (CUDA_VISIBLE_DEVICES, LD_LIBRARY_PATH ...): nbclient's env replaces it whole.
KERNEL_ENV = {**os.environ, "TQDM_DISABLE": "1"}
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # where a kernel's run must train


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
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=KERNEL_ENV)
    pasted, readme, bad = (outputs(c) for c in nb.cells)

    assert "| Round | Weights Remaining | Ticket | Control |" in pasted[0]  # the default run's table
    assert (tmp_path / "results" / "results.csv").exists() and "error" not in pasted[1]
    assert json.loads((tmp_path / "results" / "config.json").read_text())["device"] == DEVICE
    assert any("image/png" in o.get("data", {}) for o in nb.cells[0].outputs)  # figures shown inline

    assert readme[2] == "0", readme[1]  # works after the earlier run, the first time
    out = re.search(r'"--out", "([^"]+)"', call)[1]
    assert (tmp_path / out / "results.csv").exists()

    assert bad[2] == "2"
    assert bad[1].strip().splitlines() == [
        "lot_improved: error: unrecognised argument '--trails'; did you mean --trials?"
    ]


def test_run_magic_takes_its_flags_refuses_a_misspelt_one_and_main_reads_switches_set_in_a_cell(tmp_path):
    # `%run lot_improved.py FLAGS` is how notebooks run scripts: FLAGS count as on a command line.
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "mnist.npz", **synthetic_arrays())
    shutil.copy(SCRIPT, tmp_path / "lot_improved.py")
    tiny = '"--rounds", "1", "--epochs", "1", "--out", "runs/y"'
    cells = [
        "%run lot_improved.py --rounds 1 --epochs 1 --out runs/x",
        "%run lot_improved.py --trails 2",
        f'import os\nos.environ["LOT_CHECKPOINT_EVERY_S"] = "soon"\nmain([{tiny}])',
        f'os.environ["LOT_CHECKPOINT_EVERY_S"] = "0"\nmain([{tiny}])',
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=KERNEL_ENV)
    ran, misspelt, bad_switch, good_switch = (outputs(c) for c in nb.cells)

    rows = pd.read_csv(tmp_path / "runs" / "x" / "results.csv")
    assert json.loads((tmp_path / "runs" / "x" / "config.json").read_text())["device"] == DEVICE
    assert sorted(rows["round"].unique()) == [0, 1] and not (tmp_path / "results").exists()
    assert "finished in" in ran[1] and " s; outputs in runs/x/" in ran[1]  # seconds, under a minute
    assert misspelt[1].strip().splitlines() == [
        "lot_improved: error: unrecognised argument '--trails'; did you mean --trials?"
    ]
    assert not (tmp_path / "results").exists()
    assert bad_switch[2] == "2" and bad_switch[1].strip().splitlines() == [
        "lot_improved: error: LOT_CHECKPOINT_EVERY_S must be a number of seconds, 0 or more, got 'soon'"
    ]
    assert good_switch[2] == "0" and (tmp_path / "runs" / "y" / "results.csv").exists()
