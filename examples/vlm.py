"""A LLaVA-style VLM through prunec, end to end on ONNX Runtime: vision-side and LLM-side pruning
compose, then generation with the KV cache.

1. Build a small random-weight LLaVA (CLIP tower + projector + Llama; ``prunec.examples``) and
   export it as VLMs are deployed: ``vision.onnx`` (pixel_values -> image_features [B, 16, C]) and
   ``decoder.onnx`` (ids + image features merged at the image tokens, with a KV cache).
2. Vision side: cls-attn (FasterVLM) keeps half the image features by the [CLS] attention of the
   tower layer LLaVA takes its features from, so the prompt carries 8 image tokens instead of 16.
3. LLM side: FastV prunes half the image tokens before layer 2 in the prefill; each prompt's image
   is found by its placeholder id (``span=token:ID``), wherever the text puts it.
4. Generate for a left-padded batch of two prompts with the unpruned and the pruned pair.

    python examples/vlm.py [--out DIR] [--new-tokens 8] [--reuse]

The same on the command line, for the two ONNX files:

    prunec vision.onnx --pass cls-attn:keep=0.5,score_layer=1 -o vision.pruned.onnx
    prunec decoder.onnx --pass fastv --keep 0.5 --span token:127 -o decoder.pruned.onnx
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import prunec
from prunec.examples import IMAGE_ID, export_llava, tiny_llava


def run(vision, decoder, pixels, texts, new_tokens):
    """Image features, prompts (text, image tokens, text; left-padded), greedy generation."""
    features = vision.run({"pixel_values": pixels})[0]  # [B, n, C]
    prompts = [before + [IMAGE_ID] * features.shape[1] + after for before, after in texts]
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    out = prunec.generate(decoder, ids, mask, max_new_tokens=new_tokens, prompt_inputs={"image_features": features})
    return features.shape[1], width, out[:, width:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the ONNX files (default: a temporary one)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--reuse", action="store_true", help="use vision.onnx and decoder.onnx already in --out")
    args = ap.parse_args(argv)
    folder = Path(args.out or tempfile.mkdtemp(prefix="prunec-vlm-"))
    folder.mkdir(parents=True, exist_ok=True)
    vision_path, decoder_path = folder / "vision.onnx", folder / "decoder.onnx"
    if not (args.reuse and vision_path.exists() and decoder_path.exists()):
        print(f"exporting a tiny LLaVA to {folder} ...")
        vision_path, decoder_path = export_llava(tiny_llava(), folder)
    vision, decoder = prunec.load(vision_path), prunec.load(decoder_path)
    vision_pruned = prunec.passes.get("cls-attn")(keep=0.5, score_layer=1)(vision)
    decoder_pruned = prunec.passes.FastV(keep=0.5, span=f"token:{IMAGE_ID}")(decoder)
    vision_pruned.save(folder / "vision.pruned.onnx")
    decoder_pruned.save(folder / "decoder.pruned.onnx")
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    texts = [([1, 15, 23], [40, 41, 42, 43, 44]), ([1, 60, 61, 62, 63, 64, 65], [70, 71])]
    for name, v, d in (("unpruned", vision, decoder), ("vision cls-attn 0.5", vision_pruned, decoder),
                       ("LLM FastV 0.5", vision, decoder_pruned), ("both", vision_pruned, decoder_pruned)):
        images, width, new = run(v, d, pixels, texts, args.new_tokens)
        print(f"{name:>20}: {images} image tokens per prompt ({width} with padding) -> {new.tolist()}")
    print(f"written: {', '.join(p.name for p in sorted(folder.glob('*.onnx')))}")


if __name__ == "__main__":
    main()
