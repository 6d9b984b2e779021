"""renkei (連携): regional DICOM image sharing between a core hospital and its clinics."""

__version__ = "0.1.0"
