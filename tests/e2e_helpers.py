"""Builders shared by the E2E-QP tests (and the torchrun worker in test_e2e_ddp.py)."""
import torch


def tiny_packed_llama(train_zeros=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from effqat_plugin.kernels import PackedQuantLinear
    from effqat_plugin.layout import set_submodule
    from effqat_plugin.quantizer import rtn_quantize

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).float()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers"):
            qw = rtn_quantize(mod.weight.data, 2, 16, torch.float32)
            set_submodule(model, name, PackedQuantLinear.from_quantized_weight(qw, train_zeros=train_zeros))
    return model
