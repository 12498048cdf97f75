"""Render docs/screenshot-slicer.png from a real MRML scene (slicer-core, no Slicer GUI needed).

The bundled CT (TSKDSlicer/Resources/SampleData/TSKDAbdomenCT.nii.gz, the TotalSegmentator example)
is loaded into a vtkMRMLScene, its example segmentation (itself a model prediction: liver, spleen,
kidneys) is imported as a segmentation through the module's own import path
(TSKDSlicerLib.mrml_io.import_labelmap_file, as after "Segment volume(s)"), and the segments are read
back on the volume's grid and drawn over an axial and a coronal slice. Run:

    PYTHONPATH=.:TSKDSlicer python scripts/render_screenshot.py [out.png]
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import slicer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "TSKDSlicer"))
from TSKDSlicerLib import mrml_io  # noqa: E402

CT = os.path.join(ROOT, "TSKDSlicer", "Resources", "SampleData", "TSKDAbdomenCT.nii.gz")
SEG = os.path.join(ROOT, "Testing", "Data", "totalseg", "example_seg.nii.gz")
CLASSES = [{"value": 5, "name": "liver", "color": (0.87, 0.51, 0.31)},
           {"value": 1, "name": "spleen", "color": (0.62, 0.35, 0.71)},
           {"value": 2, "name": "kidney_right", "color": (0.21, 0.63, 0.35)},
           {"value": 3, "name": "kidney_left", "color": (0.27, 0.52, 0.85)}]


def main(out):
    mrml_io.register_converter_rules()
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume = mrml_io.load_volume(scene, CT, "TSKD abdomen CT")
    seg = mrml_io.import_labelmap_file(SEG, volume, CLASSES, name="TSKD abdomen CT prediction")
    image = slicer.util.arrayFromVolume(volume).astype(float)  # (K, J, I)
    layers = []
    for c in CLASSES:
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName(c["name"])
        layers.append((mrml_io.segments_to_label_array(seg, [sid], volume) > 0, c))
    k = int(np.argmax(sum(m.sum(axis=(1, 2)) for m, _ in layers)))
    j = int(np.argmax(sum(m.sum(axis=(0, 2)) for m, _ in layers)))
    window = np.clip((image + 160.0) / 400.0, 0, 1)  # abdomen window (W 400, L 40)
    sp = volume.GetSpacing()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), facecolor="black")
    views = [("axial", window[k], [m[k] for m, _ in layers], sp[1] / sp[0]),
             ("coronal", window[:, j, :], [m[:, j, :] for m, _ in layers], sp[2] / sp[0])]
    for ax, (title, img, masks, aspect) in zip(axes, views):
        rgb = np.repeat(img[..., None], 3, axis=2)
        for mask, (_, c) in zip(masks, layers):
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array(c["color"])
        # as in Slicer's views: anterior/superior up, patient right on the left
        ax.imshow(rgb[::-1, ::-1], aspect=aspect, interpolation="nearest")
        ax.set_title(title, color="white")
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c["color"]) for _, c in layers]
    fig.legend(handles, [c["name"] for _, c in layers], loc="lower center", ncol=4, frameon=False,
               labelcolor="white")
    fig.suptitle("TSKD: segmentation shown on the volume (MRML scene, bundled example CT)", color="white")
    fig.savefig(out, dpi=90, facecolor="black", bbox_inches="tight")
    print(out, json.dumps({"slice_k": k, "slice_j": j}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "screenshot-slicer.png"))
