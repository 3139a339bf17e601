"""Smoke test of ``benchmarks/decode.py`` (FastV with a KV cache: time to first token and decode
speed, pruned vs unpruned) in its ``--quick`` configuration (2 layers, hidden 128, 128 tokens, 8 new
tokens): the keep=1.0 rewrite generates as the unpruned model and the pruned prefill keeps
35 + round(0.25 x 64) + 29 = 80 tokens. About 15-20 s on 2 cores; timings are not asserted."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode.py"


def test_decode_benchmark_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick", "--batches", "1,2"])
    assert result["same"]
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert (row["tokens"], row["kept"]) == (128, 80)
        assert row["speedup"] > 0 and row["ideal"] > 1
    assert "of ideal" in capsys.readouterr().out
