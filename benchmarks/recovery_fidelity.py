"""How close recovered full-length outputs stay to the unpruned model.

1. A saliency-style model (random weights): a timm ViT (224 px, patch 16, 6 layers, width
   192) and a conv decoder over the reshaped 14×14 patch grid, on 8 scikit-image photos.
   For each pass, keep and recovery mode: Pearson r between the decoder's output and the
   unpruned output (all pixels of all images), and the tokens left after the last cut.
2. all-MiniLM-L6-v2 (trained) on the 50 Lee documents at 128 tokens: ``last_hidden_state``
   restored to [B, N, C]; mean token-level cosine to the unpruned hidden states over the
   real (non-padding) tokens, all of them and only the tokens that were pruned or merged away.

Torch (fx) backend; the test suite holds the ONNX backend to the same numbers.

    python benchmarks/recovery_fidelity.py [--json]
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")


class Saliency(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import timm

        self.encoder = timm.create_model("vit_small_patch16_224", pretrained=False, depth=6, embed_dim=192,
                                         num_heads=3, num_classes=0)
        self.decoder = torch.nn.Sequential(torch.nn.Conv2d(192, 64, 3, padding=1), torch.nn.ReLU(),
                                           torch.nn.Conv2d(64, 1, 1))

    def forward(self, x):
        t = self.encoder.forward_features(x)[:, 1:]
        return self.decoder(t.reshape(-1, 14, 14, 192).permute(0, 3, 1, 2))


def photos(n=8):
    import skimage.data
    import skimage.transform

    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "moon", "page", "horse"]
    out = []
    for name in names:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = skimage.transform.resize(img[..., :3], (224, 224), anti_aliasing=True).astype(np.float32)
        out.append((img - 0.5) / 0.25)
        if len(out) == n:
            break
    return torch.as_tensor(np.stack(out)).permute(0, 3, 1, 2).contiguous()


SEG_SETTINGS = [
    ("fastv", lambda keep: dict(keep=keep, layer="2"), ("copy", "attn")),
    ("divprune", lambda keep: dict(keep=keep, layer="2"), ("copy", "attn")),
    ("tome", lambda keep: dict(r=str(round((1 - keep) * 196 / 6))), ("unmerge", "copy", "attn")),
    ("evit", lambda keep: dict(keep=str(round(keep ** (1 / 3), 3))), ("unmerge", "copy", "attn")),
]


def seg_rows(log):
    import prunec

    torch.manual_seed(0)
    model = Saliency().eval()
    x = photos()
    base = prunec.load(model, (x,))
    ref = base.run(x).numpy().ravel()
    rows = []
    for name, opts_of, modes in SEG_SETTINGS:
        for keep in (0.5, 0.25):
            for mode in modes:
                opts = opts_of(keep)
                with log.status(f"{name} {opts} recover={mode}"):
                    p = prunec.passes.get(name)(**opts, recover=mode)(base)
                    out = p.run(x).numpy().ravel()
                    kept = p.kept_indices(x)
                counts = [np.asarray(v).shape[1] for v in kept.values()]
                tokens = f"197 -> {counts[-1]}" + (f" ({len(counts)} cuts)" if len(counts) > 1 else "")
                r = float(np.corrcoef(ref, out)[0, 1])
                rows.append(dict(pass_=name, setting=",".join(f"{k}={v}" for k, v in opts.items()), keep=keep,
                                 mode=mode, tokens=tokens, pearson_r=r))
                log.print(f"seg {name} {opts} {mode}: r = {r:.4f}")
    return rows


class Hidden(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


MINILM_SETTINGS = [
    ("fastv", dict(keep=0.5, layer="2", query="cls", span="1:"), ("copy", "attn")),
    ("fastv", dict(keep=0.25, layer="2", query="cls", span="1:"), ("copy", "attn")),
    ("tome", dict(r="8", prefix=1), ("unmerge", "attn")),
    ("tome", dict(r="16", prefix=1), ("unmerge", "attn")),
]


def minilm_rows(log):
    import prunec
    from prunec.examples import lee_corpus, minilm

    wrapper, tok = minilm()
    docs, _ = lee_corpus()
    enc = tok(docs, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model = Hidden(wrapper.encoder).eval()
    base = prunec.load(model, {"input_ids": ids, "attention_mask": mask})
    ref = base.run(input_ids=ids, attention_mask=mask).numpy()
    real = mask.numpy().astype(bool)
    rows = []
    for name, opts, modes in MINILM_SETTINGS:
        for mode in modes:
            with log.status(f"MiniLM {name} {opts} recover={mode}"):
                p = prunec.passes.get(name)(**opts, recover=mode)(base)
                out = p.run(input_ids=ids, attention_mask=mask).numpy()
                reduced = prunec.passes.get(name)(**opts, recover="none")(base)
                kept = reduced.kept_indices(input_ids=ids, attention_mask=mask)
            cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
            gone = np.ones_like(real)
            if name == "fastv":
                (idx,) = kept.values()
                for b in range(len(idx)):
                    gone[b, idx[b]] = False
            else:  # a merge: tokens that are not the representative of any final token were merged away
                rep = None
                for v in kept.values():
                    v = np.asarray(v)
                    rep = v if rep is None else np.take_along_axis(rep, v, axis=1)
                for b in range(len(rep)):
                    gone[b, rep[b]] = False
            rows.append(dict(pass_=name, setting=",".join(f"{k}={v}" for k, v in opts.items()), mode=mode,
                             shape=list(out.shape), cos_real=float(cos[real].mean()),
                             cos_removed=float(cos[real & gone].mean()), removed_real=int((real & gone).sum())))
            log.print(f"MiniLM {name} {opts} {mode}: cos {rows[-1]['cos_real']:.4f}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    log = Console(stderr=True)
    t0 = time.perf_counter()
    seg = seg_rows(log)
    lm = minilm_rows(log)
    if args.json:
        print(json.dumps(dict(saliency=seg, minilm=lm, seconds=round(time.perf_counter() - t0)), indent=2))
        return
    out = Console(width=160)
    t = Table(title="saliency ViT + conv decoder (random weights), 8 photos: Pearson r of the output vs unpruned")
    for col in ("pass", "setting", "target keep", "tokens", "recovery", "Pearson r"):
        t.add_column(col)
    for r in seg:
        t.add_row(r["pass_"], r["setting"], str(r["keep"]), r["tokens"], r["mode"], f"{r['pearson_r']:.4f}")
    out.print(t)
    t = Table(title="all-MiniLM-L6-v2 on Lee: recovered last_hidden_state vs unpruned, token cosine")
    for col in ("pass", "setting", "recovery", "output shape", "cos, real tokens", "cos, removed real tokens"):
        t.add_column(col)
    for r in lm:
        t.add_row(r["pass_"], r["setting"], r["mode"], str(r["shape"]), f"{r['cos_real']:.4f}",
                  f"{r['cos_removed']:.4f} ({r['removed_real']})")
    out.print(t)
    out.print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
