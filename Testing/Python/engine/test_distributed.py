"""Multi-process data parallelism (issue 6): real DDP with the Gloo backend on the CPU.

Each DDP test launches ``torchrun --standalone --nproc_per_node=2`` on this very file (the worker
is the ``__main__`` block below), on real bundled data with tiny budgets:

* teacher fine-tuning (``fast`` preset: cached LiteMedSAM embeddings, 2 HC18 slices, 1 per rank);
* distillation (the DICOM CT through ``TSKDLib.data.case`` at S = 64, a stand-in teacher cache).

The distillation worker runs the stage uninterrupted, then again on a second folder interrupted
(on every rank) after the first checkpoint and resumed; the teacher worker only runs the
interrupted and resumed run (an encoder pass costs ~3 s per slice here). The tests check that
both ranks end with identical weights (each rank trained on a different share of the batch, so
this holds only if DDP all-reduced the gradients), that they differ from the initial weights,
that both ranks resumed from rank 0's checkpoint (and, for distillation, ended with the weights of
the uninterrupted run), and, through a Python audit hook recording every file opened for writing,
created, renamed or removed in the run folders, that only rank 0 wrote files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[3]
DATA = ROOT / "Testing" / "Data"


class Interrupted(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Worker (runs inside torchrun, one process per rank)
# ------------------------------------------------------------------------------------------------
def _install_write_recorder(root: Path) -> list:
    """Record every write-like file operation below ``root`` (Python audit events)."""
    writes: list = []
    root_s = str(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def as_str(p):
        if isinstance(p, (str, bytes, os.PathLike)):
            p = os.fsdecode(p)
            return os.path.abspath(p)
        return None

    def hook(event, args):
        paths = []
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                    (isinstance(flags, int) and flags & write_flags):
                paths = [path]
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [a for a in args[:2]]
        for p in paths:
            s = as_str(p)
            if s is not None and s.startswith(root_s):
                writes.append(f"{event} {s}")
    sys.addaudithook(hook)
    return writes


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _worker_teacher(run_root: Path):
    from TSKDLib.engine import distributed
    from TSKDLib.data.case import load_2d_cases, prepare_slices
    from TSKDLib.teacher import TeacherConfig, build_teacher, finetune_teacher
    from TSKDLib.teacher import training

    hc = DATA / "hc18"
    cases = load_2d_cases(hc / "images", hc / "masks", hc / "labels.json", names=["000_HC", "001_HC"])
    data = prepare_slices(cases, 256)
    config = TeacherConfig.preset("fast", steps=3, batch_size=1, lr=3e-3, warmup_steps=1, val_fraction=0.0,
                                  checkpoint_every=2, device="cpu")
    first = build_teacher(data.class_map.names, config)
    initial = first.trainable_state_dict()

    real = training._batch_indices

    def interrupt_at_step_2(train, share, batch_size, seed):
        if share // distributed.world_size() == 2:  # after the checkpoint of step 2, on every rank
            raise Interrupted
        return real(train, share, batch_size, seed)
    training._batch_indices = interrupt_at_step_2
    try:
        finetune_teacher(first, data, config, work_dir=run_root / "resumed")
        raise AssertionError("not interrupted")
    except Interrupted:
        pass
    finally:
        training._batch_indices = real
    distributed.barrier()  # rank 0 has written its checkpoint before anyone resumes
    resumed, rhist = finetune_teacher(build_teacher(data.class_map.names, config), data, config,
                                      work_dir=run_root / "resumed")
    # (that a resumed run equals an uninterrupted one is checked on one process in test_teacher.py
    # and under DDP for distillation below; an encoder pass per slice costs ~3 s here)
    return {"initial": initial, "final": resumed.trainable_state_dict(), "resumed": resumed.trainable_state_dict(),
            "loss": rhist["loss"], "resumed_from": rhist["resumed_from"], "world_size": distributed.world_size()}


def _worker_distill(run_root: Path):
    import warnings

    import torch.nn.functional as F

    from TSKDLib.distillation import distill as distill_mod
    from TSKDLib.engine import distributed
    from TSKDLib.data.case import load_case, prepare_slices
    from TSKDLib.distillation.distill import DistillConfig, TransferSet, build_teacher_cache, distill
    from TSKDLib.distillation.student import build_student

    ts = DATA / "totalseg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = load_case(ts / "ct_dicom", ts / "example_seg_dicom.nii.gz", ts / "label_map_total_ct.json",
                         classes=["liver", "spleen"])
    full_slices = prepare_slices([case], 64)
    slices = prepare_slices([case], 64)
    keep = torch.zeros(len(slices), dtype=torch.bool)
    keep[[2, 7, 12, 17]] = True
    slices.labels = slices.labels.clone()
    slices.labels[~keep] = -1
    slices.labelled = keep
    transfer = TransferSet.build(slices)

    def teacher(x):  # stand-in teacher: soft one-hot of the reference labels of each slice
        idx = [int(torch.argmin((transfer.images.flatten(1) - xi.flatten()).abs().sum(1))) for xi in x]
        probs = F.one_hot(full_slices.labels[idx].clamp(min=0), 3).permute(0, 3, 1, 2).float() * 0.9 + 0.1 / 3
        emb = F.avg_pool2d(probs, 4).repeat(1, 86, 1, 1)[:, :256]
        return emb, probs
    cache = build_teacher_cache(teacher, transfer.images)
    cfg = DistillConfig(steps=4, finetune_steps=2, batch_size=2, checkpoint_every=2, log_every=1, seed=3,
                        device="cpu")
    torch.manual_seed(cfg.seed)
    initial = _state(build_student("unet-s", num_classes=2, input_size=64))
    full = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=run_root / "full")

    real = distill_mod._lr_at

    def interrupt_at_step_3(step, c, *args):
        if step == 2:  # after the checkpoint of step 2, on every rank
            raise Interrupted
        return real(step, c, *args)
    distill_mod._lr_at = interrupt_at_step_3
    try:
        distill(transfer, cfg, cache, "unet-s", checkpoint_dir=run_root / "resumed")
        raise AssertionError("not interrupted")
    except Interrupted:
        pass
    finally:
        distill_mod._lr_at = real
    distributed.barrier()
    resumed = distill(transfer, cfg, cache, "unet-s", checkpoint_dir=run_root / "resumed")
    return {"initial": initial, "final": _state(full.model), "resumed": _state(resumed.model),
            "loss": [h["loss"] for h in full.history], "world_size": distributed.world_size()}


def _worker_main(kind: str, out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    run_root = out / "run"
    writes = _install_write_recorder(run_root)
    result = {"teacher": _worker_teacher, "distill": _worker_distill}[kind](run_root)
    result["writes"] = list(writes)
    torch.save(result, out / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
def _torchrun(kind: str, out: Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE), kind, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]


def _check(ranks: list[dict], out: Path, expected_files: set[str]):
    r0, r1 = ranks
    assert r0["world_size"] == r1["world_size"] == 2
    for key in ("final", "resumed"):
        assert r0[key].keys() == r1[key].keys() == r0["initial"].keys()
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key} {name} differs between the ranks"
    assert any(not torch.equal(r0["final"][n], r0["initial"][n]) for n in r0["final"]), "weights did not change"
    for name in r0["final"]:  # resuming on both ranks from rank 0's checkpoint == uninterrupted run
        assert torch.equal(r0["final"][name], r0["resumed"][name]), name
    assert r0["loss"] == r1["loss"]  # the logged loss is the mean over the ranks' shares
    assert r1["writes"] == [], r1["writes"][:5]
    assert r0["writes"], "rank 0 wrote nothing"
    written = {p.relative_to(out / "run").as_posix() for p in (out / "run").rglob("*") if p.is_file()}
    assert written == expected_files


def test_teacher_finetune_ddp_two_cpu_processes(tmp_path):
    ranks = _torchrun("teacher", tmp_path)
    _check(ranks, tmp_path, {"resumed/teacher_resume.pt"})
    assert ranks[0]["resumed_from"] == ranks[1]["resumed_from"] == 2
    assert set(ranks[0]["final"]) >= {"prompt_tokens"} and any("lora_" in k for k in ranks[0]["final"])


def test_distill_ddp_two_cpu_processes(tmp_path):
    ranks = _torchrun("distill", tmp_path)
    files = {f"{d}/{f}" for d in ("full", "resumed") for f in ("checkpoint.pt", "student.pt", "result.json")}
    _check(ranks, tmp_path, files)


def test_without_torchrun_everything_is_a_no_op(monkeypatch):
    from torch import nn

    from TSKDLib.engine import distributed

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init("cpu") is False and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    assert distributed.init("auto") is False and not torch.distributed.is_initialized()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert not distributed.is_active()
    module = nn.Linear(2, 2)
    assert distributed.wrap_ddp(module, torch.device("cpu"), find_unused_parameters=True) is module
    assert distributed.device_for(torch.device("cuda")) == torch.device("cuda")
    obj = {"a": [1, 2]}
    assert distributed.broadcast(obj) is obj and distributed.all_equal(3)
    t = torch.tensor([1.5])
    assert distributed.mean(t) is t
    assert distributed.run_on_main(lambda: 7) == 7
    distributed.barrier()
    distributed.cleanup()
    with pytest.raises(ZeroDivisionError):
        distributed.run_on_main(lambda: 1 / 0)


if __name__ == "__main__":
    _worker_main(sys.argv[1], Path(sys.argv[2]))
