"""Llama / Qwen2-family decoder-only language model on the edgevlm kernels (numpy; never torch).

    dec = Decoder(f, text_config)                 # f: an open EvlmFile, keys text.* / lm_head.*
    cache = dec.new_cache(ctx=2048)               # preallocated K/V for 2048 positions
    logits = dec.forward(dec.embed(ids), cache)   # prefill: every linear is one GEMM over T rows
    logits = dec.forward(dec.embed([tok]), cache) # decode: GEMV, attends to the cached keys

What runs is transformers' ``LlamaModel`` / ``Qwen2Model`` (and the Qwen2-VL text model):
``x += o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))``; ``x += down(silu(gate(n2 x)) * up(n2 x))``;
final RMSNorm; LM head (its own packed matrix, or the packed token-embedding table when tied:
the q8 table's planar layout is a linear layer's, so the same kernel runs it).

RoPE: ``rope_parameters`` (transformers 5) or the older ``rope_theta``/``rope_scaling`` keys;
types default, linear and llama3; ``mrope_section`` (Qwen2-VL) takes positions [3, T] (t, h, w)
and gives each rotary frequency the position of its section, as transformers'
``apply_multimodal_rotary_pos_emb`` does.

KV cache: float32 [layers][Hkv, ctx, hd] for K and V, allocated once (``np.zeros``, so pages
the sequence never reaches are never touched); a prompt that does not fit is a ValueError.

Qwen3 / Qwen3-VL-MoE additions, each chosen per layer from the file's keys (absent keys = the
Llama/Qwen2 path above, unchanged): RMSNorm over each head's q and k before RoPE
(``attn.q_norm`` / ``attn.k_norm``); a sparse MoE MLP (:mod:`.moe`) where the layer has
``moe.router.weight``; interleaved mrope (``mrope_interleaved``: frequency j takes h where
j % 3 == 1 and j < 3 s_h, w where j % 3 == 2 and j < 3 s_w, t elsewhere, as Qwen3-VL's
``recomposition_frequencies``); and DeepStack (:class:`DeepStack`): image features added to the
outputs of the first decoder layers at the image-token rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layers import Embedding, Linear, get_activation, rms_norm, silu, silu_, vector
from .linear import QuantLinear
from .moe import MoE

try:
    from .. import _core
except ImportError:  # a source checkout without the built extension: the numpy path only
    _core = None

__all__ = ["DeepStack", "Decoder", "KVCache", "KV_DTYPES", "rope_inv_freq"]

F32 = np.float32
#: text model types whose mrope is interleaved even when the config does not say so (transformers'
#: Qwen3-VL rotary always interleaves)
_INTERLEAVED_MROPE = ("qwen3_vl_text", "qwen3_vl_moe_text")


def _rope_params(c: dict) -> dict:
    """Merged rope settings: transformers 5 ``rope_parameters`` over the legacy keys."""
    p = dict(c.get("rope_scaling") or {})
    if c.get("rope_theta") is not None:
        p.setdefault("rope_theta", c["rope_theta"])
    p.update(c.get("rope_parameters") or {})
    if "type" in p and "rope_type" not in p:
        p["rope_type"] = p["type"]
    if p.get("rope_type") == "mrope":  # Qwen2-VL hub configs: default RoPE + mrope_section
        p["rope_type"] = "default"
    p.setdefault("rope_type", "default")
    p.setdefault("rope_theta", 10000.0)
    return p


def rope_inv_freq(c: dict, head_dim: int) -> np.ndarray:
    """Inverse frequencies float32 [rot/2] as transformers computes them (float32 arithmetic)."""
    p = _rope_params(c)
    rot = int(head_dim * float(p.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0))
    base = float(p["rope_theta"])
    inv = (F32(1.0) / (F32(base) ** (np.arange(0, rot, 2, dtype=np.int64).astype(F32) / F32(rot)))).astype(F32)
    kind = p["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / F32(p["factor"])).astype(F32)
    if kind == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p.get("original_max_position_embeddings") or c.get("max_position_embeddings"))
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv.astype(np.float64)
        scaled = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return np.where(medium, smoothed, scaled).astype(F32)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


KV_DTYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}


def _kv_dtype(name: str) -> np.dtype:
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


@dataclass
class KVCache:
    """Keys and values of every layer, [Hkv, ctx, hd] each, float32 (the default) or float16;
    ``length`` positions filled."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    ctx: int
    length: int = 0
    plan: Any = None  # the decoder's _core.DecodePlan over these arrays (built at the first decode step)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def reset(self) -> None:
        self.length = 0


