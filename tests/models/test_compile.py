"""Every arch traces whole under ``torch.compile(fullgraph=True)``: no graph break in the forward of a
window with a carried state and document resets, and the same logits, state and gradients as eager.

The state a window returns has the layout of the empty state (contiguous), so the next window
runs the same graph: carrying a state never recompiles.

Dynamo's tracing is what breaks graphs, so the test compiles with the ``eager`` backend (no code
generation: seconds, no compiler needed); ``train.compile`` uses the default backend on the same graph.
"""

from __future__ import annotations

import pytest
import torch

from zarvan_dist import ARCHS, build_model


@pytest.mark.parametrize("arch", ARCHS)
def test_the_window_forward_compiles_without_a_graph_break(arch, tiny_config, one_thread):
    torch._dynamo.reset()
    model = build_model(tiny_config(arch)).train()
    ids = torch.randint(4, 61, (2, 12))
    ids[:, 0] = 1
    ids[1, 7] = 1  # a document starts inside the window
    first = model(ids[:, :5], model.init_state(2), ids[:, :5] == 1).state  # a carried state, not an empty one
    state = type(first)({k: v.detach() for k, v in first.items()})
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # a graph break raises here
    torch.manual_seed(1)
    got = compiled(ids, state, ids == 1)
    torch.manual_seed(1)
    want = model(ids, state, ids == 1)
    torch.testing.assert_close(got.logits, want.logits)
    for key in want.state.keys():
        torch.testing.assert_close(got.state[key], want.state[key])
    grads = [torch.autograd.grad(out.logits.square().mean(), list(model.parameters()), allow_unused=True)
             for out in (got, want)]
    for g, w in zip(*grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "slam"])
def test_a_carried_state_does_not_recompile(arch, tiny_config, one_thread):
    torch._dynamo.reset()
    model = build_model(tiny_config(arch)).train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    state = model.init_state(2)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a guard failing on the state raises
        for step in range(3):
            ids = torch.randint(4, 61, (2, 12))
            ids[:, 0] = step == 0
            state = compiled(ids, state, ids == 1).state.detach()
