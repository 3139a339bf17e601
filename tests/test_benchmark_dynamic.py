"""Smoke test of ``benchmarks/dynamic.py`` (dynamic vs ``--shape``-static FastV rewrite timing) on
its tiny decoder (3 layers, width 64), one length, a few rounds: the script rewrites the export
both ways, checks both rewrites keep the same tokens and prints/writes its row. The export is
``tests/test_dynamic.py``'s Llama (same config, cached there), so in a full run the two files
export it once; this test alone takes about 20-30 s on 2 busy cores, most of it that export."""
import importlib.util
import json
from pathlib import Path

from test_dynamic import exported

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "dynamic.py"


def test_dynamic_benchmark_runs_on_a_tiny_decoder(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_dynamic", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "export", lambda module, names, path, max_len: exported("llama", "dynamo18"))
    out = tmp_path / "rows.json"
    rows = mod.main(["--only", "decoder", "--tiny-decoder", "--lengths", "12", "--repeat", "2",
                     "--min-seconds", "0", "--warmup", "1", "--json", str(out)])
    assert len(rows) == 1
    row = rows[0]
    # causal decoder: first and last token outside the span, round(0.5 * 10) = 5 of the rest kept
    assert row["tokens"] == "12->7" and row["kept_same"]
    for key in ("unpruned_ms", "dynamic_ms", "static_ms", "flops_ideal", "dyn_over_static_paired"):
        assert row[key] > 0
    assert json.loads(out.read_text())["rows"][0]["length"] == 12
    assert "dyn / static" in capsys.readouterr().out
