"""Data layer: reading scans and labels (SimpleITK, DICOM, .seg.nrrd), geometry (slice axis, RAS/LPS), class maps, intensity normalisation, the slice dataset and atomic file writes."""
