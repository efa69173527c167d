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
