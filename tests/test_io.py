"""Reading and writing models: external data (kept external, read lazily, > 2 GiB files),
graphs with nodes out of topological order, atomic writes under Ctrl-C, unwritable outputs."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import prunec
from conftest import case, onnx_file

FASTV = dict(keep=0.5, layer="1")


def prunec_cli(*args, code=None):
    """Run the CLI in a subprocess; ``code`` runs first (e.g. to patch a writer)."""
    script = (code or "") + "\nimport sys\nfrom prunec.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)


def files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    d = tmp_path_factory.mktemp("io")
    dst = d / "vit.onnx"
    shutil.copy(onnx_file("timm_vit", "dynamo18"), dst)
    return dst


@pytest.fixture(scope="module")
def pruned_inline(vit):
    """Outputs of FastV on the plain (inline-weight) export: what every other form must give."""
    x = case("timm_vit").inputs["x"].numpy()
    return prunec.passes.FastV(**FASTV)(prunec.load(vit)).run({"x": x})


def save_external(src: Path, dst: Path) -> Path:
    m = onnx.load(str(src))
    onnx.save(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data",
              size_threshold=1024)
    return dst


def test_external_data_is_read_and_written_external(vit, pruned_inline, tmp_path):
    src = save_external(vit, tmp_path / "ext.onnx")
    before = files(tmp_path)
    out = tmp_path / "out.onnx"
    r = prunec_cli(src, "--pass", "fastv", "--keep", "0.5", "--layer", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    data = tmp_path / "out.onnx.data"
    assert "out.onnx.data" in r.stderr and data.exists()
    weights = sum(t.ByteSize() for t in onnx.load(str(vit)).graph.initializer)
    assert data.stat().st_size > 0.9 * weights > 2 * out.stat().st_size  # the weights went beside, not inline
    proto = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} == {data.name}
    x = case("timm_vit").inputs["x"].numpy()
    got = prunec.load(out).run({"x": x})
    for a, b in zip(got, pruned_inline, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {k: v for k, v in files(tmp_path).items() if not str(k).startswith("out.")} == before
    # an output whose .data would replace the input's weights is refused; nothing is touched
    clash = tmp_path / "clash.onnx"
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "o2.onnx.data"
    onnx.save(m, str(clash))
    os.replace(tmp_path / "ext.onnx.data", tmp_path / "o2.onnx.data")
    before = files(tmp_path)
    r = prunec_cli(clash, "--pass", "fastv", "--layer", "1", "-o", tmp_path / "o2.onnx", "--force")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "holds the input model's weights" in r.stderr, r.stderr
    assert files(tmp_path) == before


def _sparse_past_2gib(vit: Path, dst: Path) -> str:
    """``vit`` with external data whose largest weight lies past a 2 GiB hole of its data file
    (a sparse file: no disk or memory spent on the hole). Returns that weight's name."""
    save_external(vit, dst)
    data = dst.with_name(dst.name + ".data")
    m = onnx.load(str(dst), load_external_data=False)
    info = {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer if t.external_data}
    name = max(info, key=lambda n: int(info[n]["length"]))
    with open(data, "r+b") as f:
        f.seek(int(info[name].get("offset", 0)))
        blob = f.read(int(info[name]["length"]))
        offset = 2**31 + 4096
        f.truncate(offset)
        f.seek(offset)
        f.write(blob)
    for t in m.graph.initializer:
        if t.name == name:
            for e in t.external_data:
                if e.key == "offset":
                    e.value = str(offset)
            if not any(e.key == "offset" for e in t.external_data):
                t.external_data.add(key="offset", value=str(offset))
    onnx.save(m, str(dst))
    assert data.stat().st_size > 2**31 and data.stat().st_blocks * 512 < 2**28  # > 2 GiB, nearly all hole
    return name


