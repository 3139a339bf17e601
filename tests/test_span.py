"""Spans with negative and open ends (``1:-8``, ``1:``, ``:-1``, ``-64:``): resolved against the
cut's token count N as Python slice bounds are, then held to the same rules as positive spans."""
from __future__ import annotations

import numpy as np
import pytest

import prunec
from conftest import case, kept, load, onnx_file, run, torch_outputs
from fastv_reference import fastv_reference
from prunec.passes.selection import parse_span

N = 24  # tokens of the tiny HF Llama (tests/zoo.py hf_llama)


@pytest.mark.parametrize("span,n,prefix,causal,expected", [
    ("4:20", 24, 0, False, (4, 20)),
    ("1:-8", 12, 0, False, (1, 4)),
    ("1:-8", 24, 0, False, (1, 16)),
    ("1:", 24, 0, False, (1, 24)),
    (":-1", 24, 0, False, (0, 23)),
    (":", 24, 1, False, (0, 24)),
    ("-64:", 64, 0, False, (0, 64)),
    ("-64:", 197, 1, False, (133, 197)),
    ("-8:-2", 12, 0, False, (4, 10)),
    ("-24:24", 24, 0, True, (0, 24)),
    (" 2 : -3 ", 24, 0, False, (2, 21)),
    ((3, 9), 24, 0, False, (3, 9)),  # a schedule's narrowed span
    (None, 24, 1, False, (1, 24)),
    (None, 24, 0, True, (1, 23)),  # a decoder's default keeps its first and last token
])
def test_parse_span(span, n, prefix, causal, expected):
    assert parse_span(span, n, prefix, causal) == expected


@pytest.mark.parametrize("span,n,message", [
    ("-2:-8", 24, "span -2:-8 is reversed"),  # refused before N is known
    ("5:-20", 24, "span 5:-20 is 5:4 (resolved on the 24 tokens at the cut), which is reversed"),
    ("5:-19", 24, "span 5:-19 is 5:5 (resolved on the 24 tokens at the cut), which is empty"),
    ("-3:21", 24, "span -3:21 is 21:21 (resolved on the 24 tokens at the cut), which is empty"),
    ("1:-8", 9, "span 1:-8 is 1:1 (resolved on the 9 tokens at the cut), which is empty"),
    ("9:3", 24, "span 9:3 is reversed"),
    ("5:5", 24, "span 5:5 is empty"),
    ("-30:", 24, "span -30: is outside the 24 tokens"),
    ("1:-25", 24, "span 1:-25 is outside the 24 tokens"),
    ("0:25", 24, "span 0:25 is outside the 24 tokens"),
    (":-24", 24, "span :-24 is 0:0 (resolved on the 24 tokens at the cut), which is empty"),
    ("a:b", 24, "span 'a:b' is not START:END"),
    ("1:2:3", 24, "span '1:2:3' is not START:END"),
    ("-8", 24, "span '-8' is not START:END"),
])
def test_parse_span_refusals(span, n, message):
    with pytest.raises(prunec.PruneError) as e:
        parse_span(span, n, 0, False)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("form", ["torch", "dynamo18"])
@pytest.mark.parametrize("span,resolved", [("1:-2", (1, 22)), ("1:", (1, 24))])
def test_fastv_negative_span_is_the_resolved_span(form, span, resolved):
    """FastV on the tiny HF Llama: ``1:-2`` is ``1:22``; ``1:`` is ``1:24``, whose last token is
    the query, so FastV narrows it to 1:23. Both equal the explicit span and the reference."""
    c = case("hf_llama")
    model = load("hf_llama", form)
    assert model.facts().num_tokens == N
    neg = prunec.passes.FastV(keep=0.25, layer=2, span=span)(model)
    pos = prunec.passes.FastV(keep=0.25, layer=2, span=f"{resolved[0]}:{resolved[1]}")(model)
    ref_out, ref_idx = fastv_reference(c.module, c.inputs, keep=0.25, layer=2, query="last", span=resolved)
    a, b = kept(neg, c.inputs)["fastv_l2"], kept(pos, c.inputs)["fastv_l2"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, ref_idx.numpy())
    assert (a[:, 0] == 0).all() and (a[:, -1] == N - 1).all()  # BOS outside the span, the query kept
    for x, y, r in zip(run(neg, c.inputs), run(pos, c.inputs), torch_outputs(ref_out), strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, r, rtol=1e-4, atol=1e-4)


def test_schedule_narrows_the_resolved_span():
    """A schedule resolves ``1:-2`` at its first cut; later cuts prune only what was kept of it."""
    c = case("hf_llama")
    model = load("hf_llama", "torch")
    neg = prunec.passes.FastV(keep="0.5/0.5", layer="1/2", span="1:-2")(model)
    pos = prunec.passes.FastV(keep="0.5/0.5", layer="1/2", span="1:22")(model)
    a, b = kept(neg, c.inputs), kept(pos, c.inputs)
    assert list(a) == list(b) == ["fastv_l1", "fastv_l2"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # BOS and the 2 tokens after the span survive both cuts (l2's indices count l1's kept tokens)
    m1 = a["fastv_l1"].shape[1]
    assert m1 == 1 + 10 + 2 and a["fastv_l2"].shape[1] == 1 + 5 + 2
    assert (a["fastv_l1"][:, [0, -2, -1]] == [0, 22, 23]).all()
    assert (a["fastv_l2"][:, [0, -2, -1]] == [0, m1 - 2, m1 - 1]).all()
    for x, y in zip(run(neg, c.inputs), run(pos, c.inputs), strict=True):
        np.testing.assert_array_equal(x, y)


def test_reversed_after_resolution_is_refused_by_the_pass():
    model = load("hf_llama", "torch")
    with pytest.raises(prunec.PruneError, match=r"span 5:-20 is 5:4 \(resolved on the 24 tokens"):
        prunec.passes.FastV(keep=0.5, layer=1, span="5:-20")(model)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "prunec.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_negative_span(tmp_path):
    """``prunec llama.onnx --pass fastv --span 1:-2`` writes the model ``span=1:22`` gives; the
    refusals are one line each and write nothing."""
    c = case("hf_llama")
    src = onnx_file("hf_llama", "dynamo18")
    out = tmp_path / "neg.onnx"
    r = _cli(src, "--pass", "fastv", "--keep", "0.25", "--layer", "2", "--span", "1:-2", "-o", out)
    assert r.returncode == 0, r.stderr
    written = prunec.load(out)
    pos = prunec.passes.FastV(keep=0.25, layer=2, span="1:22")(prunec.load(src))
    for x, y in zip(run(written, c.inputs), run(pos, c.inputs), strict=True):
        np.testing.assert_array_equal(x, y)
    for span, needle in (("-2:-8", "span -2:-8 is reversed"),
                         ("5:-20", "span 5:-20 is 5:4 (resolved on the 24 tokens at the cut), which is reversed"),
                         ("a:b", "span 'a:b' is not START:END")):
        bad = tmp_path / "bad.onnx"
        r = _cli(src, "--pass", "fastv", "--layer", "2", "--span", span, "-o", bad)  # "--span -2:-8" as typed
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], r.stderr
        assert not bad.exists()
