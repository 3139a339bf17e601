"""prunec sweep: CSV, plot and kept-token picture for a small ViT."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import onnx_file


def test_sweep_writes_csv_plot_and_picture(tmp_path):
    vit = onnx_file("timm_vit", "dynamo18")
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "prunec.cli", "sweep", str(vit), "--pass", "fastv:layer=1", "--pass",
            "random:layer=1", "--keeps", "0.5,0.25", "--data", str(data), "-o", str(out), "--bench-batch", "2",
            "--repeat", "2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(row["pass"], float(row["keep"])) for row in rows] == [("fastv", 0.5), ("fastv", 0.25),
                                                                   ("random", 0.5), ("random", 0.25)]
    assert all(0 < float(row["cosine"]) <= 1.0 + 1e-6 and float(row["ideal_speedup"]) > 1 for row in rows)
    assert float(rows[1]["ideal_speedup"]) > float(rows[0]["ideal_speedup"])
    for png in ("sweep.png", "kept_tokens.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--force" in r.stderr  # nothing overwritten by surprise
