"""perlhf.parallel in two real gloo processes: what every process must agree on."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, init_file: str, results):
    from perlhf import parallel
    from perlhf.rl.objectives import masked_whiten

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = {"world": parallel.world_size(), "rank": parallel.rank()}
        # each process holds half of a batch of 4 (one masked entry); whitening must equal the whole batch's
        values = torch.tensor([[1.0, 2.0], [4.0, 9.0]][rank])
        mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]][rank])
        out["whitened"] = masked_whiten(values, mask, total=parallel.all_sum).tolist()
        out["global_mean"] = parallel.global_mean(torch.tensor([[1.0, 2.0], [6.0]][rank]))  # unequal counts
        out["any"] = parallel.any_process(rank == 1)
        # gradients averaged in buckets; a parameter without a gradient on one process counts as zero
        torch.manual_seed(rank)  # different weights on purpose: broadcast must make them rank 0's
        params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
        parallel.broadcast_parameters(params)
        out["weights"] = [p.detach().clone() for p in params]
        params[0].grad = torch.full((3,), float(rank + 1))
        if rank == 0:
            params[1].grad = torch.ones(2, 2)
        parallel.average_gradients(params)
        out["grads"] = [p.grad.clone() for p in params]
        out["fingerprint"] = parallel.check_identical(params, "test weights")
        # 7 examples over 2 processes in batches of 1: shares of 4 and 3; sharded, the 3 get a 4th to discard
        share = list(range(rank, 7, 2))
        out["lockstep"] = parallel.lockstep_batches(share, 1, 7, lockstep=True)
        out["plain"] = parallel.lockstep_batches(share, 1, 7, lockstep=False)
        out["lockstep_by_3"] = parallel.lockstep_batches(share, 3, 7, lockstep=True)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_processes_agree(tmp_path):
    from perlhf.rl.objectives import masked_whiten

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    a, b = results[0], results[1]
    assert (a["world"], a["rank"], b["world"], b["rank"]) == (2, 0, 2, 1)  # two processes really ran
    whole = masked_whiten(torch.tensor([1.0, 2.0, 4.0, 9.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])).tolist()
    assert torch.allclose(torch.tensor(a["whitened"] + b["whitened"]), torch.tensor(whole), atol=1e-6)
    assert a["global_mean"] == b["global_mean"] == 3.0
    assert a["any"] and b["any"]
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert torch.equal(a["grads"][0], torch.full((3,), 1.5)) and torch.equal(b["grads"][0], torch.full((3,), 1.5))
    assert torch.equal(a["grads"][1], torch.full((2, 2), 0.5)) and torch.equal(b["grads"][1], torch.full((2, 2), 0.5))
    assert a["fingerprint"] == b["fingerprint"]
    assert a["lockstep"] == a["plain"] == [([0], True), ([2], True), ([4], True), ([6], True)]
    assert b["plain"] == [([1], True), ([3], True), ([5], True)]
    assert b["lockstep"] == b["plain"] + [([0], False)]  # as many forwards as process 0, the extra one discarded
    assert a["lockstep_by_3"] == [([0, 2, 4], True), ([6], True)] and b["lockstep_by_3"] == [([1, 3, 5], True), ([0], False)]


def test_fsdp_with_full_tuning_or_a_quantized_base_is_refused_with_the_way_out():
    import pytest

    from perlhf.config import ConfigError
    from perlhf.reward import RewardConfig
    from perlhf.rl.trainer import RLConfig

    with pytest.raises(ConfigError, match="--fsdp.*--full.*drop --fsdp"):
        RewardConfig(data="pairs.jsonl", full=True, fsdp=True)
    with pytest.raises(ConfigError, match="--fsdp.*--quantize"):
        RLConfig(reward_model="rm", prompts="p.txt", fsdp=True, quantize="4bit")
