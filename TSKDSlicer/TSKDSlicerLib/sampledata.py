"""Sample data registered with Slicer's Sample Data module (plain Python).

The bundled abdominal CT (the TotalSegmentator example scan, Apache-2.0; see
Testing/Data/totalseg/SOURCE.md) ships inside the module, so it loads offline from a ``file://``
URI; the checksum lets Sample Data verify it.
"""

from __future__ import annotations

import os
import pathlib

SAMPLE_NAME = "TSKDAbdomenCT"
FILE_NAME = "TSKDAbdomenCT.nii.gz"
SHA256 = "SHA256:e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"


def sample_sources(module_dir: str) -> list[dict]:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``."""
    path = os.path.join(module_dir, "Resources", "SampleData", FILE_NAME)
    return [dict(category="TSKD", sampleName=SAMPLE_NAME, uris=pathlib.Path(path).resolve().as_uri(),
                 fileNames=FILE_NAME, nodeNames=SAMPLE_NAME, loadFileType="VolumeFile", checksums=SHA256,
                 thumbnailFileName=os.path.join(module_dir, "Resources", "Icons", "TSKDSlicer.png"))]


def register(module_dir: str) -> bool:
    """Register the samples (Slicer only); False when the Sample Data module is not available."""
    try:
        import SampleData
    except ImportError:
        return False
    for kwargs in sample_sources(module_dir):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**kwargs)
    return True
