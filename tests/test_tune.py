"""prunec tune: the search on a toy ViT (mechanics) and on a real trained model
(all-MiniLM-L6-v2 on gensim's Lee corpus) where the held-out fidelity is checked."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import case, onnx_file


def prunec(*args):
    return subprocess.run([sys.executable, "-m", "prunec.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_tune_toy_vit_writes_model_and_curve(tmp_path):
    vit = onnx_file("timm_vit", "dynamo18")
    np.savez(tmp_path / "x.npz", x=case("timm_vit").make_inputs(8, 4)["x"].numpy())
    out = tmp_path / "tuned.onnx"
    r = prunec("tune", vit, "--method", "fastv", "--budget", "cosine>=0.999", "--inputs", tmp_path / "x.npz",
               "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert out.exists() and Path(res["curve_csv"]).exists()
    rows = list(csv.DictReader(open(res["curve_csv"])))
    assert len(rows) == len(res["curve"]) >= 2
    assert res["calibration"] >= 0.999  # the chosen setting meets the budget where it was tuned
    assert res["holdout_meets_budget"] == (res["holdout"] >= 0.999)
    assert 1 <= res["layer"] <= 2 and 0 < res["keep"] <= 1
    # every setting cheaper than the chosen one at its layer missed the budget
    same_layer = [c for c in res["curve"] if c["layer"] == res["layer"] and c["keep"] < res["keep"]]
    assert all(c["cosine"] < 0.999 for c in same_layer)
    r = prunec("tune", vit, "--method", "fastv", "--budget", "cosine>=0.999", "--inputs", tmp_path / "x.npz", "-o", out)
    assert r.returncode != 0 and "exists" in r.stderr


def test_tune_bad_budget(tmp_path):
    vit = onnx_file("timm_vit", "dynamo18")
    np.savez(tmp_path / "x.npz", x=case("timm_vit").make_inputs(4, 4)["x"].numpy())
    r = prunec("tune", vit, "--method", "fastv", "--budget", "cos>0.9", "--inputs", tmp_path / "x.npz",
               "-o", tmp_path / "t.onnx")
    assert r.returncode != 0 and "budget" in r.stderr and not (tmp_path / "t.onnx").exists()


def test_tune_minilm_meets_budget_on_held_out_docs(tmp_path):
    from prunec.examples import lee_corpus, minilm

    model, tok = minilm()
    docs, _ = lee_corpus()
    enc = tok(docs, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    np.savez(tmp_path / "lee.npz", input_ids=ids, attention_mask=mask)
    onnx_path = tmp_path / "minilm.onnx"
    torch.onnx.export(model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(onnx_path), dynamo=True,
                      opset_version=18, external_data=False, input_names=["input_ids", "attention_mask"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},
                                      {0: torch.export.Dim("batch", min=1, max=64)}), verbose=False)
    budget = 0.99
    r = prunec("tune", onnx_path, "--method", "fastv", "--budget", f"cosine>={budget}", "--inputs",
               tmp_path / "lee.npz", "--layers", "1,2,3", "--batch", "25", "-o", tmp_path / "tuned.onnx", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["calibration_samples"] == 25 and res["holdout_samples"] == 25
    assert res["calibration"] >= budget and res["keep"] < 1.0
    assert res["holdout"] >= budget - 0.005, res  # held-out fidelity within 0.005 of the budget
    assert res["holdout_meets_budget"] == (res["holdout"] >= budget)
