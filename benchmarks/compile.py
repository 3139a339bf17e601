"""Compile at scale: where the time of a ``prunec`` rewrite goes, per model and pass.

For each row (a model and its passes) the script prints the rewrite split into phases,
measured inside one run of the command line's own code path (``prunec.cli.main`` on the
same arguments, in a fresh process, with prunec's library calls wrapped by timers; prunec's
code is not changed):

* read     ``prunec.model._read_onnx``: ``onnx_ir.load``, mapping external data, decoding
           inline weights (file I/O)
* load     the rest of ``prunec.load``: sorting nodes, ``OnnxModel(...)`` (skip-norm
           unfusing, node names, probe inputs)
* probe    ``prunec.ir.from_onnx.probe_onnx``: ONNX shape inference plus ORT runs on the probe
           inputs of what it leaves open (of the weight-free nodes, or of the whole model)
* analyze  ``from_onnx`` (the uniform graph) and ``passes.analysis.blocks.analyze``
* plan     the passes' ``Pass.plan``
* lower    ``prunec.backends.onnx.lower_onnx`` / ``lower_onnx_with_proto`` (clone of the graph, new
           nodes, the outputs' shape inference on the weight-free serialisation the check reuses)
* checker  ``onnx.checker.check_model`` in ``OnnxModel.validate``
* ort      the rest of ``OnnxModel.validate``: one ORT session, run at the probe shapes and
           at the other batches / lengths
* save     ``prunec.model.save_onnx``: serialise and write the model (and its ``.data``)
* post     ``prunec.cli._warn_reduced_outputs``: the CLI names the written model's reduced token
           outputs (read off its graph outputs' shapes for ONNX; a second analysis for torch)
* other    the rest of ``cli.main`` (argument parsing, output checks, bookkeeping)

``rewrite`` = probe + analyze + plan + lower + checker + ort (prunec's own work, no file
I/O); ``analysis`` = probe + analyze; ``validate`` = checker + ort. Times are exclusive (a
phase called inside another is counted once, in the inner one); imports are done before the
clock starts and reported apart. Counters: ORT sessions built, weight-free graph
serialisations (``graph_only_proto``), ``onnx_ir.Model.clone`` calls and ONNX shape
inference runs, ORT runs (and, where prunec has them, the probe's ORT symbolic shape
inference and weight-free run), each with the phase it happened in.

Beside the phases: the command line end to end, a subprocess ``python -m prunec.cli MODEL
--pass ... -o OUT --force`` (process start and imports included), its wall time and peak RSS.
Peak RSS is the child's maximum resident set size as ``/usr/bin/time -f %M`` reports it
(wait4 rusage of a process forked from ``time`` itself, so the parent's size does not leak
in; if ``/usr/bin/time`` is missing: the VmHWM of /proc/PID/status, sampled every 50 ms).
Every subprocess runs under a watchdog that samples its process tree every 50 ms and kills
the group past ``--rss-limit-gb`` of RSS, ``--write-limit-gb`` written to storage
(/proc/PID/io ``write_bytes``: a sparse copy counts nothing) or ``--timeout``; the row then
reports ``fails: <reason>`` and the phase the run was in, and the script goes on. Each subprocess
starts after ``os.sync()``: on this kind of machine the kernel's writeback of the hundreds of MiB an
earlier run wrote otherwise slows the next run's write by seconds (measured: the same 330 MiB write
took 0.1 to 1.2 s depending on what was written before it).

Rows (``--only`` takes a row name or its model part, e.g. ``vit-b`` or ``depth``):

* ``vit-b/fastv``, ``vit-b/tome``: timm ``vit_base_patch16_224`` (random weights), dynamo
  ONNX opset 18, dynamic batch; FastV keep 0.25 before layer 2; ToMe r=16.
* ``smollm/fastv``, ``smollm/tome``: a 30-layer decoder shaped like SmolLM-135M (HF
  LlamaConfig: hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied
  embeddings, no cache; random weights), dynamo ONNX opset 18, dynamic batch and sequence;
  FastV keep 0.5 before layer 2; ToMe r=8 (reported as refused if prunec refuses it).
* ``depth6/tome`` ... ``depth48/tome``: timm ``vit_small_patch16_224`` with ``depth=D``
  (``--depths``), ToMe r=8; the script prints t(48)/t(12) of the rewrite (target <= 4.5).
* ``7b/fastv``: a 7B-shaped decoder (Llama-2-7B widths with grouped-query attention: 32
  layers, hidden 4096, 32 heads / 8 KV heads, intermediate 11008, vocab 32000, untied head;
  5.93 B parameters, float16 by default: an 11 GiB data file) whose weights are external data
  in a *sparse* file that is never written: the graph is exported by the dynamo exporter from a
  ``LlamaForCausalLM`` built on the ``meta`` device (no weight memory), the big weights become
  ``ExternalTensor``s pointing into a file made by ``truncate`` (holes read as zeros), the
  norm weights (ones) and rotary ``inv_freq`` are real. Weight transposes that the exporter's
  optimizer would fold by computing them are folded by permuting the shape (the data is
  zeros), then the exporter's optimizer runs without folding anything that reads an external
  weight. FastV keep 0.5 before layer 2 over a 576-token image span (``--span 35:611``). Where
  the CLI has no probe-length option, the phase run uses the Python API's
  ``prunec.load(..., probe_length=612)`` (injected into ``cli.main``'s call of
  ``prunec.load``) while the plain CLI run probes at its default length; a prunec whose CLI
  takes ``--probe-length`` gets ``--probe-length 612`` in both runs. Reported beside the
  numbers: how many bytes of the data file were read (page-cache residency of the sparse file
  via mincore(2), evicted with posix_fadvise before each run) and the blocks allocated to the
  written model's data file. The skeleton's graph differs from a plain export of the same
  module by one no-op Reshape per layer (after attention x V) that the exporter's optimizer
  removes when the weights are real tensors; the smoke test holds the builder to the module's
  outputs at a tiny width.

The 7B row is exported once per run (about 1.5-2.5 min; 1.1 GiB RSS, nothing read or written
of its 11 GiB of weights); ``--skip-7b`` leaves it out.

Exports are cached in a temporary folder (removed at the end) or in ``--keep-files DIR``
(kept, and reused by later runs).

    python benchmarks/compile.py                              # every row (many minutes on 2 cores)
    python benchmarks/compile.py --only vit-b,smollm --json compile.json
    python benchmarks/compile.py --only depth --depths 6,12,24,48 --keep-files /tmp/prunec-compile
    python benchmarks/compile.py --only 7b --keep-files /tmp/prunec-compile --rss-limit-gb 6
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

PHASES = ("read", "load", "probe", "analyze", "plan", "lower", "checker", "ort", "save", "post", "other")
REWRITE = ("probe", "analyze", "plan", "lower", "checker", "ort")
LIGHT_COUNTERS = ("ORT symbolic shape inference", "weight-free run")  # the probe's steps, where prunec has them

SMOLLM = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
              num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=11008,
               num_hidden_layers=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
# the smoke test's stand-in for the 7B skeleton: the same builder at a tiny width
LLAMA_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=3, vocab_size=100, tie_word_embeddings=False, max_position_embeddings=1024)


# ----------------------------------------------------------------------------------------------
# rows


def rows_for(args) -> list[dict]:
    """The rows to run, in order: name, export key, CLI pass arguments, targets."""
    rows = [
        dict(name="vit-b/fastv", model="vit_b", passes=["--pass", "fastv", "--keep", "0.25", "--layer", "2"],
             target_rewrite=3.0, target_cli=5.0),
        dict(name="vit-b/tome", model="vit_b", passes=["--pass", "tome:r=16"], target_rewrite=3.0, target_cli=5.0),
        dict(name="smollm/fastv", model="smollm", passes=["--pass", "fastv", "--keep", "0.5", "--layer", "2"],
             target_rewrite=3.0, target_cli=5.0),
        dict(name="smollm/tome", model="smollm", passes=["--pass", "tome:r=8"], target_rewrite=3.0, target_cli=5.0,
             refusal_ok=True),
    ]
    for d in args.depths:
        rows.append(dict(name=f"depth{d}/tome", model=f"vit_s_d{d}", passes=["--pass", "tome:r=8"]))
    if not args.skip_7b:
        rows.append(dict(name="7b/fastv", model=f"llama7b_{args.dtype_7b}",
                         passes=["--pass", "fastv", "--keep", "0.5", "--layer", "2", "--span", "35:611"],
                         probe_length=612, target_rewrite=30.0, target_cli=30.0, target_rss_mib=2048, sparse=True))
    if args.tiny:  # the smoke test's rows (hidden): a tiny ViT and the tiny skeleton decoder
        rows = [dict(name="tiny-vit/fastv", model="vit_tiny_d2", passes=["--pass", "fastv", "--keep", "0.5",
                                                                          "--layer", "1"]),
                dict(name="tiny-7b/fastv", model="llama_tiny_float32",
                     passes=["--pass", "fastv", "--keep", "0.5", "--layer", "1", "--span", "35:611"],
                     probe_length=612, sparse=True)]
    if args.only:
        want = set(args.only)
        rows = [r for r in rows if r["name"] in want or r["name"].split("/")[0] in want
                or ("depth" in want and r["name"].startswith("depth"))]
        if not rows:
            sys.exit(f"--only {','.join(args.only)} matches no row")
    return rows


# ----------------------------------------------------------------------------------------------
# exports (each in its own process: `compile.py --export KEY PATH`)


class _Logits:
    """A causal LM with one input (``input_ids``) and one output (the logits); built lazily so
    that importing this script does not import torch."""

    def __new__(cls, m):
        import torch

        class Logits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                return self.m(input_ids=input_ids).logits

        return Logits(m)


def export_timm(name: str, path: Path, **kwargs) -> None:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)


def export_decoder(config: dict, path: Path) -> None:
    """A random-weight Llama (dynamo, opset 18, dynamic batch and sequence on input_ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**config, use_cache=False)
    module = _Logits(LlamaForCausalLM(cfg).eval())
    ids = torch.zeros(2, 16, dtype=torch.int64)
    torch.onnx.export(module, (ids,), str(path), dynamo=True, opset_version=18, external_data=False,
                      input_names=["input_ids"], verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64),
                                       1: torch.export.Dim("sequence", min=3, max=cfg.max_position_embeddings)},))


