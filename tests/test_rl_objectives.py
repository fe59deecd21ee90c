"""RL numerics against values worked out by hand."""

import math

import pytest
import torch

from perlhf.rl.objectives import (AdaptiveKLController, FixedKLController, entropy_from_logprobs, gae, kl_per_token,
                                  masked_mean, policy_gradient_loss, ppo_policy_loss, rloo_advantages,
                                  sequence_returns, token_rewards, value_loss)


def close(tensor, expected):
    assert torch.allclose(torch.as_tensor(tensor, dtype=torch.float32), torch.tensor(expected), atol=1e-5), tensor


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    close(kl_per_token(logp, ref, "k1"), [0.5, -1.0])
    # k3 = (e^x - 1) - x with x = ref - logp = [-0.5, 1.0]
    close(kl_per_token(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1])
    close(kl_per_token(logp, ref, "k3"), [0.106531, 0.718282])
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.tensor([-0.3, -4.0])
    close(kl_per_token(logp, logp, "k1"), [0.0, 0.0])
    close(kl_per_token(logp, logp, "k3"), [0.0, 0.0])


def test_adaptive_kl_controller_by_hand():
    high = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    high.update(12.0, n_samples=256)  # error clipped to +0.2
    assert high.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    low = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    low.update(3.0, n_samples=256)  # error -0.5 clipped to -0.2
    assert low.coef == pytest.approx(0.099488)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.coef == 0.05
    restored = AdaptiveKLController(1.0, target=6.0)
    restored.load_state_dict(high.state_dict())
    assert restored.coef == high.coef


def test_sequence_returns_ignore_padding_and_penalise_missing_eos():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 0.0, 0.0]])  # the 9.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    close(sequence_returns(scores, kl, mask, 0.1), [0.9, 1.9])
    ended = torch.tensor([True, False])
    close(sequence_returns(scores, kl, mask, 0.1, ended, missing_eos_penalty=1.0), [0.9, 0.9])


def test_rloo_leave_one_out_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    close(rloo_advantages(returns, k=3), [-1.5, 0.0, 1.5, -15.0, -15.0, 30.0])
    with pytest.raises(ValueError):
        rloo_advantages(returns, k=1)


def test_token_rewards_put_score_on_last_real_token():
    rewards = token_rewards(torch.tensor([1.0]), torch.tensor([[0.2, 0.4, 0.6]]), torch.tensor([[1.0, 1.0, 0.0]]), 0.5)
    close(rewards, [[-0.1, 0.8, 0.0]])


def test_gae_by_hand():
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 0.5)
    # t=1: delta = 1 - 0.2 = 0.8; t=0: delta = 0 + 0.2 - 0.5 = -0.3, A0 = -0.3 + 0.5 * 0.8 = 0.1
    close(advantages, [[0.1, 0.8]])
    close(returns, [[0.6, 1.0]])


def test_gae_padding_does_not_leak():
    advantages, returns = gae(torch.tensor([[1.0, 5.0]]), torch.tensor([[0.5, 0.9]]), torch.tensor([[1.0, 0.0]]))
    close(advantages, [[0.5, 0.0]])
    close(returns, [[1.0, 0.0]])


def test_policy_gradient_loss_by_hand():
    loss = policy_gradient_loss(torch.tensor([[-1.0, -2.0, -7.0]]), torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(6.0)


def test_ppo_clipped_loss_by_hand():
    logp = torch.tensor([[math.log(1.5), 0.0]])
    old = torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, -1.0]])
    loss, clip_fraction = ppo_policy_loss(logp, old, advantages, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_value_loss_by_hand():
    mask = torch.ones(2)
    assert value_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), mask).item() == pytest.approx(0.5)
    clipped = value_loss(torch.tensor([2.5]), torch.tensor([3.0]), torch.ones(1), torch.tensor([2.0]), clip=0.2)
    assert clipped.item() == pytest.approx(0.5 * 0.64)


def test_entropy_and_masked_mean():
    close(entropy_from_logprobs(torch.log_softmax(torch.zeros(1, 4), dim=-1)), [math.log(4)])
    # a certain next token has zero entropy
    close(entropy_from_logprobs(torch.log_softmax(torch.tensor([[0.0, -1e4]]), dim=-1)), [0.0])
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(2.0)
