"""Tiny randomly initialised transformers models (built from config objects, no downloads) through
torch.compile(backend="sparsa"), and the opt-in swap of their MoE blocks for Sparsa-compiled ones."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers_experts import experts_block  # noqa: E402

from sparsa.backends.cpu import available as cpu_available  # noqa: E402
from sparsa.ir import print_module  # noqa: E402
from sparsa.runtime.torch_backend import SparsaBackend  # noqa: E402
from sparsa.runtime.torch_moe import SparsaMoEBlock, swap_moe_blocks  # noqa: E402

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=64, **SMALL))


def mistral():
    """Sliding-window attention: transformers builds the window mask from aranges, and repeats the key/value
    heads for SDPA (repeat_kv) since a mask is passed."""
    return transformers.MistralForCausalLM(transformers.MistralConfig(intermediate_size=64, sliding_window=8, **SMALL))


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                                                      num_experts_per_tok=2, **SMALL))


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        head_dim=8, **SMALL))


def qwen2_moe():
    """Shared experts beside the routed ones (a sigmoid-gated dense MLP)."""
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8,
        num_experts_per_tok=2, **SMALL))


def deepseek_v3():
    """Group-limited routing (sigmoid scores, 4 groups, 2 kept), a shared expert, a first dense layer, and
    multi-head latent attention (q assembled in place from its rotary and plain halves)."""
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **{**SMALL, "num_key_value_heads": 4}))


def run(model, ids, backend=None):
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        backend = backend or SparsaBackend()
        compiled = torch.compile(model, backend=backend)
        got = compiled(ids).logits
        again = compiled(ids).logits
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-4 * scale and float((again - want).abs().max()) <= 1e-4 * scale
    return backend


def test_llama_compiles_whole_with_attention_recognized():
    torch.manual_seed(0)
    backend = run(llama(), torch.randint(0, 64, (2, 13)))
    assert not backend.fallbacks and backend.stats["partitions compiled"] == 1
    assert "attn.attention" in print_module(backend.partitions[0].module)
    assert backend.stats["graphs"] == 1  # the second call with the same shapes did not recompile


def test_llama4_rotary_in_complex_numbers_and_dense_routing_compile_whole():
    """Llama 4: rotary embeddings in complex numbers, a router scattering its top-k logits into -inf, the tokens
    repeated once per expert; nothing is left to PyTorch."""
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(intermediate_size=64, intermediate_size_mlp=64, num_local_experts=4,
                                           num_experts_per_tok=1, head_dim=8, **SMALL)
    backend = run(transformers.Llama4ForCausalLM(config), torch.randint(0, 64, (2, 13)))
    assert not backend.fallbacks and backend.stats["partitions compiled"] == 1


def test_mistral_window_mask_is_analysed_and_repeated_heads_read_once():
    torch.manual_seed(0)
    backend = run(mistral(), torch.randint(0, 64, (1, 40)))
    assert not backend.fallbacks and backend.stats["partitions compiled"] == 1
    attention = [op for op in backend.partitions[0].func.walk() if op.NAME == "attn.attention"]
    assert len(attention) == 2  # one per layer, on the 2 key/value heads, not repeat_kv's 4 copies of them
    assert all(op.q.type.shape[1] == 4 and op.k.type.shape[1] == op.v.type.shape[1] == 2 for op in attention)
    mask = print_module(backend.partitions[0].module).split("attn.attention", 1)[1].split("func.yield", 1)[0]
    assert "tensor.gather" not in mask and "{value = 8}" in mask  # the window, symbolic: q - 8 < k <= q


def test_generate_with_a_sliding_window_cache_decodes_in_sparsa():
    """generate() with the model's forward compiled: the prefill and the decode steps (a token against the cache,
    dynamic lengths) compile whole, tokens as eager's. The window's offset into the cache (`Max(0, s - 7)`, which
    the dim language cannot write) and the cache's length (which no input's shape binds) come in as 0-d values."""
    torch.manual_seed(0)
    model = mistral().eval()
    ids = torch.randint(0, 64, (1, 12))
    backend = SparsaBackend()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        model.forward = torch.compile(model.forward, backend=backend)
        got = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert not backend.fallbacks and backend.stats["partitions compiled"] >= 2
    assert any(part.scalar_pos for part in backend.partitions)


@pytest.mark.parametrize("make", [mixtral, qwen3_moe, qwen2_moe])
def test_grouped_mm_moe_blocks_are_recognized(make):
    """transformers' default experts (sort, histc, its grouped_mm_fallback op, an inverse permutation) are
    folded into one MoE call and imported as moe.moe: the model compiles as one partition, with the router,
    dispatch, grouped matmuls and combine in its IR, and nothing falls back."""
    torch.manual_seed(0)
    backend = run(make(), torch.randint(0, 64, (2, 9)))
    assert backend.stats["moe blocks recognized"] == 2 and not backend.fallbacks
    assert backend.stats["partitions compiled"] == 1
    ir = print_module(backend.partitions[0].module)
    for op in ("moe.route", "moe.dispatch", "moe.grouped_matmul", "moe.grouped_matmul_combine", "attn.attention"):
        assert op in ir


def test_deepseek_v3_group_routing_and_latent_attention_in_one_partition():
    """The router's scatter/masked_fill/gather, the attention's in-place assembly and its causal mask all
    import: one partition, nothing falls back (the reference target: the cpu target's kernels for these ops
    are checked in test_torch_backend)."""
    torch.manual_seed(0)
    backend = run(deepseek_v3(), torch.randint(0, 64, (2, 9)), SparsaBackend({"target": "reference"}))
    assert backend.stats["moe blocks recognized"] == 1 and not backend.fallbacks
    assert backend.stats["partitions compiled"] == 1


@pytest.mark.parametrize("make", [llama, deepseek_v3, qwen2_moe])
def test_models_compile_whole_under_dynamic_true(make):
    """dynamic=True: float attributes come in as 0-d float64 inputs cast by prims.convert_element_type, and
    DeepSeek's view of [tokens, experts] as [-1, groups, experts per group] keeps its symbolic token count;
    nothing falls back, and a new length reuses the graphs."""
    torch.manual_seed(0)
    model = make().eval()
    backend = SparsaBackend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    graphs = []
    with torch.no_grad():
        for S in (7, 12):
            ids = torch.randint(0, 64, (1, S))
            want, got = model(ids).logits, compiled(ids).logits
            assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
            graphs.append(backend.stats["graphs"])
    assert graphs[0] == graphs[1] and not backend.fallbacks
    assert backend.stats["partitions compiled"] >= 1 and not any("not compiled" in k for k in backend.stats)


def longformer():
    return transformers.LongformerModel(transformers.LongformerConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        attention_window=[8], max_position_embeddings=300))


def mamba():
    return transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=4, use_mambapy=False))


def jamba():
    return transformers.JambaForCausalLM(transformers.JambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
        use_mamba_kernels=False))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


@pytest.mark.parametrize("make", [longformer, mamba, jamba])
def test_models_at_new_shapes_match_eager(make):
    """A second batch and length (Dynamo recompiles with symbolic sizes): the results match eager to float32
    rounding. Longformer's chunking reads slices through as_strided (they stay PyTorch's views; compact
    copies from a partition differed by 3e-4); Mamba's and Jamba's sizes that Dynamo's guards make equal
    (`2*((s-1)//2)+2` and `s`) are one size in the IR, and every size binds from the inputs."""
    torch.manual_seed(0)
    model = make().eval()
    backend = SparsaBackend({"target": "cpu" if cpu_available() else "reference"})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for shape in ((1, 16), (2, 24)):
            ids = torch.randint(0, 64, shape)
            want, got = model(ids), compiled(ids)
            key = "logits" if hasattr(want, "logits") else "last_hidden_state"
            want, got = getattr(want, key), getattr(got, key)
            assert float((got - want).abs().max()) <= 2e-6 * max(1.0, float(want.abs().max())), shape
    assert backend.stats["partitions compiled"] >= 2
    assert not [k for k in backend.stats if "broadcast" in k or "not bound" in k], dict(backend.stats)


def test_gpt2_compiled_dynamic_runs_whole_in_sparsa():
    """torch.compile(dynamic=True): its attention's scale, a float64 true_divide of 0-d tensors, had stayed in
    PyTorch; every length matches eager with nothing left to PyTorch."""
    torch.manual_seed(0)
    model = gpt2().eval()
    backend = SparsaBackend({"target": "cpu" if cpu_available() else "reference"})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for shape in ((2, 12), (1, 19)):
            ids = torch.randint(0, 64, shape)
            assert float((compiled(ids).logits - model(ids).logits).abs().max()) <= 1e-5, shape
    assert not backend.fallbacks and backend.stats["partitions compiled"] >= 1, dict(backend.fallbacks)


def test_mamba_associative_scan_runs_as_one_scan():
    """transformers' Mamba compiled writes its recurrence as torch's generic associative scan (log2(L) levels of
    slices, combines and interleavings; 21 steps: odd lengths pad); each layer's is folded into one scan, made in
    its read-out's frame (its transpose) and fused with its producers and read-out (`h @ C[..., None]` as a
    product and a sum)."""
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4))
    backend = run(model, torch.randint(0, 64, (1, 21)))
    assert backend.stats["parallel scans recognized"] == 2 and not backend.fallbacks
    ops = [op for part in backend.partitions for op in part.func.walk()]
    assert [op.NAME for op in ops].count("scan.fused") == 2 and "scan.scan" not in [op.NAME for op in ops]
    # no [B, D, L, N] level of the parallel scan is left (the only concatenations pad the convolution's input)
    assert not [op for op in ops if op.NAME == "tensor.concat" and op.results[0].type.rank == 4]


def test_mixtral_on_the_triton_target():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU: Triton's interpreter
    backend = run(mixtral().to(device), torch.randint(0, 64, (1, 9), device=device),
                  backend=SparsaBackend({"target": "triton"}))
    assert backend.stats["moe blocks recognized"] == 2 and not backend.fallbacks
    assert all(p.target == "triton" for p in backend.partitions)


@pytest.mark.parametrize("make", [mixtral, qwen3_moe])
def test_swapped_moe_blocks_match_eager(make):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
    names = swap_moe_blocks(model)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.get_submodule(n), SparsaMoEBlock) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)
    backend = run(model, ids)  # the rest of the model through the backend; the blocks run as Sparsa calls
    assert not backend.fallbacks
    src = model.get_submodule(names[0]).source(torch.float32)
    assert "moe(x, idx, w)" in src and "silu(h @ w_gate_up[e][:" in src and "param" not in src
    if cpu_available():  # float32 on CPU: the swapped blocks run natively
        assert {key[0] for key in model.get_submodule(names[0])._models} == {"cpu"}


def test_swapped_blocks_keep_the_parameters_names_and_read_them_after_a_load():
    """The swap keeps the block's parameters under their names (the original checkpoint loads), and weights
    loaded or updated afterwards are used (they were read once, at the first call, and renamed moe.block.*)."""
    torch.manual_seed(0)
    model = mixtral().eval()
    ids = torch.randint(0, 64, (2, 9))
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    swap_moe_blocks(model)
    assert set(model.state_dict()) == set(checkpoint)
    with torch.no_grad():
        first = model(ids).logits
        for name, p in model.named_parameters():  # new weights, loaded the usual way
            if ".mlp.experts." in name:
                p.mul_(1.5)
        scaled = model(ids).logits
        model.load_state_dict(checkpoint)  # and back: the original checkpoint loads into the swapped model
        again = model(ids).logits
    assert not torch.allclose(scaled, first)
    torch.testing.assert_close(again, first)
    fresh = mixtral().eval()
    fresh.load_state_dict(checkpoint)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if ".mlp.experts." in name:
                p.mul_(1.5)
        torch.testing.assert_close(scaled, fresh(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("freezing", [False, True])
def test_swapped_blocks_see_writes_through_data(freezing):
    """Without freezing the parameters are the compiled block's inputs: a write through `.data` (no new
    version) is seen at the next call. With freezing they are loaded as constants: such a write is seen after
    refresh(), an in-place update with a new version at once."""
    torch.manual_seed(0)
    model = mixtral().eval()
    ids = torch.randint(0, 64, (2, 9))
    reference = mixtral().eval()
    reference.load_state_dict(model.state_dict())
    names = swap_moe_blocks(model, freezing=freezing)
    block = model.get_submodule(names[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        router = torch.randn(4, 32)
        for m in (model, reference):
            m.get_submodule(names[0]).experts.down_proj.data.mul_(-2.0)
            m.get_submodule(names[0]).gate.weight.data.copy_(router)
        if freezing:
            assert not torch.allclose(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
            block.refresh()
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        for m in (model, reference):
            m.get_submodule(names[0]).experts.gate_up_proj.mul_(0.5)  # a new version
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert ("param w_gate_up" in block.source(torch.float32)) == freezing


def test_swapped_block_on_the_triton_target():
    torch.manual_seed(0)
    model = mixtral().eval()
    ids = torch.randint(0, 64, (1, 7))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU: Triton's interpreter
    model = model.to(device)
    ids = ids.to(device)
    with torch.no_grad():
        want = model(ids).logits
        swap_moe_blocks(model, target="triton")
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sentinel_guards", [False, True])
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_both_transformers_expert_forms_fold_into_one_moe(experts, sentinel_guards):
    """A Mixtral block with each of transformers' compilable expert implementations: one moe.moe, same result.
    With sentinel guards (the experts' code under expert parallelism, and always before transformers 5.23)
    the grouped form zeroes the rows of ids >= E around each grouped matmul and the batched form clamps ids."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4,
                                        num_experts_per_tok=2)
    config._experts_implementation = experts
    block = MixtralSparseMoeBlock(config).eval()
    block.experts._is_expert_parallel = sentinel_guards
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, 32)
    backend = SparsaBackend()
    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, backend=backend)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert backend.stats["moe blocks recognized"] == 1 and not backend.fallbacks
    assert "moe.grouped_matmul_combine" in print_module(backend.partitions[0].module)


