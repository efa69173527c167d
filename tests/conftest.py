"""Shared fixtures: small models of every supported family, made once per test session; a
check that the run leaves nothing in the temporary folder."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from hydraserve.make_model import ModelSpec, make_model

# name -> spec; 4 layers so every model splits into p = 1..4 stages
MODEL_SPECS = {
    "llama": ModelSpec(arch="llama", hidden=64, layers=4, heads=4, kv_heads=2, vocab=512, seed=1),
    "llama3-rope": ModelSpec(
        arch="llama", hidden=64, layers=4, heads=4, kv_heads=1, vocab=512, seed=2,
        extra_config={"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": ModelSpec(arch="qwen2", hidden=64, layers=4, heads=4, kv_heads=2, vocab=512, seed=3),
    "mistral-window": ModelSpec(arch="mistral", hidden=64, layers=4, heads=4, kv_heads=2,
                                vocab=512, seed=4, extra_config={"sliding_window": 8}),
    "opt": ModelSpec(arch="opt", hidden=64, layers=4, heads=4, vocab=512, seed=5),
    # Falcon-7B's decoder: one kv head, attention and MLP in parallel from one norm
    "falcon": ModelSpec(arch="falcon", hidden=64, layers=4, heads=4, kv_heads=1, vocab=512, seed=6),
    # Falcon-40B's: grouped kv heads, ln_attn and ln_mlp (here with biases too)
    "falcon-grouped": ModelSpec(arch="falcon", hidden=64, layers=4, heads=4, kv_heads=2,
                                vocab=512, seed=7, extra_config={"bias": True}),
    # per-head q/k/v and sequential attention then MLP, each after its own norm
    "falcon-sequential": ModelSpec(arch="falcon", hidden=64, layers=4, heads=4, kv_heads=4,
                                   vocab=512, seed=8, extra_config={"parallel_attn": False}),
}


# what a test run must not leave in the temporary folder: our folders (a local cluster's, a vLLM
# worker's, ...) and Chromium's (a profile, its singleton socket's folder, chromedriver's scoped
# folders; Debian's Chromium names them org.chromium.Chromium.*, others with a leading dot)
LEFTOVERS = ("hydraserve-", "org.chromium.", ".org.chromium.", "com.google.Chrome.",
             ".com.google.Chrome.", "scoped_dir")


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_in_the_temporary_folder(tmp_path_factory):
    """The run's temporary folder is a fresh one of its own (TMPDIR, inherited by every process
    it starts, so a run beside it cannot blur the count); what is left in it at the end by the
    names of `LEFTOVERS` fails the run (an error at the last test's teardown). The folder goes
    either way. pytest's own tmp_path folders stay where they are, kept as pytest keeps them."""
    tmp_path_factory.getbasetemp()  # made now, in the temporary folder outside ours
    before = os.environ.get("TMPDIR")
    ours = tempfile.mkdtemp(prefix="hydraserve-tests-")
    os.environ["TMPDIR"] = tempfile.tempdir = ours
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        tempfile.tempdir = None  # found again from the environment
        left = sorted(n for n in os.listdir(ours) if n.startswith(LEFTOVERS))
        for _ in range(10):  # a process that outlived its test may still be writing there
            shutil.rmtree(ours, ignore_errors=True)
            if not os.path.exists(ours):
                break
            time.sleep(0.5)
    if left:
        pytest.fail(f"the test run left {len(left)} folder(s) or file(s) in the temporary "
                    f"folder: {', '.join(left)}", pytrace=False)
    if os.path.exists(ours):
        pytest.fail(f"the run's own temporary folder {ours} is still written to", pytrace=False)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: str(make_model(root / name, spec)) for name, spec in MODEL_SPECS.items()}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault suite's table of counts (tests/test_faults.py), when it ran."""
    from tests.faults import TABLE, format_table

    if TABLE:
        terminalreporter.section("faults: requests sent / answered / clear error / lost")
        terminalreporter.write_line(format_table(TABLE))