def test_external_data_past_2gib_is_mapped_not_read(vit, pruned_inline, tmp_path):
    """A data file over 2 GiB (a weight at an offset past 2**31): loaded by memory mapping,
    rewritten with peak memory far below the file's size, written with external data."""
    src = tmp_path / "far.onnx"
    _sparse_past_2gib(vit, src)
    out = tmp_path / "far.fastv.onnx"
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over fork + exec)
    code = "import atexit\natexit.register(lambda: print([ln for ln in open('/proc/self/status') " \
           "if ln.startswith('VmHWM')][0]))"
    r = prunec_cli(src, "--pass", "fastv", "--keep", "0.5", "--layer", "1", "-o", out, code=code)
    assert r.returncode == 0, r.stderr
    rss_mib = int(r.stdout.split("VmHWM:")[1].split()[0]) / 1024
    assert rss_mib < 1024, f"peak memory {rss_mib:.0f} MiB for a model of < 1 MiB of weights"
    data = out.with_name(out.name + ".data")
    # the input's data file copied by the kernel with its offsets: holes stay holes (no disk, no memory)
    assert data.exists() and data.stat().st_size > 2**31 and data.stat().st_blocks * 512 < 2**28
    got = prunec.load(out).run({"x": case("timm_vit").inputs["x"].numpy()})
    for a, b in zip(got, pruned_inline, strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_over_the_protobuf_limit_go_to_external_data(vit, pruned_inline, tmp_path, monkeypatch):
    """Weights over 2 GiB cannot be one protobuf: save() switches to external data. The limit
    is lowered here so that the decision is tested on a small model."""
    import prunec.model

    model = prunec.passes.FastV(**FASTV)(prunec.load(vit))
    assert not model.external_data()
    monkeypatch.setattr(prunec.model, "INLINE_LIMIT", 1000)
    assert model.external_data()
    out = model.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    got = prunec.load(out).run({"x": case("timm_vit").inputs["x"].numpy()})
    for a, b in zip(got, pruned_inline, strict=True):
        np.testing.assert_array_equal(a, b)


def test_external_data_is_copied_without_copy_file_range(vit, pruned_inline, tmp_path, monkeypatch):
    """Where the kernel copy is missing (not Linux: no os.copy_file_range), the data file is copied
    in user space instead: the same model."""
    src = save_external(vit, tmp_path / "ext.onnx")
    model = prunec.passes.FastV(**FASTV)(prunec.load(src))
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    out = model.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()
    got = prunec.load(out).run({"x": case("timm_vit").inputs["x"].numpy()})
    for a, b in zip(got, pruned_inline, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not os.environ.get("PRUNEC_BIG"), reason="writes 2 GiB and needs ~4.5 GiB of memory: "
                    "set PRUNEC_BIG=1 to run")
def test_a_weight_over_2gib(vit, pruned_inline, tmp_path):
    """A genuine 2 GiB weight (a [53.7M, 10] float32 table, sparse on disk, read through a
    Gather of its last row into the logits): rewritten and written with external data. ORT
    copies every weight into its session, so this needs about twice the table in memory."""
    from onnx import TensorProto, helper, numpy_helper

    src = save_external(vit, tmp_path / "big.onnx")
    m = onnx.load(str(src), load_external_data=False)
    data = tmp_path / "big.onnx.data"
    rows, width = 2**31 // 40 + 1000, 10
    offset = (data.stat().st_size + 4095) // 4096 * 4096
    big = TensorProto(name="big_table", data_type=TensorProto.FLOAT, dims=[rows, width],
                      data_location=TensorProto.EXTERNAL)
    for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(rows * width * 4))):
        big.external_data.add(key=k, value=v)
    last = np.arange(1, width + 1, dtype=np.float32)
    with open(data, "r+b") as f:
        f.truncate(offset + rows * width * 4)
        f.seek(offset + (rows - 1) * width * 4)
        f.write(last.tobytes())
    name = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [o + "_pre" if o == name else o for o in n.output]
    m.graph.initializer.extend([big, numpy_helper.from_array(np.array(rows - 1, np.int64), "big_row")])
    m.graph.node.extend([helper.make_node("Gather", ["big_table", "big_row"], ["big_bias"], axis=0),
                         helper.make_node("Add", [name + "_pre", "big_bias"], [name])])
    onnx.save(m, str(src))
    out = tmp_path / "big.fastv.onnx"
    r = prunec_cli(src, "--pass", "fastv", "--keep", "0.5", "--layer", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "big.fastv.onnx.data").stat().st_size > 2**31 > 100 * out.stat().st_size
    got = prunec.load(out).run({"x": case("timm_vit").inputs["x"].numpy()})
    np.testing.assert_allclose(got[0], pruned_inline[0] + last, rtol=1e-6, atol=1e-6)


def _out_of_order(proto: onnx.ModelProto) -> int:
    seen = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    late = 0
    for n in proto.graph.node:
        late += any(x not in seen for x in n.input)
        seen.update(n.output)
    return late