@pytest.mark.parametrize("form", ["relu2", "transposed", "interleaved", "interleaved+bias", "interleaved+learned"])
def test_grouped_mm_experts_of_other_activations_and_layouts_fold(form):
    """Any row-wise activation between the two grouped matmuls folds (inference): each column slice of the first
    product it reads (chunk halves, ::2 interleaves) becomes a matmul by that slice of the weight, so the dispatch
    is fused as SwiGLU's is. GPT-OSS's expert biases are expert vectors: the first added to the permuted rows
    before the activation, the second's gate-weighted sum over each token's slots after the combine."""
    torch.manual_seed(0)
    block, x = experts_block(form), torch.randn(19, 32)
    backend = SparsaBackend()
    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, backend=backend)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert backend.stats["moe blocks recognized"] == 1 and not backend.fallbacks
    ir = print_module(backend.partitions[0].module)
    assert "moe.moe" not in ir and ir.count("moe.grouped_matmul ") + ir.count("moe.grouped_matmul(") >= 1, ir
    assert "moe.grouped_matmul_combine" in ir


@pytest.mark.parametrize("form", ["interleaved", "interleaved+bias"])
def test_grouped_mm_experts_reading_float_attributes_fold_under_dynamic_shapes(form):
    """GPT-OSS's activation reads its module's alpha and limit; under dynamic=True Dynamo passes such floats as 0-d
    tensors, and the activation reads them (`.item()`, `-limit`): they become inputs of the folded block, and its
    first stage's epilogue runs as tensor ops (a grouped matmul's kernel reads no outside value)."""
    torch.manual_seed(0)
    block, backend = experts_block(form), SparsaBackend()
    compiled = torch.compile(block, backend=backend, dynamic=True)
    with torch.no_grad():
        for tokens in (19, 26):
            x = torch.randn(tokens, 32)
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)
    assert backend.stats["moe blocks recognized"] == 1 and not backend.fallbacks
    ir = print_module(backend.partitions[0].module)
    assert "moe.moe" not in ir and "moe.grouped_matmul_combine" in ir, ir
