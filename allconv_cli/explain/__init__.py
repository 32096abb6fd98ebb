"""Explanations: the paper's backward rules (``rules``), where the backward signal starts
(``targets``), saliency methods (``saliency``), data-set scans (``scan``), sanity checks
(``sanity``) and their figures (``figures``)."""
