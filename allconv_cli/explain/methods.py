"""The saliency methods: one table, an entry per method carrying all that allconv needs to know of
it (how it computes, how it is drawn, what it needs). ``saliency`` computes every entry,
``figures`` titles and draws it, ``faithfulness`` scores it, ``sanity`` randomizes it, ``scan``
reconstructs patches with it, and the commands' help and validation list it from here.

Torch-free data, so that the command line lists and checks the names without importing torch:
an entry names its function as ``"module:function"`` (the built-in ones live in
``explain.maps``), imported when the first map is computed, or holds the function itself. A new
method is one entry and its function; a method with settings of its own (steps, a baseline, a
noise level) declares each once, as a ``Setting`` of its entry, and the commands add an option for
it (``--PREFIX-NAME``, e.g. ``--ig-steps``), its help, default and range read from the entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from allconv_cli.util import did_you_mean


@dataclass(frozen=True)
class Setting:
    """A setting of one method: the keyword its function takes, and on the command line the option
    ``--PREFIX-NAME`` (``Method.options``). A number has a range (``low`` to ``high``, either may be
    None); text has ``choices``. A setting named ``seed`` makes the method draw noise: its function
    gets ``generator``, a ``torch.Generator`` seeded with it, instead."""

    name: str
    default: int | float | str
    help: str
    low: int | float | None = None
    high: int | float | None = None
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """The values allowed, in words."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.low is not None and self.high is not None:
            return f"{self.low} to {self.high}"
        if self.low is not None:
            return f"at least {self.low}"
        return f"at most {self.high}" if self.high is not None else "any number"

    def describe(self) -> str:
        """The help text, with the default and the values allowed."""
        return f"{self.help} Default: {self.default}; {self.allowed()}."

    def check(self, value, option: str):
        """``value`` as the setting's type; a value outside its range or choices raises ValueError."""
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{option} {value!r}: choose from {', '.join(self.choices)}")
            return value
        value = type(self.default)(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{option} {value}: give {self.allowed()}")
        return value


@dataclass(frozen=True)
class Method:
    """A saliency method. ``compute(model, x, rows, layer, **settings)`` gets model inputs ``x``
    (N, C, H, W), one ``targets.Target`` per row of ``x``, the layer to weigh (``needs_layer``; else
    None), its ``settings`` by name (with ``generator`` for ``seed``; see ``Setting``) and, with
    ``needs_black``, ``black``: a black image as the model's input (1, C, H, W). It returns one map
    per row, (N, C, H, W) or (N, 1, H, W), as a tensor on ``x``'s device, and leaves the model as it
    found it (no hooks, same parameters, gradients and mode)."""

    title: str  # in figures, charts and legends
    compute: str | Callable  # "module:function", imported on first use, or the function itself
    needs_class: bool = False  # explains a class logit (--class), not a neuron
    needs_layer: bool = False  # weighs a layer's maps (--layer; default: the last conv layer)
    colormap: str | None = None  # a non-negative map, drawn 0 to max in this matplotlib colormap; None: by --norm
    paper: bool = False  # one of the paper's three (Section 3.4): visualize's default
    settings: tuple[Setting, ...] = ()  # its own, each an option of every command that computes maps
    prefix: str | None = None  # of its options, --PREFIX-NAME; None: the method's name
    needs_black: bool = False  # gets ``black``, a black image as the model's input (a baseline)
    report: str | Callable | None = None  # "module:function" (model, x, rows, maps, layer, **settings) -> {what: (N,)}

    def options(self, name: str) -> dict[str, Setting]:
        """Its command-line options, ``--PREFIX-NAME`` -> setting, for the entry called ``name``."""
        return {f"--{self.prefix or name}-{s.name}": s for s in self.settings}

    def resolve(self, name: str, given: dict | None = None) -> dict:
        """Every setting's value (``given``, by setting name, else its default), checked."""
        given = dict(given or {})
        options = self.options(name)
        unknown = set(given) - {s.name for s in self.settings}
        if unknown:
            raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))}; it has "
                             f"{', '.join(s.name for s in self.settings) or 'none'}")
        return {s.name: s.check(given.get(s.name, s.default), option) for option, s in options.items()}

    def function(self) -> Callable:
        """The function that computes the maps."""
        return _imported(self.compute)

    def reporter(self) -> Callable | None:
        """The function that measures its maps (e.g. integrated gradients' completeness), if any."""
        return None if self.report is None else _imported(self.report)


def _imported(function: str | Callable) -> Callable:
    """A "module:function" name imported, or the function itself."""
    if callable(function):
        return function
    module, name = function.split(":")
    return getattr(importlib.import_module(module), name)


