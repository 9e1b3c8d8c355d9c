"""The command line, as users run it: every output of a tiny real run, determinism, bad input,
and the pasted-notebook entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, SCRIPT, TINY, lot, refused, synthetic_arrays


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_cli(*TINY, "--trials", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_tiny_run_writes_every_output_and_nothing_half_written(tiny_run):
    out, _ = tiny_run
    expected = {
        "results.csv",
        "curves.csv",
        "masks.pt",
        "tickets.pt",
        "graph_improved.png",
        "layers.png",
        "pixels.png",
        "summary.md",
        "config.json",
        "checkpoint.pt",
    }
    assert {p.name for p in out.iterdir()} == expected  # no temp files left behind
    for png in ("graph_improved.png", "layers.png", "pixels.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_csv_has_one_row_per_trial_round_variant_with_exact_weight_counts(tiny_run):
    rows = pd.read_csv(tiny_run[0] / "results.csv")
    assert list(rows.columns) == [
        "trial",
        "round",
        "variant",
        "weights",
        "weights_pct",
        "fc1_pct",
        "fc2_pct",
        "fc3_pct",
        "train_loss",
        "test_loss",
        "test_acc",
    ]
    assert len(rows) == 2 * 3 * 2 and not rows.duplicated(["trial", "round", "variant"]).any()
    assert sorted(rows.weights.unique(), reverse=True) == [266200, 212960, 170368]
    assert rows.weights_pct.round(2).tolist().count(64.0) == 4
    dense = rows[rows["round"] == 0]
    assert (dense[["fc1_pct", "fc2_pct", "fc3_pct"]] == 100.0).all().all()
    per_round = rows.groupby(["trial", "round"]).agg(lambda c: c.nunique())
    assert (per_round[["weights", "fc1_pct"]] == 1).all().all()  # ticket and control share the mask
    assert rows.test_acc.between(0, 100).all() and (rows.test_acc > 30).all()  # chance is 10%


def test_curves_csv_has_every_epoch_and_ends_where_results_csv_reports(tiny_run):
    out = tiny_run[0]
    curves, rows = pd.read_csv(out / "curves.csv"), pd.read_csv(out / "results.csv")
    assert list(curves.columns) == ["trial", "round", "variant", "epoch", "train_loss", "test_loss", "test_acc"]
    assert len(curves) == 2 * 3 * 2 * 2
    last = curves[curves.epoch == 2].merge(rows, on=["trial", "round", "variant"], suffixes=("", "_final"))
    assert (last.test_acc == last.test_acc_final).all()


def test_masks_pt_loads_safely_and_matches_the_reported_counts(tiny_run):
    out = tiny_run[0]
    masks = lot.load_masks(out)
    rows = pd.read_csv(out / "results.csv")
    assert set(masks) == {"fc1", "fc2", "fc3"}
    assert masks["fc1"].shape == (2, 3, 300, 784) and masks["fc3"].shape == (2, 3, 10, 100)
    assert all(m.dtype == torch.bool for m in masks.values())
    for t in range(2):
        for r in range(3):
            kept = sum(int(masks[name][t, r].sum()) for name in ("fc1", "fc2", "fc3"))
            assert kept == rows[(rows.trial == t) & (rows["round"] == r)].weights.iloc[0]
            if r:
                assert not (masks["fc1"][t, r] & ~masks["fc1"][t, r - 1]).any()
    assert not torch.equal(masks["fc1"][0, 2], masks["fc1"][1, 2])  # trials are independent
    assert (out / "masks.pt").stat().st_size <= 2 * 0.5e6  # at most 0.5 MB a trial: a byte a weight


def test_a_masks_pt_of_plain_bool_tensors_as_older_runs_wrote_still_loads(tiny_run, tmp_path):
    masks = lot.load_masks(tiny_run[0])
    torch.save(masks, tmp_path / "masks.pt")
    old = lot.load_masks(tmp_path)
    assert list(old) == list(masks) and all(torch.equal(old[k], masks[k]) for k in masks)


def test_summary_and_console_show_the_table_with_spread_over_trials(tiny_run):
    out, proc = tiny_run
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0] == "| Round | Weights Remaining | Ticket | Control | Delta |"
    assert "| 2 | 64.00% |" in summary and "±" in summary
    assert summary.split("\n\n")[0] in proc.stdout


def test_config_json_records_every_setting_and_the_environment(tiny_run):
    cfg = json.loads((tiny_run[0] / "config.json").read_text())
    assert cfg["config"]["trials"] == 2 and cfg["config"]["train_subset"] == 600
    assert set(cfg["config"]) == {f.name for f in lot.dataclasses.fields(lot.Config)}
    assert cfg["torch"] == torch.__version__ and cfg["device"] == "cpu"
    assert cfg["status"] == "finished" and cfg["wall_time_s"] > 0


def test_same_seed_twice_gives_identical_results_and_another_seed_does_not(tmp_path):
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (5, 5, 6)):
        assert lot.main([*TINY, "--rounds", "1", "--seed", str(seed), "--out", str(out)]) == 0
    a, b, c = ((o / "results.csv").read_bytes() for o in outs)
    assert a == b
    for name in ("curves.csv", "masks.pt"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert a != c


def test_help_documents_every_flag():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for f in lot.dataclasses.fields(lot.Config):
        assert "--" + f.name.replace("_", "-") in proc.stdout
        assert f.metadata["help"].split()[0] in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert (
        "uses MKL (default: on where PyTorch has MKL, else off)" in text
        and "(default: off)" in text
        and "stacked (default: 1)" in text
    )


BAD_INPUTS = {
    "prune rate 0": ["--prune-rate", "0"],
    "prune rate 1": ["--prune-rate", "1"],
    "prune rate 1.5": ["--prune-rate", "1.5"],
    "rounds 0": ["--rounds", "0"],
    "epochs -1": ["--epochs", "-1"],
    "batch size 0": ["--batch-size", "0"],
    "trials 0": ["--trials", "0"],
    "subset 0": ["--train-subset", "0"],
    "subset too large": ["--train-subset", "60001"],
    "epochs not a number": ["--epochs", "many"],
    "lr nan": ["--lr", "nan"],
    "unknown device": ["--device", "tpu"],
    "bad cuda index": ["--device", "cuda:x"],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_exit_2_and_out_untouched(case, tmp_path, capsys):
    out = tmp_path / "out"
    refused([*BAD_INPUTS[case], "--out", str(out)], capsys, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    assert lot.main(["--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_out_pointing_to_a_file_or_an_unwritable_place_is_refused(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert lot.main([*TINY, "--out", str(target)]) == 2
    assert target.read_text() == "keep me"
    assert lot.main([*TINY, "--out", "/proc/lot_improved_out"]) == 2  # not writable, even for root
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is a file" in err[0] and "not writable" in err[1]


def test_bad_input_from_the_shell_prints_no_traceback(tmp_path):
    proc = run_cli("--rounds", "0", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = run_cli("--epochs", "x", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--epochs" in proc.stderr


@pytest.mark.parametrize(
    "typed,meant",
    [
        (["--trails", "3"], "--trials"),
        (["--ep", "1"], "--epochs"),
        (["--prune_rate", "0.3"], "--prune-rate"),
        (["-f", "kernel.json"], ""),
    ],
)
def test_a_misspelt_abbreviated_or_unknown_flag_is_refused_naming_the_closest_real_one(typed, meant, tmp_path):
    # Outside a notebook every argument is the user's: none is ignored, none is guessed at.
    proc = run_cli(*typed, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"unrecognised argument '{typed[0]}'" in proc.stderr
    assert (f"did you mean {meant}?" in proc.stderr) == bool(meant), proc.stderr


def fake_notebook(monkeypatch, shown: list) -> None:
    """A live IPython as a notebook kernel has one, recording what it is asked to display."""
    import types

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: object()
    display = types.ModuleType("IPython.display")
    display.Image = lambda filename: filename
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)


def test_in_a_notebook_the_kernels_arguments_are_ignored_and_resuming_is_shown_as_a_main_call(monkeypatch):
    fake_notebook(monkeypatch, [])
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/share/jupyter/kernel-1.json"])
    assert lot.command_line() == []
    cfg = lot.parse_config(["--trials", "3", "--epochs", "10"])
    assert lot.resume_command(cfg) == 'main(["--epochs", "10", "--trials", "3", "--resume"])'


def test_pasted_into_a_notebook_cell_it_runs_shows_plots_and_never_raises_system_exit(tmp_path, monkeypatch):
    # A notebook cell: no __file__, __name__ == "__main__", a live IPython, kernel args in sys.argv.
    # The default run, on a tiny synthetic data/mnist.npz in the notebook's folder (2 steps an epoch).
    shown = []
    fake_notebook(monkeypatch, shown)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "mnist.npz", **synthetic_arrays())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "k.json"])
    cell = {"__name__": "__main__"}
    exec(compile(SCRIPT.read_text(), "<cell>", "exec"), cell)
    assert len(pd.read_csv(tmp_path / "results" / "results.csv")) == 21 * 2
    assert shown == [str(Path("results") / f) for f in ("graph_improved.png", "layers.png", "pixels.png")]
    assert cell["main"](["--rounds", "0"]) == 2  # bad input: a return code, no SystemExit


def test_run_from_another_folder_finds_the_bundled_data(tmp_path):
    proc = run_cli(*TINY, "--rounds", "1", "--epochs", "1", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "results.csv").exists()


def test_readme_flags_table_lists_exactly_the_cli_flags_with_their_defaults():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Flags")[1].split("\n\n")[1]
    documented = {line.split("`")[1]: line.split("|")[2].strip() for line in table.splitlines()[2:]}
    flags = {"--" + f.name.replace("_", "-"): f.default for f in lot.dataclasses.fields(lot.Config)}
    assert set(documented) == set(flags)
    for flag, default in flags.items():
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert documented[flag] == str(default), flag


def test_replot_redraws_summary_and_figures_from_results_csv_alone(tiny_run, tmp_path, capsys):
    out = tmp_path / "replot"
    out.mkdir()
    (out / "results.csv").write_bytes((tiny_run[0] / "results.csv").read_bytes())
    assert lot.main(["--replot", "--out", str(out)]) == 0
    assert (out / "summary.md").read_text() == (tiny_run[0] / "summary.md").read_text()
    for png in ("graph_improved.png", "layers.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lot.main(["--replot", "--out", str(empty)]) == 2
    assert "cannot read" in capsys.readouterr().err.strip().splitlines()[-1]
