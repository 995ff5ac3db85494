"""Recipes, time budgets and schedules (core.recipe, core.schedule), honest model
selection, and training precision.

The arithmetic is tested exactly; the budgeted pipeline runs on a tiny budget with the real RLFN-S ×2
teacher and small crops of the bundled sample images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file

from core.data.datasets import TrainImages, holdout_split
from core.data.sample import sample_dir
from core.distill.stage import (
    DistillConfig,
    loss_at,
    measure_distill_step,
    replanned,
    teacher_outputs,
    with_ground_truth,
)
from core.errors import Canceled
from core.job import JobConfig, JobParams
from core.loop import resolve_precision
from core.models.checkpoint import load_checkpoint
from core.pipeline import run_pipeline
from core.recipe import RECIPES
from core.schedule import (
    BudgetPlan,
    StepCost,
    ema_decay_for,
    lr_factor,
    plan_pruning,
    run_length,
    validate_every_for,
    warmup_steps,
)

# --- schedules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_exactly_at_the_last_iteration(schedule):
    total = 1000
    factors = [lr_factor(k, total, schedule, warmup_steps(0.02, total)) for k in range(1, total + 1)]
    assert factors[total - 1] == 0.0  # the last step
    assert factors[total - 2] > 0.0  # and not before
    assert all(a >= b for a, b in zip(factors[20:], factors[21:], strict=False))  # monotone decay
    assert lr_factor(total + 1, total, schedule) == pytest.approx(0.0, abs=1e-12)  # never negative after


def test_warmup_is_a_fraction_of_the_run_and_reaches_the_peak_at_its_last_step():
    for total in (50, 1000, 34_000):
        warm = warmup_steps(0.02, total)
        assert warm == math.ceil(0.02 * total) and warmup_steps(0.0, total) == 0
        assert lr_factor(1, total, "cosine", warm) == pytest.approx(1 / warm)
        assert lr_factor(warm, total, "cosine", warm) == 1.0
        assert lr_factor(warm + 1, total, "cosine", warm) < 1.0


def test_step_schedule_halves_at_each_milestone():
    milestones = (250, 500, 750)
    assert lr_factor(250, 1000, "step", milestones=milestones) == 1.0
    assert lr_factor(251, 1000, "step", milestones=milestones) == 0.5
    assert lr_factor(1000, 1000, "step", milestones=milestones) == 0.125


def test_ema_horizon_and_validation_cadence_scale_with_the_run():
    assert ema_decay_for(300, 0.999, 0.1) == pytest.approx(1 - 1 / 30)
    assert ema_decay_for(100_000, 0.999, 0.1) == 0.999  # capped by the recipe's decay
    assert ema_decay_for(300, 0.999, None) == 0.999  # the paper's: as given
    assert validate_every_for(270, 10) == 27
    assert validate_every_for(5, 10) == 1
    assert validate_every_for(1000, 0) == 0


def test_budget_to_iterations_arithmetic():
    plan = plan_pruning(budget_seconds=600, share=0.05, step_seconds=0.5)
    assert plan.prune_iters == 60  # 5% of 600 s at 0.5 s a step
    distill = plan.plan_distill(
        45.0, StepCost(0.25), finish_share=0.0, validation_seconds=1.5, validations=10
    )
    assert distill.distill_iters == math.floor((600 - 45 - 15) / 0.25) == 2160
    # A budget already spent still trains one step; a plan survives a JSON round trip unchanged.
    assert run_length(-3.0, 0.1) == 1 and run_length(-3.0, 0.1, done=40) == 41
    assert BudgetPlan(**json.loads(distill.model_dump_json())) == distill
    # An L2 finish over its last quarter at 0.8 of a step's cost: 0.75·N·0.25 s + 0.25·N·0.2 s ≤ 540 s.
    finished = plan.plan_distill(
        45.0, StepCost(0.25, 0.8), finish_share=0.25, validation_seconds=1.5, validations=10
    )
    assert finished.distill_iters == 2273 == math.floor(2160 / 0.95) and finished.finish_step_ratio == 0.8
    # A re-plan after 100 steps fills what is left the same way: (2280 − 100 − 570)·0.25 + 570·0.2 = 516.5.
    assert run_length(516.5, 0.25, done=100, finish_share=0.25, finish_ratio=0.8) == 2280


def test_the_l2_finish_is_the_last_fraction_of_the_run():
    config = DistillConfig(iterations=1000, loss="l1_gt", l2_finish=0.25)
    losses = [loss_at(config, k) for k in range(1, 1001)]
    assert losses.index("l2_gt") == 750 and losses[-1] == "l2_gt"  # steps 751…1000, 250 of them
    assert losses.count("l2_gt") == 250 and set(losses[:750]) == {"l1_gt"}
    assert {loss_at(DistillConfig(iterations=7, loss="paper"), k) for k in range(1, 8)} == {"paper"}


# --- recipes and the job's parameters ------------------------------------------------------------------


def test_paper_recipe_resolves_to_the_papers_values():
    recipe = JobParams(model="rlfn_s", scale=2, recipe="paper").resolved_recipe()
    assert (recipe.student_init, recipe.loss, recipe.alpha, recipe.lr) == ("scratch", "paper", 0.1, 1e-4)
    assert (recipe.schedule, recipe.warmup, recipe.ema_decay, recipe.ema_horizon) == (
        "step",
        0.0,
        0.999,
        None,
    )
    assert recipe.precision == "fp32" and recipe.overridden == []


def test_fast_is_the_default_and_every_knob_stays_overridable():
    params = JobParams(model="rlfn_s", scale=2)
    assert params.recipe == "fast" and params.resolved_recipe() == RECIPES["fast"]
    recipe = JobParams(
        model="rlfn_s", scale=2, distill_lr=5e-4, distill_loss="blend", lr_schedule="linear", alpha=0.3,
        l2_finish=0.1, overparam=2.0,
    ).resolved_recipe()  # fmt: skip
    assert (recipe.lr, recipe.loss, recipe.schedule, recipe.alpha) == (5e-4, "blend", "linear", 0.3)
    assert (recipe.l2_finish, recipe.overparam) == (0.1, 2.0)
    assert recipe.overridden == ["alpha", "l2_finish", "loss", "lr", "overparam", "schedule"]


def test_fast_changes_with_the_time_budget_unless_the_job_says_otherwise():
    def recipe(**fields):
        return JobParams(model="rlfn_s", scale=2, **fields).resolved_recipe()

    def tiered(r):
        return r.loss, r.patch_size, r.l2_finish

    assert tiered(recipe()) == tiered(recipe(budget_minutes=29.9)) == ("l1_gt", 48, 0.0)
    assert tiered(recipe(budget_minutes=30)) == tiered(recipe(budget_minutes=59)) == ("pixel_hf", 48, 0.0)
    assert tiered(recipe(budget_minutes=60)) == ("pixel_hf", 64, 0.25)
    assert recipe(budget_minutes=29.9).overparam == 0.0
    assert recipe(budget_minutes=30).overparam == recipe(budget_minutes=60).overparam == 2.0
    assert recipe(budget_minutes=60).overridden == []
    # the job's own values win over every tier
    own = recipe(budget_minutes=120, distill_loss="blend", patch_size=32, l2_finish=0.0)
    assert tiered(own) == ("blend", 32, 0.0) and own.overridden == ["l2_finish", "loss", "patch_size"]
    assert tiered(recipe(budget_minutes=120, recipe="paper")) == ("paper", 48, 0.0)


def test_a_budget_tier_may_only_change_recipe_values():
    with pytest.raises(ValidationError, match="unknown values"):
        RECIPES["fast"].model_validate(
            {**RECIPES["fast"].model_dump(), "budget_tiers": [{"minutes": 5, "changes": {"lr_typo": 1}}]}
        )


def test_a_student_of_another_family_starts_from_scratch():
    params = JobParams(model="rlfn_s", scale=2, student_preset="edsr_mini")
    assert params.cross_family_student and params.resolved_recipe().student_init == "scratch"
    same_family = JobParams(model="rlfn", scale=2, student_preset="rlfn_s")
    assert same_family.resolved_recipe().student_init == "inherit"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"budget_minutes": 5, "distill_iters": 100}, "either budget_minutes or iteration counts"),
        ({"budget_minutes": 5, "prune_iters": 10}, "either budget_minutes or iteration counts"),
        ({"student_preset": "edsr_mini", "target_params": 45000}, "student_preset names the student"),
        (
            {"student_preset": "edsr_mini", "student_init": "inherit"},
            "needs a student of the teacher's family",
        ),
        ({"student_preset": "nope"}, "unknown student_preset"),
        ({"model": "nope"}, "unknown preset"),
        ({"alpha": math.inf}, "finite"),
        ({"distill_lr": math.nan}, "finite"),
        ({"budget_minutes": 0}, "greater than 0"),
        ({"seed": 2**64}, "less than"),
        ({"distill_loss": "mse"}, "pixel_hf"),
        ({"device": "tpu"}, "unknown device"),
        ({"student": (20, 0, 4)}, "must be positive"),
        ({"model": "swinir_lightweight", "student": (25, 4, 3)}, "multiple of the 6 attention heads"),
    ],
)
def test_bad_job_parameters_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        JobParams(**{"model": "rlfn_s", "scale": 2, **fields})


# --- honest selection ------------------------------------------------------------------------------------


def test_holdout_is_disjoint_seeded_and_at_most_a_tenth():
    paths = [Path(f"img{i:03d}.png") for i in range(232)]
    train, held = holdout_split(paths, 8, seed=0)
    assert len(held) == 8 and len(train) == 224
    assert not set(train) & set(held) and set(train) | set(held) == set(paths)
    assert holdout_split(paths, 8, seed=0) == (train, held)  # seeded
    assert holdout_split(paths, 8, seed=1)[1] != held
    assert len(holdout_split(paths[:30], 8, seed=0)[1]) == 3  # a tenth of 30
    assert len(holdout_split(paths[:5], 8, seed=0)[1]) == 1  # at least one of several
    assert holdout_split(paths[:1], 8, seed=0) == (paths[:1], [])  # never the only image


# --- precision ---------------------------------------------------------------------------------------------


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16():
    cpu = torch.device("cpu")
    fallback = resolve_precision("bf16", cpu, cpu_bf16=False)
    assert fallback.dtype is None and fallback.name == "fp32" and "lacks native bf16" in fallback.reason
    assert resolve_precision("bf16", cpu, cpu_bf16=True).dtype == torch.bfloat16
    assert resolve_precision("auto", cpu, cpu_bf16=True).dtype == torch.bfloat16
    assert resolve_precision("auto", cpu, cpu_bf16=False).dtype is None
    assert resolve_precision("fp16", cpu).dtype is None


def test_gpu_precision_autocasts_bf16_else_fp16_with_a_grad_scaler():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda, cuda_bf16=True).dtype == torch.bfloat16
    fp16 = resolve_precision("auto", cuda, cuda_bf16=False)
    assert fp16.dtype == torch.float16 and fp16.needs_grad_scaler
    assert resolve_precision("bf16", cuda, cuda_bf16=False).dtype is None
    assert resolve_precision("fp32", cuda, cuda_bf16=True).dtype is None


# --- the budgeted pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """Six 96x72 HR crops of the sample images: five train, one is held out."""
    source = sample_dir(tmp_path_factory.mktemp("cache"))
    folder = tmp_path_factory.mktemp("crops")
    for path in sorted(source.glob("*.png")):
        Image.fromarray(np.asarray(Image.open(path).convert("RGB"))[:72, :96]).save(folder / path.name)
    return folder


def budget_config(teacher: Path, crops: Path, **changes) -> JobConfig:
    """Only the model, scale, teacher, data, a size target and a budget: the rest is the recipe's."""
    fields = dict(
        model="rlfn_s",
        scale=2,
        teacher_weights=teacher,
        train_data=[crops],
        val_data=[crops],
        target_params=20000,
        budget_minutes=0.15,
        batch_size=2,
        patch_size=16,
        device="cpu",
    )
    return JobConfig(**{**fields, **changes})


