"""The command line: the headline command, inspect, passes, and bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import onnx_file


def prunec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prunec.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    src = onnx_file("timm_vit", "dynamo18")
    d = tmp_path_factory.mktemp("cli")
    dst = d / "vit.onnx"
    dst.write_bytes(Path(src).read_bytes())
    return dst


def test_headline_command_writes_pruned_model(vit, tmp_path):
    out = tmp_path / "vit.fastv.onnx"
    before = vit.read_bytes()
    r = prunec(vit, "--pass", "fastv", "--keep", "0.25", "--layer", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in " ".join(r.stderr.split())  # printed in full before the command's quick exit
    assert out.exists() and vit.read_bytes() == before
    import onnx

    onnx.checker.check_model(str(out), full_check=True)
    import prunec as pc

    info = pc.load(out).facts()
    assert info.depth == 3


def test_refuses_to_overwrite_without_force(vit, tmp_path):
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    r = prunec(vit, "--pass", "fastv", "-o", out, "--layer", "1")
    assert r.returncode != 0 and "exists" in r.stderr
    assert out.read_bytes() == b"keep me"


def test_inspect_text_and_json(vit):
    r = prunec("inspect", vit)
    assert r.returncode == 0, r.stderr
    assert "3 attention layers" in r.stdout and "1 prefix token" in r.stdout
    r = prunec("inspect", vit, "--json")
    info = json.loads(r.stdout)
    assert info["tokens"] == 17 and info["prefix_tokens"] == 1 and len(info["layers"]) == 3


def test_inspect_says_when_there_is_no_attention(tmp_path):
    path = tmp_path / "mlp.onnx"
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.onnx.export(mlp, (torch.randn(2, 8),), str(path), dynamo=False, opset_version=17)
    r = prunec("inspect", path)
    assert r.returncode == 0 and "no attention found" in r.stdout


def test_passes_lists_fastv():
    r = prunec("passes")
    assert r.returncode == 0 and "fastv" in r.stdout and "keep" in r.stdout


def _external(vit, folder, name, damage):
    """``vit`` saved with external data, then the data file damaged: 'missing' or 'truncated'."""
    import onnx

    path = folder / name
    onnx.save(onnx.load(str(vit)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=1024)
    data = folder / (name + ".data")
    if damage == "missing":
        data.unlink()
    else:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    return path


def _bad(tmp_path, vit):
    mlp_path = tmp_path / "mlp.onnx"
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.onnx.export(mlp, (torch.randn(2, 8),), str(mlp_path), dynamo=False, opset_version=17)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx model at all \x00\xff" * 10)
    trunc = tmp_path / "trunc.onnx"
    data = vit.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    folder = tmp_path / "a_folder"
    folder.mkdir()
    return {
        "missing file": ([tmp_path / "nope.onnx", "--pass", "fastv"], "no such file"),
        "not onnx": ([junk, "--pass", "fastv"], "not a valid ONNX"),
        "truncated": ([trunc, "--pass", "fastv"], "not a valid ONNX"),
        "no attention": ([mlp_path, "--pass", "fastv"], "no attention"),
        "keep zero": ([vit, "--pass", "fastv", "--keep", "0"], "keep must be in (0, 1]"),
        "keep above one": ([vit, "--pass", "fastv", "--keep", "1.5"], "keep must be in (0, 1]"),
        "layer beyond depth": ([vit, "--pass", "fastv", "--layer", "7"], "out of range"),
        "unknown pass": ([vit, "--pass", "nosuch"], "unknown pass"),
        "output is input": ([vit, "--pass", "fastv", "-o", vit], "is the input"),
        "output folder missing": ([vit, "--pass", "fastv", "-o", tmp_path / "no" / "such" / "out.onnx"],
                                  "folder " + str(tmp_path / "no" / "such") + " does not exist"),
        "output is a folder": ([vit, "--pass", "fastv", "-o", folder], "is a directory"),
        "output is a folder, forced": ([vit, "--pass", "fastv", "-o", folder, "--force"], "is a directory"),
        "span reversed": ([vit, "--pass", "fastv", "--span", "10:3"], "span 10:3 is reversed"),
        "span empty": ([vit, "--pass", "fastv", "--span", "5:5"], "span 5:5 is empty"),
        "span not numeric": ([vit, "--pass", "fastv", "--span", "a:b"], "is not START:END"),
        "span in the pass spec reversed": ([vit, "--pass", "fastv:span=9:2"], "span 9:2 is reversed"),
        "shape of a missing input": ([vit, "--pass", "fastv", "--shape", "nosuch=?,3,32,32"],
                                     "'nosuch', which is not an input"),
        "external data missing": ([_external(vit, tmp_path, "gone.onnx", "missing"), "--pass", "fastv"],
                                  "gone.onnx.data', which is missing"),
        "external data truncated": ([_external(vit, tmp_path, "cut.onnx", "truncated"), "--pass", "fastv"],
                                    "cut.onnx.data', which is truncated"),
    }


BAD = ["missing file", "not onnx", "truncated", "no attention", "keep zero", "keep above one", "layer beyond depth",
       "unknown pass", "output is input", "output folder missing", "output is a folder", "output is a folder, forced",
       "span reversed", "span empty", "span not numeric", "span in the pass spec reversed",
       "shape of a missing input", "external data missing", "external data truncated"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_error(case, vit, tmp_path):
    """One line on stderr, exit != 0, no output written, every file as it was. (Read-only
    folders, a weight file over 2 GiB and Ctrl-C during the write: tests/test_io.py.)"""
    args, needle = _bad(tmp_path, vit)[case]
    snapshot = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()
    vit_before = vit.read_bytes()
    out = tmp_path / "out.onnx"
    if "-o" not in map(str, args):
        args = [*args, "-o", out]
    r = prunec(*args)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("prunec: error:") and needle in lines[0], lines[0]
    assert not out.exists()
    assert vit.read_bytes() == vit_before
    assert snapshot() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []  # no temporary files


def test_nothing_reduced_is_said(vit, tmp_path):
    """A pass that reduces nothing (ToMe r=0, FastV keep=1) still writes the model, and says so."""
    for args in (["--pass", "tome:r=0"], ["--pass", "fastv", "--keep", "1", "--layer", "1"]):
        out = tmp_path / f"{args[1][:4]}.onnx"
        r = prunec(vit, *args, "-o", out)
        assert r.returncode == 0, r.stderr
        assert "reduced no tokens" in r.stderr and "nothing reduced" in r.stderr and "unchanged" in r.stderr
        assert out.exists()
    r = prunec(vit, "--pass", "tome:r=0", "--pass", "fastv", "--layer", "1", "-o", tmp_path / "both.onnx")
    assert r.returncode == 0 and "ToMe(" in r.stderr and "reduced no tokens" in r.stderr and "wrote" in r.stderr
    assert "nothing reduced" not in r.stderr


def test_pt2_in_pt2_out(tmp_path):
    import os

    from conftest import case

    c = case("timm_vit")
    ep = torch.export.export(c.module, (c.inputs["x"],), strict=False)
    src = tmp_path / "vit.pt2"
    torch.export.save(ep, str(src))
    r = prunec(src, "--pass", "fastv", "--keep", "0.5", "--layer", "1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "vit.fastv.pt2"
    assert out.exists() and (os.stat(out).st_mode & 0o044)  # readable like any file the user writes
    module = torch.export.load(str(out)).module()
    assert module(c.inputs["x"]).shape == (2, 10)


def test_dynamic_sequence_runs_at_any_length_and_shape_still_specializes(tmp_path):
    from conftest import case

    c = case("hf_bert")
    names = list(c.inputs)
    path = tmp_path / "bert.onnx"

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.onnx.export(Wrap(c.module), tuple(c.inputs[n] for n in names), str(path), dynamo=False, opset_version=17,
                      input_names=names, dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    r = prunec(path, "--pass", "fastv", "--layer", "1", "-o", tmp_path / "a.onnx")  # no --shape: counts at run time
    assert r.returncode == 0, r.stderr
    import prunec as pc

    dyn = pc.load(tmp_path / "a.onnx")
    for n in (16, 40):
        ids = np.zeros((3, n), np.int64)
        assert dyn.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].shape == (3, n // 2, 64)
    r = prunec(path, "--pass", "tome:r=4", "-o", tmp_path / "t.onnx")  # a merge: r capped at run time
    assert r.returncode == 0, r.stderr
    merged = pc.load(tmp_path / "t.onnx")
    for n in (5, 40):
        ids = np.zeros((3, n), np.int64)
        out = merged.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        assert out.shape[0] == 3 and out.shape[1] < n
    r = prunec(path, "--pass", "pool:factor=2,grid=4x4,span=1:17", "-o", tmp_path / "p.onnx")  # a fixed grid
    assert r.returncode != 0 and "--shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()
    r = prunec(path, "--pass", "fastv", "--layer", "1", "--shape", "input_ids=?,16", "--shape",
               "attention_mask=?,16", "-o", tmp_path / "b.onnx")
    assert r.returncode == 0, r.stderr
    out = pc.load(tmp_path / "b.onnx").run({n: c.inputs[n].numpy() for n in names})[0]
    assert out.shape == (2, 8, 64)  # nothing reads [CLS] in this graph: no prefix token, keep 0.5 of 16
    r = prunec(path, "--pass", "fastv", "--shape", "nosuch=?,16", "-o", tmp_path / "c.onnx")
    assert r.returncode != 0 and "not an input" in r.stderr
    assert np.isfinite(out).all()


def test_every_command_takes_the_loading_options():
    """inspect and bench (like prune, eval, tune and sweep) take --probe-length and --check: a span past
    the default probe length of a dynamic model works through them."""
    import json

    from test_dynamic import exported

    path = exported("bert", "torchscript17")
    r = prunec("inspect", path, "--probe-length", "40", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 40
    r = prunec("bench", path, "--pass", "fastv", "--span", "1:35", "--probe-length", "40", "--check", "none",
               "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    r = prunec("bench", path, "--pass", "fastv", "--span", "1:35", "--repeat", "1")
    assert r.returncode != 0 and "--probe-length" in r.stderr


def test_check_fast_runs_the_graph_up_to_two_layers_after_the_cut(tmp_path, monkeypatch):
    """``--check fast``: onnx.checker on the written model, ONNX Runtime on the graph up to the stream
    leaving layer K + 2 (4 of 6 layers for a cut before layer 1): fewer nodes, that one output; the
    output line says so."""
    import onnx

    import prunec as pc
    import prunec.ir.session as session
    from prunec.cli import main
    from tiny_models import tiny, tiny_inputs

    path = tmp_path / "tiny6.onnx"
    with torch.no_grad():
        torch.onnx.export(tiny(depth=6).eval(), (tiny_inputs()["x"],), str(path), dynamo=True, external_data=False,
                          input_names=["x"], verbose=False)
    ran = []
    real = session.make_session
    monkeypatch.setattr(session, "make_session",
                        lambda model, *a, **k: ran.append(model) or real(model, *a, **k))
    out = pc.passes.FastV(keep=0.5, layer="1")(pc.load(path, check="fast"))
    assert out.checked_layers == 4
    checked = ran[-1]
    assert len(checked.graph.outputs) == 1 and len(list(checked.graph)) < len(list(out.model.graph))
    full = pc.passes.FastV(keep=0.5, layer="1")(pc.load(path))
    assert full.checked_layers is None and len(list(ran[-1].graph)) == len(list(full.model.graph))
    dst = tmp_path / "out.onnx"
    r = prunec(path, "--pass", "fastv", "--layer", "1", "--check", "fast", "-o", dst, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    assert "first 4 layers (--check fast)" in " ".join((r.stdout + r.stderr).split())
    onnx.checker.check_model(str(dst), full_check=True)
