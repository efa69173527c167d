"""The engine against Hugging Face transformers (the independent reference), token by token."""
from __future__ import annotations

import pytest
import torch

from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.sequence import SamplingParams
from hydraserve.tokenizer import Tokenizer

from conftest import MODEL_SPECS

PROMPTS = ["def main(argv):", "import os\nimport sys\n\nclass Config(object):\n    pass",
           "The quick brown fox"]
GREEDY_32 = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _reference(transformers, model_dir: str, prompts: list[list[int]]):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    outs, logits = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, max_new_tokens=32, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(ids):].tolist())
            logits.append(model(x).logits[0, -1])
    return outs, logits


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_greedy_and_logits_match_transformers(transformers, model_dirs, name):
    model_dir = model_dirs[name]
    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    ref_tokens, ref_logits = _reference(transformers, model_dir, prompts)
    assert all(len(set(t)) > 4 for t in ref_tokens), "reference output is degenerate"
    for p in (1, 2, 3, 4):
        engine = LLMEngine(model_dir, pipeline=p)
        results = engine.generate(prompts, GREEDY_32)  # all prompts batched together
        for prompt, ref, res in zip(PROMPTS, ref_tokens, results):
            assert res.token_ids == ref, f"{name} p={p} prompt {prompt!r}"
        for ids, ref in zip(prompts, ref_logits):
            ours = engine.prompt_logits(ids)
            rel = (ours - ref).abs().max() / ref.abs().max()
            assert rel < 1e-4, f"{name} p={p}: last-token logits differ by {rel:.2e}"


def test_falcon_7b_config_reads_as_transformers_reads_it(transformers):
    """transformers' FalconConfig defaults are Falcon-7B's: 71 heads of 64 sharing one kv head."""
    from hydraserve.engine.config import Arch, ModelConfig

    ref = transformers.FalconConfig()
    cfg = ModelConfig.from_hf({**ref.to_dict(), "architectures": ["FalconForCausalLM"]})
    assert cfg.arch is Arch.FALCON
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4544, 71, 1, 64)
    assert (cfg.num_layers, cfg.vocab_size, cfg.intermediate_size) == (32, 65024, 4 * 4544)
    assert cfg.parallel_attn and cfg.parallel_norms == 1 and cfg.tie_word_embeddings
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.rope_scaling) == (1e-5, 10000.0, None)


def test_falcon2_style_layers_match_transformers(transformers):
    """Grouped kv heads with one shared parallel norm (Falcon2-11B): the same tensors as
    transformers' model (the forward is Falcon-7B's, checked token by token above)."""
    from hydraserve.engine.config import ModelConfig
    from hydraserve.engine.models.falcon import FalconStage
    from hydraserve.store.layout import StageSpec

    raw = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1}
    ref = transformers.FalconForCausalLM(transformers.FalconConfig(**raw))
    cfg = ModelConfig.from_hf({**raw, "architectures": ["FalconForCausalLM"]})
    ours = FalconStage(cfg, StageSpec(0, 1, 0, 2), torch.float32, torch.device("cpu"), 64)
    assert (cfg.num_kv_heads, cfg.parallel_norms) == (2, 1)
    assert ours.expected_tensors() == set(ref.state_dict()) - {"lm_head.weight"}
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert all(shapes[n] == tuple(t.shape) for n, t in ref.state_dict().items() if n in shapes)
