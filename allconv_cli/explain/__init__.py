"""Explanations: the saliency methods' table (``methods``) and their maps (``maps``, by the paper's
backward rules in ``rules``), where the backward signal starts (``targets``), maps for images
(``saliency``), data-set scans (``scan``), sanity checks (``sanity``), faithfulness metrics
(``perturbation``) and their run (``faithfulness``), and every figure and chart (``figures``)."""