@dataclass
class DeepStack:
    """Qwen3-VL DeepStack: ``features[l]`` float32 [n, D] is added to the output of decoder layer l
    at the rows where ``mask`` (bool [T], the prompt's image tokens, n of them) is set."""

    mask: np.ndarray
    features: list[np.ndarray]


class _Layer:
    def __init__(self, f: Any, p: str, eps: float, isa: str | None, config: dict | None = None) -> None:
        self.n1 = vector(f, f"{p}.norm1.weight")
        self.n2 = vector(f, f"{p}.norm2.weight")
        self.q, self.k, self.v, self.o = (Linear.from_file(f, f"{p}.attn.{x}", isa=isa) for x in "qkvo")
        # Qwen3: RMSNorm over each head's q / k (weights [hd]) before RoPE
        qn, kn = f"{p}.attn.q_norm.weight", f"{p}.attn.k_norm.weight"
        self.q_norm = vector(f, qn) if qn in f.records else None
        self.k_norm = vector(f, kn) if kn in f.records else None
        self.moe = MoE.from_file(f, f"{p}.moe", config or {}, isa=isa) if f"{p}.moe.router.weight" in f.records \
            else None
        if self.moe is None:
            self.gate, self.up, self.down = (Linear.from_file(f, f"{p}.mlp.{x}", isa=isa)
                                             for x in ("gate", "up", "down"))
        self.eps = eps


