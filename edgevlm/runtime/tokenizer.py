"""Text tokenization for the runtime: the exported ``tokenizer.json`` run by the ``tokenizers`` library.

:class:`Tokenizer` reproduces what a transformers fast tokenizer (``TokenizersBackend``) returns
for ``tok(texts, padding=..., truncation=True, max_length=...)``: it configures the backend's
truncation (``longest_first``, ``truncation_side``) and padding (``pad_token`` / its id,
``padding_side``) the same way ``set_truncation_and_padding`` does, then calls
``encode_batch(texts, add_special_tokens=True)``.  Special tokens come from the stored
``tokenizer_config.json`` (strings or ``{"content": ...}`` dicts), then
``special_tokens_map.json``.

Only the ``tokenizers`` package is needed (no transformers).  A tokenizer whose Python class
does extra work outside its ``tokenizer.json`` (e.g. the slow SentencePiece ``SiglipTokenizer``,
which lowercases and strips punctuation in Python) is reproduced only as far as the exported
``tokenizer.json`` encodes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Tokenizer"]

# transformers' "no limit" sentinel for model_max_length (int(1e30)); anything this large means unset
_VERY_LARGE = int(1e20)


def _token_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token / padding settings of its transformers wrapper."""

    def __init__(self, backend: Any, config: dict | None = None, special_tokens: dict | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.special_tokens = dict(special_tokens or {})
        for name in ("pad", "eos", "bos", "unk"):
            tok = self._special(f"{name}_token")
            setattr(self, f"{name}_token", tok)
            setattr(self, f"{name}_token_id", backend.token_to_id(tok) if tok is not None else None)
        mml = self.config.get("model_max_length")
        self.model_max_length: int | None = int(mml) if isinstance(mml, (int, float)) and mml < _VERY_LARGE else None
        self.padding_side = self.config.get("padding_side") or "right"
        self.truncation_side = self.config.get("truncation_side") or "right"
        self.split_special_tokens = bool(self.config.get("split_special_tokens", False))
        for side, what in ((self.padding_side, "padding_side"), (self.truncation_side, "truncation_side")):
            if side not in ("left", "right"):
                raise ValueError(f"tokenizer {what} must be 'left' or 'right', got {side!r}")

    def _special(self, key: str) -> str | None:
        v = _token_str(self.config.get(key))
        return v if v is not None else _token_str(self.special_tokens.get(key))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, tokenizer_json: bytes | bytearray | memoryview | np.ndarray | str,
                   tokenizer_config: dict | None = None, special_tokens: dict | None = None) -> Tokenizer:
        """From the bytes of a ``tokenizer.json`` (or a uint8 array of them, as stored in an .evlm)."""
        from tokenizers import Tokenizer as _Backend

        if isinstance(tokenizer_json, np.ndarray):
            tokenizer_json = tokenizer_json.tobytes()
        text = tokenizer_json if isinstance(tokenizer_json, str) else bytes(tokenizer_json).decode("utf-8")
        try:
            backend = _Backend.from_str(text)
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise ValueError(f"could not load tokenizer.json ({type(e).__name__}: {e})") from None
        # the settings a transformers tokenizer starts from: no padding/truncation baked in
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, tokenizer_config, special_tokens)

    @classmethod
    def from_evlm(cls, f: Any) -> Tokenizer:
        """From an open EvlmFile: ``metadata["tokenizer"]`` and its u8 ``tokenizer.json`` tensor."""
        meta = f.metadata.get("tokenizer")
        if not meta:
            raise ValueError(f"{getattr(f, 'path', 'file')}: no tokenizer in this export (the source folder had no "
                             "tokenizer.json); re-export with the tokenizer files next to the model")
        name = meta.get("tensor", "tokenizer.json")
        if name not in f.records:
            raise ValueError(f"{getattr(f, 'path', 'file')}: tokenizer tensor {name!r} is missing")
        return cls.from_bytes(f[name], meta.get("config") or {}, meta.get("special_tokens") or {})

    @classmethod
    def from_file(cls, path: str, tokenizer_config: dict | None = None) -> Tokenizer:
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read(), tokenizer_config)

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, texts: str | list[str], *, max_length: int | None = None, padding: str | bool = "longest",
               truncation: bool = True, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (input_ids int64 [B, T], attention_mask int64 [B, T]).

        ``padding``: "longest" (or True) pads to the longest text of the batch, "max_length" to
        ``max_length``, "do_not_pad" (or False) needs equal lengths.  ``truncation`` cuts to
        ``max_length`` (default ``model_max_length``) keeping the special tokens, like
        transformers' ``truncation=True`` (longest_first).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        if padding is True:
            padding = "longest"
        elif padding is False or padding is None:
            padding = "do_not_pad"
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if max_length is None:
            max_length = self.model_max_length
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length (the tokenizer has no model_max_length)")
        be = self.backend
        if truncation and max_length is not None:
            be.enable_truncation(max_length=int(max_length), stride=0, strategy="longest_first",
                                 direction=self.truncation_side)
        else:
            be.no_truncation()
        if padding != "do_not_pad":
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("the tokenizer has no pad token (tokenizer_config.json pad_token), so it cannot pad "
                                 "a batch; encode texts one at a time or set a pad token")
            be.enable_padding(direction=self.padding_side, pad_id=int(pad_id), pad_type_id=0,
                              pad_token=self.pad_token,
                              length=int(max_length) if padding == "max_length" else None)
        else:
            be.no_padding()
        be.encode_special_tokens = self.split_special_tokens
        try:
            encs = be.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            be.no_padding()
            be.no_truncation()
        lens = {len(e.ids) for e in encs}
        if len(lens) > 1:
            raise ValueError(f"texts tokenized to different lengths {sorted(lens)} and padding is off")
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    __call__ = encode

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab={self.vocab_size}, pad={self.pad_token!r}, eos={self.eos_token!r}, "
                f"model_max_length={self.model_max_length})")
