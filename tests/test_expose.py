"""Token sizes and kept indices exposed as extra outputs (``Model.expose``, ``--expose``) for
users who pool a reduced token output themselves."""
import numpy as np
import pytest

import prunec
from conftest import case, load
from merge_reference import reference_merge, tome_reduce
from prunec.errors import PruneError

FORMS = ("torch", "dynamo18", "torchscript17")
NAME = "timm_vit_features"  # its graph output is the token tensor [B, N, C]


def _run(model, inputs):
    """(tokens [B, M, C], {"sizes": [B, M], "kept_indices": [B, M]}) as numpy, for either backend."""
    if model.kind == "torch":
        out, extra = model.run(**inputs)
        return out.numpy(), {k: v.numpy() for k, v in extra.items()}
    names = [v.name for v in model.model.graph.outputs]
    outs = dict(zip(names, model.run(inputs)))
    token = names[0]
    assert names[1:] == [f"{token}.sizes", f"{token}.kept_indices"]
    return outs[token], {"sizes": outs[f"{token}.sizes"], "kept_indices": outs[f"{token}.kept_indices"]}


def _kept(model, inputs):
    return model.kept_indices(**inputs) if model.kind == "torch" else model.kept_indices(inputs)


def _composed(kept: dict) -> np.ndarray:
    """Each final token's position in the input tokens, from the per-cut kept indices in cut order."""
    pos = None
    for idx in kept.values():
        idx = np.asarray(idx)
        pos = idx if pos is None else np.take_along_axis(pos, idx, axis=1)
    return pos


@pytest.mark.parametrize("form", FORMS)
def test_tome_sizes_weight_the_tokens_as_the_reference(form):
    c = case(NAME)
    inputs = c.make_inputs(2, 4)  # the torch path runs at its export batch (2)
    base = load(NAME, form)
    model = prunec.passes.get("tome")(r=2)(base).expose("sizes,indices")
    tokens, extra = _run(model, {k: v if form == "torch" else v.numpy() for k, v in inputs.items()})
    n = 17  # 16 patches + CLS
    assert tokens.shape == (2, n - 6, 64) and extra["sizes"].shape == (2, n - 6)
    np.testing.assert_array_equal(extra["sizes"].sum(1), np.full(2, n))
    ref, state = reference_merge(c.module, inputs, {i: tome_reduce(2, c.prefix) for i in range(3)}, prop_attn=True)
    size = state["size"]
    want = ((ref * size).sum(1) / size.sum(1)).numpy()
    w = extra["sizes"][..., None]
    got = (tokens * w).sum(1) / w.sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    plain = tokens.mean(1)  # the trap the sizes avoid: an unweighted mean of merged tokens is off
    assert np.abs(plain - want).max() > 1e-3
    kept = _kept(model, inputs if form == "torch" else {k: v.numpy() for k, v in inputs.items()})
    assert list(kept) == ["tome_l0", "tome_l1", "tome_l2"]
    np.testing.assert_array_equal(extra["kept_indices"], _composed(kept))
    assert (extra["kept_indices"][:, 0] == 0).all()  # CLS, never merged


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
def test_fastv_sizes_are_ones_and_indices_the_kept_ones(form):
    c = case(NAME)
    inputs = c.inputs if form == "torch" else {k: v.numpy() for k, v in c.inputs.items()}
    model = prunec.passes.get("fastv")(keep=0.5, layer=1)(load(NAME, form))
    exposed = model.expose("sizes,indices")
    tokens, extra = _run(exposed, inputs)
    np.testing.assert_array_equal(extra["sizes"], np.ones_like(extra["sizes"]))
    (tag, idx), = _kept(model, inputs).items()
    np.testing.assert_array_equal(extra["kept_indices"], np.asarray(idx))
    ref = model.run(**inputs) if form == "torch" else model.run(inputs)[0]
    np.testing.assert_array_equal(tokens, np.asarray(ref))  # the token output itself is unchanged


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
def test_pool_sizes_are_window_sizes(form):
    model = prunec.passes.get("pool")(factor=2, layer=1)(load(NAME, form)).expose("sizes")
    if form == "torch":
        _, extra = model.run(**case(NAME).inputs)
        assert list(extra) == ["sizes"]
        sizes = extra["sizes"].numpy()
    else:
        names = [v.name for v in model.model.graph.outputs]
        assert len(names) == 2 and names[1].endswith(".sizes")
        _, sizes = model.run({k: v.numpy() for k, v in case(NAME).inputs.items()})
    np.testing.assert_array_equal(sizes, [[1.0] + [4.0] * 4] * 2)  # CLS, then 2x2 windows of the 4x4 grid


def test_expose_refusals():
    base = load(NAME, "dynamo18")
    with pytest.raises(PruneError, match="no pass reduced"):
        base.expose()
    model = prunec.passes.get("tome")(r=2)(base)
    with pytest.raises(PruneError, match="give sizes, indices"):
        model.expose("weights")
    recovered = prunec.passes.get("tome")(r=2, recover="unmerge")(base)
    with pytest.raises(PruneError, match="no graph output carries reduced tokens"):
        recovered.expose()
    exposed = prunec.Pipeline([prunec.passes.get("tome")(r=2)], expose="indices")(base)
    assert [v.name.split(".")[-1] for v in exposed.model.graph.outputs][1:] == ["kept_indices"]
    with pytest.raises(PruneError, match="apply every pass first"):
        prunec.passes.get("fastv")(keep=0.5, layer=2)(exposed)


def test_cli_expose(tmp_path, capsys):
    """`prunec --expose`: the written model has the extra outputs (dynamic batch kept), the output
    line names them; without it the line offers the option; a bad value is one line, nothing written."""
    import onnx

    from conftest import onnx_file
    from prunec.cli import main

    src = onnx_file(NAME, "dynamo18")
    out = tmp_path / "tome.onnx"
    assert main([str(src), "--pass", "tome:r=0/0/3", "-o", str(tmp_path / "plain.onnx")]) == 0
    assert "--expose sizes,indices" in capsys.readouterr().err
    assert main([str(src), "--pass", "tome:r=0/0/3", "--expose", "sizes,indices", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    proto = onnx.load(str(out))
    token = proto.graph.output[0].name
    assert [o.name for o in proto.graph.output] == [token, f"{token}.sizes", f"{token}.kept_indices"]
    assert f"'{token}.sizes'" in err and "--recover unmerge" not in err
    assert main(["inspect", str(out)]) == 0
    assert f"exposed:{token}.sizes,{token}.kept_indices" in "".join(capsys.readouterr().out.split())  # rich wraps
    x = case(NAME).make_inputs(3, 2)["x"].numpy()
    tokens, sizes, idx = prunec.load(out).run({"x": x})
    assert tokens.shape == (3, 14, 64) and sizes.shape == idx.shape == (3, 14)
    np.testing.assert_array_equal(sizes.sum(1), [17, 17, 17])
    bad = tmp_path / "bad.onnx"
    assert main([str(src), "--pass", "tome:r=0/0/3", "--expose", "weights", "-o", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--expose 'weights'" in err and err.count("\n") == 1 and not bad.exists()
    assert main(["passes"]) == 0
    assert "--expose sizes,indices" in capsys.readouterr().out
