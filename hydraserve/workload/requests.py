"""Model endpoints, applications, SLOs and request lengths of the end-to-end experiment.

Endpoints (PAPER.md 10 and 14): per application in the order chatbot, code, summarization, and
within each the Llama2-13B replicas then the Llama2-7B ones; endpoint ``<model>-<idx>`` with idx
0..per_app-1 chatbot, per_app..2*per_app-1 code, then summarization (the paper writes
``<model>/<idx>``; here model names are URL path segments and folder names, so '-').

Lengths in tokens, one distribution per application; prompts truncated to 1,024 tokens and
outputs at most 1,024 (PAPER.md 14):
- chatbot, ShareGPT: mean prompt 161.31 and mean output 337.99 tokens (Kwon et al., "Efficient
  Memory Management for Large Language Model Serving with PagedAttention", SOSP'23, Fig. 11 /
  section 6.1). Lognormals with those means; sigma 1.0 for both is our choice.
- code, HumanEval (164 problems; a prompt is a function signature and docstring): we have no
  published token statistics from a source we can cite here, so these are our estimate: prompt
  mean 130 tokens (lognormal sigma 0.5), output mean 80 tokens (lognormal sigma 0.6).
- summarization, LongBench: its English samples average 6,711 words (Bai et al., "LongBench",
  ACL'24, abstract), far above 1,024 tokens, so nearly every truncated prompt is 1,024 tokens;
  our choice: 5% shorter documents, uniform in 256..1,024. LongBench generates at most 512
  tokens for its summarization tasks (its per-task maximum output length), so outputs are
  capped at 512; the lognormal mean 300 (sigma 0.5) under that cap is our choice.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

MAX_PROMPT = 1024  # PAPER.md 14: prompts truncated to 1,024 tokens
MAX_OUTPUT = 1024  # PAPER.md 14: max new tokens up to 1,024
SUMMARY_MAX_OUTPUT = 512  # LongBench's output limit for its summarization tasks
MIN_PROMPT = 4  # our choice: a prompt of at least a few tokens
MODELS = ("Llama2-13B", "Llama2-7B")  # model set 3 (hydraserve.testbeds.MODEL_SETS[3])


class Application(enum.Enum):
    CHATBOT = "chatbot"
    CODE = "code"
    SUMMARIZATION = "summarization"


# PAPER.md section 10: (TTFT SLO in s, TPOT SLO in ms) per application, 7B and 13B models
SLOS: dict[Application, dict[str, tuple[float, float]]] = {
    Application.CHATBOT: {"7B": (7.5, 200.0), "13B": (12.0, 200.0)},
    Application.CODE: {"7B": (7.5, 84.0), "13B": (12.0, 116.0)},
    Application.SUMMARIZATION: {"7B": (37.5, 84.0), "13B": (60.0, 116.0)},
}


@dataclass(frozen=True)
class Endpoint:
    name: str  # "<model>-<index>"
    model: str
    application: str  # an Application value
    index: int  # 0 .. 3 * per_app - 1 within its model


def endpoints(per_app: int = 64, models: tuple[str, ...] = MODELS) -> list[Endpoint]:
    """The end-to-end endpoints in the paper's order: 3 * per_app per model (384 by default)."""
    if per_app < 1:
        raise ValueError(f"per_app must be >= 1, got {per_app}")
    out = []
    for a, app in enumerate(Application):
        for model in models:
            for i in range(per_app):
                idx = a * per_app + i
                out.append(Endpoint(f"{model}-{idx}", model, app.value, idx))
    return out


def slo(application: str, model: str) -> tuple[float, float]:
    """(TTFT SLO in s, TPOT SLO in ms) of ``application`` on ``model`` (the 13B column when the
    model name says 13B, else the 7B one)."""
    size = "13B" if "13B" in model else "7B"
    return SLOS[Application(application)][size]


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    """A lognormal draw with the given mean (mu = ln(mean) - sigma^2 / 2)."""
    return float(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma))


def sample_lengths(application: str, rng: np.random.Generator) -> tuple[int, int]:
    """(prompt tokens, max output tokens) of one request of ``application``: prompt in
    [MIN_PROMPT, 1024], output in [1, 1024] (summarization: [1, 512])."""
    app = Application(application)
    if app is Application.CHATBOT:
        prompt, out = _lognormal(rng, 161.31, 1.0), _lognormal(rng, 337.99, 1.0)
    elif app is Application.CODE:
        prompt, out = _lognormal(rng, 130.0, 0.5), _lognormal(rng, 80.0, 0.6)
    else:
        prompt = MAX_PROMPT if rng.random() >= 0.05 else rng.uniform(256, MAX_PROMPT)
        out = min(_lognormal(rng, 300.0, 0.5), SUMMARY_MAX_OUTPUT)
    return (int(min(MAX_PROMPT, max(MIN_PROMPT, round(prompt)))),
            int(min(MAX_OUTPUT, max(1, round(out)))))
