"""Smoke test of ``benchmarks/compile.py`` (compile time per phase) on a tiny stand-in for its 7B
row: the skeleton builder (a Llama exported from the ``meta`` device, weights as external data,
weight transposes folded by permuting shapes) is built at width 64 with a real module's weights
written in, and must compute what that module computes in ONNX Runtime and pass onnx.checker;
then the script's 7B-style row (FastV over ``--span 35:611`` at probe length 612) runs on it:
the phase worker (``cli.main`` with prunec's calls timed) and the plain CLI subprocess. About
25-35 s on 2 busy cores (the export is most of it)."""
import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compile.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compile_benchmark_skeleton_and_phases(tmp_path):
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mod = _script()
    torch.manual_seed(0)
    module = mod._Logits(LlamaForCausalLM(LlamaConfig(**mod.LLAMA_TINY, use_cache=False)).eval())
    path = tmp_path / "llama_tiny_float32.onnx"
    info = mod.export_skeleton(mod.LLAMA_TINY, path, "float32", weights=module.state_dict())
    assert info["initializers_external"] == 3 * 7 + 2  # q, k, v, o, gate, up, down per layer; embedding; head
    onnx.checker.check_model(str(path), full_check=True)
    ids = np.random.default_rng(0).integers(1, 100, (2, 40)).astype(np.int64)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)

    (tmp_path / "llama_tiny_float32.json").write_text(json.dumps(info))  # the script's export cache
    out = tmp_path / "rows.json"
    rows = mod.main(["--tiny", "--only", "tiny-7b", "--keep-files", str(tmp_path), "--json", str(out),
                     "--timeout", "300"])
    (row,) = rows
    assert row["status"] == "ok", row.get("reason")
    for phase in ("read", "probe", "analyze", "plan", "lower", "checker", "save"):
        assert row["phases"].get(phase, 0) > 0, phase
    assert row["rewrite_s"] > 0 and row["worker"]["peak_rss_mib"] > 0
    assert row["cli"]["rc"] == 0 or "probe" in row["cli"]["reason"]  # a CLI without --probe-length refuses the span
    assert json.loads(out.read_text())["rows"][0]["name"] == "tiny-7b/fastv"