_MAPS = "allconv_cli.explain.maps"
SALIENCY_METHODS: dict[str, Method] = {
    "backprop": Method("backpropagation", f"{_MAPS}:backprop", paper=True),
    "deconvnet": Method("deconvnet", f"{_MAPS}:deconvnet", paper=True),
    "guided": Method("guided backprop", f"{_MAPS}:guided", paper=True),
    "gradcam": Method("Grad-CAM", f"{_MAPS}:gradcam", needs_class=True, needs_layer=True, colormap="inferno"),
    "guided-gradcam": Method("guided Grad-CAM", f"{_MAPS}:guided_gradcam", needs_class=True, needs_layer=True),
    "input-x-gradient": Method("input × gradient", f"{_MAPS}:input_x_gradient"),
    "integrated-gradients": Method(
        "integrated gradients", f"{_MAPS}:integrated_gradients", prefix="ig", needs_black=True,
        report=f"{_MAPS}:completeness", settings=(
            Setting("steps", 32, "Points on the straight path from the baseline to the image at which the "
                    "gradient is averaged (the right Riemann sum, as captum's riemann_right).", 1, 4096),
            Setting("baseline", "black", "Where the path starts: black (a black image as the model's input), blur "
                    "(the image blurred by a Gaussian of sigma = width / 16) or mean (0 in the model's input: the "
                    "training data's mean colour for standardized input).", choices=("black", "blur", "mean")))),
    "smoothgrad": Method("SmoothGrad", f"{_MAPS}:smoothgrad", settings=(
        Setting("of", "backprop", "The gradient method averaged over noisy copies of the image.",
                choices=("backprop", "deconvnet", "guided", "input-x-gradient")),
        Setting("samples", 16, "Noisy copies averaged.", 1, 4096),
        Setting("noise", 0.15, "Standard deviation of the Gaussian noise, as a share of each image's range of "
                "input values (max - min).", 0.0, 10.0),
        Setting("seed", 0, "Seed of the noise.", 0))),
    "occlusion": Method("occlusion", f"{_MAPS}:occlusion", settings=(
        Setting("window", 8, "Side of the square patch set to 0 in the model's input (the training data's mean "
                "colour for standardized input), in pixels; at most the input's side.", 1),
        Setting("stride", 4, "Pixels between patches; at most the window.", 1))),
    "lrp": Method("LRP", f"{_MAPS}:lrp", needs_class=True, settings=(
        Setting("rule", "epsilon", "Rule at every conv (each BatchNorm folded into the conv before it): epsilon "
                "(R_in = x W^T R / (z + eps sign z)) or zplus (positive weights for positive inputs, negative "
                "for negative ones); ReLUs pass relevance through, the global average shares it by contribution.",
                choices=("epsilon", "zplus")),
        Setting("epsilon", 1e-6, "Stabilizer of each rule's division (the epsilon of the epsilon rule).", 0.0))),
}

# Maps that know nothing of the model, which ``faithfulness`` scores beside the methods as
# references (``perturbation.model_free_map`` computes them): name -> what it is.
MODEL_FREE = {"random": "uniform noise", "sobel": "the image's edges"}

# The names as the table holds them when the command line reads it (its help texts). The
# library reads SALIENCY_METHODS itself each time, so an entry added later counts everywhere.
METHODS = tuple(SALIENCY_METHODS)
PAPER_METHODS = tuple(name for name, method in SALIENCY_METHODS.items() if method.paper)
CLASS_METHODS = tuple(name for name, method in SALIENCY_METHODS.items() if method.needs_class)


def fitting(by_class: bool) -> tuple[str, ...]:
    """Every method that explains a class score (``by_class``) or a neuron (the rest)."""
    return tuple(name for name, method in SALIENCY_METHODS.items() if by_class or not method.needs_class)


def check_methods(methods: Iterable[str] | None, model_free: bool = False) -> tuple[str, ...]:
    """Validate method names (SALIENCY_METHODS, with ``model_free`` also MODEL_FREE); None: all of
    them. Duplicates are dropped, order kept."""
    known = (*SALIENCY_METHODS, *(MODEL_FREE if model_free else ()))
    chosen = tuple(dict.fromkeys(m.strip() for m in (known if methods is None else methods) if m.strip()))
    for method in chosen:
        if method not in known:
            raise ValueError(f"unknown method {method!r}{did_you_mean(method, known)}; choose from {', '.join(known)}")
    if not chosen:
        raise ValueError(f"no method given; choose from {', '.join(known)}")
    return chosen


def setting_options() -> dict[str, tuple[str, Setting]]:
    """Every entry's options: ``--PREFIX-NAME`` -> (method, setting). Two entries that would
    share an option raise ValueError."""
    options = {}
    for name, method in SALIENCY_METHODS.items():
        for option, setting in method.options(name).items():
            if option in options:
                raise ValueError(f"{name} and {options[option][0]} both declare {option}: give one a prefix")
            options[option] = (name, setting)
    return options


def check_settings(methods: Iterable[str], settings: dict[str, dict] | None) -> dict[str, dict]:
    """Each chosen method's settings, checked and completed with defaults; a setting given for a
    method not chosen raises ValueError (it would be silently ignored)."""
    methods, settings = tuple(methods), dict(settings or {})
    for name, given in settings.items():
        if name not in SALIENCY_METHODS:
            raise ValueError(f"settings for unknown method {name!r}; choose from {', '.join(SALIENCY_METHODS)}")
        if name not in methods and given:
            options = ", ".join(o for o, s in SALIENCY_METHODS[name].options(name).items() if s.name in given)
            raise ValueError(f"{options} set{'s' if ', ' not in options else ''} {name}, which is not among the "
                             f"methods: add it to --methods, or drop {options}")
    return {m: SALIENCY_METHODS[m].resolve(m, settings.get(m)) for m in methods if m in SALIENCY_METHODS}
