"""Data sets as uint8 batches (``datasets``), image files (``images``) and input preprocessing
(``preprocess``)."""
