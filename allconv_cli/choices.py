"""The names a user can choose, one tuple per kind of choice. A leaf that imports nothing, so that
the training settings and the command line list them without importing torch; the modules that
implement each kind take their names from here."""

AUGMENTATIONS = ("none", "paper", "strong")
PREPROCESSING = ("standardize", "zca")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTA = ("none", "flip", "flip-shift")  # test-time augmentation: see evaluate.predict
WEIGHT_INITS = ("xavier-open", "xavier", "caffe-xavier", "kaiming", "lsuv")
SCHEDULES = ("paper", "cosine", "onecycle", "constant")
FLIPS = ("random", "alternate")
WHITEN = ("off", "init", "frozen")
