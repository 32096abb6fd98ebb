"""The fast recipe on tiny data: its preset, alternating flips, weight decay groups, test-time
augmentation, the --target stop and the learning-rate schedules; the paper presets' settings."""

import json

import pytest
import torch
from typer.testing import CliRunner

from allconv_cli.models.initialization import first_conv
from allconv_cli import train as trainer
from allconv_cli.choices import SCHEDULES
from allconv_cli.cli import app
from allconv_cli.data import augmentation, splits
from allconv_cli.data.batches import Batches
from allconv_cli.evaluate import predict
from allconv_cli.files.weights import load_model
from allconv_cli.models import create_model
from allconv_cli.train import lookahead as train_lookahead
from allconv_cli.train import optim as train_optim
from allconv_cli.train import settings as configuration
from allconv_cli.train import step as train_step

TINY = dict(train_limit=64, test_limit=32, batch_size=32, epochs=1, precision="fp32")


def test_alternating_flips_mirror_each_image_every_other_epoch():
    data = splits.ImageData(torch.zeros(40, 3, 4, 4, dtype=torch.uint8), torch.zeros(40, dtype=torch.long), ["a", "b"])
    batches = Batches(data, 8, shuffle=True, drop_last=True, seed=3)
    plan = train_step.flip_plan(len(data), seed=3)
    assert torch.equal(plan, train_step.flip_plan(len(data), seed=3)) and 0 < plan.sum() < len(data)
    for epoch in (0, 1, 2):
        seen = torch.zeros(len(data), dtype=torch.bool)
        seen[batches.order(epoch)] = train_step.epoch_flips(plan, batches, epoch)
        assert torch.equal(seen, plan ^ bool(epoch % 2))  # epoch 1 mirrors exactly the others
    assert train_step.epoch_flips(None, batches, 0) is None


def test_given_flips_replace_the_coin():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    out = augmentation.augment(images, "paper", torch.Generator().manual_seed(0), shift=0,
                           flips=torch.tensor([True, False]))
    assert torch.equal(out[0], images[0].flip(2)) and torch.equal(out[1], images[1])


@pytest.mark.parametrize("frozen_first", [False, True])
@pytest.mark.parametrize("decay_all", [True, False])
def test_weight_decay_on_weights_only(decay_all, frozen_first):
    config = configuration.resolve(None, optimizer="sgd", bias_lr_scale=1.0, decay_all=decay_all, weight_decay=5e-4)
    model = create_model("all_cnn_c", batch_norm=True)
    first_conv(model).requires_grad_(not frozen_first)  # --whiten frozen: a BatchNorm comes first
    groups = train_optim.make_optimizer(model, config).param_groups
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trained)
    if decay_all:
        assert len(decayed) == len(trained)
    else:
        assert decayed and all(p.ndim == 4 for p in decayed)  # conv weights; BatchNorm and biases not
    # the layout of runs saved before --bias-lr-scale, so their optimizer states load: one group,
    # or the weights then every 1-d parameter, each in the model's order
    layout = [trained] if decay_all else [[p for p in trained if p.ndim > 1], [p for p in trained if p.ndim <= 1]]
    assert [g["params"] for g in groups] == layout


