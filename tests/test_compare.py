"""``colabx compare`` on the tiny phantom: the tables, and a restart after an interruption that
trains no finished run again; the paired interval over seeds and its coverage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from colabx.cli import main
from colabx.data.phantom import write_phantom
from colabx.train.compare import paired_seed_interval
from colabx.train.trainer import Trainer

TINY = ["--epochs", "2", "--iterations", "2", "--base-features", "4", "--num-pool", "2",
        "--patch-size", "16", "16", "8", "--num-workers", "0", "--no-progress", "--threads", "1",
        "--val-cases", "1", "--snapshot-every", "0"]


def test_paired_seed_interval_is_the_t_interval_over_seeds():
    from scipy import stats

    d = [0.119, -0.019, -0.006]  # per-seed mean differences
    mean, lo, hi = paired_seed_interval(d)
    want = stats.t.interval(0.95, 2, loc=np.mean(d), scale=stats.sem(d))
    assert mean == pytest.approx(np.mean(d)) and (lo, hi) == pytest.approx(want)
    assert paired_seed_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2, 0.2))
    one = paired_seed_interval([0.1, float("nan")])  # one seed left: no interval
    assert one[0] == pytest.approx(0.1) and np.isnan(one[1]) and np.isnan(one[2])
    assert all(np.isnan(paired_seed_interval([float("nan")])))


def test_paired_interval_covers_the_true_difference_across_seed_variation():
    """3 seeds x 8 cases, true difference 0, differences = seed effect + case effect + noise:
    the interval over seeds covers 0 in about 95 % of 400 simulated studies. (Pooling the 24
    (case, seed) pairs as independent covered it in 46-73 % when seeds vary.)"""
    rng = np.random.default_rng(0)
    for seed_sd, case_sd, noise_sd in ((0.0, 0.0, 0.03), (0.03, 0.0, 0.03), (0.05, 0.02, 0.02)):
        covered = 0
        for _ in range(400):
            d = (rng.normal(0, seed_sd, (3, 1)) + rng.normal(0, case_sd, (1, 8))
                 + rng.normal(0, noise_sd, (3, 8)))
            _, lo, hi = paired_seed_interval(d.mean(axis=1).tolist())
            covered += lo <= 0.0 <= hi
        assert 0.92 <= covered / 400 <= 0.98, (seed_sd, case_sd, noise_sd, covered)


def test_compare_tables_and_restart(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "cache"))
    data = write_phantom(tmp_path / "phantom", preset="tiny", num_cases=3, num_test=2)
    out = tmp_path / "cmp"
    args = ["compare", str(data), "--modes", "vanilla", "colab", "--seeds", "0", "1", "--out",
            str(out), *TINY]

    class Interrupted(Trainer):
        """Stops colab-seed0 after one of its two epochs, as a Ctrl-C would."""

        def run(self, max_epochs=None):
            if self.out.name == "colab-seed0" and self.start_epoch == 0:
                super().run(max_epochs=1)
                raise KeyboardInterrupt
            return super().run(max_epochs)

    monkeypatch.setattr("colabx.train.trainer.Trainer", Interrupted)
    assert main(args) == 130  # one line, no traceback
    assert capsys.readouterr().err.endswith("colabx compare: interrupted\n")
    monkeypatch.undo()
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "cache"))
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "vanilla-seed0",
                                                       out / "vanilla-seed1")}
    assert (out / "colab-seed0" / "checkpoint_latest.pth").is_file()
    assert not (out / "colab-seed0" / "checkpoint_final.pth").exists()
    mtimes = {n: (out / n / "checkpoint_final.pth").stat().st_mtime_ns for n in finished}

    starts = []
    original_init = Trainer.__init__

    def spy(self, cfg, out_dir, **kw):
        starts.append((out_dir.name, kw.get("resume", False)))
        original_init(self, cfg, out_dir, **kw)

    monkeypatch.setattr(Trainer, "__init__", spy)
    assert main(args) == 0
    assert starts == [("colab-seed0", True), ("colab-seed1", False)]
    for n, t in mtimes.items():
        assert (out / n / "checkpoint_final.pth").stat().st_mtime_ns == t  # not retrained
    text = capsys.readouterr().out
    assert "finished earlier, skipped" in text and "| colab |" in text
    # finished runs of other options are refused, before anything trains
    other = [a if a != "4" else "6" for a in args]  # --base-features 6
    monkeypatch.setattr(Trainer, "__init__", spy)
    starts.clear()
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "this finished run was trained with other options (base_features: run 4, asked 6)" \
        in err
    assert starts == []

    payload = json.loads((out / "compare.json").read_text())
    table = payload["table"]
    assert set(table) == {"none", "lcc"}
    for post in ("none", "lcc"):
        assert set(table[post]) == {"vanilla", "colab"}
        dsc = table[post]["colab"]["dice"]
        assert len(dsc["per_seed"]) == 2 and dsc["mean"] == pytest.approx(np.mean(dsc["per_seed"]))
        assert dsc["vs_vanilla"]["pairs"] == 4  # 2 test cases x 2 seeds
        assert dsc["vs_vanilla"]["seeds"] == 2
        assert "vs_vanilla" not in table[post]["vanilla"]["dice"]
    # each seed's number is its run's evaluation.json foreground mean
    for s in (0, 1):
        fg = json.loads((out / f"colab-seed{s}" / "evaluation.json").read_text())
        assert table["none"]["colab"]["dice"]["per_seed"][s] == fg["foreground_mean"]["dice"]
    # the paired difference: per seed the mean over cases of colab - vanilla, then over seeds
    cases = payload["cases"]
    per_seed = [np.mean([cases[f"colab-seed{s}"]["none"][c]["dice"]
                         - cases[f"vanilla-seed{s}"]["none"][c]["dice"]
                         for c in cases["colab-seed0"]["none"]]) for s in (0, 1)]
    vs = table["none"]["colab"]["dice"]["vs_vanilla"]
    assert vs["per_seed"] == pytest.approx(per_seed)
    assert (vs["mean"], *vs["ci95"]) == pytest.approx(paired_seed_interval(per_seed))
    for name in ("compare.md", "compare.csv", "compare.png"):
        assert (out / name).stat().st_size > 100
    assert "Δ" in (out / "compare.md").read_text()


def test_compare_refuses_seed_and_mode_options(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    for key, value in (("seed", 3), ("mode", "colab")):
        cfg.write_text(f"{key}: {value}\n")
        assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "c")]) == 2
        assert f"{key}: set by compare for each run" in capsys.readouterr().err
    assert main(["compare", "--modes", "colab", "colab", "--out", str(tmp_path / "c")]) == 2
    assert "modes: expected distinct modes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_seed_means_follow_the_evaluation_and_undefined_ones_read_n_a():
    """Two ROI classes, one missing from a case: the seed's mean is the foreground mean of
    evaluation.json (per class over cases, then over classes: (0.2 + 0.9) / 2), not the mean of
    the cases' class means ((0.2 + 0.9) / 2 and 0.2 give 0.375); a metric undefined in every
    seed reads n/a, not nan."""
    from colabx.inference.metrics import summarize
    from colabx.train.compare import _case_values, _foreground, _markdown, _summaries

    def metrics(dice, precision):
        return {"dice": dice, "sensitivity": 1.0, "precision": precision, "hd95": 1.0,
                "tp": 1, "fp": 0, "fn": 0, "n_pred": 1, "n_ref": 1}

    per_case = [{1: metrics(0.2, math.nan), 2: metrics(0.9, math.nan)},
                {1: metrics(0.2, math.nan)}]
    result = {**summarize(per_case),
              "cases": {f"c{i}": {"metrics": c} for i, c in enumerate(per_case)}}
    values = {(mode, s): {"none": _case_values(result)} for mode in ("vanilla", "colab")
              for s in (0, 1)}
    fg = {key: {"none": _foreground(result)} for key in values}
    table = _summaries(values, fg, ["vanilla", "colab"], [0, 1])
    dsc = table["none"]["colab"]["dice"]
    assert dsc["per_seed"] == [pytest.approx(0.55)] * 2 and dsc["mean"] == pytest.approx(0.55)
    assert math.isnan(table["none"]["colab"]["precision"]["mean"])
    text = _markdown(table, [0, 1])
    assert "nan" not in text and "| n/a ± n/a<br>Δ n/a [n/a, n/a] |" in text


def test_several_roi_classes_get_a_table_each():
    """Multi-class audit: with c >= 3 compare showed only the foreground mean, which can hide
    one class getting worse. Each ROI class's table uses that class alone: its seed value is
    the class's mean over the cases (evaluation.json's "mean"), its pairs only the cases where
    the class is defined."""
    from types import SimpleNamespace

    from colabx.inference.metrics import summarize
    from colabx.train.compare import _csv, _markdown, _roi_classes, _table

    def metrics(dice):
        return {"dice": dice, "sensitivity": 1.0, "precision": 1.0, "hd95": 1.0,
                "tp": 1, "fp": 0, "fn": 0, "n_pred": 1, "n_ref": 1}

    def result(liver, tumour):
        per_case = [{1: metrics(liver[0]), 2: metrics(tumour)}, {1: metrics(liver[1])}]
        # as read back from evaluation.json: class keys are strings there
        cases = {f"c{i}": {"metrics": {str(k): v for k, v in c.items()}}
                 for i, c in enumerate(per_case)}
        return {**summarize(per_case), "cases": cases}

    results = {("vanilla", s): {"none": result((0.8, 0.6), 0.5)} for s in (0, 1)}
    results.update({("colab", s): {"none": result((0.7, 0.5), 0.9 + 0.02 * s)}
                    for s in (0, 1)})
    modes, seeds = ["vanilla", "colab"], [0, 1]
    ds = SimpleNamespace(labels={"background": 0, "liver": 1, "tumour": 2, "ignore": 3},
                         ignore_label=3)
    assert _roi_classes(ds) == {"liver": 1, "tumour": 2}
    assert _roi_classes(SimpleNamespace(labels={"background": 0, "liver": 1},
                                        ignore_label=None)) == {}
    liver = _table(results, modes, seeds, 1)[0]["none"]["colab"]["dice"]
    tumour = _table(results, modes, seeds, 2)[0]["none"]["colab"]["dice"]
    assert liver["per_seed"] == [pytest.approx(0.6)] * 2
    assert liver["vs_vanilla"]["mean"] == pytest.approx(-0.1) and \
        liver["vs_vanilla"]["pairs"] == 4
    assert tumour["per_seed"] == [pytest.approx(0.9), pytest.approx(0.92)]
    assert tumour["vs_vanilla"]["mean"] == pytest.approx(0.41) and \
        tumour["vs_vanilla"]["pairs"] == 2  # the tumour is in one case of two
    table = _table(results, modes, seeds)[0]
    per_class = {name: _table(results, modes, seeds, v)[0] for name, v in _roi_classes(ds).items()}
    rows = _csv(table, per_class).splitlines()
    assert rows[0].endswith(",pairs,class") and len(rows) == 1 + 3 * 2 * 4
    assert sum(r.endswith(",tumour") for r in rows) == 8
    assert "### class tumour, post-processing: none" in _markdown(per_class["tumour"], seeds,
                                                                  "class tumour, ")
