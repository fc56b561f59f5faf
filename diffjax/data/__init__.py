"""Data: the datasets diffjax knows (``registry``, ``digits``), reading them as TFDS
array_record sources (``sources``), per-image preprocessing (``preprocess``), the resumable
per-process input pipeline (``pipeline``) and images as 8-bit pixels and PNG files (``images``).
"""