@pytest.mark.slow
def test_a_budgeted_job_resolves_to_fast_and_reports_the_gap(tmp_path, shared_weights, crops):
    report = run_pipeline(budget_config(shared_weights / "RLFN_s_x2.pth", crops), tmp_path)
    small = {"batch_size": 2, "patch_size": 16}  # the only values the job set, to keep the test quick
    assert report.recipe == RECIPES["fast"].model_copy(update={**small, "overridden": sorted(small)})
    plan = report.budget
    assert plan is not None and plan.budget_seconds == 9.0
    assert report.prune.iterations == plan.prune_iters >= 1
    # Every planned (or re-planned) iteration ran, unless the machine slowed down after measuring
    # (then the budget's deadline cut the run short, and the report says so).
    assert plan.distill_iters >= 1 and report.distill.planned_iterations == plan.distill_iters
    final = report.distill.replan.iterations if report.distill.replan else plan.distill_iters
    assert report.distill.iterations == final or (
        report.distill.stopped_early and report.distill.iterations < final
    )
    expected = math.floor(
        (9.0 - plan.spent_before_distill_seconds - plan.validations * plan.validation_seconds)
        / plan.distill_step_seconds
    )
    assert plan.distill_iters == max(1, expected)
    # The checkpoint was chosen on a held-out training image; the named set is reported beside it.
    assert len(report.holdout.images) == 1 and report.holdout.training_images == 5
    assert report.distill.validation_set == "holdout"
    assert [g.used_for_selection for g in report.gaps] == [True, False]
    for gap in report.gaps:
        assert gap.student_minus_teacher == pytest.approx(gap.student - gap.teacher)
    assert report.gaps[1].student == pytest.approx(report.student.scores[0].psnr)
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    assert stored["recipe"]["loss"] == "l1_gt" and stored["budget"]["distill_iters"] == plan.distill_iters


