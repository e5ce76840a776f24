"""Closed-form heads (weightgen.heads), the support protocol (weightgen.support) and the input-shift flag."""
from __future__ import annotations

import math

import pytest
import torch

from weightgen import build_model
from weightgen.data import load_dataset
from weightgen.evaluate import accuracy_many, logits_many, prototype_accuracy
from weightgen.heads import (MAX_FOLDS, _lda, _stats, embed_linear_classifier, fit_head, fit_lda,
                             stratified_folds)
from weightgen.shift import check_inputs, input_profile
from weightgen.support import split_user_data, wilson_interval


def _random_stack(arch, k, shape, n, seed=0):
    torch.manual_seed(seed)
    models = [build_model(arch, k, shape) for _ in range(n)]
    return {name: torch.stack([m.state_dict()[name] for m in models]) for name in models[0].state_dict()}


@pytest.mark.parametrize("arch", ["mlp-s", "mlp-m"])
def test_a_linear_classifier_embeds_exactly_in_relu_units(arch):
    """relu(z) - relu(-z) = z: the MLP computes the linear rule's logits up to a per-row constant."""
    torch.manual_seed(0)
    k, x = 6, torch.rand(40, 64)
    w, b = torch.randn(k, 64), torch.randn(k)
    sd = embed_linear_classifier(arch, k, (64,), w, b, x.mean(0))
    build_model(arch, k, (64,)).load_state_dict({n: v[0] for n, v in sd.items()}, strict=True)
    got = logits_many(arch, k, (64,), sd, x)[0]
    want = x @ w.T + b
    diff = got - want
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-4)


def test_lda_from_fold_statistics_equals_refitting_without_the_fold():
    torch.manual_seed(1)
    k, n = 3, 30
    y = torch.arange(n) % k
    z = torch.randn(2, n, 5) + y[None, :, None].float()
    fold, f = stratified_folds(y, k)
    assert f == min(MAX_FOLDS, n // k) and all(torch.bincount(y[fold == i], minlength=k).min() >= 1 for i in range(f))
    cnt, sums, second = _stats(z, y, fold, k, f)
    for i in range(f):
        keep = fold != i
        c2, s2, q2 = _stats(z[:, keep], y[keep], torch.zeros(int(keep.sum()), dtype=torch.long), k, 1)
        shrink, scale = torch.full((2,), 0.3), torch.ones(2, 5)
        w_sub, b_sub = _lda((cnt.sum(0) - cnt[i])[None].expand(2, -1), sums.sum(1) - sums[:, i],
                            second.sum(1) - second[:, i], shrink, scale)
        w_ref, b_ref = _lda(c2[0][None].expand(2, -1), s2[:, 0], q2[:, 0], shrink, scale)
        assert torch.allclose(w_sub, w_ref, atol=1e-4) and torch.allclose(b_sub, b_ref, atol=1e-4)


def test_fitted_head_reads_the_support_and_loads():
    """On a held-out digits task, random (untrained) hidden units + the fitted head beat the
    nearest-class-mean rule: the head uses the inputs block and picks it by cross-validation."""
    task = load_dataset("digits:classes=9,3,5,0,7")
    sx, sy = task.support(10, 0)
    sd = _random_stack("mlp-s", 5, (64,), 4)
    fitted, fit = fit_head("mlp-s", 5, (64,), sd, sx, sy)
    model = build_model("mlp-s", 5, (64,))
    model.load_state_dict({n: v[0] for n, v in fitted.items()}, strict=True)
    acc = accuracy_many("mlp-s", 5, (64,), fitted, task.x_test, task.y_test)
    assert acc.min() > prototype_accuracy(sx, sy, task.x_test, task.y_test, 5) > 0.8
    assert fit.folds == MAX_FOLDS and ((0 <= fit.cv_accuracy) & (fit.cv_accuracy <= 1)).all() and fit.input_units == 8
    d = fit.describe(0)
    assert d["method"].startswith("shrinkage LDA") and d["cv_folds"] == MAX_FOLDS and d["input_units_per_layer"] == 8
    shuffled = sy[torch.randperm(len(sy), generator=torch.Generator().manual_seed(0))]
    other, _ = fit_head("mlp-s", 5, (64,), sd, sx, shuffled)
    assert not torch.allclose(other["fcs.1.weight"], fitted["fcs.1.weight"]), "labels change the head"


def test_one_example_per_class_fits_without_cross_validation():
    task = load_dataset("digits:classes=1,2")
    sx, sy = task.support(1, 0)
    fitted, fit = fit_head("mlp-s", 2, (64,), _random_stack("mlp-s", 2, (64,), 2), sx, sy)
    assert fit.folds == 0 and torch.isnan(fit.cv_accuracy).all() and fit.describe(0)["cv_accuracy"] is None
    assert all(torch.isfinite(v).all() for v in fitted.values())


def test_head_only_archs_fit_on_penultimate_features():
    x = torch.rand(24, 1, 8, 8)
    y = torch.arange(24) % 3
    sd = _random_stack("cnn-s", 3, (1, 8, 8), 2)
    fitted, fit = fit_head("cnn-s", 3, (1, 8, 8), sd, x, y)
    assert math.isinf(float(fit.feature_weight[0])) and fit.input_units == 0
    assert torch.equal(fitted["conv1.weight"], sd["conv1.weight"]) and not torch.equal(
        fitted["classifier.weight"], sd["classifier.weight"])


def test_lda_grid_prefers_inputs_when_generated_features_are_noise():
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 4) + 3 * torch.nn.functional.one_hot(y, 4).float()
    z = torch.cat([x, torch.randn(60, 20)], 1)[None]  # 20 generated features of pure noise
    _, _, fit = fit_lda(z, y, 3, 4)
    assert float(fit.feature_weight[0]) <= 0.3 and float(fit.cv_accuracy[0]) > 0.9


