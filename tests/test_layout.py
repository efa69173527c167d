"""The paper's stage split and exact tensor coverage of the stages."""
from __future__ import annotations

import shutil

import pytest

from hydraserve.engine.engine import LLMEngine
from hydraserve.engine.runner import iter_checkpoint
from hydraserve.engine.sequence import SamplingParams
from hydraserve.store.checkpoint import scan_checkpoint
from hydraserve.store.layout import StageLayout, StageSpec, split_layers

from conftest import MODEL_SPECS


def test_split_ties_go_to_the_later_stage():
    # equal loads: layer 0 -> stage 1, layer 1 -> stage 0, layer 2 -> stage 1
    assert split_layers([10, 10, 10], 0, 0, 2) == [range(0, 1), range(1, 3)]


def test_split_balances_embedding_and_head():
    assert split_layers([10] * 4, 25, 25, 2) == [range(0, 2), range(2, 4)]
    # a heavy embedding leaves stage 0 with fewer layers
    # loads [30, 0]: s1 s1 s1(tie) s0 s1(tie) -> 1 layer on stage 0
    assert split_layers([10] * 6, 30, 0, 2) == [range(0, 1), range(1, 6)]
    assert split_layers([10] * 4, 100, 0, 2) == [range(0, 0), range(0, 4)]


def test_split_rejects_bad_sizes():
    with pytest.raises(ValueError):
        split_layers([10] * 2, 0, 0, 3)
    with pytest.raises(ValueError):
        split_layers([10] * 2, 0, 0, 0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "falcon"])
def test_stages_cover_checkpoint_exactly_once(model_dirs, name):
    tensors = scan_checkpoint(model_dirs[name])
    layout = StageLayout(tensors)
    for p in (1, 2, 3, 4):
        engine = LLMEngine(model_dirs[name], pipeline=p)
        specs = [s.spec for s in engine.stages]
        assert specs[0].layer_start == 0 and specs[-1].layer_end == layout.num_layers
        assert all(a.layer_end == b.layer_start for a, b in zip(specs, specs[1:]))
        counts: dict[str, int] = {}
        for stage in engine.stages:
            assert stage.loaded == set(layout.tensor_names(stage.spec))
            for n in stage.loaded:
                counts[n] = counts.get(n, 0) + 1
        assert set(counts) == set(tensors)
        tied = layout.tied_embedding if layout.tied and p > 1 else None
        assert {n for n, c in counts.items() if c != 1} == ({tied} if tied else set())
        # what a stage lacks plus what it holds is the whole model
        for spec in specs:
            assert set(layout.rest_names(spec)) | set(layout.tensor_names(spec)) == set(tensors)


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_every_stage_grows_into_the_whole_model(model_dirs, name):
    """Consolidation in one process: a stage of a 3-stage pipeline extends to all layers, loads
    only what it lacked, and then generates what the whole model does."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 13], list(range(100, 111))]
    whole = LLMEngine(model_dirs[name])
    expected = [r.token_ids for r in whole.generate(prompts, params)]
    spec = StageSpec(0, 1, 0, whole.model_cfg.num_layers)
    for rank in range(3):
        engine = LLMEngine(model_dirs[name], pipeline=3)
        stage = engine.stages[rank]
        rest = engine.layout.rest_names(stage.spec)
        stage.extend(spec)
        stage.load(iter_checkpoint(model_dirs[name], rest, engine.layout.tensors))
        stage.activate(spec)
        engine.stages = [stage]
        assert [r.token_ids for r in engine.generate(prompts, params)] == expected, rank


def test_a_tied_checkpoint_that_stores_the_head_too_loads_at_every_p(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "falcon"
    shutil.copytree(model_dirs["falcon"], d)
    tensors = load_file(d / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"].clone()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = LLMEngine(model_dirs["falcon"]).generate([[5, 9, 13]], params)[0].token_ids
    for p in (1, 2, 3):
        engine = LLMEngine(d, pipeline=p)
        assert engine.stages[-1].loaded >= {"lm_head.weight", "transformer.ln_f.weight"}
        assert engine.generate([[5, 9, 13]], params)[0].token_ids == expected, p


def test_first_and_last_stage_hold_embedding_and_head(model_dirs):
    layout = StageLayout(scan_checkpoint(model_dirs["llama"]))
    first, *_, last = layout.stages(3)
    assert "model.embed_tokens.weight" in layout.tensor_names(first)
    assert "lm_head.weight" not in layout.tensor_names(first)
    assert {"lm_head.weight", "model.norm.weight"} <= set(layout.tensor_names(last))
    assert "model.embed_tokens.weight" not in layout.tensor_names(last)
    with pytest.raises(ValueError):
        layout.stage(3, 3)