def export_skeleton(config: dict, path: Path, dtype: str = "float16", weights: dict | None = None) -> dict:
    """A Llama of ``config`` as ONNX with its weights as external data in ``PATH.data``, without
    weight memory: exported from a module on the ``meta`` device. Without ``weights`` the data
    file is made by truncate: all holes, nothing written (the weights read as zeros); with
    ``weights`` (a state dict of the same config: the smoke test's check of this builder on a tiny
    config) their values are written. Norm weights (ones) and the rotary ``inv_freq`` are real
    values in the graph either way. Returns a summary."""
    import numpy as np
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**config, use_cache=False)
    tdtype = getattr(torch, dtype)
    with torch.device("meta"):
        module = _Logits(LlamaForCausalLM(cfg).to(tdtype).eval())
    ids = torch.zeros(2, 16, dtype=torch.int64, device="meta")
    prog = torch.onnx.export(module, (ids,), dynamo=True, opset_version=18, input_names=["input_ids"],
                             verbose=False, optimize=False,
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64),
                                              1: torch.export.Dim("sequence", min=3,
                                                                  max=cfg.max_position_embeddings)},))
    model = prog.model
    graph = model.graph
    inv_freq = LlamaRotaryEmbedding(config=cfg).inv_freq.detach().numpy()

    def real_value(name: str, v):
        """The real values of a small tensor the graph needs (None: a weight, left external)."""
        np_dtype = v.dtype.numpy()
        if name.endswith("inv_freq"):
            return inv_freq.astype(np_dtype)
        if name.endswith("norm.weight"):
            return np.ones([int(d) for d in v.shape], np_dtype) if weights is None else \
                weights[name].detach().to(tdtype).numpy()
        return None

    small = set()
    for name, v in list(graph.initializers.items()):
        arr = real_value(name, v)
        if arr is not None:
            small.add(name)
            v.const_value = ir.Tensor(arr, name=name)
    # fold weight transposes (the exporter's optimizer would compute them, reading every weight)
    # by permuting the declared shape; ``origin``: folded weight -> (state dict key, perm)
    origin = {v.name: (v.name, None) for n, v in graph.initializers.items() if n not in small}
    for v in [v for n, v in graph.initializers.items() if n not in small]:
        uses = list(v.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Transpose":
            continue
        node = uses[0].node
        perm = list(node.attributes["perm"].as_ints())
        out = node.outputs[0]
        name = out.name
        out.name = f"{name}__folded"
        shape = ir.Shape([v.shape[p] for p in perm])
        new = ir.Value(name=name, shape=shape, type=ir.TensorType(v.dtype),  # data placed below
                       const_value=ir.ExternalTensor("", 0, 0, v.dtype, shape=shape, name=name))
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        graph.initializers.pop(v.name)
        graph.register_initializer(new)
        origin[name] = (origin.pop(v.name)[0], perm)
    big = [v for n, v in graph.initializers.items() if n in origin]
    data = path.with_name(path.name + ".data")
    offset, align = 0, 65536
    with open(data, "wb") as f:
        for v in big:
            shape = [int(d) for d in v.shape]
            nbytes = int(np.prod(shape) * v.dtype.itemsize)
            if weights is not None:
                key, perm = origin[v.name]
                w = weights[key].detach().to(tdtype)
                f.seek(offset)
                f.write(np.ascontiguousarray((w.permute(*perm) if perm else w).numpy()).tobytes())
            v.const_value = ir.ExternalTensor(data.name, offset, nbytes, v.dtype, shape=ir.Shape(shape),
                                              name=v.name, base_dir=str(path.parent))
            offset += (nbytes + align - 1) // align * align
        f.truncate(offset)  # sparse: the holes are neither written nor allocated

    def should_fold(node):  # never fold (compute) anything that reads an external weight
        if any(x is not None and isinstance(x.const_value, ir.ExternalTensor) for x in node.inputs):
            return False
        return None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    proto = ir.serde.serialize_model(model)  # external tensors are written as references, not read
    path.write_bytes(proto.SerializeToString())
    params = sum(int(np.prod([int(d) for d in v.shape])) for n, v in graph.initializers.items()
                 if v.shape is not None and v.dtype.is_floating_point() and not n.endswith("inv_freq"))
    return {"params": params, "data_bytes": offset, "graph_bytes": path.stat().st_size,
            "initializers_external": len(big), "nodes": len(graph)}


def run_export(key: str, path: Path) -> dict:
    """Export the model ``key`` to ``path`` (in this process)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    info: dict = {}
    if key == "vit_b":
        export_timm("vit_base_patch16_224", path)
    elif key == "vit_tiny_d2":
        export_timm("vit_tiny_patch16_224", path, depth=2)
    elif key.startswith("vit_s_d"):
        export_timm("vit_small_patch16_224", path, depth=int(key[len("vit_s_d"):]))
    elif key == "smollm":
        export_decoder(SMOLLM, path)
    elif key.startswith("llama7b_"):
        info = export_skeleton(LLAMA7B, path, dtype=key.split("_", 1)[1])
    elif key.startswith("llama_tiny_"):
        info = export_skeleton(LLAMA_TINY, path, dtype=key.split("_", 2)[2])
    else:
        raise SystemExit(f"unknown model {key}")
    return info


def ensure_export(key: str, folder: Path, timeout: float) -> tuple[Path, dict, float | None]:
    """The cached export of ``key`` in ``folder`` (made in a subprocess if missing): (path, info,
    export seconds or None when cached)."""
    path = folder / f"{key}.onnx"
    meta = folder / f"{key}.json"
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text()), None
    for p in (path, folder / f"{key}.onnx.data", meta):
        if p.exists():
            p.unlink()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE), "--export", key, str(path)], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    dt = time.perf_counter() - t0
    if r.returncode or not path.exists():
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise RuntimeError(f"export of {key} failed: {tail[-1] if tail else r.returncode}")
    info = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
    info["export_s"] = dt
    meta.write_text(json.dumps(info))
    return path, info, dt


# ----------------------------------------------------------------------------------------------
# the phase worker (`compile.py --worker SPEC.json`): cli.main with prunec's calls timed


class Clock:
    """Exclusive time per phase of wrapped functions, plus counters of other wrapped calls (calls
    and inclusive seconds, keyed by the phase they happened in). A phase entered again inside
    itself (a subclass's ``plan`` calling its parent's) is counted once; inside an ``opaque``
    phase no other phase starts (the CLI's post-write analysis is one phase)."""

    def __init__(self, log_path: str | None = None):
        self.stack: list[list] = []
        self.phases: dict[str, list] = {}
        self.counters: dict[str, dict[str, list]] = {}
        self.opaque = 0
        self.log = open(log_path, "a", buffering=1) if log_path else None

    def _mark(self, phase: str) -> None:
        if self.log is not None:
            self.log.write(f"{time.perf_counter():.3f} {phase}\n")

    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "other"

    def phase(self, name: str, fn, opaque: bool = False):
        import functools

        @functools.wraps(fn)
        def timed(*a, **k):
            if self.opaque or any(f[0] == name for f in self.stack):
                return fn(*a, **k)
            frame = [name, time.perf_counter(), 0.0]
            self.stack.append(frame)
            self._mark(name)
            self.opaque += opaque
            try:
                return fn(*a, **k)
            finally:
                self.opaque -= opaque
                self.stack.pop()
                dt = time.perf_counter() - frame[1]
                p = self.phases.setdefault(name, [0.0, 0])
                p[0] += dt - frame[2]
                p[1] += 1
                if self.stack:
                    self.stack[-1][2] += dt
                self._mark(self.current())
        return timed

    def counter(self, name: str, fn):
        import functools

        @functools.wraps(fn)
        def counted(*a, **k):
            where = self.current()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                c = self.counters.setdefault(name, {}).setdefault(where, [0, 0.0])
                c[0] += 1
                c[1] += time.perf_counter() - t0
        return counted


def worker(spec_path: str) -> int:
    """Run ``prunec.cli.main(argv)`` with prunec's phases timed; write the result JSON."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    import onnx
    import onnx.checker
    import onnx.shape_inference
    import onnx_ir as ir
    import onnxruntime

    import prunec
    import prunec.backends.onnx
    import prunec.cli
    import prunec.ir.from_onnx
    import prunec.ir.session
    import prunec.model
    import prunec.passes
    import prunec.passes.analysis.blocks
    import rich.console  # noqa: F401
    import_s = time.perf_counter() - t0

    clock = Clock(spec.get("phase_log"))
    probe_length = spec.get("probe_length")
    load = prunec.model.load

    def load_with_probe_length(*a, **k):
        if probe_length and k.get("probe_length") is None:
            k["probe_length"] = probe_length
        return load(*a, **k)

    timed_load = clock.phase("load", load_with_probe_length)
    prunec.load = prunec.model.load = timed_load
    prunec.model._read_onnx = clock.phase("read", prunec.model._read_onnx)
    fo = prunec.ir.from_onnx
    fo.probe_onnx = clock.phase("probe", fo.probe_onnx)
    fo.from_onnx = clock.phase("analyze", fo.from_onnx)
    blocks = prunec.passes.analysis.blocks
    blocks.analyze = clock.phase("analyze", blocks.analyze)
    seen = set()
    for cls in prunec.passes.REGISTRY.values():
        for c in cls.__mro__:
            if c not in seen and "plan" in c.__dict__:
                seen.add(c)
                c.plan = clock.phase("plan", c.__dict__["plan"])
    backend = prunec.backends.onnx
    for name in ("lower_onnx", "lower_onnx_with_proto"):  # (the second where this prunec has it)
        if hasattr(backend, name):
            setattr(backend, name, clock.phase("lower", getattr(backend, name)))
    onnx.checker.check_model = clock.phase("checker", onnx.checker.check_model)
    prunec.model.OnnxModel.validate = clock.phase("ort", prunec.model.OnnxModel.validate)
    prunec.model.save_onnx = clock.phase("save", prunec.model.save_onnx)
    prunec.cli._warn_reduced_outputs = clock.phase("post", prunec.cli._warn_reduced_outputs, opaque=True)
    sess = prunec.ir.session
    sess.make_session = clock.counter("ORT sessions", sess.make_session)
    sess.graph_only_proto = clock.counter("graph serialisations", sess.graph_only_proto)
    if getattr(backend, "graph_only_proto", None) is not None:  # the backend's own name for it
        backend.graph_only_proto = sess.graph_only_proto
    ir.Model.clone = clock.counter("model clones", ir.Model.clone)
    onnx.shape_inference.infer_shapes = clock.counter("shape inference", onnx.shape_inference.infer_shapes)
    onnxruntime.InferenceSession.run = clock.counter("ORT runs", onnxruntime.InferenceSession.run)
    for name, label in zip(("_symbolic_shapes", "_weight_free_run"), LIGHT_COUNTERS):
        if hasattr(fo, name):  # the light probe's steps, where this prunec has them
            setattr(fo, name, clock.counter(label, getattr(fo, name)))

    t0 = time.perf_counter()
    try:
        rc = prunec.cli.main(list(spec["argv"]))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001  (a crash is a row result too)
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        rc = 3
    total = time.perf_counter() - t0
    phases = {k: v[0] for k, v in clock.phases.items()}
    phases["other"] = total - sum(phases.values())
    out = {"rc": rc, "import_s": import_s, "total_s": total, "phases": phases,
           "calls": {k: v[1] for k, v in clock.phases.items()},
           "counters": {k: {w: {"calls": c[0], "s": c[1]} for w, c in v.items()} for k, v in clock.counters.items()}}
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------------------
# subprocesses under a watchdog


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB (0, 0 when it is gone)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def _write_bytes(pid: int) -> int:
    """Bytes a process caused to be written to storage (/proc/PID/io write_bytes; 0 when unknown)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_limited(cmd: list[str], *, timeout: float, rss_limit_kib: int, write_limit: int, phase_log: str | None = None,
                env: dict | None = None) -> dict:
    """Run ``cmd`` (under ``/usr/bin/time -f %M`` when present) in its own process group; kill the
    group when the tree's RSS passes ``rss_limit_kib``, the bytes it wrote to storage pass
    ``write_limit`` (/proc/PID/io write_bytes: a sparse copy writes nothing) or ``timeout`` passes.
    Returns rc, wall_s, peak_rss_mib, rss_method, stdout, stderr, killed (reason or None)."""
    timefile = None
    if os.path.exists("/usr/bin/time"):
        fd, timefile = tempfile.mkstemp(prefix="prunec-time-")
        os.close(fd)
        cmd = ["/usr/bin/time", "-f", "%M", "-o", timefile] + cmd

    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    os.sync()  # the files earlier runs wrote reach the disk first: their writeback does not slow this run's write
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env, start_new_session=True)
    killed, hwm, peak_sampled, written = None, 0, 0, 0
    status = None
    while True:
        pid, status, _ = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        tree = [p.pid] + _descendants(p.pid)
        rss_total = writes = 0
        for q in tree:
            rss, h = _rss_kib(q)
            rss_total += rss
            writes += _write_bytes(q)
            if q != p.pid or timefile is None:
                hwm = max(hwm, h)
        peak_sampled = max(peak_sampled, rss_total)
        written = max(written, writes)
        elapsed = time.perf_counter() - t0
        if killed is None and rss_total > rss_limit_kib:
            killed = (f"killed at {rss_total / 2**20:.1f} GiB RSS (limit {rss_limit_kib / 2**20:.1f} GiB) "
                      f"after {elapsed:.0f} s")
        elif killed is None and writes > write_limit:
            killed = (f"killed after writing {writes / 2**30:.1f} GiB (limit {write_limit / 2**30:.1f} GiB) "
                      f"in {elapsed:.0f} s")
        elif killed is None and elapsed > timeout:
            killed = f"killed after the {timeout:.0f} s timeout"
        if killed is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    peak, method = None, None
    if timefile is not None:
        try:
            text = Path(timefile).read_text().strip().splitlines()
            peak, method = int(text[-1]) / 1024, "/usr/bin/time %M"
        except (ValueError, IndexError, OSError):
            pass
        finally:
            os.unlink(timefile)
    if peak is None:
        peak, method = hwm / 1024, "VmHWM sampled every 50 ms"
    if killed:  # time's report of a killed child is missing: the sampled RSS is what is known
        peak, method = max(peak or 0, peak_sampled / 1024), "sampled RSS of the process tree (killed)"
    out.seek(0)
    err.seek(0)
    last_phase = None
    if phase_log and os.path.exists(phase_log):
        lines = Path(phase_log).read_text().split()
        last_phase = lines[-1] if lines else None
    rc_stderr = err.read().decode(errors="replace")
    if timefile is not None:  # time's own line for a signalled child
        rc_stderr = "\n".join(line for line in rc_stderr.splitlines() if not line.startswith("Command terminated"))
    return {"rc": p.returncode, "wall_s": wall, "peak_rss_mib": peak, "rss_method": method,
            "stdout": out.read().decode(errors="replace"), "stderr": rc_stderr, "killed": killed,
            "last_phase": last_phase, "written_mib_sampled": written / 2**20}


# ----------------------------------------------------------------------------------------------
# page-cache residency of a file (was the sparse weight file read?)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore(2) on a read-only shared mapping; mapping
    reads nothing)."""
    import ctypes
    import ctypes.util
    import mmap

    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(1 for b in bytes(vec) if b & 1) * mmap.PAGESIZE
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (so residency after a run is that run's reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# one row


def _one_line(text: str) -> str:
    """The line of a failed run's stderr that says why."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("prunec: error:"):
            return ln[len("prunec: error:"):].strip()
    return lines[-1][:300] if lines else "no message"


