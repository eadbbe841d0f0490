"""``replaced_forwards`` puts back exactly what each layer had: an instance ``forward`` (a hook's) or
none, also when the pass raises."""
import pytest
import torch
import torch.nn as nn

from effqat_plugin.layer_forward import replaced_forwards


def test_restores_instance_and_class_forwards_even_on_error():
    layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
    hooked = lambda x: x * 7  # noqa: E731 - stands for accelerate's instance forward
    layers[1].forward = hooked
    x = torch.ones(1, 2)
    want0 = layers[0](x)

    with replaced_forwards(layers, lambda i: (lambda h: h + i)):
        assert torch.equal(layers[0](x), x) and torch.equal(layers[1](x), x + 1)
    assert "forward" not in layers[0].__dict__ and torch.equal(layers[0](x), want0)
    assert layers[1].forward is hooked

    with pytest.raises(RuntimeError):
        with replaced_forwards(layers, lambda i: (lambda h: h)):
            raise RuntimeError("stop")
    assert "forward" not in layers[0].__dict__ and layers[1].forward is hooked
