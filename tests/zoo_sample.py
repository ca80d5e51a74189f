"""A seeded sample of timm.list_models() beyond the sweep's list, each checked as the sweep checks.

    python tests/zoo_sample.py [N]      # N models (default 60), models over 60M parameters skipped

On 2026-12-03 (timm 1.0.31): 28 checked exact, 2 refused by name for having no tensor
addition (lcnet_050, mobilenetv1_100h), crossvit_18_dagger_408 does not take 64 px images.
"""
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch, timm
torch.set_num_threads(1)
from zoo_check import check_network
from test_zoo_sweep import TIMM_FAST, TIMM_SLOW
names = [n for n in timm.list_models() if n not in TIMM_FAST and n not in TIMM_SLOW]
random.Random(0).shuffle(names)
ok, bad = 0, []
t0 = time.time()
for n in names[:int(sys.argv[1]) if len(sys.argv) > 1 else 60]:
    try:
        torch.manual_seed(0)
        try:
            m = timm.create_model(n, pretrained=False, num_classes=8, img_size=64)
            size = 64
        except TypeError:
            m = timm.create_model(n, pretrained=False, num_classes=8); size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        if sum(p.numel() for p in m.parameters()) > 60e6:
            print("skip big", n); continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_network(m, (torch.randn(2, 3, size, size),))
        ok += 1; print("ok", n, flush=True)
    except Exception as e:
        bad.append(n); print("FAIL", n, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", flush=True)
print("ok", ok, "fail", len(bad), "s", round(time.time() - t0))
