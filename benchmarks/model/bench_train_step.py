"""One training step of rtdetr_r18vd at 640x640 (forward with the loss, backward, AdamW step),
batch 2, with the kernels (backend auto) and with the reference backend.

Run: python -m pytest benchmarks/model/bench_train_step.py --benchmark-columns=min,median
"""
import pytest
import torch

from rtdetr_fast import RTDETR, ops
from rtdetr_fast.engine.train import TrainConfig, Trainer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_train_step_cpu_r18(benchmark, tmp_path, device, backend):
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd")
    trainer = Trainer(model, [], TrainConfig(output_dir=str(tmp_path), progress=False,
                                             warmup_steps=1), device=device)
    model.train()
    images = torch.rand(2, 3, 640, 640)
    targets = [{"boxes": torch.tensor([[50.0, 60, 300, 400], [320, 100, 600, 380]]),
                "labels": torch.tensor([1, 17])},
               {"boxes": torch.tensor([[10.0, 10, 200, 200]]), "labels": torch.tensor([3])}]
    benchmark.extra_info.update(preset="rtdetr_r18vd", shape="2x3x640x640", backend=backend,
                                device=device, dtype="float32", torch=torch.__version__)

    def step():
        with ops.backend(backend):
            stats = trainer.train_step(images, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        return stats

    stats = benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    assert torch.isfinite(torch.tensor(stats["loss"]))
