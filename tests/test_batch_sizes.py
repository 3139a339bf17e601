"""Every pass written at the probe's batch (2) runs at other batch sizes, each row as that sample
alone; validation refuses a graph whose batch size got baked in."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import prunec
from conftest import case, load
from prunec.errors import PruneError

# the ten passes of `prunec passes`, each cutting at (or before) layer 1 of the 3-layer timm ViT
SETTINGS = {
    "fastv": dict(keep=0.5, layer=1), "cls-attn": dict(keep=0.5, layer=1), "divprune": dict(keep=0.5, layer=1),
    "random": dict(keep=0.5, layer=1), "pool": dict(factor=2, layer=1), "zero-tprune": dict(keep=0.5, layer=1),
    "tome": dict(r=2), "evit": dict(keep=0.5, layers=1), "ppt": dict(r=2, layers=1),
    "visionzip": dict(dominant=4, contextual=2, layer=1),
}
BATCHES = (1, 3, 10)


def test_settings_cover_every_pass():
    assert set(SETTINGS) == set(prunec.passes.REGISTRY)


def _check_rows(model, x, what):
    """Batch 1, 3 and 10 against each sample run alone at batch 1."""
    alone = [model.run({"x": x[i:i + 1]}) for i in range(len(x))]
    for b in BATCHES:
        outs = model.run({"x": x[:b]})
        for j, out in enumerate(outs):
            assert out.shape[0] == b, f"{what}: output {j} at batch {b} has shape {out.shape}"
            ref = np.concatenate([a[j] for a in alone[:b]])
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"{what} at batch {b}")


# timm_vit: recovery before layer 2 (copy / unmerge); the feature extractor: recovery at its token output
@pytest.mark.parametrize("name,exporter,recover_at", [
    ("timm_vit", "torchscript17", 2), ("timm_vit", "dynamo18", 2), ("timm_vit_features", "dynamo18", None)])
def test_every_pass_at_other_batch_sizes(name, exporter, recover_at):
    base = load(name, exporter)
    x = case(name).make_inputs(max(BATCHES), 5)["x"].numpy()
    checked = 0
    for pname, opts in SETTINGS.items():
        for mode in ("none", "copy", "unmerge"):
            extra = {} if mode == "none" or recover_at is None else {"recover_at": recover_at}
            model = prunec.passes.get(pname)(**opts, recover=mode, **extra)(base)  # validated at batch 1 and 3
            assert model.reduced_since(base), (pname, mode)
            _check_rows(model, x, f"{name} {exporter} {pname} recover={mode}")
            checked += 1
    assert checked == 3 * len(SETTINGS)


def _tiny(batch_dim):
    """x [batch, 4] -> Reshape to a literal [2, 4] (a batch size baked in) -> Relu."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="baked"), helper.make_node("Relu", ["r"], ["y"])]
    g = helper.make_graph(nodes, "baked", [x], [y], [shape])
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_validation_refuses_a_baked_batch():
    model = prunec.load(_tiny("batch"))
    with pytest.raises(PruneError, match="batch size 1") as e:
        model.validate()
    assert "\n" not in str(e.value)


def test_validation_of_a_static_batch_runs_the_probe_only():
    model = prunec.load(_tiny(2))
    assert model._other_batches() == ()
    model.validate()


def test_torch_path_keeps_the_export_batch():
    """torch.export here is static-shaped: the rewritten GraphModule, like the unmodified export,
    refuses another batch size with the exporter's guard (never a wrong result)."""
    base = load("timm_vit", "torch")
    model = prunec.passes.get("tome")(r=2, recover="unmerge", recover_at=2)(base)
    x = case("timm_vit").make_inputs(3, 5)["x"]
    for m in (base, model):
        with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[0\] == 2"):
            m.run(x=x)
