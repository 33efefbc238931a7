"""``colabx compare`` on the tiny phantom: the tables, and a restart after an interruption that
trains no finished run again; the paired bootstrap interval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from colabx.cli import main
from colabx.data.phantom import write_phantom
from colabx.train.compare import paired_bootstrap
from colabx.train.trainer import Trainer

TINY = ["--epochs", "2", "--iterations", "2", "--base-features", "4", "--num-pool", "2",
        "--patch-size", "16", "16", "8", "--num-workers", "0", "--no-progress", "--threads", "1",
        "--val-cases", "1", "--snapshot-every", "0"]


def test_paired_bootstrap():
    assert paired_bootstrap([0.2] * 7) == pytest.approx((0.2, 0.2, 0.2))
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.05, 400)
    mean, lo, hi = paired_bootstrap(list(d))
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.3 * se)  # normal theory
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.3 * se)
    assert all(np.isnan(paired_bootstrap([float("nan")])))


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

    payload = json.loads((out / "compare.json").read_text())
    table = payload["table"]
    assert set(table) == {"none", "lcc"}
    for post in ("none", "lcc"):
        assert set(table[post]) == {"vanilla", "colab"}
        dsc = table[post]["colab"]["dice"]
        assert len(dsc["per_seed"]) == 2 and dsc["mean"] == pytest.approx(np.mean(dsc["per_seed"]))
        assert dsc["vs_vanilla"]["pairs"] == 4  # 2 test cases x 2 seeds
        assert "vs_vanilla" not in table[post]["vanilla"]["dice"]
    # the paired difference is the mean over (case, seed) of colab - vanilla
    cases = payload["cases"]
    diffs = [cases[f"colab-seed{s}"]["none"][c]["dice"] - cases[f"vanilla-seed{s}"]["none"][c]
             ["dice"] for s in (0, 1) for c in cases["colab-seed0"]["none"]]
    assert table["none"]["colab"]["dice"]["vs_vanilla"]["mean"] == pytest.approx(np.mean(diffs))
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
