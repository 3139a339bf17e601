"""prunec bench / eval: exit codes, JSON schema, numbers that mean what they say."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import case, onnx_file


def prunec(*args):
    return subprocess.run([sys.executable, "-m", "prunec.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def vit():
    return Path(onnx_file("timm_vit", "dynamo18"))


def test_bench_json_schema_and_flops(vit):
    r = prunec("bench", vit, "--pass", "fastv", "--keep", "0.25", "--layer", "1", "--batch", "2", "--repeat", "3",
               "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("original", "rewritten"):
        e = res[key]
        assert set(e) >= {"latency_ms", "latency_iqr_ms", "throughput_per_s", "peak_memory_mib", "gflops",
                          "gflops_per_block", "tokens_per_block"}
        assert e["latency_ms"] > 0 and len(e["gflops_per_block"]) == 3
    assert res["original"]["tokens_per_block"] == [17, 17, 17]
    assert res["rewritten"]["tokens_per_block"] == [17, 5, 5]  # 1 CLS + round(0.25 * 16)
    assert res["rewritten"]["gflops"] < res["original"]["gflops"]
    assert res["ideal_speedup"] == pytest.approx(res["original"]["gflops"] / res["rewritten"]["gflops"])
    assert res["providers"] == ["CPUExecutionProvider"]


def test_bench_table(vit):
    r = prunec("bench", vit, "--pass", "fastv:keep=0.5,layer=1", "--batch", "2", "--repeat", "2", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert "speedup" in r.stdout and "rewritten" in r.stdout


def test_eval_npz_with_labels(vit, tmp_path):
    c = case("timm_vit")
    x = c.make_inputs(6, 2)["x"].numpy()
    labels = np.arange(6) % 10
    np.savez(tmp_path / "batch.npz", x=x, labels=labels)
    r = prunec("eval", vit, "--pass", "fastv", "--keep", "1.0", "--layer", "1", "--inputs", tmp_path / "batch.npz",
               "--batch", "4", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    out = next(iter(res["outputs"].values()))
    assert res["samples"] == 6
    assert out["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and out["top1_agreement"] == 1.0  # keep=1: identity
    assert out["accuracy_original"] == out["accuracy_rewritten"]
    r = prunec("eval", vit, "--pass", "fastv", "--keep", "0.25", "--layer", "1", "--inputs", tmp_path / "batch.npz",
               "--json")
    out = next(iter(json.loads(r.stdout)["outputs"].values()))
    assert out["cosine_mean"] < 1.0


def test_eval_image_folder_with_classes(vit, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    r = prunec("eval", vit, "--pass", "fastv", "--keep", "0.5", "--layer", "1", "--data", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    out = next(iter(res["outputs"].values()))
    assert res["samples"] == 6 and "accuracy_original" in out and 0 <= out["top1_agreement"] <= 1


def test_eval_bad_inputs(vit, tmp_path):
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 3, 32, 32), np.float32))
    r = prunec("eval", vit, "--pass", "fastv", "--inputs", tmp_path / "wrong.npz")
    assert r.returncode != 0 and "no array for input" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = prunec("eval", vit, "--pass", "fastv", "--data", tmp_path / "nope")
    assert r.returncode != 0 and "no such folder" in r.stderr