class Decoder:
    """The language model of a generative export: ids/embeddings -> next-token logits."""

    def __init__(self, f: Any, text_config: dict, *, isa: str | None = None) -> None:
        c = dict(text_config)
        try:
            self.dim = int(c["hidden_size"])
            self.n_heads = int(c["num_attention_heads"])
            self.n_layers = int(c["num_hidden_layers"])
        except KeyError as e:
            raise ValueError(f"text config lacks {e.args[0]!r}; is this a complete generative export?") from None
        self.n_kv = int(c.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(c.get("head_dim") or self.dim // self.n_heads)
        if self.n_heads % self.n_kv:
            raise ValueError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv}")
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.act = get_activation(c.get("hidden_act", "silu"))
        #: decode steps (one token) run the C++ glue ops (:meth:`_step`); False: the numpy loop
        self.fast_decode = (hasattr(_core, "attend_decode")  # False without the extension (or a stale build)
                            and c.get("hidden_act", "silu") in ("silu", "swish"))
        self.config = c
        self.inv_freq = rope_inv_freq(c, self.head_dim)                   # [rot/2]
        self.rot = 2 * self.inv_freq.size
        self.mrope = _rope_params(c).get("mrope_section")
        if self.mrope is not None:
            self.mrope = [int(s) for s in self.mrope]
            if sum(self.mrope) != self.inv_freq.size:
                raise ValueError(f"mrope_section {self.mrope} must sum to head_dim/2 = {self.inv_freq.size}")
            # frequency j takes the position of section sec[j] (0: t, 1: h, 2: w)
            self._sec = np.repeat(np.arange(3), self.mrope)
            if _rope_params(c).get("mrope_interleaved") or c.get("model_type") in _INTERLEAVED_MROPE:
                sec = np.zeros(self.inv_freq.size, dtype=np.int64)         # Qwen3-VL: t h w t h w ...
                sec[1:3 * self.mrope[1]:3], sec[2:3 * self.mrope[2]:3] = 1, 2
                self._sec = sec
        self.max_positions = int(c.get("max_position_embeddings") or 0) or None
        self.tok = Embedding.from_file(f, "text.embed.tok")
        self.vocab = self.tok.v
        self.layers = [_Layer(f, f"text.blocks.{i}", self.eps, isa, c) for i in range(self.n_layers)]
        self.norm = vector(f, "text.norm.weight")
        #: decode steps run as one _core.DecodePlan call (False: one C++ op call at a time, _step's loop)
        self.use_plan = self.fast_decode and self._plannable()
        if "lm_head.weight" in f.records:
            self.head = Linear.from_file(f, "lm_head", isa=isa)
        else:  # tied: the embedding table is the head
            rec = f.records["text.embed.tok"]
            if rec.quantized:
                self.head = Linear(quant=QuantLinear(f["text.embed.tok"], rec.qtype, *rec.shape, rec.group_size),
                                   isa=isa)
            else:
                self.head = Linear(weight=vector(f, "text.embed.tok"))
        if self.head.n != self.vocab or self.head.k != self.dim:
            raise ValueError(f"LM head is {self.head.n}x{self.head.k}, expected {self.vocab}x{self.dim}")

    # ------------------------------------------------------------------------------------------
    def embed(self, ids: Any) -> np.ndarray:
        """int ids [T] -> float32 [T, D] (rows dequantized from the file)."""
        return self.tok(np.asarray(ids, dtype=np.int64).reshape(-1))

    def new_cache(self, ctx: int, kv_dtype: str = "f32") -> KVCache:
        """A KV cache for ``ctx`` positions. ``kv_dtype``: "f32" (default) stores keys and values
        exactly; "f16" stores them as IEEE halves, rounded to nearest even, and attention computes
        in float32 over them: half the memory, and half the bytes each decode step reads
        (Qwen2-VL-2B at ~400 positions: ~23 MB -> ~11 MB per token), at ~1e-4 absolute logit
        error on the tiny test models (tests/test_generate.py)."""
        ctx = int(ctx)
        if ctx < 1:
            raise ValueError(f"ctx must be a positive number of tokens, got {ctx}")
        dtype = _kv_dtype(kv_dtype)
        shape = (self.n_kv, ctx, self.head_dim)
        return KVCache([np.zeros(shape, dtype) for _ in range(self.n_layers)],
                       [np.zeros(shape, dtype) for _ in range(self.n_layers)], ctx)

    def kv_bytes(self, ctx: int, kv_dtype: str = "f32") -> int:
        return 2 * self.n_layers * self.n_kv * int(ctx) * self.head_dim * _kv_dtype(kv_dtype).itemsize

    def _cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions int [T] or [3, T] -> cos, sin float32 [T, rot] (frequencies repeated twice)."""
        pos = np.asarray(positions)
        if self.mrope is not None:
            if pos.ndim == 1:
                pos = np.broadcast_to(pos, (3, pos.size))
            freqs = pos[self._sec, :].T.astype(F32) * self.inv_freq       # [T, rot/2]
        else:
            if pos.ndim != 1:
                raise ValueError(f"positions must be int [T] for this model, got shape {pos.shape}")
            freqs = pos.astype(F32)[:, None] * self.inv_freq[None, :]     # [T, rot/2]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb).astype(F32), np.sin(emb).astype(F32)

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x [H, T, hd]: x * cos + rotate_half(x) * sin on the first ``rot`` dims."""
        r, h = self.rot, self.rot // 2
        xr = x[..., :r]
        rot = np.concatenate([-xr[..., h:], xr[..., :h]], axis=-1)
        out = xr * cos + rot * sin
        return out if r == x.shape[-1] else np.concatenate([out, x[..., r:]], axis=-1)

    def forward(self, x: np.ndarray, cache: KVCache, positions: np.ndarray | None = None, *,
                all_logits: bool = False, deepstack: DeepStack | None = None) -> np.ndarray:
        """Append T tokens (embeddings x [T, D]) to ``cache`` and return logits float32 [V] of the
        last token, or [T, V] with ``all_logits``.  ``positions``: int [T] or (mrope) [3, T];
        default ``cache.length + arange(T)``.  ``deepstack``: features added to the first
        layers' outputs at its mask's rows (Qwen3-VL prefill)."""
        x = np.asarray(x, dtype=F32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"decoder input must be [T, {self.dim}] float32, got {x.shape}")
        t, start = x.shape[0], cache.length
        if start + t > cache.ctx:
            raise ValueError(f"the sequence needs {start + t} positions but the context holds {cache.ctx} "
                             f"(prompt/generation too long); raise ctx (--ctx) or shorten the prompt")
        if positions is None:
            positions = np.arange(start, start + t)
        if deepstack is not None and (np.shape(deepstack.mask) != (t,) or len(deepstack.features) > self.n_layers):
            raise ValueError(f"DeepStack mask must be bool [{t}] (one flag per input row) with at most "
                             f"{self.n_layers} feature arrays, got mask {np.shape(deepstack.mask)} and "
                             f"{len(deepstack.features)} arrays")
        cos, sin = self._cos_sin(positions)
        if t == 1 and self.fast_decode and deepstack is None:
            logits = self._step(x, cache, cos[0], sin[0])
            cache.length = start + 1
            return logits[None] if all_logits else logits
        hq, hkv, hd = self.n_heads, self.n_kv, self.head_dim
        rep = hq // hkv
        end = start + t
        # causal mask over the cached + new keys: query i (absolute start+i) sees keys <= start+i
        mask = None
        if t > 1:
            mask = np.arange(end)[None, :] > (start + np.arange(t))[:, None]  # [T, end] True = masked
        scale = F32(hd ** -0.5)
        x = np.array(x, dtype=F32)  # the residual stream, updated in place (the caller's array is kept)
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.n1, self.eps)                                  # [T, D]
            q = L.q(h).reshape(t, hq, hd).transpose(1, 0, 2)                 # [Hq, T, hd]
            k = L.k(h).reshape(t, hkv, hd).transpose(1, 0, 2)                # [Hkv, T, hd]
            v = L.v(h).reshape(t, hkv, hd).transpose(1, 0, 2)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, self.eps)
            if L.k_norm is not None:
                k = rms_norm(k, L.k_norm, self.eps)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[:, start:end] = k
            vc[:, start:end] = v
            qg = q.reshape(hkv, rep * t, hd)                                 # query heads grouped by kv head
            a = np.empty((hkv, rep * t, hd), F32)                            # [Hkv, rep*T, hd]
            for g in range(hkv):  # one kv head at a time: scores [rep*T, end], not Hkv times that
                s = np.matmul(qg[g], kc[g, :end].T)                          # [rep*T, end]
                s *= scale
                if mask is not None:
                    s.reshape(rep, t, end)[:, mask] = np.finfo(F32).min
                s -= s.max(-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(-1, keepdims=True)
                np.matmul(s, vc[g, :end], out=a[g])
            del s
            a = a.reshape(hq, t, hd).transpose(1, 0, 2).reshape(t, hq * hd)
            x += L.o(a)
            h = rms_norm(x, L.n2, self.eps)
            if L.moe is not None:
                x += L.moe(h)
            else:  # act(gate) * up with one [T, I] temporary besides the result (bitwise the same)
                m = L.gate(h)
                if self.act is silu:
                    silu_(m)
                else:
                    m = self.act(m)
                m *= L.up(h)
                x += L.down(m)
                del m
            if deepstack is not None and li < len(deepstack.features):
                x[deepstack.mask] += deepstack.features[li]
        cache.length = end
        if not all_logits:
            x = x[-1:]
        logits = self.head(rms_norm(x, self.norm, self.eps))
        return logits if all_logits else logits[0]

    def _plannable(self) -> bool:
        """True when one _core.DecodePlan can run every layer: all seven linears of every layer
        packed for the CPU kernels (one ISA), no MoE layer, and an extension that has the plan."""
        if not hasattr(_core, "DecodePlan"):
            return False
        lins = [getattr(L, n) for L in self.layers for n in ("q", "k", "v", "o", "gate", "up", "down")
                if L.moe is None]
        return (all(L.moe is None for L in self.layers) and all(type(l.quant) is QuantLinear for l in lins)
                and len({l.isa for l in lins}) == 1)

    def _make_plan(self, cache: KVCache) -> Any:
        """A DecodePlan over this decoder's packed layers and ``cache``'s arrays (csrc/ops/decode_step.h)."""
        def lin(l: Linear) -> tuple:
            q = l.quant
            return (q.blob, q.qtype.name, q.group, q.n, q.k, q.bias)

        layers = [([lin(getattr(L, n)) for n in ("q", "k", "v", "o", "gate", "up", "down")], L.n1, L.n2,
                   L.q_norm, L.k_norm, cache.k[i], cache.v[i]) for i, L in enumerate(self.layers)]
        L0 = self.layers[0]
        dims = (self.dim, self.n_heads, self.n_kv, self.head_dim, cache.ctx, L0.gate.n)
        return _core.DecodePlan(layers, self.norm, dims, self.eps, float(F32(self.head_dim ** -0.5)), L0.q.isa)

    def _step(self, x: np.ndarray, cache: KVCache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """One token x [1, D] through every layer -> logits [V]: the numpy loop of
        :meth:`forward` with its glue (norms, RoPE, cache write, attention, residuals, SwiGLU
        gate) in three C++ calls per layer (csrc/ops/decode_ops.h).  cos, sin: float32 [rot]."""
        pos, eps, scale = cache.length, self.eps, float(F32(self.head_dim ** -0.5))
        x = np.array(x, dtype=F32)                  # the residual stream, updated in place
        if self.use_plan:  # every layer in one C++ call (the loop below, op for op)
            if cache.plan is None:
                cache.plan = self._make_plan(cache)
            return self.head(cache.plan.step(x.reshape(-1), pos, cos, sin)[None])[0]
        h = _core.rms_norm(x, self.layers[0].n1, eps)
        for li, L in enumerate(self.layers):
            a = _core.attend_decode(L.q(h), L.k(h), L.v(h), cache.k[li], cache.v[li], pos, cos, sin,
                                    L.q_norm, L.k_norm, eps, scale)
            h = _core.add_rms_norm(x, L.o(a), L.n2, eps)
            m = L.moe(h) if L.moe is not None else L.down(_core.silu_mul(L.gate(h), L.up(h)))
            h = _core.add_rms_norm(x, m, self.layers[li + 1].n1 if li + 1 < self.n_layers else self.norm, eps)
        return self.head(h)[0]