def test_labelling_follows_its_order_and_stops_at_its_time_and_the_rest_keep_ground_truth(
    shared_weights, crops
):
    teacher, _ = load_checkpoint(shared_weights / "RLFN_s_x2.pth", preset="rlfn_s", scale=2)
    data = TrainImages.from_folders(crops, 2, lr_patch=16, batch_size=2)
    cpu = torch.device("cpu")
    nothing = teacher_outputs(teacher, data, cpu, order=range(len(data)), seconds=0.0)
    assert nothing == [None] * len(data)
    two = teacher_outputs(teacher, data, cpu, order=[2, 0])
    assert [out is not None for out in two] == [i in (0, 2) for i in range(len(data))]
    targets = with_ground_truth(data, two)
    assert targets[2] is two[2] and targets[2].shape == data.hr_images[2].shape
    assert np.array_equal(targets[1], data.hr_images[1].astype(np.float32) / 255.0)


@pytest.mark.slow
def test_resume_under_a_budget_is_bit_identical(tmp_path, shared_weights, crops, monkeypatch):
    """With a teacher-driven loss, so that the teacher's labelling is planned and repeated too. The
    step timings are fixed so that the plan has a few iterations however busy the machine is."""
    monkeypatch.setattr("core.pipeline.measure_prune_step", lambda *args, **kwargs: 3.0)
    monkeypatch.setattr("core.pipeline.measure_distill_step", lambda *args, **kwargs: StepCost(10.0))
    # and the re-plan after the warm-up (its 2nd step) to 6 more: it is recorded, so both runs agree
    monkeypatch.setattr("core.distill.stage.run_length", lambda *args, **kwargs: 2 + 6)
    teacher = shared_weights / "RLFN_s_x2.pth"
    config = budget_config(teacher, crops, checkpoint_every=2, distill_loss="pixel_hf", budget_minutes=2)
    killed = tmp_path / "killed"
    steps = []

    def cancel_in_distill() -> bool:
        return len(steps) >= 3

    with pytest.raises(Canceled):
        run_pipeline(
            config,
            killed,
            on_progress=lambda stage, f, m: (
                steps.append(1) if stage == "distilling" and "phase" not in m else None
            ),
            should_cancel=cancel_in_distill,
        )
    plan = json.loads((killed / "state.json").read_text())["plan"]
    assert plan["distill_iters"] > 3 and plan["labelled_images"] >= 1  # planned before the kill
    resumed = run_pipeline(config, killed)
    # The same plan in a fresh workdir, run without a stop: the same weights, bit for bit.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "state.json").write_text(json.dumps({"results": {}, "seconds": {}, "plan": plan}))
    straight = run_pipeline(config, fresh)
    assert resumed.distill.planned_iterations == straight.distill.planned_iterations == plan["distill_iters"]
    for run in (resumed, straight):  # the resumed run took its re-plan from the killed one's checkpoint
        assert (run.distill.replan.at_iteration, run.distill.replan.iterations) == (2, 8)
    assert resumed.distill.iterations == straight.distill.iterations == 2 + 6
    a = load_file(killed / "out" / "model.safetensors")
    b = load_file(fresh / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_plan_from_a_pessimistic_measurement_is_replanned_to_fill_the_budget(
    tmp_path, shared_weights, crops, monkeypatch
):
    """A step measured far slower than it runs (here 1 s) plans a handful of iterations; the run
    re-plans after its warm-up from the steps it took, to many more, and still ends within the budget."""
    monkeypatch.setattr("core.pipeline.measure_distill_step", lambda *args, **kwargs: StepCost(1.0))
    report = run_pipeline(budget_config(shared_weights / "RLFN_s_x2.pth", crops), tmp_path)
    plan, distill = report.budget, report.distill
    assert distill.planned_iterations == plan.distill_iters and distill.replan is not None
    assert distill.replan.at_iteration == 2 and distill.replan.step_seconds < 1.0
    assert distill.replan.iterations > 2 * plan.distill_iters
    assert distill.iterations == distill.replan.iterations or distill.stopped_early
    assert distill.seconds < plan.budget_seconds - plan.spent_before_distill_seconds + 2.0
    assert "re-planned after 2 of them" in (tmp_path / "out" / "MODEL_CARD.md").read_text()


def test_a_replanned_run_keeps_its_number_of_validations():
    config = DistillConfig(iterations=270, validate_every=27, loss="l1_gt")
    assert replanned(config, 540).validate_every == 54 and replanned(config, 540).iterations == 540
    assert replanned(config.model_copy(update={"validate_every": 0}), 540).validate_every == 0


def test_a_run_ending_on_an_l2_finish_measures_that_step_too(shared_weights, crops):
    """The plan prices the finish at its own cost (a ratio to the run's step); other runs measure one."""
    model, _ = load_checkpoint(shared_weights / "RLFN_s_x2.pth", preset="rlfn_s", scale=2)
    data = TrainImages.from_folders(crops, 2, lr_patch=16, batch_size=2)
    config, cpu = DistillConfig(loss="l1_gt", l2_finish=0.25), torch.device("cpu")
    cost = measure_distill_step(model, None, data, None, config, cpu)
    assert cost.seconds > 0 and cost.finish_ratio > 0 and cost.finish_ratio != 1.0
    plain = measure_distill_step(model, None, data, None, config.model_copy(update={"l2_finish": 0}), cpu)
    assert plain.finish_ratio == 1.0


@pytest.mark.slow
def test_a_machine_slower_than_its_plan_stops_at_the_budget(tmp_path, shared_weights, crops, monkeypatch):
    """A step measured 1,000x too fast plans far more iterations than the budget holds: distillation
    stops at the budget's end, says so, and the job still finishes with a student."""
    monkeypatch.setattr("core.pipeline.measure_distill_step", lambda *args, **kwargs: StepCost(1e-5))
    report = run_pipeline(budget_config(shared_weights / "RLFN_s_x2.pth", crops), tmp_path)
    plan = report.budget
    assert report.distill.stopped_early and report.distill.iterations < plan.distill_iters
    assert report.distill.seconds < plan.budget_seconds - plan.spent_before_distill_seconds + 2.0
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_student_preset_of_another_family_is_distilled(tmp_path, shared_weights, crops):
    config = budget_config(
        shared_weights / "RLFN_s_x2.pth", crops, target_params=None, student_preset="edsr_mini",
        budget_minutes=None, prune_iters=1, distill_iters=3,
    )  # fmt: skip
    report = run_pipeline(config, tmp_path)
    assert report.student.config["family"] == "edsr" and report.student.params == 49_603
    assert report.recipe.student_init == "scratch"
    assert "preset edsr_mini" in report.compress.note


@pytest.mark.slow
def test_an_absurd_lr_diverges_instead_of_succeeding(tmp_path, shared_weights, crops):
    from core.errors import Diverged

    config = budget_config(
        shared_weights / "RLFN_s_x2.pth", crops, budget_minutes=None, prune_iters=1, distill_iters=20,
        distill_lr=1e6,
    )  # fmt: skip
    with pytest.raises(Diverged, match=r"at iteration \d+ \(last finite loss"):
        run_pipeline(config, tmp_path)
    assert not (tmp_path / "out" / "model.safetensors").exists()
