"""Models too large to run for analysis (issue 13): the light probe reads no weight.

A model over 1 GiB of weights is analysed without running them: ONNX shape inference (and ORT's
symbolic shape inference where it stops) gives the shapes, and only the values computed without
weights (shape arithmetic, masks, positions) are run, in a model of just the nodes they need.
Its rewrite is checked by onnx.checker only (``check="auto"``), and its external data is copied
by the kernel, never through prunec. Tested here by forcing the light probe on small models:
the analysis and the rewritten model are those of the full probe, and a model whose weights
cannot be read at all is still analysed, rewritten and checked."""
import numpy as np
import onnx_ir as ir
import pytest

import prunec
from conftest import case, onnx_file
from prunec.ir.from_onnx import weight_names

FORMS = [("timm_vit", "dynamo18"), ("timm_vit", "torchscript17"), ("hf_bert", "torchscript14"),
         ("hf_bert", "dynamo23"), ("hf_llama", "dynamo18"), ("hf_vit", "torchscript17")]


def _facts(model):
    f = model.facts()
    return (f.num_tokens, f.prefix, f.causal, f.depth, [s.kind for s in f.sites], [s.causal for s in f.sites],
            [s.heads for s in f.sites], [v.name for v in f.streams], [v.shape for v in f.streams],
            sorted(v.name for v in f.side_inputs))


def _run_everything(path, monkeypatch):
    """The model with the probe that runs the whole model (what the default probe does only where the
    weights feed a value the analysis reads), its facts computed."""
    from prunec.ir import from_onnx

    with monkeypatch.context() as m:
        m.setattr(from_onnx, "_weight_free_run", lambda *a, strict=True, **k: None)
        model = prunec.load(path)
        model.facts()
    return model


@pytest.mark.parametrize("name,form", FORMS, ids=[f"{n}-{f}" for n, f in FORMS])
def test_the_light_probe_sees_what_the_full_probe_sees(name, form, monkeypatch):
    """Same sites, streams, prefix, causal flags and side inputs from the light probe, the default one
    and one that runs the whole model; FastV written from the light or the default analysis keeps
    the same tokens and computes the same outputs."""
    path = onnx_file(name, form)
    full, light = prunec.load(path), prunec.OnnxModel(prunec.load(path).model, light=True)
    assert not full.light and light.light
    assert _facts(light) == _facts(full) == _facts(_run_everything(path, monkeypatch))
    layer = "2"
    span = "4:20" if name == "hf_llama" else None
    a = prunec.passes.get("fastv")(keep=0.5, layer=layer, span=span)(full)
    b = prunec.passes.get("fastv")(keep=0.5, layer=layer, span=span)(light)
    inputs = {k: v.numpy() for k, v in case(name).inputs.items()}
    for x, y in zip(a.run(inputs), b.run(inputs), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.kept_indices(inputs)["fastv_l2"], b.kept_indices(inputs)["fastv_l2"])


def _unreadable_weights(model, tmp_path):
    """Point every weight at a file that does not exist: any read of a weight fails."""
    for name in weight_names(model.model):
        v = model.model.graph.initializers[name]
        t = v.const_value
        v.const_value = ir.ExternalTensor("missing.bin", 0, t.nbytes, t.dtype, shape=t.shape, name=name,
                                          base_dir=str(tmp_path))
    return model


@pytest.mark.parametrize("name,form", [("hf_llama", "dynamo18"), ("timm_vit", "torchscript17")])
def test_a_model_whose_weights_cannot_be_read_is_analysed_rewritten_and_checked(name, form, tmp_path):
    """No weight is read: with every weight unreadable, the light probe, a FastV plan, its
    lowering and the structural check all work; the full check, which runs the model, fails."""
    base = prunec.load(onnx_file(name, form))
    model = prunec.OnnxModel(_unreadable_weights(base, tmp_path).model, light=True)
    assert model.check_mode == "structure" and weight_names(model.model)
    facts = model.facts()
    assert facts.depth == 3 and len(facts.sites) == 3
    passes = [prunec.passes.get("fastv")(keep=0.5, layer="2", span="4:20" if name == "hf_llama" else None)]
    out = prunec.Pipeline(passes)(model)
    assert out.cuts and out.cuts[0][2] < out.cuts[0][1]
    strict = prunec.OnnxModel(model.model, light=True, check="full")
    with pytest.raises(prunec.PruneError, match="does not run"):
        prunec.Pipeline(passes)(strict)


def test_a_big_model_is_probed_light_and_the_cli_says_what_it_checked(tmp_path, monkeypatch):
    """The size threshold decides (lowered here to test it on a small model); the output line says
    the model was checked by onnx.checker only, and --check full runs it."""
    import prunec.model
    from prunec.cli import main

    monkeypatch.setattr(prunec.model, "LIGHT_PROBE_BYTES", 1000)
    src = onnx_file("timm_vit", "dynamo18")
    assert prunec.load(src).light
    out = tmp_path / "vit.onnx"
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        assert main([str(src), "--pass", "fastv", "--layer", "1", "-o", str(out)]) == 0
    assert "checked by onnx.checker only" in err.getvalue()
    x = case("timm_vit").inputs["x"].numpy()
    ref = prunec.passes.get("fastv")(layer="1")(prunec.load(src, check="full"))
    np.testing.assert_array_equal(prunec.load(out).run({"x": x})[0], ref.run({"x": x})[0])
    err = io.StringIO()
    with redirect_stderr(err):
        assert main([str(src), "--pass", "fastv", "--layer", "1", "-o", str(out), "--force", "--check", "full"]) == 0
    assert "checked by onnx.checker only" not in err.getvalue()


@pytest.mark.parametrize("name,form", [("timm_vit", "dynamo18"), ("hf_llama", "dynamo18")])
def test_the_full_probe_runs_the_weights_only_for_what_a_pass_reads(name, form, monkeypatch):
    """Under the light probe's size the probe still runs no weight where shape inference and a run
    of the weight-free nodes give what the analysis reads: the attention probabilities are known by
    shape until a pass reads their content (FastV refuses NaN scores), and then the model runs up
    to them only; the unreadable-weights model shows that the probe itself read none."""
    from prunec.ir import session

    path = onnx_file(name, form)
    sessions = []  # what each ORT session was built over
    real = session.make_session
    monkeypatch.setattr(session, "make_session", lambda m, *a, **k: (sessions.append(m), real(m, *a, **k))[1])
    model = prunec.load(path)
    assert not model.light
    facts = model.facts()
    weights = weight_names(model.model)
    assert sessions and all(not isinstance(m, ir.Model) and not {t.name for t in m.graph.initializer} & weights
                            and not {i.name for i in m.graph.input} & weights for m in sessions)
    graph = facts.graph
    probs = facts.sites[0].probs  # (of the first of three layers)
    assert probs is not None and probs.name in graph.unprobed and "finite" not in probs.facts
    del sessions[:]
    assert graph.probe_facts(probs)["finite"] is True and probs.name not in graph.unprobed
    (run,) = sessions  # one run, of the nodes up to the probabilities
    assert isinstance(run, ir.Model) and len(list(run.graph)) < len(list(model.model.graph)) / 2
    assert [o.name for o in run.graph.outputs] == [probs.name]
    assert _facts(model) == _facts(_run_everything(path, monkeypatch))
