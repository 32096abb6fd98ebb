"""The paper's ablation (Table 3) as a resumable set of training runs.

Each model is trained under one protocol. With a learning-rate grid, every rate is trained with
the first seed on a validation split held out of the training set (never the test set); the
rate with the lowest validation error is then trained with the remaining seeds. The table
reports, per model, the chosen rate and the test error's mean and spread over seeds.

Layout of an ablation folder: ``ablation.json`` (the plan), one run folder per
(model, rate, seed) as ``MODEL/lr{rate}-seed{seed}/``, each with ``result.json`` once finished,
and ``table.md``, ``table.csv``, ``table.json``, ``chart.png``; ``.claims/`` says which process
trains which run. Running the same command again skips finished runs and resumes interrupted
ones from their checkpoints.

One module per concern: ``grid`` (what is trained, and the check of every combination),
``estimate`` (its cost, before any run), ``pool`` (training runs, several at once),
``shards`` (which process trains which run), ``paper`` (the rows beside the paper's figures),
``tables`` (the files), ``ablation`` (from the plan to the table).
"""

from allconv_cli.ablate.ablation import PLAN_NAME, ablate, prepare
from allconv_cli.ablate.estimate import SPLIT_IMAGES, cost, estimate_seconds, split_sizes
from allconv_cli.ablate.grid import (
    FAMILIES,
    MAX_SEEDS,
    PAPER_GRID,
    Run,
    Variant,
    parse_grid,
    planned_runs,
    run_config,
    seed_list,
    select_models,
    variant_name,
    variants,
)
from allconv_cli.ablate.paper import PROTOCOLS, paper_key, table_rows
from allconv_cli.ablate.pool import RESULT_NAME, RUNS_PER_GPU, default_jobs, device_slots, run_in_slots
from allconv_cli.ablate.shards import Share, parse_shard
from allconv_cli.ablate.tables import markdown_table, row_label, write_tables

__all__ = ["FAMILIES", "MAX_SEEDS", "PAPER_GRID", "PLAN_NAME", "PROTOCOLS", "RESULT_NAME", "RUNS_PER_GPU",
           "SPLIT_IMAGES", "Run", "Share", "Variant", "ablate", "cost", "default_jobs", "device_slots",
           "estimate_seconds", "markdown_table", "paper_key", "parse_grid", "parse_shard", "planned_runs",
           "prepare", "row_label", "run_config", "run_in_slots", "seed_list", "select_models", "split_sizes",
           "table_rows", "variant_name", "variants", "write_tables"]
