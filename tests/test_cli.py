"""The ``colabx`` command line: make-phantom, preprocess, train errors, predict and evaluate."""

from __future__ import annotations

import json

import pytest

from colabx.cli import main
from colabx.data import load_dataset


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "phantom"
    assert main(["make-phantom", str(d), "--preset", "tiny", "--cases", "3",
                 "--test-cases", "1"]) == 0
    return d


def test_make_phantom_writes_an_nnunet_dataset(phantom, capsys):
    ds = load_dataset(phantom)
    assert len(ds.cases) == 3 and len(ds.test_cases) == 1
    assert main(["make-phantom", str(phantom), "--preset", "tiny"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_preprocess_then_cached(phantom, tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["preprocess", str(phantom), "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert (out / "plans.json").is_file() and "written" in text
    # a folder of one's own: the command that trains on it
    assert f"train on them with: colabx train {phantom} --preprocessed {out}" in text
    spaced = tmp_path / "my pre"
    assert main(["preprocess", str(phantom), "--out", str(spaced), "--workers", "0",
                 "--target-spacing", "2", "2", "2"]) == 0
    assert f"--preprocessed '{spaced}' --target-spacing 2.0 2.0 2.0" in capsys.readouterr().out
    assert main(["preprocess", str(phantom), "--out", str(out), "--workers", "0"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_train_option_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nlearnig_rate: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "learnig_rate: unknown configuration key" in capsys.readouterr().err
    assert main(["train", "--t", "1", "--mode", "colab"]) == 2
    assert "t: mode 'colab' needs t >= 2" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_train_predict_evaluate(phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["train", str(phantom), "--mode", "vanilla", "--epochs", "1", "--iterations", "2",
            "--base-features", "4", "--num-pool", "2", "--patch-size", "16", "16", "8",
            "--num-workers", "0", "--no-progress", "--threads", "1", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final evaluation on 1 held-out test cases" in out and "DSC" in out
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    preds = tmp_path / "preds"
    assert main(["predict", str(run), str(phantom / "imagesTs"), str(preds), "--device",
                 "cpu"]) == 0
    assert sorted(p.name for p in preds.iterdir()) == ["colabx_predict.json",
                                                       "phantom_test_000.nii.gz"]
    assert main(["evaluate", str(preds), str(phantom / "labelsTs"), "--labels",
                 str(phantom / "dataset.json")]) == 0
    summary = json.loads((preds / "summary.json").read_text())
    assert summary["num_cases"] == 1 and 0 <= summary["foreground_mean"]["dice"] <= 1
    assert "mean" in capsys.readouterr().out
    # post-processed predictions score as post-processing them before evaluation does
    lcc = tmp_path / "lcc"
    assert main(["predict", str(run), str(phantom / "imagesTs"), str(lcc), "--postprocess",
                 "lcc"]) == 0
    for folder, post in ((lcc, "none"), (preds, "lcc")):
        assert main(["evaluate", str(folder), str(phantom / "labelsTs"), "--labels",
                     str(phantom / "dataset.json"), "--postprocess", post, "--out",
                     str(tmp_path / f"{folder.name}-{post}.json")]) == 0
    a = json.loads((tmp_path / "lcc-none.json").read_text())
    b = json.loads((tmp_path / "preds-lcc.json").read_text())
    assert b["postprocess"] == "lcc" and a["foreground_mean"] == b["foreground_mean"]
    capsys.readouterr()
    # --out NAME.csv would have the per-case CSV replace the summary: refused before scoring
    assert main(["evaluate", str(preds), str(phantom / "labelsTs"), "--labels",
                 str(phantom / "dataset.json"), "--out", str(tmp_path / "scores.csv")]) == 2
    assert "cannot end in .csv" in capsys.readouterr().err
    assert not (tmp_path / "scores.csv").exists()


def test_bench_compares_with_the_twins(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--ops", "distance_transform", "--min-time", "0",
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    labels = {k for row in payload["rows"] for k in row["timings"]}
    assert {"colabx", "eager", "scipy"} <= labels
    assert "| distance_transform |" in capsys.readouterr().out
