"""Your own network for PMGD: XOR with a 2-3-1 tanh/sigmoid torch module.

    pmgd train --model examples/xor_task.py:task --perturbation rcm --seeds 20

``task()`` returns the module and its data; every parameter of the module becomes part of
the flat θ that the parameter nodes perturb and update (docs/bring-your-own.md).
"""

import torch


def task():
    x = torch.tensor([[-1., -1.], [-1., 1.], [1., -1.], [1., 1.]])
    y = torch.tensor([[0.], [1.], [1.], [0.]])
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(),
                              torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    return dict(model=net, train=(x, y), loss="mse")
