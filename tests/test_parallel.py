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