@pytest.mark.parametrize("decay_all", [True, False])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_bias_lr_scale_speeds_up_the_biases_only(decay_all, batch_norm):
    config = configuration.resolve(None, optimizer="sgd", batch_norm=batch_norm, decay_all=decay_all,
                                   weight_decay=5e-4, lr=0.1, bias_lr_scale=64, nesterov=True)
    model = create_model("all_cnn_c", batch_norm=batch_norm, num_classes=4)
    optimizer = train_optim.make_optimizer(model, config)
    biases = {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[0]["params"][0].ndim == 4
    for g in optimizer.param_groups:
        fast = {id(p) in biases for p in g["params"]}
        assert len(fast) == 1 and g["lr"] == pytest.approx(0.1 * (64 if fast.pop() else 1))
        if g["weight_decay"]:  # decayed biases lose what the weights lose per step: lr x decay
            assert g["lr"] * g["weight_decay"] == pytest.approx(0.1 * 5e-4)
    # one step from rest: every bias moves 64 times as far as it does at a scale of 1
    x = torch.randn(4, 3, 32, 32)
    moves = []
    for scale in (1, 64):
        torch.manual_seed(0)  # the same start and the same dropout masks for both scales
        model = create_model("all_cnn_c", batch_norm=batch_norm, num_classes=4)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = train_optim.make_optimizer(model, configuration.resolve(
            None, optimizer="sgd", batch_norm=batch_norm, lr=0.1, bias_lr_scale=scale, weight_decay=0.0,
            nesterov=True))
        model(x).logsumexp(1).mean().backward()
        optimizer.step()
        moves.append({name: p.detach() - before[name] for name, p in model.named_parameters()})
    for name, move in moves[1].items():
        expected = moves[0][name] * (64 if name.endswith("bias") else 1)
        assert torch.allclose(move, expected, rtol=1e-4, atol=1e-6)  # atol: fp32 rounding of p + move


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 864), (864, 96), (10, 192)])
def test_orthogonalize_sets_every_singular_value_near_one_in_the_same_directions(shape, dtype):
    torch.manual_seed(0)
    matrix = torch.randn(shape) * torch.logspace(0, -1, shape[1])  # singular values spread over 10x
    result = train_optim.orthogonalize(matrix, dtype)
    assert result.shape == matrix.shape and result.dtype == matrix.dtype
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.6 and singular.max() < 1.3
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    polar = u @ vh  # the exact orthogonal factor: the same directions, every singular value 1
    assert torch.nn.functional.cosine_similarity(result.flatten(), polar.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_muon_steps_conv_weights_by_orthogonalized_momentum_and_the_rest_by_sgd(precision, dtype):
    settings = dict(batch_norm=True, lr=0.1, nesterov=True, weight_decay=5e-4, decay_all=False, bias_lr_scale=4)
    config = configuration.resolve(None, **settings, optimizer="muon", muon_lr=0.05, muon_momentum=0.6,
                                   precision=precision)
    torch.manual_seed(0)
    model = create_model("all_cnn_c", batch_norm=True, num_classes=4)
    twin = create_model("all_cnn_c", batch_norm=True, num_classes=4)
    twin.load_state_dict(model.state_dict())
    optimizer = train_optim.make_optimizer(model, config)
    sgd = train_optim.make_optimizer(twin, configuration.resolve(None, **settings))  # the plain recipe
    weights = [p for p in model.parameters() if p.ndim > 1]
    first = optimizer.param_groups[0]
    assert first["params"] == weights and first["lr"] == 0.05 and first["weight_decay"] == 0
    assert optimizer.dtype == dtype  # the run's precision: fp32 runs never meet slow emulated bf16
    assert [g["lr"] for g in optimizer.param_groups[1:]] == [g["lr"] for g in sgd.param_groups[1:]]
    grads = [torch.randn_like(p) for p in model.parameters()]
    expected = [w.detach().clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights]
    for _ in range(2):  # the same gradients twice: the second step also shows the momentum
        for (a, b), g in zip(zip(model.parameters(), twin.parameters()), grads):
            a.grad, b.grad = g.clone(), g.clone()
        optimizer.step()
        sgd.step()
        for w, buffer, g in zip(expected, buffers, [g for p, g in zip(model.parameters(), grads) if p.ndim > 1]):
            buffer.mul_(0.6).add_(g)
            direction = g.add(buffer, alpha=0.6)  # Nesterov
            update = train_optim.orthogonalize(direction.flatten(1), optimizer.dtype) * max(1, w.shape[0] / w[0].numel()) ** 0.5
            w.mul_(w.shape[0] ** 0.5 / w.norm()).add_(update.view_as(w), alpha=-0.05)
    # fp32: the batched, zero-padded orthogonalization is each matrix's own; bf16: up to the
    # rounding of products summed in other blocks when batched (7e-5 measured, weights ~0.05)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-4
    assert all(torch.allclose(w, e, rtol=0, atol=tolerance) for w, e in zip(weights, expected))
    for a, b in zip(model.parameters(), twin.parameters()):
        if a.ndim <= 1:  # BatchNorm scales and shifts: exactly the SGD of the plain recipe
            assert torch.equal(a, b)
    # a step moves every bank by about muon_lr of its norm, whatever its shape (10 to 192 x 27 to 1,728)
    rescaled = [w.detach() * w.shape[0] ** 0.5 / w.detach().norm() for w in weights]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()
    moves = [float((w.detach() - r).norm() / r.norm()) for w, r in zip(weights, rescaled)]
    assert all(0.6 * 0.05 < move < 1.3 * 0.05 for move in moves), moves


def test_bn_momentum_sets_how_fast_the_running_statistics_follow():
    config = configuration.resolve(None, batch_norm=True, bn_momentum=0.4, drop_input=0.0, **TINY)
    model = trainer.build(config, torch.device("cpu")).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 9 and all(m.momentum == 0.4 for m in norms)
    x = torch.randn(8, 3, 32, 32) * 3 + 1
    model.train()
    model(x)
    first = norms[0]  # its input is conv1's output, recomputed here
    batch_mean = torch.nn.functional.conv2d(x, model.features.conv1.conv.weight, padding=1).mean((0, 2, 3))
    assert torch.allclose(first.running_mean, 0.4 * batch_mean, atol=1e-5)  # from 0: 0.6 x 0 + 0.4 x batch


def test_lookahead_pulls_every_fifth_step_and_at_the_last():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    lookahead = train_lookahead.Lookahead(model, decay=0.9, steps_per_epoch=4, total_steps=7)
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(lookahead.state_dict()) == floats and "1.num_batches_tracked" not in floats
    for done in range(1, 8):  # the run's steps 1-7: epoch 0 holds steps 1-4, epoch 1 steps 5-7
        with torch.no_grad():  # a stand-in for the optimizer's step
            for v in model.state_dict().values():
                v += done
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        slow = {k: v.clone() for k, v in lookahead.state_dict().items()}
        lookahead.update(model, *divmod(done - 1, 4))
        if done in (5, 7):  # the fifth step and the run's last: pulled toward the slow copy
            rho = 0.9 ** 5 * (done / 7) ** 3
            for k, v in lookahead.state_dict().items():
                assert torch.allclose(v, slow[k] + (1 - rho) * (trained[k] - slow[k]))
                assert torch.equal(model.state_dict()[k], v)  # training goes on from the slow copy
        else:
            assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tta, views", [("none", 1), ("flip", 2), ("flip-shift", 6)])
def test_predict_averages_the_views(tta, views):
    calls = []

    def model(x):
        calls.append(x)
        return torch.zeros(len(x), 3)

    logits = predict(model, torch.randn(2, 3, 8, 8), tta)
    assert len(calls) == views and logits.shape == (2, 3)
    if tta != "none":  # equal scores in every view: the mean softmax is uniform
        assert torch.allclose(logits.exp(), torch.full((2, 3), 1 / 3))


def test_shifted_views_are_the_image_moved_by_one_pixel():
    x = torch.randn(1, 1, 5, 5)
    calls = []
    predict(lambda v: calls.append(v) or torch.zeros(1, 2), x, "flip-shift")
    assert torch.equal(calls[2][..., 1:, 1:], x[..., :-1, :-1])  # moved down-right
    assert torch.equal(calls[4][..., :-1, :-1], x[..., 1:, 1:])  # moved up-left
    assert torch.equal(calls[3], calls[2].flip(3))


def test_target_stops_the_run_and_reports_epoch_and_time(tmp_path):
    config = configuration.resolve(None, **{**TINY, "epochs": 3}, target=1.0, tta="flip")
    summary = trainer.train(config, tmp_path / "run")
    assert summary["finished"] and summary["epochs_done"] == 1  # any net reaches 1 % accuracy
    assert summary["target"]["epoch"] == 1 and summary["target"]["wall_seconds"] > 0
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["target_reached"] and history[-1]["wall_seconds"] == summary["target"]["wall_seconds"]
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["epoch"] == 1  # checkpointed at the target
    with pytest.raises(ValueError, match="already finished"):
        trainer.resume(tmp_path / "run")


def test_unreached_target_runs_every_epoch_with_tta_at_the_end(tmp_path):
    config = configuration.resolve(None, **{**TINY, "epochs": 2}, target=100.0, eval_every=5, tta="flip-shift",
                                   val_fraction=0.25)
    summary = trainer.train(config, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_done"] == 2 and "target" not in summary
    assert "val_top1_error" in history[0] and "val_tta_top1_error" not in history[0]  # every epoch, for the target
    assert "val_tta_top1_error" in history[1] and "test_tta" in summary and "test" in summary


@pytest.mark.parametrize("option, value, message", [
    ("--target", "0", "--target 0.0 is not allowed"), ("--target", "101", "--target 101.0 is not allowed"),
    ("--tta", "mirror", "--tta mirror is not allowed"), ("--flips", "always", "--flips always is not allowed"),
    ("--whiten", "yes", "--whiten yes is not allowed")])
def test_bad_recipe_options_get_one_line(option, value, message, tmp_path):
    result = CliRunner().invoke(app, ["train", option, value, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_eval_tta_modes(tmp_path):
    trainer.train(configuration.resolve(None, **TINY), tmp_path / "run")
    runner = CliRunner()
    for mode in ("none", "flip", "flip-shift"):
        result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--tta", mode, "--limit", "16", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output[result.output.index("{"):])["tta"] == mode
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--tta", "mirror", "--limit", "16"])
    assert result.exit_code == 2 and "unknown --tta 'mirror'" in result.output


def test_fast_recipe_preset_trains_without_dropout_and_reports_tta(tmp_path):
    config = configuration.resolve("fast-cifar10", dataset="sample", train_limit=64, test_limit=32, epochs=1,
                                   warmup_epochs=0.5, batch_size=32, precision="fp32")
    summary = trainer.train(config, tmp_path / "run")
    model, meta, _ = load_model(tmp_path / "run")
    assert meta["model_kwargs"]["batch_norm"] and meta["model_kwargs"]["drop_input"] == 0.0
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    assert summary["finished"] and "test_tta_top1_error" in summary["last"]


@pytest.mark.parametrize("name", ["paper-cifar10", "paper-cifar10-aug", "paper-cifar100"])
def test_paper_presets_follow_the_paper_then_the_caffe_reproduction(name):
    """The paper's own values (Section 3.2), and where it is silent the Caffe reproduction that came
    closest to its error (mateuszbuda/ALL-CNN: batch 256, Caffe's xavier filler, biases 0)."""
    config = configuration.resolve(name)
    paper = (config.lr, config.momentum, config.weight_decay, config.schedule, config.milestones, config.gamma,
             config.warmup_epochs, config.epochs, config.preprocess)
    assert paper == (0.05, 0.9, 0.001, "paper", [200, 250, 300], 0.1, 0, 350, "zca")
    assert configuration.model_kwargs(config, 10) == {"num_classes": 10, "batch_norm": False, "class_relu": True,
                                                      "drop_input": 0.2, "drop_rate": 0.5}
    assert (config.batch_size, config.weight_init) == (256, "caffe-xavier")


def rates(config, steps_per_epoch: int) -> list[float]:
    """The learning rate each step of a run uses."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = train_optim.make_scheduler(optimizer, config, steps_per_epoch)
    seen = []
    for _ in range(config.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("epochs, steps, warmup", [(1, 1, 0.0), (1, 2, 0.0), (1, 2, 0.5), (1, 3, 1.0), (10, 5, 1.5)])
def test_every_schedule_takes_any_warm_up_and_step_count(schedule, epochs, steps, warmup):
    config = configuration.resolve(None, schedule=schedule, epochs=epochs, warmup_epochs=warmup, lr=0.2)
    seen = rates(config, steps)
    assert len(seen) == epochs * steps and all(0 < lr <= 0.2 + 1e-12 for lr in seen)


def test_onecycle_warms_up_to_the_peak_then_decays_to_a_thousandth():
    config = configuration.resolve(None, schedule="onecycle", epochs=10, warmup_epochs=1.5, lr=0.2)
    seen = rates(config, 20)  # 200 steps, 30 of warm-up
    assert seen[0] == pytest.approx(0.02) and seen[30] == pytest.approx(0.2) and max(seen) == pytest.approx(0.2)
    assert seen[-1] == pytest.approx(0.2e-3)
    assert all(a < b for a, b in zip(seen[:30], seen[1:31])) and all(a > b for a, b in zip(seen[30:], seen[31:]))
    no_warm_up = rates(configuration.resolve(None, schedule="onecycle", epochs=1, warmup_epochs=0, lr=0.2), 4)
    assert no_warm_up[0] == pytest.approx(0.2) and no_warm_up[-1] == pytest.approx(0.2e-3)
