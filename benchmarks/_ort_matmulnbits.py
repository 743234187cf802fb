"""ONNX Runtime ``com.microsoft.MatMulNBits`` baseline for ``bench_kernels.py``.

Builds single-op (or many-op) graphs whose weights are initializers in the layout of the
ORT contrib-op spec, checks them numerically against a numpy dequantisation, and hands
back timed "calls" over many distinct weight copies so that GEMV reads stream from DRAM.

Packing, dequantisation and the node builder are edgevlm.interop.onnx_pack's (the layout is
drawn there); the product exporter (``edgevlm export-onnx``) uses the same code.

The weights are random bytes: every byte pattern is a valid code stream, and speed does not
depend on the values. Copy ``i`` differs from copy 0 (XOR mask + index stamp), so no
initializer de-duplication can collapse the copies.

Cold weights: every node owns its own initializer (passed as an external initializer, so no
multi-GB protobuf is serialized), which ORT pre-packs into its own buffer at session creation.
A session holds as many nodes (copies) as the caller asks. ORT 1.32 runs every node of a
session on each run, whatever outputs are fetched (measured), so a timed call is one run of
one session and the per-op time is the run time divided by its node count.
"""
from __future__ import annotations

import math

import numpy as np

from edgevlm.interop.onnx_pack import (IR_VERSION, OPSET_CONTRIB, OPSET_ONNX, NBitsWeights, dequant_rows,
                                       external_tensor, matmulnbits_node)


def import_ort():
    """Return (onnxruntime, onnx) or raise ImportError with a readable message."""
    import onnx  # noqa: F401  (graph construction)
    import onnxruntime

    return onnxruntime, onnx


def random_weights(n: int, k: int, bits: int, block: int, seed: int = 0) -> NBitsWeights:
    """Random but valid MatMulNBits weights (codes, zero points, scales ~ 1e-2)."""
    rng = np.random.default_rng(seed)
    nb = math.ceil(k / block)
    blob = block * bits // 8
    b = rng.integers(0, 256, size=(n, nb, blob), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.015, size=n * nb).astype(np.float32)
    zp = rng.integers(0, 256, size=n * math.ceil(nb * bits / 8), dtype=np.uint8)
    return NBitsWeights(n, k, bits, block, b, scales, zp)


def weight_copy(base: NBitsWeights, i: int) -> NBitsWeights:
    """Distinct copy i of `base` (its own memory; codes XOR-ed, index stamped in B[0,0,:2])."""
    b = np.bitwise_xor(base.b, np.uint8((i * 151) & 0xFF))
    b[0, 0, :2] = (i & 0xFF, (i >> 8) & 0xFF)
    return NBitsWeights(base.n, base.k, base.bits, base.block, b, base.scales.copy(), base.zp.copy())


def build_model(weights: list[NBitsWeights], accuracy_level: int) -> tuple[bytes, list[str], list[np.ndarray]]:
    """Model with input A [M, K] and node i = MatMulNBits(A, copy i) -> Y{i} [M, N].

    The weights are external initializers: returns (model bytes, names, arrays) for
    SessionOptions.add_external_initializers — no multi-GB protobuf serialization.
    """
    _, onnx = import_ort()
    from onnx import TensorProto, helper

    w0 = weights[0]
    nodes, inits, outs, names, arrays = [], [], [], [], []
    for i, w in enumerate(weights):
        tri = [f"B{i}", f"S{i}", f"Z{i}"]
        for a, n, dt in zip((w.b, w.scales, w.zp), tri, (TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8)):
            inits.append(external_tensor(n, a, dt))
            names.append(n)
            arrays.append(a)
        nodes.append(matmulnbits_node("A", w, tuple(tri), f"Y{i}", accuracy_level=accuracy_level, name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["M", w0.n]))
    a_in = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", w0.k])
    graph = helper.make_graph(nodes, "matmulnbits_bench", [a_in], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_ONNX),
                                                    helper.make_opsetid("com.microsoft", OPSET_CONTRIB)])
    model.ir_version = IR_VERSION
    return model.SerializeToString(), names, arrays


