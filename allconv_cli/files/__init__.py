"""The file formats allconv owns: safetensors weights with their metadata (``weights``) and the
one loader from a weights file to a model ready to use (``loading``)."""
