"""Run code in a fresh interpreter where torch & co. cannot be imported (the runtime's promise).

In-process, an earlier test's import would hide a violation; here a meta-path finder makes the
forbidden modules unimportable, so even a lazy import inside the runtime fails loudly.
"""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "triton", "onnxruntime")

_PREAMBLE = f"""
import importlib.abc, sys
FORBIDDEN = {FORBIDDEN!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in FORBIDDEN:
            raise ImportError('runtime imported forbidden module ' + name)
sys.meta_path.insert(0, Block())
"""


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` (may use FORBIDDEN) after the blocking finder; ``args`` become sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", _PREAMBLE + code, *args], capture_output=True, text=True)


def generate_without_torch(evlm, image) -> subprocess.CompletedProcess:
    """A 4-token generation from ``evlm`` about ``image``; prints 'OK <generated> <prompt tokens>'."""
    return run_without_torch("from edgevlm.runtime.vlm import Runtime\n"
                             "out = Runtime.load(sys.argv[1]).generate('Describe it.', images=[sys.argv[2]], "
                             "max_tokens=4)\n"
                             "print('OK', len(out.token_ids), out.prompt_tokens)\n", str(evlm), str(image))