_CLI_HELP: list = []


def cli_has_probe_length() -> bool:
    """Whether ``prunec MODEL ...`` takes ``--probe-length`` (read off its --help once)."""
    if not _CLI_HELP:
        r = subprocess.run([sys.executable, "-m", "prunec.cli", "--help"], capture_output=True, text=True, cwd=REPO)
        _CLI_HELP.append(r.stdout)
    return "--probe-length" in _CLI_HELP[0]


def run_row(row: dict, model: Path, info: dict, work: Path, args) -> dict:
    out = work / f"{row['name'].replace('/', '_')}.out.onnx"
    argv = [str(model)] + row["passes"] + ["-o", str(out), "--force"]
    res = dict(row, model_file=str(model), graph_mib=model.stat().st_size / 2**20, info=info)
    inject = None  # a probe length the CLI cannot take: given to prunec.load by the phase worker
    if row.get("probe_length"):
        if cli_has_probe_length():
            argv += ["--probe-length", str(row["probe_length"])]
            res["probe_length_via"] = "CLI --probe-length"
        else:
            inject = row["probe_length"]
            res["probe_length_via"] = ("Python API: prunec.load(probe_length=) in the phase run; the plain CLI run "
                                       "has no such option and probes at its default length")
    data = model.with_name(model.name + ".data")
    limits = dict(timeout=args.timeout, rss_limit_kib=int(args.rss_limit_gb * 2**20),
                  write_limit=int(args.write_limit_gb * 2**30))
    env = dict(os.environ, ORT_LOGGING_LEVEL="3", PYTHONWARNINGS="ignore")

    def data_check(key: str) -> None:
        if data.exists() and row.get("sparse"):
            res[key] = {"resident_bytes": resident_bytes(data), "allocated_bytes": data.stat().st_blocks * 512,
                        "size_bytes": data.stat().st_size}
            evict(data)

    # phases: cli.main in a worker process with prunec's calls timed
    if data.exists() and row.get("sparse"):
        evict(data)
    spec = work / "spec.json"
    result = work / "result.json"
    phase_log = work / "phases.log"
    for p in (result, phase_log):
        if p.exists():
            p.unlink()
    spec.write_text(json.dumps({"argv": argv, "probe_length": inject, "result": str(result),
                                "phase_log": str(phase_log)}))
    w = run_limited([sys.executable, str(HERE), "--worker", str(spec)], phase_log=str(phase_log), env=env, **limits)
    res["worker"] = {k: w[k] for k in ("rc", "wall_s", "peak_rss_mib", "rss_method", "killed", "last_phase")}
    data_check("data_after_phases")
    if result.exists():
        r = json.loads(result.read_text())
        res.update(phases=r["phases"], calls=r["calls"], counters=r["counters"], import_s=r["import_s"],
                   inproc_s=r["total_s"], inproc_rc=r["rc"])
        ph = r["phases"]
        res["rewrite_s"] = sum(ph.get(k, 0.0) for k in REWRITE)
    if w["killed"]:
        res["status"] = "fails"
        res["reason"] = f"{w['killed']} in phase '{w['last_phase']}'"
    elif w["rc"] != 0 or res.get("inproc_rc", 0) != 0:
        msg = _one_line(w["stderr"])
        refused = res.get("inproc_rc") == 2
        res["status"] = "refused" if refused and row.get("refusal_ok") else "fails"
        res["reason"] = msg
    else:
        res["status"] = "ok"
    # the command line end to end (plain, as a user runs it)
    for p in (out, out.with_name(out.name + ".data")):
        if p.exists():
            p.unlink()
    c = run_limited([sys.executable, "-m", "prunec.cli"] + argv, env=env, **limits)
    res["cli"] = {k: c[k] for k in ("rc", "wall_s", "peak_rss_mib", "rss_method", "killed", "written_mib_sampled")}
    if c["killed"]:
        res["cli"]["reason"] = c["killed"]
    elif c["rc"]:
        res["cli"]["reason"] = _one_line(c["stderr"])
    if out.exists():
        res["out_mib"] = out.stat().st_size / 2**20
        out_data = out.with_name(out.name + ".data")
        if out_data.exists():
            st = out_data.stat()
            res["out_data"] = {"size_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}
    data_check("data_after_cli")
    for p in (out, out.with_name(out.name + ".data")):
        if p.exists():
            p.unlink()
    return res


# ----------------------------------------------------------------------------------------------
# report


def _s(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def verdicts(r: dict) -> str:
    """Targets beside the numbers (rewrite, CLI end to end, the CLI's peak RSS) and the notes."""
    parts = []
    ok, cli = r["status"] == "ok", r.get("cli") or {}
    cli_ok = cli.get("rc") == 0
    if r.get("target_rewrite") is not None:
        met = ok and r.get("rewrite_s") is not None and r["rewrite_s"] <= r["target_rewrite"]
        parts.append(f"rewrite <= {r['target_rewrite']:g} s: {'yes' if met else 'no'}")
    if r.get("target_cli") is not None:
        met = cli_ok and cli["wall_s"] <= r["target_cli"]
        parts.append(f"CLI <= {r['target_cli']:g} s: {'yes' if met else 'no'}")
    if r.get("target_rss_mib") is not None:
        met = cli_ok and (cli.get("peak_rss_mib") or 0) <= r["target_rss_mib"]
        parts.append(f"CLI peak RSS <= {r['target_rss_mib'] / 1024:g} GiB: {'yes' if met else 'no'}")
    if r.get("out_data"):
        o = r["out_data"]
        parts.append(f"CLI output data: {o['allocated_bytes'] / 2**20:.0f} MiB allocated of "
                     f"{o['size_bytes'] / 2**30:.1f} GiB")
    if r.get("probe_length_via"):
        parts.append(f"probe length {r['probe_length']} via {r['probe_length_via']}")
    for key in ("data_after_phases", "data_after_cli"):
        d = r.get(key)
        if d is not None:
            parts.append(f"weights read ({'phases' if key.endswith('phases') else 'CLI'} run): "
                         f"{d['resident_bytes'] / 2**20:.0f} MiB of {d['size_bytes'] / 2**30:.1f} GiB")
    return "; ".join(parts)


def report(results: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=240) if not Console().is_terminal else Console()
    t = Table(title="prunec compile time (seconds; phases measured inside cli.main, exclusive)")
    cols = ("row", "status", "graph MiB", "read", "load", "analysis", "plan", "lower", "validate", "save", "post",
            "other", "rewrite", "in-proc", "CLI e2e", "CLI peak RSS MiB")
    for col in cols:
        t.add_column(col, justify="left" if col in ("row", "status") else "right")
    for r in results:
        ph = r.get("phases", {})
        g = ph.get
        analysis = (g("probe") or 0) + (g("analyze") or 0) if ph else None
        validate = (g("checker") or 0) + (g("ort") or 0) if ph else None
        cli = r.get("cli", {})
        cli_s = f"{cli['wall_s']:.2f}" + ("" if cli.get("rc") == 0 else " (fails)") if cli else "-"
        t.add_row(r["name"], r["status"], f"{r['graph_mib']:.1f}", _s(g("read")), _s(g("load")), _s(analysis),
                  _s(g("plan")), _s(g("lower")), _s(validate), _s(g("save")), _s(g("post")), _s(g("other")),
                  _s(r.get("rewrite_s")), _s(r.get("inproc_s")), cli_s,
                  _s(cli.get("peak_rss_mib"), 0) if cli else "-")
    console.print(t)
    d = Table(title="detail: sub-phases (s) and counters (calls per phase)")
    for col in ("row", "probe", "analyze", "checker", "ort check", "imports", "phases RSS MiB", "ORT sessions",
                "ORT runs", "serialisations", "shape inference", "probe steps", "clones"):
        d.add_column(col, justify="left" if col == "row" else "right")

    def counter(r, name, seconds=True):
        c = r.get("counters", {}).get(name, {})
        return " ".join(f"{w}:{v['calls']}" + (f" ({v['s']:.2f})" if seconds else "") for w, v in c.items()) or "-"

    for r in results:
        g = r.get("phases", {}).get
        d.add_row(r["name"], _s(g("probe")), _s(g("analyze")), _s(g("checker")), _s(g("ort")), _s(r.get("import_s")),
                  _s(r["worker"]["peak_rss_mib"], 0), counter(r, "ORT sessions"), counter(r, "ORT runs"),
                  counter(r, "graph serialisations"), counter(r, "shape inference"),
                  " ".join(f"{k.split()[-1]}: {counter(r, k)}" for k in LIGHT_COUNTERS
                           if k in r.get("counters", {})) or "-",
                  counter(r, "model clones", False))
    console.print(d)
    console.print("counters: calls per phase they ran in (inclusive seconds); ORT sessions = make_session (graph "
                  "serialisation and session build), serialisations = graph_only_proto (also inside make_session)",
                  markup=False, highlight=False)
    for r in results:
        v = verdicts(r)
        line = f"{r['name']}: {r['status']}"
        if r.get("reason"):
            line += f": {r['reason']}"
        if r.get("cli", {}).get("reason"):
            line += f"; CLI: fails: {r['cli']['reason']}"
        if v:
            line += f"  [{v}]"
        console.print(line, markup=False, highlight=False)
    rss_methods = {r["cli"]["rss_method"] for r in results if r.get("cli")}
    console.print(f"peak RSS: {', '.join(sorted(m for m in rss_methods if m))}", markup=False, highlight=False)
    depth = {int(r["name"][5:].split("/")[0]): r for r in results
             if r["name"].startswith("depth") and r["status"] == "ok"}
    if depth:
        console.print("ToMe r=8 rewrite by depth: " + ", ".join(
            f"depth {k}: {depth[k]['rewrite_s']:.2f} s (CLI {depth[k]['cli']['wall_s']:.2f} s)" for k in sorted(depth)),
            markup=False, highlight=False)
        if 12 in depth and 48 in depth:
            ratio = depth[48]["rewrite_s"] / depth[12]["rewrite_s"]
            console.print(f"t(48)/t(12) of the rewrite: {ratio:.2f} (target <= 4.5, linear: "
                          f"{'yes' if ratio <= 4.5 else 'no'}); in-process total "
                          f"{depth[48]['inproc_s'] / depth[12]['inproc_s']:.2f}", markup=False, highlight=False)
    for r in results:
        info = r.get("info") or {}
        if "params" in info:
            console.print(f"{r['name']}: skeleton of {info['params'] / 1e9:.2f} B parameters, {info['nodes']} nodes; "
                          f"graph file {info['graph_bytes'] / 2**20:.2f} MiB, sparse data file "
                          f"{info['data_bytes'] / 2**30:.2f} GiB ({info['initializers_external']} external weights)",
                          markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    help="rows to run: names (vit-b/fastv) or model parts (vit-b, smollm, depth, 7b), comma-separated")
    ap.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[6, 12, 24, 48],
                    help="ViT-S depths of the ToMe rows (default 6,12,24,48)")
    ap.add_argument("--skip-7b", action="store_true", help="leave out the 7B-shaped decoder")
    ap.add_argument("--dtype-7b", choices=("float16", "float32"), default="float16",
                    help="weight type of the 7B skeleton (default float16: 11 GiB of sparse weights)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="also write the results as JSON to PATH (without PATH: print JSON instead of the tables)")
    ap.add_argument("--keep-files", metavar="DIR", help="keep (and reuse) the exports in DIR")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed (default 900)")
    ap.add_argument("--rss-limit-gb", type=float, default=8.0,
                    help="RSS at which a run's process tree is killed (GiB, default 8)")
    ap.add_argument("--write-limit-gb", type=float, default=4.0,
                    help="bytes a run may write to storage before it is killed (GiB, /proc/PID/io write_bytes; "
                         "default 4; a sparse copy writes nothing)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test's rows
    ap.add_argument("--export", nargs=2, metavar=("KEY", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.export:
        info = run_export(args.export[0], Path(args.export[1]))
        print(json.dumps(info))
        return []
    if args.worker:
        worker(args.worker)
        return []

    rows = rows_for(args)
    folder = Path(args.keep_files) if args.keep_files else Path(tempfile.mkdtemp(prefix="prunec-compile-"))
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prunec-compile-work-", dir=folder))
    quiet = args.json == "-"
    results = []
    try:
        for row in rows:
            t0 = time.perf_counter()
            try:
                model, info, export_s = ensure_export(row["model"], folder, timeout=max(args.timeout, 1800))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                results.append(dict(row, status="fails", reason=f"export: {e}", graph_mib=0.0,
                                    worker={"peak_rss_mib": None}, cli={}))
                continue
            if not quiet:
                print(f"[{row['name']}] " + (f"exported in {export_s:.0f} s; " if export_s else "cached export; ")
                      + "running ...", file=sys.stderr, flush=True)
            res = run_row(row, model, info, work, args)
            res["row_s"] = time.perf_counter() - t0
            results.append(res)
            if not quiet:
                print(f"[{row['name']}] {res['status']}" + (f": {res['reason']}" if res.get("reason") else "")
                      + f" (row {res['row_s']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_files:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json == "-":
        print(json.dumps({"rows": results}, indent=2, default=str))
    else:
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": results}, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
