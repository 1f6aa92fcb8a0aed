"""Two gloo processes under DistributedDataParallel give the single-process gradients."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rtdetr_fast import RTDETR
from rtdetr_fast.engine import distributed as D


def _model(num_denoising=0):
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=3, hidden_dim=64, dim_feedforward=128,
                             num_queries=20, num_denoising=num_denoising).train()
    # batch statistics differ between a half and a whole batch; the comparison is about the
    # loss and gradient reduction, so the norms use their running statistics
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 64, 64, generator=g)
    targets = [
        {"boxes": torch.tensor([[4.0, 4, 30, 40]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[10.0, 12, 50, 60], [0, 0, 20, 20]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[30.0, 30, 63, 63]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, empty):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    device = D.init_distributed("cpu")
    assert D.get_world_size() == world and D.get_rank() == rank
    model = _model(num_denoising=20 if empty else 0)
    ddp = D.wrap_model(model, device)
    images, targets = _batch()
    if empty:
        # rank 1's batch has no boxes at all; rank 0's has some
        targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2 \
            if rank == 1 else targets[:2]
        images = images[:2]
    else:
        images, targets = images[2 * rank: 2 * rank + 2], targets[2 * rank: 2 * rank + 2]
    out = ddp(images, targets)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    D.cleanup()


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), False), nprocs=2,
                       join=True, start_method="spawn")
    model = _model()
    images, targets = _batch()
    model(images, targets)["loss"].backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    g0 = torch.load(tmp_path / "rank0.pt")
    g1 = torch.load(tmp_path / "rank1.pt")
    assert g0.keys() == single.keys()
    for n in single:
        torch.testing.assert_close(g0[n], g1[n])  # DDP averaged them
        torch.testing.assert_close(g0[n], single[n], rtol=1e-4, atol=1e-6)


def test_ddp_rank_with_only_empty_targets_does_not_hang(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), True), nprocs=2,
                       join=True, start_method="spawn")
    g0 = torch.load(tmp_path / "rank0.pt")
    g1 = torch.load(tmp_path / "rank1.pt")
    assert "decoder.denoising_class_embed.weight" in g1
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n])
