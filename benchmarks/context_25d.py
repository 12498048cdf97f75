"""Issue 15, item 4 ("2.5D context"): a student that sees the neighbouring slices, on CHAOS MR.

    python benchmarks/context_25d.py --groups 0,1,2 --out bench/ctx_012 [--seeds 0] \
        [--work-dir bench/work_noval] [--within-only]

The sparse-slice protocol (``TSKDLib.evaluation.sparse_benchmark``: 3 labelled slices per organ,
``fast`` preset, teacher with ``val_fraction 0`` from ``--work-dir``, ``tskd_nosyn`` student),
with a 2.5D student: its input is slices ``k - 1, k, k + 1`` of the scan as three channels (the
end slices repeat themselves), the MONAI U-Net built with ``in_channels=3``; the teacher and its
cached outputs stay 2D (the middle channel), and the same augmentations act on the three
channels together. Scored within the training scans and on the other scans, raw and after ``tskd
segment``'s clean-up. Writes ``results.md``/``results.csv`` to ``--out`` and prints the tables.
Compare with the 2D student of the same command in ``tskd benchmark --protocol sparse-slices``
(same teachers). Results: benchmarks/RESULTS.md, section 6, "Eighth pass". CHAOS data stay outside
the project (SOURCE.md). The product's student is 2D; this script patches the benchmark only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import monai.networks.nets as monai_nets
import torch
from chaos import DEFAULT_DIR, SCANS, load_scan

import TSKDLib.distillation.distill as distill_module
import TSKDLib.evaluation.sparse_benchmark as sparse
from TSKDLib.data.case import prepare_case_slices


def with_neighbours(images: torch.Tensor, case_index: torch.Tensor, slice_index: torch.Tensor) -> torch.Tensor:
    """``(N, 1, S, S)`` slices -> ``(N, 3, S, S)``: each slice between its neighbours in its scan
    (``case_index``, ordered by ``slice_index``); an end slice stands in for its missing neighbour."""
    out = images.repeat(1, 3, 1, 1)
    for c in case_index.unique():
        sel = (case_index == c).nonzero().flatten()
        order = sel[torch.argsort(slice_index[sel])]
        below = torch.cat([order[:1], order[:-1]])
        above = torch.cat([order[1:], order[-1:]])
        out[order, 0] = images[below, 0]
        out[order, 2] = images[above, 0]
    return out


def _patch() -> None:
    """Transfer sets with neighbours, a 2D teacher cache, 3-channel U-Nets, 2.5D prediction."""
    build, cache = distill_module.TransferSet.build.__func__, distill_module.build_teacher_cache
    unet = monai_nets.UNet

    def build_25d(cls, slices, *args, **kwargs):
        t = build(cls, slices, *args, **kwargs)
        t.images = with_neighbours(t.images, t.case_index, t.slice_index).contiguous()
        return t

    def cache_2d(teacher, images, *args, **kwargs):
        return cache(teacher, images[:, 1:2].contiguous() if images.shape[1] == 3 else images, *args, **kwargs)

    def predict_25d(proba, case, size):
        images, _, resizer, _ = prepare_case_slices(case, size)
        n = len(images)
        x = with_neighbours(images.float(), torch.zeros(n, dtype=torch.long), torch.arange(n))
        out = []
        with torch.inference_mode():
            for i in range(0, n, 8):
                out.append(resizer.from_model(proba(x[i:i + 8]).float(), "bilinear").argmax(1).to(torch.uint8))
        return torch.cat(out).numpy()

    distill_module.TransferSet.build = classmethod(build_25d)
    distill_module.build_teacher_cache = cache_2d
    monai_nets.UNet = lambda *args, **kwargs: unet(*args, **{**kwargs, "in_channels": 3})
    sparse._predict = predict_25d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DIR))
    ap.add_argument("--groups", default="0,1,2", help="training groups, ';'-separated (indices into 31 32 33 34 36)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--within-only", action="store_true")
    ap.add_argument("--work-dir", default="bench/work_noval")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    _patch()
    scans = [load_scan(args.data, i) for i in SCANS]
    groups = [[int(i) for i in g.split(",")] for g in args.groups.split(";")]
    cfg = sparse.SparseConfig(seeds=args.seeds, train_groups=groups, preset="fast", methods=["tskd_nosyn"],
                              work_dir=args.work_dir, teacher_other=False, other_scans=not args.within_only,
                              teacher={"val_fraction": 0.0})
    sparse.run_sparse_benchmark(scans, cfg, args.out)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