def test_split_user_data_never_estimates_on_what_it_fits():
    y = torch.arange(100) % 4
    x = torch.arange(100).float()[:, None]
    beyond = split_user_data(x, y, 4, cap=10, seed=0)
    assert len(beyond.y) == 40 and len(beyond.y_est) == 60 and "beyond the support cap" in beyond.basis
    aside = split_user_data(x, y, 4, cap=256, seed=0)
    assert len(aside.y_est) == 20 and len(aside.y) == 80 and "set aside" in aside.basis
    for s in (beyond, aside):
        assert not set(s.x.flatten().tolist()) & set(s.x_est.flatten().tolist())
        assert torch.bincount(s.y_est, minlength=4).min() > 0
    few = split_user_data(x[:12], y[:12], 4, seed=0)
    assert len(few.y_est) == 0 and few.basis.startswith("none") and len(few.y) == 12
    again = split_user_data(x, y, 4, cap=256, seed=0)
    assert torch.equal(again.x, aside.x), "deterministic given the seed"
    with pytest.raises(ValueError, match=">= 1"):
        split_user_data(x, y, 4, cap=0)


def test_wilson_interval():
    lo, hi = wilson_interval(90, 100)
    assert abs(lo - 0.8256) < 1e-3 and abs(hi - 0.9448) < 1e-3
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(10, 10)[1] == 1.0


def test_input_shift_flag():
    from weightgen.harness import elastic_task, shift_task

    fam_tasks = ["digits:classes=0,1,2,3,4", "digits:classes=5,6,7,8,9", "digits:classes=0,2,4,6,8"]
    profile = input_profile([load_dataset(t).x_train for t in fam_tasks])
    held = load_dataset("digits:classes=1,3,5,7,9")
    assert not check_inputs(profile, held.support(10, 0)[0])["shifted"]
    for shifted in (shift_task(held, 2), load_dataset("mnist:size=8;classes=1,3,5,7,9")):
        out = check_inputs(profile, shifted.support(10, 0)[0])
        assert out["shifted"] and out["score"] > out["limit"], shifted.name
    assert check_inputs(profile, torch.rand(5, 10)) is None, "another input size is not compared"
    assert elastic_task(held).x_train.shape == held.x_train.shape
