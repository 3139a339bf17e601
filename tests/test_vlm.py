"""A LLaVA-style VLM end to end on ONNX (issue 14), deployed as VLMs are: a vision encoder ONNX
(CLIP tower + projector) and a decoder ONNX with a KV cache that takes the image features beside
the ids. Vision side: cls-attn (FasterVLM), VisionZip or DivPrune at the tower's output shrinks the
image features, so the prompt carries fewer image tokens; LLM side: FastV with ``span=token:ID``
prunes the prefill. The generated ids equal a plain-PyTorch reference on the unmodified HF LLaVA
(``kv_reference.llava_generate_reference``), per prompt, in a left-padded batch; keep=1 on both
sides generates as the unpruned models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import prunec
from kv_models import IMAGE_ID, export_llava, left_pad, tiny_llava
from kv_reference import divprune_vision, llava_generate_reference, llava_image_features, visionzip_vision

NEW = 6
SCORE_LAYER = 1  # FasterVLM: the [CLS] attention of the layer LLaVA takes its features from (-2 of 3)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model = tiny_llava()
    vision, decoder = export_llava(model, tmp_path_factory.mktemp("llava"))
    return model, prunec.load(vision), prunec.load(decoder), vision.parent


def _run(vision, decoder, pixels, texts):
    """Image features from ``vision``, prompts of text / image tokens / text, ``generate`` on ``decoder``."""
    features = vision.run({"pixel_values": pixels})[0]
    n = features.shape[1]
    prompts = [before + [IMAGE_ID] * n + after for before, after in texts]
    ids, mask = left_pad(prompts)
    out = prunec.generate(decoder, ids, mask, max_new_tokens=NEW, prompt_inputs={"image_features": features})
    return prompts, out[:, ids.shape[1]:]


@pytest.mark.parametrize("vision_keep, keep", [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5)])
def test_vision_and_llm_passes_compose_and_equal_the_reference(llava, vision_keep, keep):
    hf, vision, decoder, _ = llava
    rng = np.random.default_rng(int(10 * vision_keep + keep))
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    texts = [(rng.integers(1, 100, 3).tolist(), rng.integers(1, 100, 5).tolist()),
             (rng.integers(1, 100, 7).tolist(), rng.integers(1, 100, 2).tolist())]
    if vision_keep < 1:
        vision = prunec.passes.get("cls-attn")(keep=vision_keep, score_layer=SCORE_LAYER)(vision)
    if keep < 1:
        decoder = prunec.passes.FastV(keep=keep, span=f"token:{IMAGE_ID}")(decoder)
    prompts, got = _run(vision, decoder, pixels, texts)
    assert len([t for t in prompts[0] if t == IMAGE_ID]) == (8 if vision_keep < 1 else 16)
    for row, ids in enumerate(prompts):
        want = llava_generate_reference(hf, torch.from_numpy(pixels[row:row + 1]), ids, vision_keep=vision_keep,
                                        vision_score_layer=SCORE_LAYER, layer=2, keep=keep, max_new_tokens=NEW)
        assert got[row].tolist() == want, f"row {row}"


# at the tower output (the vision graph ends at LLaVA's select layer, 1 CLS + 16 patches, width 64):
# options, the plain-PyTorch reference, image tokens per prompt after the CLS slice
VISION_SIDE = {"visionzip": ({"dominant": 4, "contextual": 2, "layer": "output"}, visionzip_vision(4, 2), 4 - 1 + 2),
               "divprune": ({"keep": 0.5, "layer": "output"}, divprune_vision(0.5), 8)}


@pytest.mark.parametrize("keep", [0.5, 1.0])
@pytest.mark.parametrize("name", sorted(VISION_SIDE))
def test_visionzip_and_divprune_at_the_tower_output_compose_with_fastv(llava, name, keep):
    """VisionZip / DivPrune at ``layer=output`` of vision.onnx, with and without FastV (keep 0.5) on
    the decoder: the image features [2, n, 64] equal ``kv_reference.llava_image_features`` and the
    generated ids equal ``llava_generate_reference``, per prompt.

    The cut is on the tower's select-layer hidden states [B, 17, 64] (CLS first), before the
    ``[:, 1:]`` slice and the projector. VisionZip there is the official variant: CLS + 3 dominant
    patches by that layer's CLS attention, 2 contextual tokens merged by its keys, CLS then sliced
    off (5 image tokens). DivPrune there picks 8 of the 16 patches by their *tower* features, not
    by the projected features the official code (vbdi/divprune) uses in LLaVA: the projector lies
    after the last attention layer, outside any cut prunec makes in this graph; the two choices
    differ on these random weights, so the reference computes the variant prunec runs."""
    hf, vision, decoder, _ = llava
    options, reference, n = VISION_SIDE[name]
    # a seed under which each row's reference ids change with the vision reduction (vs all 16 patches)
    # and, at keep 0.5, with FastV too: a mistake on either side shows in the ids
    rng = np.random.default_rng(800 + len(name) + int(10 * keep))
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    texts = [(rng.integers(1, 100, 4).tolist(), rng.integers(1, 100, 3).tolist()),
             (rng.integers(1, 100, 1).tolist(), rng.integers(1, 100, 6).tolist())]
    vision = prunec.passes.get(name)(**options)(vision)
    if keep < 1:
        decoder = prunec.passes.FastV(keep=keep, span=f"token:{IMAGE_ID}")(decoder)
    features = vision.run({"pixel_values": pixels})[0]
    want = np.stack([llava_image_features(hf, torch.from_numpy(pixels[row:row + 1]), reference).numpy()
                     for row in range(2)])
    assert features.shape == want.shape == (2, n, 64)
    assert np.abs(features - want).max() < 1e-4
    prompts, got = _run(vision, decoder, pixels, texts)
    for row, ids in enumerate(prompts):
        want_ids = llava_generate_reference(hf, torch.from_numpy(pixels[row:row + 1]), ids, vision=reference, layer=2,
                                            keep=keep, max_new_tokens=NEW)
        assert got[row].tolist() == want_ids, f"row {row}"


def test_keep_one_on_both_sides_is_the_unpruned_vlm(llava):
    _, vision, decoder, _ = llava
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    texts = [([5, 6, 7], [8, 9]), ([11], [12, 13, 14, 15])]
    _, want = _run(vision, decoder, pixels, texts)
    same_vision = prunec.passes.get("cls-attn")(keep=1.0, score_layer=SCORE_LAYER)(vision)
    same_decoder = prunec.passes.FastV(keep=1.0, span=f"token:{IMAGE_ID}")(decoder)
    _, got = _run(same_vision, same_decoder, pixels, texts)
    assert (got == want).all()


def test_generate_names_a_prompt_input_the_decoder_lacks(llava):
    _, _, decoder, _ = llava
    with pytest.raises(prunec.PruneError, match="no 'pixels' input"):
        prunec.generate(decoder, [[1, 2]], max_new_tokens=1, prompt_inputs={"pixels": np.zeros((1, 1))})


def test_the_runnable_example_and_the_cli_on_the_two_files(llava, tmp_path, capsys):
    """``examples/vlm.py`` runs; ``prunec`` rewrites the decoder with ``--span token:ID``; ``prunec
    generate`` names the image-features input it cannot feed from the command line."""
    import importlib.util
    from pathlib import Path

    from prunec.cli import main

    script = Path(__file__).resolve().parent.parent / "examples" / "vlm.py"
    spec = importlib.util.spec_from_file_location("vlm_example", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import shutil

    for name in ("vision.onnx", "decoder.onnx"):  # the fixture's export (the example's own takes 15 s)
        shutil.copy(llava[3] / name, tmp_path / name)
    mod.main(["--out", str(tmp_path), "--new-tokens", "3", "--reuse"])
    out = capsys.readouterr().out
    assert "both: 8 image tokens per prompt" in out and "exporting" not in out
    pruned = tmp_path / "cli.onnx"
    assert main([str(tmp_path / "decoder.onnx"), "--pass", "fastv", "--keep", "0.5", "--span", f"token:{IMAGE_ID}",
                 "-o", str(pruned)]) == 0
    assert main(["generate", str(pruned), "--ids", "1,2,3", "--max-new-tokens", "2"]) == 2
    assert "image_features" in capsys.readouterr().err


@pytest.mark.parametrize("name, options", [("cls-attn", {"keep": 0.5, "score_layer": SCORE_LAYER}),
                                           ("visionzip", {"dominant": 4, "contextual": 2, "layer": "output"}),
                                           ("divprune", {"keep": 0.5})])
def test_vision_output_declares_the_shape_it_returns(llava, name, options):
    """The tower's output drops CLS after the cut ([:, 1:] of the reduced tokens: N - 1 is not in the
    token class), so its declared size must come from the rewritten graph, not from the input's 16
    (onnx.checker refused VisionZip's for it); each declared number is what ONNX Runtime returns."""
    _, vision, _, _ = llava
    out = prunec.passes.get(name)(**options)(vision)
    declared = next(o.shape for o in out.model.graph.outputs if o.name == "image_features")
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = out.run({"pixel_values": pixels})[0].shape
    assert got[1] < 16 and len(declared) == len(got)
    assert all(d == g for d, g in zip(declared, got) if isinstance(d, int)), (declared, got)
    assert declared[1] in (got[1], None) or not isinstance(declared[1], int)


@pytest.fixture(scope="module")
def llava_torch(llava):
    """The same HF LLaVA on prunec's torch path: (vision, decoder) by torch.export (``load_llava``)."""
    from prunec.examples import load_llava

    return load_llava(llava[0])


TORCH_VISION = {"cls-attn": ({"keep": 0.5, "score_layer": SCORE_LAYER}, None),
                "visionzip": VISION_SIDE["visionzip"][:2], "divprune": VISION_SIDE["divprune"][:2]}


@pytest.mark.parametrize("name", sorted(TORCH_VISION))
def test_the_torch_path_generates_as_the_reference_and_as_onnx(llava, llava_torch, name):
    """The vision pass and FastV (``span=token:ID``) on the torch models: the image features equal
    the rewritten ONNX vision model's, and ``prunec.generate`` on the rewritten torch decoder yields
    the reference's ids, per prompt of a left-padded batch."""
    hf, onnx_vision, _, _ = llava
    vision, decoder = llava_torch
    options, reference = TORCH_VISION[name]
    rng = np.random.default_rng(900 + len(name))
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    texts = [(rng.integers(1, 100, 4).tolist(), rng.integers(1, 100, 3).tolist()),
             (rng.integers(1, 100, 1).tolist(), rng.integers(1, 100, 6).tolist())]
    torch_vision = prunec.passes.get(name)(**options)(vision)
    features = torch_vision.run(torch.from_numpy(pixels))
    features = (features[0] if isinstance(features, (tuple, list)) else features).numpy()
    onnx_features = prunec.passes.get(name)(**options)(onnx_vision).run({"pixel_values": pixels})[0]
    assert features.shape == onnx_features.shape and features.shape[1] < 16
    assert np.abs(features - onnx_features).max() < 1e-4
    decoder = prunec.passes.FastV(keep=0.5, span=f"token:{IMAGE_ID}")(decoder)
    prompts = [before + [IMAGE_ID] * features.shape[1] + after for before, after in texts]
    ids, mask = left_pad(prompts)
    got = prunec.generate(decoder, ids, mask, max_new_tokens=NEW, prompt_inputs={"image_features": features})
    for row, p in enumerate(prompts):
        kw = {"vision": reference} if reference is not None else {"vision_keep": 0.5, "vision_score_layer": SCORE_LAYER}
        want = llava_generate_reference(hf, torch.from_numpy(pixels[row:row + 1]), p, layer=2, keep=0.5,
                                        max_new_tokens=NEW, **kw)
        assert got[row, ids.shape[1]:].tolist() == want, f"row {row}"
