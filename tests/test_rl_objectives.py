"""RL numerics against values worked out by hand."""

import math

import pytest
import torch

from perlhf.rl.objectives import (AdaptiveKLController, FixedKLController, exact_kl, gae, kl_per_token, masked_mean,
                                  masked_whiten, missing_eos_penalized, policy_gradient_loss, ppo_policy_loss,
                                  rloo_advantages, sequence_returns, token_logprobs, token_rewards, value_loss)


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
    rewards = missing_eos_penalized(scores, torch.tensor([True, False]), penalty=1.0)
    close(rewards, [1.0, 1.0])
    close(sequence_returns(rewards, kl, mask, 0.1), [0.9, 0.9])


def test_ppo_token_rewards_see_the_missing_eos_penalty():
    """PPO's per-token rewards start from the penalised reward, so the penalty reaches its advantages."""
    rewards = missing_eos_penalized(torch.tensor([2.0, 2.0]), torch.tensor([True, False]), penalty=100.0)
    per_token = token_rewards(rewards, torch.zeros(2, 2), torch.ones(2, 2), 0.1)
    close(per_token, [[0.0, 2.0], [0.0, -98.0]])


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
    # with a given token count (data parallelism: global tokens / processes) the sum is divided by it instead
    loss, _ = ppo_policy_loss(logp, old, advantages, torch.ones(1, 2), clip=0.2, tokens=torch.tensor(4.0))
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 4)


def test_value_loss_by_hand():
    mask = torch.ones(2)
    assert value_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), mask).item() == pytest.approx(0.5)
    clipped = value_loss(torch.tensor([2.5]), torch.tensor([3.0]), torch.ones(1), torch.tensor([2.0]), clip=0.2)
    assert clipped.item() == pytest.approx(0.5 * 0.64)


def test_token_logprobs_at_a_temperature_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # at T=1: p = [1/4, 3/4]
    logp, entropy = token_logprobs(logits, torch.tensor([[1]]), 1.0, with_entropy=True)
    close(logp, [[math.log(0.75)]])
    close(entropy, [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    # at T=0.5 the logits double: p = [1/10, 9/10]
    logp, entropy = token_logprobs(logits, torch.tensor([[0]]), 0.5, with_entropy=True)
    close(logp, [[math.log(0.1)]])
    close(entropy, [[-(0.1 * math.log(0.1) + 0.9 * math.log(0.9))]])
    # uniform over 4 has entropy log 4; a certain token has zero
    close(token_logprobs(torch.zeros(1, 1, 4), torch.tensor([[2]]), with_entropy=True)[1], [[math.log(4)]])
    close(token_logprobs(torch.tensor([[[0.0, -1e4]]]), torch.tensor([[0]]), with_entropy=True)[1], [[0.0]])


def test_token_logprobs_in_chunks_equal_one_pass():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    whole = token_logprobs(logits, tokens, 0.7, with_entropy=True, chunk_elements=10**9)
    chunked = token_logprobs(logits, tokens, 0.7, with_entropy=True, chunk_elements=11 * 2)  # 2 positions a chunk
    reference = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(whole[0], reference, atol=1e-6) and torch.allclose(chunked[0], reference, atol=1e-6)
    assert torch.allclose(whole[1], chunked[1], atol=1e-6)


def test_masked_whitening_by_hand():
    values, mask = torch.tensor([1.0, 2.0, 4.0, 9.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    # by hand: mean 7/3, variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3 = 14/9
    close(masked_whiten(values, mask), [(1 - 7 / 3) / math.sqrt(14 / 9), (2 - 7 / 3) / math.sqrt(14 / 9),
                                        (4 - 7 / 3) / math.sqrt(14 / 9), 0.0])


def test_exact_kl_by_hand():
    # p = [1/4, 3/4], q = [1/2, 1/2] at T=1: KL = 1/4 log(1/2) + 3/4 log(3/2)
    p, q = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)
    close(exact_kl(p, q), [0.25 * math.log(0.5) + 0.75 * math.log(1.5)])
    # at T=0.5: p = [1/10, 9/10], q still uniform
    close(exact_kl(p, q, 0.5), [0.1 * math.log(0.2) + 0.9 * math.log(1.8)])
    close(exact_kl(p, p), [0.0])


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(2.0)
