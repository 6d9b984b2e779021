"""The center as a service: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with per-site identity."""
