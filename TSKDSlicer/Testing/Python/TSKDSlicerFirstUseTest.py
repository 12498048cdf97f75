"""In-Slicer checks of issue 11 that need the Slicer application (run by ctest or
``slicer.util.testing``; the Slicer-free ones are this folder's test_slicer_*.py, run with pytest).

- the running Slicer passes the module's version check;
- the install plan of the running Slicer never asks for torch to segment;
- a prediction imported under a parent transform lands on its volume (full application: the
  segmentation's display pipeline and the Segmentations module logic);
- "segment this slice" undo through the application's Segmentations logic.
"""

import os
import unittest

import numpy as np
import slicer
import vtk

from TSKDSlicerLib import compat, install, mrml_io


class TSKDSlicerFirstUseTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for name in sorted(n for n in dir(self) if n.startswith("test_")):
            self.setUp()
            getattr(self, name)()

    def test_version(self):
        self.assertIsNone(compat.runtime_problem(f"{slicer.app.majorVersion}.{slicer.app.minorVersion}"))

    def test_segment_plan_has_no_torch(self):
        resources = os.path.join(os.path.dirname(slicer.modules.tskdslicer.path), "Resources")
        plan = install.install_plan("segment", resources)
        self.assertFalse(plan.torch)
        self.assertFalse({install.requirement_name(r) for r in plan.requirements} & {"torch", "torchvision"})

    def _volume(self):
        volume = slicer.util.addVolumeFromArray(np.zeros((10, 16, 16), np.int16), name="v")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        m = vtk.vtkMatrix4x4()
        m.SetElement(0, 3, 30.0)
        transform.SetMatrixTransformToParent(m)
        volume.SetAndObserveTransformNodeID(transform.GetID())
        return volume

    def test_slice_prediction_under_transform_and_undo(self):
        volume = self._volume()
        seg = mrml_io.prediction_segmentation(slicer.mrmlScene, volume, "v TSKD")
        classes = [{"value": 1, "name": "liver", "color": (1, 0, 0)}]
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 5:12] = 1
        backup = mrml_io.write_slice_prediction(seg, mask, volume, 0, 4, classes)
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName("liver")
        back = mrml_io.segments_to_label_array(seg, [sid], volume)
        np.testing.assert_array_equal(back[4], mask)
        mrml_io.restore_slice(seg, volume, backup)
        self.assertIsNone(seg.GetSegmentation().GetSegment(sid))