def make_session(model: tuple[bytes, list[str], list[np.ndarray]], threads: int):
    """InferenceSession on CPU: intra_op=threads, inter_op=1, sequential, all graph optimizations.

    The weight arrays must outlive the session (ORT may read them in place).
    """
    ort, _ = import_ort()
    data, names, arrays = model
    ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4
    so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def check_output(sess, w: NBitsWeights, output: str, m: int = 3, rows: int = 256, seed: int = 1) -> float:
    """Run `output` for a random A [m, K]; max |Y - ref| / max |ref| over the first `rows` columns."""
    a = np.random.default_rng(seed).standard_normal((m, w.k), dtype=np.float32)
    y = sess.run([output], {"A": a})[0]
    r = min(rows, w.n)
    ref = a.astype(np.float64) @ dequant_rows(w, r).astype(np.float64).T
    return float(np.abs(y[:, :r] - ref).max() / max(np.abs(ref).max(), 1e-12))


def tolerance(accuracy_level: int) -> float:
    """Accepted relative error: int8 activations (level 4) vs fp32 compute (level 0)."""
    return 3e-2 if accuracy_level == 4 else 1e-4


def probe_bits(candidates=(2, 3, 4, 8), k: int = 256, n: int = 64, block: int = 32,
               accuracy_level: int = 4) -> dict[int, str]:
    """Which bit widths this ORT builds *and* computes correctly: {bits: 'ok' or the error}."""
    out = {}
    for bits in candidates:
        try:
            w = weight_copy(random_weights(n, k, bits, block, seed=bits), 0)
            sess = make_session(build_model([w], accuracy_level), threads=1)
            err = check_output(sess, w, "Y0")
            out[bits] = "ok" if err < tolerance(accuracy_level) else f"wrong result (rel err {err:.2g})"
        except Exception as e:  # noqa: BLE001  (ORT raises several types)
            msg = str(e).splitlines()[0]
            out[bits] = "rejected: " + (msg.split(" was false. ")[-1] if " was false. " in msg else msg)[-120:]
    return out


class OrtCopies:
    """Many distinct weight copies of one MatMulNBits config, pre-packed by ORT.

    The copies are split over sessions of `nodes_per_session` nodes (0: all in one session).
    ORT runs every node of a session on each run whatever is fetched, so one timed call is
    one run of one session and costs `nodes_per_session` ops. Outputs are bound once with
    IOBinding: a call is only `run_with_iobinding` (no output allocation or copies).
    """

    def __init__(self, base: NBitsWeights, copies: int, threads: int, accuracy_level: int,
                 nodes_per_session: int = 0):
        self.base, self.threads, self.level = base, threads, accuracy_level
        per = nodes_per_session or copies
        self.copies = math.ceil(copies / per) * per  # equal sessions: every call runs as many ops
        self.per_session = per
        self.sessions, self._arrays = [], []
        for s0 in range(0, self.copies, per):
            model = build_model([weight_copy(base, i) for i in range(s0, s0 + per)], accuracy_level)
            self.sessions.append(make_session(model, threads))
            self._arrays.append(model[2])
        # Copy 0 of every config is checked against numpy, after all sessions exist.
        self.max_rel_err = check_output(self.sessions[0], weight_copy(base, 0), "Y0")
        self.ok = self.max_rel_err < tolerance(accuracy_level)
        self._keep: list[np.ndarray] = []

    @property
    def nbytes(self) -> int:
        """Weight bytes over all copies (B + scales + zero points)."""
        return self.copies * self.base.nbytes

    def calls(self, m: int, x: np.ndarray):
        """(list of zero-arg callables, ops per call) for input x [m, K]: one per session."""
        fns, self._keep = [], [x]
        for sess in self.sessions:
            io = sess.io_binding()
            io.bind_cpu_input("A", x)
            for i in range(self.per_session):
                y = np.empty((m, self.base.n), np.float32)
                self._keep.append(y)
                io.bind_output(f"Y{i}", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
            fns.append(lambda s=sess, b=io: s.run_with_iobinding(b))
        return fns, self.per_session

    def close(self):
        """Drop the sessions and the weight arrays."""
        self.sessions.clear()
        self._arrays.clear()
        self._keep = []
