"""The saliency methods, one entry each: what a user types, how figures title it, which maps it
multiplies, and whether the paper has it. Torch-free data, so the command line's help lists the
methods from here; ``saliency`` computes each entry's maps. A method made of the maps below is one
entry; a new kind of map is its own code in ``saliency`` plus an entry."""

from dataclasses import dataclass

GRADCAM = "gradcam"  # Grad-CAM's map (Selvaraju et al., 2017): it explains a class score
RULES = ("backprop", "deconvnet", "guided")  # the paper's backward rules at every ReLU (Section 3.4)


@dataclass(frozen=True)
class Method:
    title: str  # in figures and charts
    maps: tuple[str, ...]  # multiplied together: rules (a map with the input's shape) and GRADCAM (N, 1, H, W)
    paper: bool = False  # one of the paper's three methods

    @property
    def needs_class(self) -> bool:
        """Whether it explains a class score (a logit), so needs class targets."""
        return GRADCAM in self.maps


SALIENCY_METHODS = {
    "backprop": Method("backpropagation", ("backprop",), paper=True),
    "deconvnet": Method("deconvnet", ("deconvnet",), paper=True),
    "guided": Method("guided backprop", ("guided",), paper=True),
    "gradcam": Method("Grad-CAM", (GRADCAM,)),
    "guided-gradcam": Method("guided Grad-CAM", ("guided", GRADCAM)),
}
METHODS = tuple(SALIENCY_METHODS)
PAPER_METHODS = tuple(name for name, method in SALIENCY_METHODS.items() if method.paper)
CLASS_METHODS = tuple(name for name, method in SALIENCY_METHODS.items() if method.needs_class)
