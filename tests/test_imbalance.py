"""Rare classes: class weights, the focal loss, balanced sampling, and the metrics that judge them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peftlab.batching import LengthGroupedBatches, balanced_weights
from peftlab.config_loading import validate_config
from peftlab.errors import ConfigError
from peftlab.metrics import classification_metrics
from peftlab.training.losses import check_against_labels, class_weights, training_loss
from peftlab.training.run import train

NAMES = ["neg", "pos"]


def _train_config(**train):
    return validate_config({"data": {"source": "tweets"}, "train": train}).train


def test_balanced_weights_follow_scikit_learns_rule_and_a_mapping_names_labels():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 90 + [1] * 10)
    balanced = class_weights(_train_config(class_weights="balanced"), NAMES, labels)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    torch.testing.assert_close(balanced, torch.tensor(expected, dtype=torch.float32))
    named = class_weights(_train_config(class_weights={"pos": 4.0}), NAMES, labels)
    assert named.tolist() == [1.0, 4.0]
    assert training_loss(_train_config(), NAMES, labels) is None  # the model's own loss, as before


def test_the_focal_loss_is_cross_entropy_at_gamma_zero_and_weighs_easy_examples_less():
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 2), torch.randint(0, 2, (32,))
    skewed = np.array([0] * 30 + [1] * 2)
    for weights in ("none", "balanced"):
        focal0 = training_loss(_train_config(loss="focal", focal_gamma=0.0, class_weights=weights), NAMES, skewed)
        weight = class_weights(_train_config(class_weights=weights), NAMES, skewed)
        torch.testing.assert_close(focal0(logits, labels), F.cross_entropy(logits, labels, weight=weight))
    focal2 = training_loss(_train_config(loss="focal"), NAMES, skewed)
    easy = torch.tensor([[4.0, -4.0]]), torch.tensor([0])
    hard = torch.tensor([[-1.0, 1.0]]), torch.tensor([0])
    assert focal2(*easy) / F.cross_entropy(*easy) < focal2(*hard) / F.cross_entropy(*hard) < 1


def test_balanced_sampling_draws_every_class_alike_reproducibly_and_keeps_the_epoch_length():
    labels = np.array([0] * 950 + [1] * 50)
    lengths = np.random.default_rng(0).integers(5, 60, size=len(labels))
    sampler = LengthGroupedBatches(lengths, 16, shuffle=True, group_by_length=True, seed=3,
                                   weights=balanced_weights(labels))
    drawn = np.concatenate([np.array(b) for b in sampler])
    assert len(drawn) == len(labels) and len(sampler) == 63
    share = (labels[drawn] == 1).mean()
    assert 0.44 < share < 0.56  # 5% of the rows, half of the draws
    assert drawn.tolist() == np.concatenate([np.array(b) for b in sampler]).tolist()  # same seed and epoch
    sampler.set_epoch(1)
    assert drawn.tolist() != np.concatenate([np.array(b) for b in sampler]).tolist()


def test_binary_metrics_add_the_areas_balanced_accuracy_and_matthews_correlation():
    from sklearn.metrics import (
        average_precision_score,
        matthews_corrcoef,
        roc_auc_score,
    )

    labels = np.array([0, 0, 0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7], [0.6, 0.4]])
    predicted = probabilities.argmax(-1)
    metrics = classification_metrics(labels, predicted, NAMES, probabilities)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]))
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(labels, probabilities[:, 1]))
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(labels, predicted))
    one_class = classification_metrics(np.zeros(3, dtype=int), np.zeros(3, dtype=int), NAMES, probabilities[:3])
    assert np.isnan(one_class["roc_auc"]) and one_class["accuracy"] == 1.0
    three = classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), ["a", "b", "c"], np.eye(3))
    assert "roc_auc" not in three and "mcc" in three
    # A class the evaluation rows lack and nothing predicts is left out of the averages, not scored 0
    # (a small eval split of a long tail misses some classes); a class predicted but absent counts.
    missing = classification_metrics(np.array([0, 0, 1]), np.array([0, 0, 1]), ["a", "b", "c"], np.eye(3))
    assert missing["f1_macro"] == 1.0 and missing["per_class"]["c"]["support"] == 0
    wrong = classification_metrics(np.array([0, 0, 1]), np.array([0, 2, 1]), ["a", "b", "c"], np.eye(3))
    assert wrong["f1_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_label_settings_are_checked_against_the_data_before_any_model_loads(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"train.class_weights: 'neutral' is not a label of this data "
                                          r"\(labels: neg, pos\)"):
        train(make_config(train={"class_weights": {"neutral": 2.0}}))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="train.best_metric=pr_auc needs two classes; this data has 3"):
        check_against_labels(_train_config(best_metric="pr_auc"), ["a", "b", "c"])


def test_a_run_with_weights_focal_loss_and_balanced_sampling_learns_and_keeps_the_best_by_pr_auc(make_config):
    from test_train import LEARNABLE

    kind, lr = LEARNABLE["lora"]
    config = make_config("bert", method=kind, data={"sampler": "balanced"},
                         train={"epochs": 10, "lr": lr, "warmup_ratio": 0.1, "class_weights": "balanced",
                                "loss": "focal", "best_metric": "pr_auc"})
    summary = json.loads((train(config) / "summary.json").read_text())
    assert summary["best_metric"] == "pr_auc"
    assert {"roc_auc", "pr_auc", "balanced_accuracy", "mcc"} <= set(summary["best"])
    assert summary["best"]["pr_auc"] >= max(e["pr_auc"] for e in [summary["final"]]) - 1e-9
    assert summary["best"]["balanced_accuracy"] >= 0.7


def test_multi_label_weights_are_each_labels_negatives_over_positives_and_focal_reduces_to_bce():
    labels = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    weights = class_weights(_train_config(class_weights="balanced"), NAMES, labels, "multi_label")
    assert weights.tolist() == pytest.approx([1 / 3, 3.0])
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 2), torch.randint(0, 2, (8, 2)).float()
    focal0 = training_loss(_train_config(class_weights="balanced", loss="focal", focal_gamma=0.0), NAMES, labels,
                           "multi_label")
    torch.testing.assert_close(focal0(logits, targets),
                               F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights))
    focal2 = training_loss(_train_config(loss="focal"), NAMES, labels, "multi_label")
    assert focal2(logits, targets) < F.binary_cross_entropy_with_logits(logits, targets)
