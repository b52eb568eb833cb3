"""The single-process DualParal executor: forward split, feature cache, resume and extend at the
executor level (the store-level versions are in test_generate.py)."""

import io

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from hpcvideo.noise import block_noise
from hpcvideo.schedulers import make_scheduler
from hpcvideo.strategies.dualparal import attention as attention_module
from hpcvideo.strategies.dualparal import forward as wan_forward
from hpcvideo.strategies.dualparal.reference import DualParalReference

C, H, W, TEXT = 4, 4, 6, 16
SCHEDULER_CONFIG = dict(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).config)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=C, out_channels=C,
        text_dim=TEXT, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    )
    return model.eval()


def _embeds(seed, length=8):
    return torch.randn(1, length, TEXT, generator=torch.Generator().manual_seed(seed))


def _executor(transformer, *, num_blocks=4, steps=3, n=2, c=1, cache=True, scheduler="unipc", prompts=1):
    template = make_scheduler(scheduler, scheduler_config=SCHEDULER_CONFIG, flow_shift=3.0, num_inference_steps=steps)
    return DualParalReference(
        transformer=transformer, scheduler_template=template,
        prompt_embeds=[_embeds(10 + i) for i in range(prompts)], negative_prompt_embeds=_embeds(99),
        prompt_index_for_block=lambda j: min(j // 2, prompts - 1), guidance_scale=4.0, num_blocks=num_blocks,
        block_latent_frames=n, context_latent_frames=c, feature_cache=cache,
        noise_fn=lambda j: block_noise(seed=5, block_index=j, block_latent_frames=n, context_latent_frames=c,
                                       latent_channels=C, latent_height=H, latent_width=W),
    )


def _run(executor, until=None):
    out = {}
    while not executor.done and (until is None or executor.tick < until):
        out.update(executor.run_tick())
    return out


def test_split_forward_equals_diffusers_forward(transformer):
    latents = torch.randn(1, C, 3, H, W)
    t = torch.tensor([777])
    embeds = _embeds(1)
    with torch.no_grad():
        expected = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
        got = wan_forward.forward(transformer, latents, t, embeds)
    assert torch.equal(expected, got)


def test_one_block_is_the_plain_denoising_loop(transformer):
    """With one block, no context and no cache the queue is WanPipeline's loop (model -> CFG -> step)."""
    executor = _executor(transformer, num_blocks=1, steps=4, n=3, c=1)
    got = _run(executor)[0]
    executor.close()
    scheduler = make_scheduler("unipc", scheduler_config=SCHEDULER_CONFIG, flow_shift=3.0, num_inference_steps=4)
    latents = block_noise(seed=5, block_index=0, block_latent_frames=3, context_latent_frames=1,
                          latent_channels=C, latent_height=H, latent_width=W)
    with torch.no_grad():
        for t in scheduler.timesteps:
            cond = transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=_embeds(10), return_dict=False)[0]
            uncond = transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=_embeds(99), return_dict=False)[0]
            latents = scheduler.step(uncond + 4.0 * (cond - uncond), t, latents, return_dict=False)[0]
    assert torch.equal(got, latents)


