"""Tune Q-TTA's cache weights for the demo on a VALIDATION stream: corrupted *training* digits
(600 of the 1200, never the held-out test split), as TDA tunes alpha_p / beta_p per dataset.
demo_shift.py's defaults come from this sweep.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tune_qtta.py     # after `make demo` (needs its .evlm), ~1.5 min
"""
import sys, json, time, itertools
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import demo_shift as D
from sklearn.datasets import load_digits
from edgevlm.adapt import corruptions as C, QTTA, QTTAConfig
from edgevlm.runtime import load_dual, set_num_threads
set_num_threads(1)
split = json.loads((D.MODEL / "demo_split.json").read_text())
test = set(split["test_indices"])
d = load_digits()
idx = np.array([i for i in range(len(d.target)) if i not in test])
rng = np.random.default_rng(1)
idx = rng.permutation(idx)[:600]
render = D._train_module().render
imgs = np.stack([np.asarray(render(d.images[i])) for i in idx]); y = d.target[idx]
enc = load_dual("build/demo/demo-clip-shq4.evlm")
prompts = [split["prompt"].format(w) for w in split["labels"]]
text = enc.encode_text(prompts); scale = float(np.exp(enc.logit_scale))
feats = {}
t=time.time()
for c in C.CORRUPTIONS:
    for s in (3, 5):
        ims = np.stack([C.corrupt(im, c, s, seed=1000 + i) for i, im in enumerate(imgs)])
        feats[(c, s)] = enc.encode_image(ims)
print("features", time.time()-t, flush=True)
zs = np.mean([np.mean(np.argmax(f @ text.T, 1) == y) for f in feats.values()])
print("zero-shot", zs)
res = []
for ap, bp, an in itertools.product([1, 2, 3, 5, 8], [3, 5, 8], [0.117, 0.3]):
    cfg = QTTAConfig(alpha_p=ap, beta_p=bp, alpha_n=an, logit_scale=scale)
    accs = []
    for f in feats.values():
        q = QTTA(text, cfg)
        accs.append(np.mean(np.argmax(q(f), 1) == y))
    res.append((np.mean(accs), ap, bp, an))
for r in sorted(res, reverse=True)[:8]: print(r)
print("default", [r for r in res if r[1]==2 and r[2]==5 and r[3]==0.117])
