"""The phase profile's step (benchmarks/bench_pretrain_phases.py) is the training step:
cut at the student's part boundaries and differentiated part by part, it gives the
loss and gradients of one whole forward and backward, in both executions."""

import contextlib
import copy

import pytest
import torch

from anatomask_fast import patch_recon_loss
from anatomask_fast.models.anatomask import reference_execution
from benchmarks.bench_pretrain_phases import (
    PHASES,
    Meter,
    _union_ns,
    batch_loader,
    executions,
    phased_step,
)

SIZE = dict(model="tiny", B=2, spatial=(32, 32, 32))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_phased_step_gives_the_loss_and_gradients_of_one_backward(backend):
    (run,) = executions(SIZE, "cpu", backend)
    run.student.double()
    run.teacher.double()
    whole = copy.deepcopy(run.student)
    batches = ({"image": b["image"].double()} for b in batch_loader(SIZE, workers=0))
    x = next(batch_loader(SIZE, workers=0))["image"].double()  # the same first batch
    grads = {}
    # The gradients as the optimizer gets them (and no update).
    run.optimizer.step = lambda: grads.update(
        {n: p.grad.clone() for n, p in run.student.named_parameters() if p.grad is not None}
    )
    meter = Meter("cpu", memory=False)
    loss, active = phased_step(run, batches, meter, "cpu", seed=3)
    assert list(meter.records) == list(PHASES)
    assert all(r["seconds"] >= 0 for r in meter.records.values())
    execution = reference_execution(whole) if backend == "reference" else contextlib.nullcontext()
    with execution:
        expected, _ = patch_recon_loss(whole(x, active), x, active, whole.patch_size)
        expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    reference = {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}
    assert grads and set(grads) == set(reference)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-10, atol=1e-14, msg=name)


def test_union_of_intervals():
    assert _union_ns([(0, 10), (5, 8), (12, 20), (19, 25)]) == 23
    assert _union_ns([]) == 0