def test_feature_cache_appends_the_newer_blocks_keys(transformer, monkeypatch):
    """Block j's self-attention keys = its window's keys ++ the keys of block j+1's first c frames
    computed earlier in the same tick, with rotary positions right after the window."""
    n, c, tpf = 2, 1, (H // 2) * (W // 2)
    executor = _executor(transformer, num_blocks=3, steps=3, n=n, c=c)
    _run(executor, until=2)  # ticks 0, 1: blocks 0 and 1 in flight
    norm_k_outputs, key_lengths = [], []
    hook = transformer.blocks[0].attn1.norm_k.register_forward_hook(lambda m, i, o: norm_k_outputs.append(o.detach().clone()))
    real_dispatch = attention_module.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        key_lengths.append((query.shape[1], key.shape[1]))
        return real_dispatch(query, key, value, **kwargs)

    monkeypatch.setattr(attention_module, "dispatch_attention_fn", spy)
    handed_over = []  # per block of the tick: what it recorded for its older neighbour
    original_end_block = executor.cache.end_block

    def end_block():
        handed_over.append({k: v[0].clone() for k, v in executor.cache.outgoing.items()})
        original_end_block()

    executor.cache.end_block = end_block
    executor.run_tick()  # tick 2: blocks 2 (step 0), 1 (step 1), 0 (step 2), newest first
    hook.remove()
    executor.close()
    ctx_tokens = c * tpf
    window_with_context, window0 = (c + n) * tpf, n * tpf
    # (query, key) lengths per layer-0 forward: block 2 cond/uncond, block 1 ..., block 0 ...
    assert key_lengths[0::2][:6] == [(window_with_context, window_with_context)] * 2 + [
        (window_with_context, window_with_context + ctx_tokens)] * 2 + [(window0, window0 + ctx_tokens)] * 2
    # layer-0 norm_k outputs in forward order; keys of a block's own first c frames follow its context
    own_first = lambda k: k[:, ctx_tokens:2 * ctx_tokens].unflatten(2, (2, -1))
    assert torch.equal(handed_over[0][("cond", 0)], own_first(norm_k_outputs[0]))  # block 2 -> block 1
    assert torch.equal(handed_over[0][("uncond", 0)], own_first(norm_k_outputs[1]))
    assert torch.equal(handed_over[1][("cond", 0)], own_first(norm_k_outputs[2]))  # block 1 -> block 0
    assert handed_over[2] == {}  # block 0 has no older neighbour in flight


def test_feature_cache_changes_the_result_and_is_reversible(transformer):
    stock = [type(b.attn1.processor) for b in transformer.blocks]
    on = _executor(transformer, cache=True)
    result_on = _run(on)
    on.close()
    assert [type(b.attn1.processor) for b in transformer.blocks] == stock
    off = _executor(transformer, cache=False)
    result_off = _run(off)
    assert torch.equal(result_on[0], result_off[0]) is False
    again = _executor(transformer, cache=True)
    result_again = _run(again)
    again.close()
    assert all(torch.equal(result_on[j], result_again[j]) for j in result_on)  # deterministic


@pytest.mark.parametrize("scheduler", ["unipc", "flow_euler"])
@pytest.mark.parametrize("stop_at", [1, 3, 5])
def test_state_dict_resume_equals_uninterrupted(transformer, scheduler, stop_at):
    full = _executor(transformer, num_blocks=4, steps=3, scheduler=scheduler, prompts=2)
    expected = _run(full)
    full.close()
    first = _executor(transformer, num_blocks=4, steps=3, scheduler=scheduler, prompts=2)
    got = _run(first, until=stop_at)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.close()
    second = _executor(transformer, num_blocks=4, steps=3, scheduler=scheduler, prompts=2)
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    got.update(_run(second))
    second.close()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[j], expected[j]) for j in expected)


def test_extension_from_the_tick_b_state_equals_the_longer_run(transformer):
    longer = _executor(transformer, num_blocks=6, steps=3)
    expected = _run(longer)
    longer.close()
    short = _executor(transformer, num_blocks=3, steps=3)
    short_result = _run(short, until=3)  # start of tick B = 3: the last state shared with any longer run
    snapshot = short.state_dict()
    short_result.update(_run(short))
    short.close()
    assert not torch.equal(short_result[2], expected[2])  # the last block saw no successor
    assert torch.equal(short_result[0], expected[0])  # finished before any end effect
    resumed = _executor(transformer, num_blocks=3, steps=3)
    resumed.load_state_dict(snapshot)
    resumed.set_num_blocks(6)
    got = _run(resumed)
    resumed.close()
    assert all(torch.equal(got[j], expected[j]) for j in got) and sorted(got) == [1, 2, 3, 4, 5]  # block 0 left at tick 2
    with pytest.raises(ValueError, match="end effects"):
        late = _executor(transformer, num_blocks=3, steps=3)
        _run(late, until=4)
        try:
            late.set_num_blocks(6)
        finally:
            late.close()
