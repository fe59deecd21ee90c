"""The numerics of RL from preferences, as pure functions of tensors.

Shapes: B sequences, T response tokens. `mask` is 1 on real response tokens (up to and including EOS) and 0 on
padding, so padding never reaches a loss, an advantage or the KL. Each function is unit-tested against values
worked out by hand (tests/test_rl_objectives.py).
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, total=None) -> torch.Tensor:
    """(values - mean) / std over the masked entries. `total` sums a tensor over every process (default: this
    one alone), so with data parallelism the mean and variance are those of the global batch."""
    total = total or (lambda t: t)
    count = total(mask.sum()).clamp(min=1)
    mean = total(masked_sum(values, mask)) / count
    var = total(masked_sum((values - mean) ** 2, mask)) / count
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


# --- Log-probabilities of the distribution that sampled ---------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, chunk_elements: int = 2**24):
    """log softmax(logits / T) at `tokens` [...], and optionally the entropy of softmax(logits / T) at each position.

    Sampling at temperature T draws from softmax(logits / T), so these are the log-probs of the sampled tokens.
    Computed in fp32 as logit / T - logsumexp(logits / T).
    """
    normaliser, entropy = log_normaliser(logits, temperature, with_entropy, chunk_elements)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    logp = (picked if temperature == 1.0 else picked / temperature) - normaliser
    return (logp, entropy) if with_entropy else logp


def log_normaliser(logits: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_elements: int = 2**24) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logsumexp(logits / T) at each position [...] in fp32, and optionally the entropy of softmax(logits / T) (a
    metric: no graph). Without a graph (reference passes, metrics) it runs a chunk of positions at a time, so no
    fp32 copy of the whole [..., V] logits is made."""
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)

    def rows(part: torch.Tensor):
        scaled = part.float() if temperature == 1.0 else part.float() / temperature  # no fp32 copy at T = 1
        normaliser = torch.logsumexp(scaled, dim=-1)
        if not with_entropy:
            return normaliser, None
        with torch.no_grad():
            probs = torch.softmax(scaled, dim=-1)
            return normaliser, normaliser - (probs * scaled).sum(-1)

    if torch.is_grad_enabled() and logits.requires_grad:
        pieces = [rows(flat)]
    else:
        step = max(1, chunk_elements // vocab)
        pieces = [rows(flat[i:i + step]) for i in range(0, flat.size(0), step)]
    normaliser = torch.cat([p[0] for p in pieces]).view(logits.shape[:-1])
    entropy = torch.cat([p[1] for p in pieces]).view(logits.shape[:-1]) if with_entropy else None
    return normaliser, entropy


def exact_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float = 1.0,
             chunk_elements: int = 2**24) -> torch.Tensor:
    """KL(p || q) over the whole vocabulary at each position [...], p = softmax(policy_logits / T), q likewise.

    The exact KL of the next-token distributions given the prefix, rather than a one-sample estimate: summed
    over a response sampled from p it is an unbiased, lower-variance estimate of the sequence KL. Chunked like
    `token_logprobs`; no graph.
    """
    vocab = policy_logits.size(-1)
    p_flat, q_flat = policy_logits.reshape(-1, vocab), reference_logits.reshape(-1, vocab)
    step = max(1, chunk_elements // vocab)
    pieces = []
    with torch.no_grad():
        for i in range(0, p_flat.size(0), step):
            logp = torch.log_softmax(p_flat[i:i + step].float() / temperature, dim=-1)
            logq = torch.log_softmax(q_flat[i:i + step].float() / temperature, dim=-1)
            pieces.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(pieces).view(policy_logits.shape[:-1])


# --- KL to the reference, on the tokens the policy sampled ------------------------------------------------------


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q: unbiased, can be negative per token.
    k3 = (q/p - 1) - log(q/p): unbiased and always >= 0, lower variance (Schulman's approximations).
    """
    log_ratio = ref_logp - logp  # log q/p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


class FixedKLController:
    def __init__(self, coef: float):
        self.coef = coef

    def update(self, observed_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move the coefficient so the observed KL approaches the target.

    coef <- coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon)
    """

    def __init__(self, coef: float, target: float, horizon: int = 10_000):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, observed_kl: float, n_samples: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_samples / self.horizon


# --- Rewards and advantages --------------------------------------------------------------------------------------


def missing_eos_penalized(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """The reward of each sequence: its reward-model score, less `penalty` where the response never ended.
    Every algorithm starts from this (REINFORCE/RLOO as the sequence's reward, PPO on its last token)."""
    return scores - penalty * (~ended).float()


def sequence_returns(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-sequence return: reward - kl_coef * the KL summed over the response."""
    return rewards - kl_coef * masked_sum(kl, mask, dim=1)


def baseline_advantages(returns: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a learned baseline: A = R - V(prompt)."""
    return returns - baseline


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out: each of the k samples of a prompt is compared with the mean of the other k-1.

    `returns` is ordered prompt-major: [p0s0, p0s1, ..., p0s(k-1), p1s0, ...].
    """
    if k < 2:
        raise ValueError("RLOO needs k >= 2 samples per prompt")
    grouped = returns.view(-1, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).view(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards: -kl_coef * KL on every token, plus the score on the last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns = advantages + values).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero past the end.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


# --- Losses ------------------------------------------------------------------------------------------------------


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE / RLOO: -A * log pi(y|x), with log pi(y|x) the sum over the response tokens; mean over sequences."""
    return -(advantages.detach() * masked_sum(logp, mask, dim=1)).mean()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate, token-level: the sum over tokens divided by `tokens` (default: the masked count here;
    with data parallelism, the global count / processes, so averaging over processes gives the global mean).
    Returns (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    tokens = mask.sum().clamp(min=1) if tokens is None else tokens
    loss = masked_sum(torch.maximum(unclipped, clipped), mask) / tokens
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, old_values: torch.Tensor | None = None,
               clip: float | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * squared error, optionally clipped around the values at rollout time (PPO); normalised as above."""
    loss = (values - returns) ** 2
    if old_values is not None and clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    tokens = mask.sum().clamp(min=1) if tokens is None else tokens
    return 0.5 * masked_sum(loss, mask) / tokens

