"""Reward-model losses and metrics against values worked out by hand."""

import math

import pytest
import torch

from perlhf.reward import (bradley_terry_loss, length_grouped_batches, pairwise_accuracy, pointwise_loss, roc_auc,
                           shorter_baseline_accuracy)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # differences 1 and -1: (log(1+e^-1) + log(1+e^1)) / 2
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.813262, abs=1e-6)


def test_bradley_terry_margin_shifts_the_difference():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2  # 1.087745
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.087745, abs=1e-6)


def test_pointwise_loss_by_hand():
    scores, labels = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2  # 1.410038
    assert pointwise_loss(scores, labels).item() == pytest.approx(expected, abs=1e-6)


def test_pointwise_loss_weighs_thumbs_up_by_hand():
    # thumbs up at score 0: -log sigmoid(0) = ln 2, weighted 0.5; thumbs down at score 2: log(1 + e^2), weight 1
    loss = pointwise_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), positive_weight=0.5)
    assert loss.item() == pytest.approx((0.5 * math.log(2) + math.log(1 + math.e ** 2)) / 2, abs=1e-6)


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == pytest.approx(0.5)


def test_roc_auc_by_hand():
    scores, labels = torch.tensor([0.9, 0.4, 0.6, 0.1]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert math.isnan(roc_auc(scores, torch.ones(4)))


def test_shorter_baseline():
    assert shorter_baseline_accuracy(torch.tensor([3, 5, 4]), torch.tensor([4, 2, 4])) == pytest.approx(0.5)


def test_length_grouped_batches_are_exact_and_deterministic():
    lengths = [(i * 37) % 101 for i in range(100)]
    a = length_grouped_batches(lengths, 8, seed=1, epoch=0, group=4)
    assert a == length_grouped_batches(lengths, 8, seed=1, epoch=0, group=4)
    assert a != length_grouped_batches(lengths, 8, seed=1, epoch=1, group=4)
    flat = [i for batch in a for i in batch]
    assert len(flat) == len(set(flat)) == 96 and all(len(b) == 8 for b in a)
    # grouping keeps lengths inside a batch close: far less padding than random batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 40
