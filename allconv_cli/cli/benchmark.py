"""allconv benchmark: the trainer's step, inference and the data path on synthetic data."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from allconv_cli.cli.common import AsJson, Threads, make_console, user_errors
from allconv_cli.cli.options import given_settings, takes_settings


@takes_settings()
def benchmark(
    mode: Annotated[str, typer.Option(help="train (the trainer's own step with its data path), infer (the network alone), data (batches, augmentation, standardization) or all.")] = "all",
    steps: Annotated[Optional[int], typer.Option(help="Timed steps. Default: 20 on the CPU, 200 on CUDA.", show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Untimed steps before them. Default: 5 on the CPU, 50 on CUDA.", show_default=False)] = None,
    as_json: AsJson = False,
    threads: Threads = None,
    **settings,
):
    """Measure speed on synthetic data (random uint8 images of the model's input size, so it runs offline) with any recipe: a preset and any training setting (model, batch size, optimizer, lookahead, EMA, augmentation, precision, compile...). Reports images/s and step time of the trainer's own training step, of inference and of the data path alone, with GFLOP per image (convolutions, counted from the layer shapes), achieved TFLOP/s, its share of a large matmul's rate measured in the same process and precision, the share of the GPU's peak where it is known, and peak memory.

    Examples: [bold]allconv benchmark --model all-cnn-c --mode train[/bold] ·
    [bold]allconv benchmark --preset fast-cifar10 --mode train[/bold] ·
    [bold]allconv benchmark --precision fp32[/bold] ·
    [bold]allconv benchmark --device cuda --batch-size 512 --json[/bold]
    """
    with user_errors():
        from allconv_cli.benchmark import run as run_benchmark
        from allconv_cli.train.settings import resolve

        given = given_settings(settings)
        config = resolve(given.pop("preset", None), **given)
        result = run_benchmark(config, mode, steps, warmup, threads)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['device_name']} ({result['device']}, "
                  f"{result['threads']} threads, {result['kernels']}): {result['precision']}, "
                  f"{'channels_last' if result['channels_last'] else 'NCHW'}{', compiled' if result['compile'] else ''}, "
                  f"batch {result['batch_size']}, {result['steps']} timed steps after {result['warmup']} warm-up; "
                  f"matmul {result['matmul_tflops']:.3f} TFLOP/s", box=box.SIMPLE_HEAD)
    for column in ("mode", "images/s", "step ms", "ops/step", "GFLOP/image", "TFLOP/s", "% of matmul", "% of peak",
                   "peak memory"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name, row in result["results"].items():
        counted = row["gflop_per_image"] is not None
        share = "unknown" if row["peak_share"] is None else f"{100 * row['peak_share']:.1f}"
        memory = (f"{row['peak_cuda_mb']:,.0f} MiB CUDA" if row["peak_cuda_mb"] is not None
                  else f"{row['peak_rss_mb']:,.0f} MiB RSS")
        ops = f"{row['ops_per_step']:.0f}" if "ops_per_step" in row else "-"
        table.add_row(name, f"{row['images_per_s']:,.0f}", f"{row['step_ms']:.2f}", ops,
                      f"{row['gflop_per_image']:.4f}" if counted else "-",
                      f"{row['tflop_per_s']:.3f}" if counted else "-",
                      f"{100 * row['matmul_share']:.1f}" if counted else "-", share if counted else "-", memory)
    console = make_console(False)
    console.print(table)
    console.print("GFLOP: convolutions only, 2 x multiply-adds, counted from the layer shapes; a training "
                  "step is forward + backward. % of matmul: against a 4096x4096 (CPU) or 8192x8192 (CUDA) "
                  "matmul in the same precision, measured just before. ops/step: aten ops one training step "
                  "dispatches (mean of 5 in a row). Data: synthetic uint8 images held in memory on the device.")
    console.print(_load_line(result), markup=False)


def _load_line(result: dict) -> str:
    """What else ran: a warning where other processes kept part of a core or more busy."""
    from allconv_cli.cpu_threads import ThreadChoice

    busy, choice = result["busy_cores"], ThreadChoice(**result["thread_choice"])
    if busy is None:
        return f"Load: unknown on this system; {choice.describe()}."
    if result["machine_idle"]:
        return f"Load: idle (other processes kept at most {busy:.2f} of {choice.cores} cores busy); {choice.describe()}."
    return (f"Warning: other processes kept up to {busy:.1f} of {choice.cores} cores busy while this ran "
            f"({choice.describe()}): these figures are this machine's speed under that load, not idle.")
