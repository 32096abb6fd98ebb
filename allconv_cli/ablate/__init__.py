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
``estimate`` (its cost, before any run), ``slots`` (how many runs at once, on which device),
``pool`` (training runs, several at once), ``shards`` (which process trains which run),
``paper`` (the rows beside the paper's figures), ``tables`` (the files), ``ablation`` (from the
plan to the table). The names below import their module on first use: a dry run reads no chart
code.
"""

from allconv_cli.util import lazy_attributes

_API = {
    **dict.fromkeys(["ablate"], "ablation"),
    **dict.fromkeys(["SPLIT_IMAGES", "cost", "estimate_seconds", "split_sizes"], "estimate"),
    **dict.fromkeys(["FAMILIES", "MAX_SEEDS", "PAPER_GRID", "PLAN_NAME", "Run", "Variant", "parse_grid",
                     "planned_runs", "prepare", "run_config", "seed_list", "select_models", "variant_name",
                     "variants"], "grid"),
    **dict.fromkeys(["PROTOCOLS", "paper_key", "table_rows"], "paper"),
    **dict.fromkeys(["RESULT_NAME", "run_in_slots"], "pool"),
    **dict.fromkeys(["RUNS_PER_GPU", "default_jobs", "device_slots"], "slots"),
    **dict.fromkeys(["Share", "parse_shard"], "shards"),
    **dict.fromkeys(["markdown_table", "row_label", "write_tables"], "tables"),
}
__getattr__, __dir__ = lazy_attributes(__name__, _API)