def test_unsorted_graphs_are_sorted_at_load(vit, pruned_inline, tmp_path):
    """Nodes out of topological order (shuffled here; ORT's fp16 converter writes such graphs)
    are sorted at load: the rewrite is the one of the sorted graph."""
    m = onnx.load(str(vit))
    nodes = list(m.graph.node)
    random.Random(0).shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    assert _out_of_order(m) > 10
    path = tmp_path / "shuffled.onnx"
    onnx.save(m, str(path))
    x = case("timm_vit").inputs["x"].numpy()
    got = prunec.passes.FastV(**FASTV)(prunec.load(path)).run({"x": x})
    for a, b in zip(got, pruned_inline, strict=True):
        np.testing.assert_array_equal(a, b)
    got = prunec.passes.FastV(**FASTV)(prunec.load(m)).run({"x": x})  # a ModelProto is sorted too
    np.testing.assert_array_equal(got[0], pruned_inline[0])


def _toposorted(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its nodes in a topological order (Kahn's algorithm, written here)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    ready = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    todo, order = list(proto.graph.node), []
    while todo:
        n = next(n for n in todo if all(x in ready for x in n.input))
        todo.remove(n)
        order.append(n)
        ready.update(n.output)
    del out.graph.node[:]
    out.graph.node.extend(order)
    return out


def test_fp16_converter_output_loads_and_rewrites(vit, tmp_path):
    """The graph ORT's fp16 converter writes (keep_io_types) has nodes out of order: prunec
    rewrites it as it rewrites the same graph sorted beforehand."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m16 = convert_float_to_float16(onnx.load(str(vit)), keep_io_types=True)
    assert _out_of_order(m16) > 0
    sorted16 = _toposorted(m16)
    assert _out_of_order(sorted16) == 0
    x = case("timm_vit").make_inputs(3, 7)["x"].numpy()
    got, want = (prunec.passes.FastV(**FASTV)(prunec.load(m)) for m in (m16, sorted16))
    np.testing.assert_array_equal(got.run({"x": x})[0], want.run({"x": x})[0])
    (k16,), (k32,) = got.kept_indices({"x": x}).values(), prunec.passes.FastV(**FASTV)(prunec.load(vit)).kept_indices(
        {"x": x}).values()
    assert k16.shape == k32.shape == (3, 9) and (k16 == k32).mean() > 0.8  # fp16 may reorder near-ties only


# -- atomic writes ---------------------------------------------------------------------------

def test_interrupted_writer_leaves_nothing(tmp_path):
    from prunec.model import atomic_write

    def writer(f):
        f.write(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "m.onnx", writer)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_external_save_leaves_nothing(vit, tmp_path, monkeypatch):
    import onnx_ir

    src = save_external(vit, tmp_path / "ext.onnx")
    model = prunec.load(src)
    assert model.external_data()
    real = onnx_ir.save

    def save_then_interrupt(*a, **kw):
        real(*a, **kw)  # model and data complete in the temporary folder
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", save_then_interrupt)
    before = files(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "out.onnx")
    assert files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_ctrl_c_during_the_write(vit, tmp_path, external):
    """A real SIGINT to the CLI while it writes (sent from inside the writer, so it lands
    mid-write every time): one line, exit 130, no output, no temporary files, input untouched."""
    src = save_external(vit, tmp_path / "ext.onnx") if external else vit
    code = ("import os, signal, prunec.model\nreal = prunec.model._publish\n"
            "def publish(moves):  # the files are written in full under temporary names, not yet renamed\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    real(moves)\n"
            "prunec.model._publish = publish\n")
    before = files(tmp_path)
    src_before = src.read_bytes()
    r = prunec_cli(src, "--pass", "fastv", "--layer", "1", "-o", tmp_path / "out.onnx", code=code)
    assert r.returncode == 130
    assert r.stderr.strip().splitlines() == ["prunec: error: interrupted (files are written whole or not at all)"], \
        r.stderr
    assert files(tmp_path) == before and src.read_bytes() == src_before


def test_read_only_output_folder(vit, tmp_path):
    """Root ignores permission bits, so the folder is made immutable (chattr +i) when running
    as root; either way the folder must really refuse a file before the test relies on it."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)]).returncode != 0:
            pytest.skip("running as root without chattr +i: no honest way to make a folder read-only here")
    else:
        ro.chmod(0o555)
    try:
        try:
            (ro / "probe").write_bytes(b"x")
            pytest.skip("the folder still accepts files (file system ignores the read-only marking)")
        except OSError:
            pass
        r = prunec_cli(vit, "--pass", "fastv", "--layer", "1", "-o", ro / "out.onnx")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, r.stderr
        assert lines[0].startswith("prunec: error: cannot write to the output folder"), lines[0]
        assert list(ro.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)])
        else:
            ro.chmod(0o755)
