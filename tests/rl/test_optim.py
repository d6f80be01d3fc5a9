import pytest
import torch

from rlhf.rl.optim import grad_norm, make_scheduler, weight_decay_groups


def test_grad_norm_reports_the_norm_before_clipping_and_clips():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    assert float(grad_norm([param], 0.0)) == pytest.approx(5.0)
    assert param.grad.tolist() == [3.0, 4.0]
    assert float(grad_norm([param], 1.0)) == pytest.approx(5.0)
    assert float(param.grad.norm()) == pytest.approx(1.0, abs=1e-5)


def test_grad_norm_leaves_out_parameters_without_gradients():
    with_grad, without = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with_grad.grad = torch.tensor([3.0, 4.0])
    assert float(grad_norm([with_grad, without], 0.0)) == pytest.approx(5.0)
    assert float(grad_norm([without], 1.0)) == 0.0


def test_weight_decay_groups_decay_matrices_only_and_skip_frozen_parameters():
    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    decay, no_decay = weight_decay_groups([*layer.parameters(), frozen], 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 3])] and decay["weight_decay"] == 0.1
    assert [p.shape for p in no_decay["params"]] == [torch.Size([2])] and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("kind", "factors"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0]),
        ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]),
    ],
)
def test_schedule_warms_up_linearly_then_decays_to_zero_at_total_steps(kind, factors):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=5, kind=kind, warmup_steps=2)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(factors)
