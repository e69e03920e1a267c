"""cisslib: CLIP-guided class-incremental semantic segmentation (CLIP-CISS) research workbook."""

__version__ = "0.1.0"
