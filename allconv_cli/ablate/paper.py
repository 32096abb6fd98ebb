"""An ablation's table rows beside the paper's figures (Table 3, and the protocol's own)."""

from __future__ import annotations

import statistics
from pathlib import Path

from allconv_cli.ablate.grid import Run, Variant, run_config, settings_of
from allconv_cli.data import folders
from allconv_cli.evaluate import paper_setting
from allconv_cli.models.registry import MODEL_OPTIONS, NETWORKS, create_model, network_name, resolve_name
from allconv_cli.train.config import TrainConfig

# The paper's figure for a run's protocol, by the key ``evaluate.paper_setting`` returns: the setting it was measured in
PROTOCOLS = {"cifar10": "Table 3: 350 epochs, no augmentation",
             "cifar10-aug": "with flips and translations",
             "cifar100": "CIFAR-100, no augmentation"}


def paper_key(base: TrainConfig) -> str | None:
    """Which of the paper's figures the runs compare with (see ``evaluate.paper_setting``): an image
    folder's classes are read from its train/ folder's names, without loading an image."""
    classes = []
    if base.dataset == "imagefolder" and base.data_dir is not None:
        classes = folders.class_names(Path(base.data_dir) / "train")
    return paper_setting(base.dataset, classes, base.augment)


def table_rows(units: list[tuple[str, Variant]], chosen: dict, seeds: list[int], results: dict,
               base: TrainConfig, networks: dict[str, dict] | None = None) -> list[dict]:
    """One row per model and --grid combination (its settings as columns): the network as built
    (``registry.network_name``), test error's mean and spread (None for one seed: one run has no
    spread), and, only beside a network that is the paper's, the paper's Table 3 figure on
    CIFAR-10 and its figure for the run's protocol, if any."""
    key = paper_key(base)
    rows = []
    for model, variant in units:
        errors = [results[Run(model, chosen[(model, variant)], s, variant)]["test_error"] for s in seeds]
        python_name = resolve_name(model)
        config = run_config(base, Run(model, chosen[(model, variant)], seeds[0], variant), networks)
        network, papers = network_name(model, {key: getattr(config, key) for key in MODEL_OPTIONS})
        paper = NETWORKS[python_name].paper_error if papers else {}
        table3 = paper.get("cifar10") if key in ("cifar10", "cifar10-aug") else None
        mean = statistics.fmean(errors)
        reference = table3 if table3 is not None else paper.get(key)
        rows.append({
            "model": model,
            **settings_of(variant),
            "params": sum(p.numel() for p in create_model(python_name).parameters()),
            "paper_params": NETWORKS[python_name].paper_params,
            "lr": chosen[(model, variant)],
            "test_error_mean": mean,
            "test_error_std": statistics.stdev(errors) if len(errors) > 1 else None,
            "seeds": len(errors),
            "paper_table3": table3,
            "paper_error": paper.get(key) if key is not None else None,
            "paper_protocol": PROTOCOLS.get(key),
            "difference": None if reference is None else mean - reference,
            "network": network,
        })
    return rows


def paper_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(row key, label) of the paper's columns to show: Table 3's whenever the runs are on CIFAR-10,
    and the protocol's own beside it where that is another of the paper's settings."""
    protocol = rows[0]["paper_protocol"]
    columns = [("paper_table3", f"paper, {PROTOCOLS['cifar10']}")]
    if protocol != PROTOCOLS["cifar10"]:
        columns.append(("paper_error", f"paper, {protocol}"))
    return [(key, label) for key, label in columns if any(r[key] is not None for r in rows)]
