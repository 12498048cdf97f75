"""``tskd benchmark`` with the random-budget protocol (TSKDLib.evaluation.benchmark) on the bundled
HC18 ultrasound images: split by subject, one row per method, budget, seed, test case and class,
and the tables a reader of benchmarks/RESULTS.md relies on. Tiny budgets: the figures are
meaningless here (full budgets: benchmarks/)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from TSKDLib.cli import main as cli
from TSKDLib.data.case import load_2d_cases
from TSKDLib.evaluation.benchmark import split_2d
from TSKDLib.pipeline.config import tiny_config


@pytest.mark.usefixtures("torch_threads")
def test_random_budget_benchmark_writes_its_tables(hc18_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config()))
    out = tmp_path / "out"
    argv = ["benchmark", "--images", hc18_dir / "images", "--masks", hc18_dir / "masks",
            "--class-map", hc18_dir / "labels.json", "--test-subjects", "4", "--budgets", "2", "3",
            "--seeds", "0", "1", "--methods", "scratch", "--config", config, "--out", out]
    assert cli.main([str(a) for a in argv]) == 0

    cases = load_2d_cases(hc18_dir / "images", hc18_dir / "masks", hc18_dir / "labels.json",
                          mask_suffix="_Annotation", mask_threshold=128)
    train, test = split_2d(cases, 4)
    assert not {c.subject for c in train} & {c.subject for c in test}
    rows = list(csv.DictReader((out / "results.csv").open()))
    # every test image, and only those, scored once per budget and seed
    assert sorted(r["case"] for r in rows) == sorted(c.name for c in test for _ in range(2 * 2))
    assert {(r["method"], r["budget"], r["seed"]) for r in rows} == {
        ("scratch", b, s) for b in ("2", "3") for s in ("0", "1")}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)

    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| dataset | method | Dice @2 | Dice @3 | HD95 @2 | HD95 @3 |"
    assert md[2].startswith("| hc18 | scratch | ")
    tools = json.loads(md[-1].removeprefix("tools: "))
    assert tools["torch"] == torch.__version__
    timings = json.loads((out / "timings.json").read_text())
    assert timings["distill_scratch"]["runs"] == 4
