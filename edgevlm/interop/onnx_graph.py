"""Graph-building primitives for ``edgevlm export-onnx``: one :class:`Graph` per exported model.

Each method adds the ONNX nodes for one piece of the runtime's math (``edgevlm.runtime.layers``)
and returns the name of its output tensor; weights are read from the open ``.evlm`` file by key,
so initializer names are the file's tensor names. What becomes what:

* packed linears (q2/q3/q4/q8/q2b) -> ``com.microsoft.MatMulNBits`` (+ the min term of
  q2/q3/q4, see onnx_pack) and an ``Add`` for the bias;
* f16 tensors -> float16 initializers + ``Cast`` to float32 (exact, and ORT folds the Cast once at
  session start: half the file size, the runtime's float32 values); f32 -> float32 initializers;
* quantized token tables -> code / scale / min tables gathered per token and dequantized in the
  graph, operation for operation as ``layers.Embedding`` (the table is never dequantized whole).

Shapes in comments: B batch, T tokens, D width, H heads, hd head width, N/K out/in features.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..runtime import layers as L
from . import onnx_pack

__all__ = ["ACT_NAMES", "Graph"]

F32 = np.float32
#: runtime activation function -> how it is written in ONNX (see Graph.act)
ACT_NAMES = {L.gelu: "gelu", L.gelu_tanh: "gelu_tanh", L.quick_gelu: "quick_gelu", L.silu: "silu",
             L.ACTIVATIONS["relu"]: "relu"}


class Graph:
    """Nodes + initializers of one model, built from the tensors of an open EvlmFile ``f``.

    accuracy_level: MatMulNBits' activation handling (0: float32; 4: int8 per block).
    """

    def __init__(self, f: Any, accuracy_level: int) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self._helper, self._np, self._tp = helper, numpy_helper, TensorProto
        self.f = f
        self.level = accuracy_level
        self.nodes: list = []
        self.inits: list = []
        self._names: Counter = Counter()
        self._consts: dict[tuple, str] = {}
        self.widths: Counter = Counter()  # (edgevlm qtype, MatMulNBits bits, block) -> linears
        self.dense = 0                     # float linears (f16/f32 records)
        self.init_bytes = 0

    # -------------------------------------------------------------------------------- basics
    def name(self, base: str) -> str:
        """A unique tensor / node name starting with ``base``."""
        self._names[base] += 1
        n = self._names[base]
        return base if n == 1 else f"{base}__{n}"

    def op(self, op_type: str, inputs: list[str], base: str, *, domain: str = "", **attrs) -> str:
        """Append one single-output node; returns its output name."""
        out = self.name(base)
        self.nodes.append(self._helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def init(self, name: str, arr: np.ndarray) -> str:
        """A named initializer holding ``arr`` (its dtype as is)."""
        name = self.name(name)
        arr = np.array(arr, order="C", copy=None)  # (ascontiguousarray would make a 0-d array 1-d)
        self.inits.append(self._np.from_array(arr, name))
        self.init_bytes += arr.nbytes
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by every node that uses the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("c", arr)
        return self._consts[key]

    def tensor(self, key: str, *, transpose: bool = False, rows: slice | None = None) -> str:
        """Raw f16/f32/bf16 tensor ``key`` of the file as a float32 graph value: its ``rows`` (first
        axis; all by default), transposed (W^T) if ``transpose``."""
        rec = self.f.records.get(key)
        if rec is None:
            raise ValueError(f"{getattr(self.f, 'path', 'file')}: missing tensor {key!r}")
        a = np.asarray(self.f[key]).reshape(rec.shape)
        if rec.qtype != "f16":
            a = L.to_f32(a, rec.qtype)  # f32 as is; bf16 widened exactly
        a = a if rows is None else a[rows]
        src = self.init(key, a.T if transpose else a)
        return self.op("Cast", [src], key + ".f32", to=self._tp.FLOAT) if rec.qtype == "f16" else src

    def array(self, name: str, arr: np.ndarray) -> str:
        """A float32 initializer from an array the runtime computed at load (same values)."""
        return self.init(name, np.asarray(arr, F32))

    # -------------------------------------------------------------------------------- layers
    def linear(self, x: str, prefix: str, rank: int, *, bias: bool | None = None) -> str:
        """``x @ W^T + b`` for ``{prefix}.weight`` [N, K] (packed or float) and ``{prefix}.bias``
        when present (bias=None) / never (False). x [..., K] of ``rank`` dims -> [..., N]."""
        wkey, bkey = f"{prefix}.weight", f"{prefix}.bias"
        rec = self.f.records.get(wkey)
        if rec is None:
            raise ValueError(f"{getattr(self.f, 'path', 'file')}: missing tensor {wkey!r}")
        if not rec.quantized:
            self.dense += 1
            w = self.tensor(wkey, transpose=True)                          # [K, N]
            y = self.op("MatMul", [x, w], prefix + ".mm")
        else:
            n, k = rec.shape
            p = onnx_pack.from_qtype(self.f[wkey], rec.qtype, n, k, rec.group_size)
            w = p.weights
            self.widths[(rec.qtype, w.bits, w.block)] += 1
            names = (self.init(wkey + ".B", w.b), self.init(wkey + ".scales", w.scales),
                     self.init(wkey + ".zp", w.zp))
            out = self.name(prefix + ".nbits")
            self.nodes.append(onnx_pack.matmulnbits_node(x, w, names, out, accuracy_level=self.level))
            y = out
            if p.mins_t is not None:
                # y += blocksum(x) @ m^T: the float mins of q2/q3/q4 (onnx_pack docstring)
                shape = self.const([0] * (rank - 1) + [w.n_blocks, w.block])
                xs = self.op("Reshape", [x, shape], prefix + ".xblocks")          # [..., nb, block]
                s = self.op("ReduceSum", [xs, self.const([-1])], prefix + ".xsum", keepdims=0)  # [..., nb]
                m = self.op("MatMul", [s, self.init(wkey + ".mins_t", p.mins_t)], prefix + ".minterm")
                y = self.op("Add", [y, m], prefix + ".nbits_m")
        if bias is not False and bkey in self.f.records:
            y = self.op("Add", [y, self.tensor(bkey)], prefix + ".out")
        return y

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        """LayerNormalization over the last axis with ``{prefix}.weight`` / ``{prefix}.bias``."""
        return self.op("LayerNormalization", [x, self.tensor(f"{prefix}.weight"), self.tensor(f"{prefix}.bias")],
                       prefix + ".ln", axis=-1, epsilon=float(eps))

    def act(self, x: str, fn: Any, base: str) -> str:
        """The runtime activation ``fn`` (layers.ACTIVATIONS) in ONNX ops."""
        kind = ACT_NAMES.get(fn)
        if kind == "gelu":
            return self.op("Gelu", [x], base)
        if kind == "gelu_tanh":
            return self.op("Gelu", [x], base, approximate="tanh")
        if kind in ("quick_gelu", "silu"):  # x * sigmoid(a x)
            a = 1.702 if kind == "quick_gelu" else 1.0
            sx = self.op("Mul", [x, self.const(a, F32)], base + ".ax") if a != 1.0 else x
            return self.op("Mul", [x, self.op("Sigmoid", [sx], base + ".sig")], base)
        if kind == "relu":
            return self.op("Relu", [x], base)
        raise ValueError(f"activation {getattr(fn, '__name__', fn)!r} has no ONNX form here; supported: "
                         f"{', '.join(sorted(ACT_NAMES.values()))}")

    def attention(self, q: str, k: str, v: str, heads: int, dim: int, base: str, allow: str | None = None) -> str:
        """Multi-head scaled dot-product attention as layers.attention: q [B|1, Tq, D], k/v [B, Tk, D]
        -> [B, Tq, D]; ``allow`` bool broadcastable to [B, H, Tq, Tk] (masked scores = float32 min)."""
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        hd = dim // heads
        split = self.const([0, 0, heads, hd])
        qh = self.op("Transpose", [self.op("Reshape", [q, split], base + ".q4")], base + ".qh", perm=[0, 2, 1, 3])
        kh = self.op("Transpose", [self.op("Reshape", [k, split], base + ".k4")], base + ".kh", perm=[0, 2, 3, 1])
        vh = self.op("Transpose", [self.op("Reshape", [v, split], base + ".v4")], base + ".vh", perm=[0, 2, 1, 3])
        s = self.op("MatMul", [qh, kh], base + ".qk")                                   # [B, H, Tq, Tk]
        s = self.op("Mul", [s, self.const(hd ** -0.5, F32)], base + ".scaled")
        if allow is not None:
            s = self.op("Where", [allow, s, self.const(np.finfo(F32).min, F32)], base + ".masked")
        p = self.op("Softmax", [s], base + ".p", axis=-1)
        o = self.op("Transpose", [self.op("MatMul", [p, vh], base + ".pv")], base + ".o4", perm=[0, 2, 1, 3])
        return self.op("Reshape", [o, self.const([0, 0, dim])], base + ".o")           # [B, Tq, D]

    def block(self, x: str, prefix: str, blk: Any, dim: int, allow: str | None = None) -> str:
        """One pre-LN encoder layer (runtime.dual._Block ``blk`` gives heads, eps, act): [B, T, D]."""
        h = self.layer_norm(x, f"{prefix}.norm1", blk.eps)
        q, k, v = (self.linear(h, f"{prefix}.attn.{c}", 3) for c in "qkv")
        a = self.attention(q, k, v, blk.heads, dim, f"{prefix}.attn", allow)
        x = self.op("Add", [x, self.linear(a, f"{prefix}.attn.o", 3)], f"{prefix}.res1")
        h = self.layer_norm(x, f"{prefix}.norm2", blk.eps)
        h = self.act(self.linear(h, f"{prefix}.mlp.fc1", 3), blk.act, f"{prefix}.mlp.act")
        return self.op("Add", [x, self.linear(h, f"{prefix}.mlp.fc2", 3)], f"{prefix}.res2")

    def l2_normalize(self, x: str, base: str) -> str:
        """Row-wise x / max(||x||, 1e-30) over the last axis (the runtime's _l2)."""
        n = self.op("ReduceL2", [x, self.const([-1])], base + ".norm", keepdims=1)
        return self.op("Div", [x, self.op("Max", [n, self.const(1e-30, F32)], base + ".clamp")], base)

    def embedding(self, ids: str, key: str) -> str:
        """Rows of the [V, D] table ``key`` for int64 ids [B, T] -> float32 [B, T, D]."""
        rec = self.f.records.get(key)
        if rec is None:
            raise ValueError(f"{getattr(self.f, 'path', 'file')}: missing tensor {key!r}")
        v, d = rec.shape
        if not rec.quantized:
            rows = self.op("Gather", [self.init(key, np.asarray(self.f[key]).reshape(v, d)), ids], key + ".rows")
            return self.op("Cast", [rows], key + ".f32", to=self._tp.FLOAT) if rec.qtype != "f32" else rows
        emb = L.Embedding.from_file(self.f, key)
        if emb.qt is None or emb.qtype == "q2b":
            raise ValueError(f"{key}: token table qtype {rec.qtype} is not supported by export-onnx (q2/q3/q4/q8 "
                             "or f16/f32)")
        g = d // emb.group
        codes = emb.qt.impl.unpack_codes(emb.qs, d)                                   # [V, D] u8 / i8
        c = self.op("Cast", [self.op("Gather", [self.init(key + ".codes", codes), ids], key + ".crows")],
                    key + ".cf", to=self._tp.FLOAT)
        w = self.op("Reshape", [c, self.const([0, 0, g, emb.group])], key + ".grp")       # [B, T, G, group]

        def per_group(arr: np.ndarray, what: str) -> str:  # f16 [V, G] rows -> float32 [B, T, G, 1]
            r = self.op("Gather", [self.init(f"{key}.{what}", np.asarray(arr)), ids], f"{key}.{what}_rows")
            r = self.op("Cast", [r], f"{key}.{what}_f32", to=self._tp.FLOAT)
            return self.op("Unsqueeze", [r, self.const([-1])], f"{key}.{what}_b")

        w = self.op("Mul", [w, per_group(emb.scales, "scales")], key + ".scaled")
        if emb.mins is not None:
            w = self.op("Add", [w, per_group(emb.mins, "mins")], key + ".shifted")
        return self.op("Reshape", [w, self.const([0, 0, d])], key + ".f32")

    # -------------------------------------------------------------------------------- model
    def model(self, inputs: list, outputs: list, doc: str, metadata: dict[str, str]):
        """The onnx ModelProto (opset OPSET_ONNX + com.microsoft)."""
        h = self._helper
        graph = h.make_graph(self.nodes, "edgevlm", inputs, outputs, initializer=self.inits, doc_string=doc)
        m = h.make_model(graph, producer_name="edgevlm", opset_imports=[
            h.make_opsetid("", onnx_pack.OPSET_ONNX), h.make_opsetid("com.microsoft", onnx_pack.OPSET_CONTRIB)])
        m.ir_version = onnx_pack.IR_VERSION
        h.set_model_props(m, metadata)
        return m

    def value_info(self, name: str, elem: str, shape: list) -> Any:
        dt = {"float": self._tp.FLOAT, "int64": self._tp.INT64}[elem]
        return self._helper.make_tensor_value_info(name, dt, shape)
