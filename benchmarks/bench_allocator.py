"""CPU allocator setting (TSKDLib.engine.runtime.tune_allocator): teacher decoder step with and without.

Runs, in two fresh processes (``TSKD_MALLOC_TUNING=0`` and ``=1``), training steps of the
LiteMedSAM decoder as the ``fast`` teacher preset trains it (cached embeddings, batch 4, 4
classes, decoder-attention LoRA + prompt tokens) and prints seconds per step, kernel (system)
seconds per step, minor page faults per step and peak resident memory.

    python benchmarks/bench_allocator.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from TSKDLib.engine.runtime import tune_allocator
applied = tune_allocator()
from TSKDLib.teacher.training import TeacherConfig, build_teacher
torch.manual_seed(0)
teacher = build_teacher(["c1", "c2", "c3", "c4"], TeacherConfig.preset("fast", device="cpu"))
teacher.train()
emb = torch.randn(4, 256, 64, 64)
opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], 1e-3)
def step():
    loss = teacher.decode(emb, 256).float().pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
step()
n = int(sys.argv[1])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(n):
    step()
dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tuned": applied, "s_per_step": dt / n, "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / n,
                  "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / n, "peak_rss_mb": r1.ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    for flag in ("0", "1"):
        env = {**os.environ, "TSKD_MALLOC_TUNING": flag, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"allocator tuning {'on ' if r['tuned'] else 'off'}: {r['s_per_step']:.2f} s/step, kernel "
              f"{r['sys_s_per_step']:.2f} s/step, {r['minor_faults_per_step']:.0f} page faults/step, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
