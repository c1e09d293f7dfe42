"""A routed block around transformers' grouped_mm experts in each layout its models declare (the torch backend's
inference and training tests of the MoE folds share it)."""

from __future__ import annotations

import torch
import transformers


def experts_block(form: str, E: int = 4, D: int = 32, F: int = 24) -> torch.nn.Module:
    """A routed block around transformers' grouped_mm experts in the layouts its models declare with
    `use_experts_implementation`: NemotronH's ungated relu^2, Aria's weights stored [E, in, out] (GELU gate),
    GPT-OSS's interleaved gate/up with clamps (without and with its biases), its alpha and limit module attributes
    (Dynamo passes them as 0-d tensors under dynamic shapes; `alpha` a parameter: "interleaved+learned")."""
    from transformers.integrations.moe import use_experts_implementation

    gated, transposed, bias = form != "relu2", form != "relu2", form == "interleaved+bias"

    @use_experts_implementation(is_transposed=transposed, has_bias=bias, has_gate=gated,
                                is_concatenated=not form.startswith("interleaved"))
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            up = (E, D, 2 * F) if transposed else (E, F, D)
            self.register_parameter("gate_up_proj" if gated else "up_proj", torch.nn.Parameter(torch.randn(up) / 4))
            self.down_proj = torch.nn.Parameter(torch.randn((E, F, D) if transposed else (E, D, F)) / 4)
            if bias:
                self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(E, 2 * F) / 4)
                self.down_proj_bias = torch.nn.Parameter(torch.randn(E, D) / 4)
            self.act_fn = (lambda t: torch.relu(t) ** 2) if form == "relu2" else torch.nn.functional.gelu
            self.alpha = torch.nn.Parameter(torch.tensor(1.702)) if form == "interleaved+learned" else 1.702
            self.limit = 1.5

        if form.startswith("interleaved"):
            def _apply_gate(self, gate_up):
                gate = gate_up[..., ::2].clamp(max=self.limit)
                up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
                return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.PretrainedConfig()
            config._experts_implementation = "grouped_mm"
            self.router, self.experts = torch.nn.Linear(D, E, bias=False), Experts(config)

        def forward(self, x):
            w, idx = torch.topk(torch.softmax(self.router(x), -1), 2, dim=-1)
            return self.experts(x, idx, w / w.sum(-1, keepdim=True))

    return Block().eval()
