"""bigmodel attention inside Hugging Face transformers, against transformers' own sdpa attention."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bigmodel.integrations  # noqa: E402

TOL = dict(atol=1e-9, rtol=1e-9)


def tiny_llama(kv_heads):
    """(sdpa model, bigmodel model) with the same random weights, in float64, no hub."""
    name = bigmodel.integrations.register_transformers()
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=12,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    # Each model gets its own config: _from_config records the attention implementation in it.
    ref = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=name)
    ref, ours = ref.double().eval(), ours.double().eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == name and ref.config._attn_implementation == "sdpa"
    return ref, ours


def left_padded_batch():
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0   # left padding, as for generation
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_padded_batch_forward_backward(kv_heads, monkeypatch):
    ref, ours = tiny_llama(kv_heads)
    ids, mask = left_padded_batch()
    calls = []
    from bigmodel.integrations import transformers as integration

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw["attn_mask"] is not None, kw["enable_gqa"]))
        return real(q, k, v, **kw)

    real = integration.scaled_dot_product_attention
    monkeypatch.setattr(integration, "scaled_dot_product_attention", spy)
    out_r = ref(input_ids=ids, attention_mask=mask).logits
    out_o = ours(input_ids=ids, attention_mask=mask).logits
    # One call per layer, with the padding mask, K/V heads not repeated.
    assert calls == [((3, 4, 11, 12), (3, kv_heads, 11, 12), True, kv_heads != 4)] * 2
    valid = mask.bool()
    torch.testing.assert_close(out_o[valid], out_r[valid], **TOL)
    # The mask reached the attention: padding changes the logits of the padded rows' real tokens.
    unpadded = ours(input_ids=ids).logits
    assert not torch.allclose(unpadded[1, -1], out_o[1, -1])
    # Gradients through a loss on the real tokens.
    (out_r[valid].square().mean()).backward()
    (out_o[valid].square().mean()).backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-8, rtol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_steps_with_cache(kv_heads):
    ref, ours = tiny_llama(kv_heads)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = []
        for model in (ref, ours):
            pre = model(input_ids=ids, attention_mask=mask, use_cache=True)
            nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            # One new token: query length 1 against 12 cached keys.
            step = model(input_ids=nxt, attention_mask=step_mask, past_key_values=pre.past_key_values,
                         use_cache=True)
            logits.append(step.logits)
        torch.testing.assert_close(logits[1], logits[0], **TOL)
        gen_r = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        gen_o = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_o, gen_r)


def test_unpadded_causal_uses_is_causal():
    # No padding: transformers passes no mask at all and the kernel's causal mode runs.
    ref, ours = tiny_llama(2)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, **TOL)


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert bigmodel.integrations.register_transformers("bigmodel_test") == "bigmodel_test"
    assert "bigmodel_test" in AttentionInterface() and "bigmodel_test" in AttentionMaskInterface()


def test_top_level_kernels_is_not_this_checkouts():
    """From the repository root, kernels/ (bigmodel.kernels) would shadow Hugging Face's `kernels`
    package, which transformers 5.x imports when it is installed: it must hand the name over."""
    import importlib.metadata
    import importlib.util
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    code = "import os, kernels; print(os.path.realpath(kernels.__file__))"
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    installed = importlib.util.find_spec("kernels") is not None and any(
        d.metadata["Name"] == "kernels" for d in importlib.metadata.distributions())
    if installed:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() != os.path.join(root, "kernels", "__init__.py"), run.stdout
    else:
        assert "No module named 'kernels'" in run.stderr
