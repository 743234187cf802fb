"""Chat formatting from the chat template stored in an export (jinja2, as transformers renders it).

The environment matches transformers' ``apply_chat_template``: a sandboxed jinja2 environment
with ``trim_blocks``/``lstrip_blocks`` and the loop-controls extension; ``tojson`` without HTML
escaping; the ``raise_exception`` and ``strftime_now`` globals; the special tokens
(``bos_token``, ``eos_token``, ...) passed as variables.  Templates are untrusted code, so the
sandbox stays on.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

__all__ = ["ChatTemplate", "user_message"]


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template stored in this export does not compile: {e}") from None


def user_message(text: str, n_images: int = 0) -> dict:
    """One user turn in the transformers multimodal message format: images first, then the text."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}


class ChatTemplate:
    """``render(messages, add_generation_prompt=True) -> str`` with the model's special tokens."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("empty chat template")
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self._tmpl = _compile(source)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        try:
            return self._tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template rejected these messages: {e}") from None
