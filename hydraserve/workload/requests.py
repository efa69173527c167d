"""Model endpoints, applications, SLOs and request lengths of the end-to-end experiment.

Endpoints (PAPER.md 10 and 14): per application in the order chatbot, code, summarization, and
within each the Llama2-13B replicas then the Llama2-7B ones; endpoint ``<model>-<idx>`` with idx
0..per_app-1 chatbot, per_app..2*per_app-1 code, then summarization (the paper writes
``<model>/<idx>``; a '/' cannot be a URL path segment or a folder name here).

Lengths (tokens), one distribution per application, prompts truncated to 1,024 tokens:
- chatbot (ShareGPT): mean prompt 161.31, mean output 337.99 tokens (Kwon et al., "Efficient
  Memory Management for Large Language Model Serving with PagedAttention", SOSP'23, section 6.1 /
  Fig. 11). Lognormals with those means; sigma 1.0 for both is our choice.
- code (HumanEval, 164 problems, a prompt is a signature and docstring): no published token
  statistics that we can cite here; our estimate: prompt mean ~130, output mean ~80 tokens,
  lognormal sigma 0.5 and 0.6 (our choice).
- summarization (LongBench): the English samples average 6,711 words (Bai et al., ACL'24), far
  above 1,024 tokens, so the truncated prompt is 1,024 tokens unless a rare short document (our
  choice: 5% uniform in 256..1024); LongBench generates at most 512 tokens for its summarization
  tasks (its per-task output limit): output lognormal mean ~300 (our choice), capped at 512.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

MAX_PROMPT = 1024
MAX_OUTPUT = 1024
MODELS = ("Llama2-13B", "Llama2-7B")


class Application(enum.Enum):
    CHATBOT = "chatbot"
    CODE = "code"
    SUMMARIZATION = "summarization"


# PAPER.md section 10: (TTFT SLO s, TPOT SLO ms) per application, for the 7B and the 13B model
SLOS: dict[Application, dict[str, tuple[float, float]]] = {
    Application.CHATBOT: {"7B": (7.5, 200.0), "13B": (12.0, 200.0)},
    Application.CODE: {"7B": (7.5, 84.0), "13B": (12.0, 116.0)},
    Application.SUMMARIZATION: {"7B": (37.5, 84.0), "13B": (60.0, 116.0)},
}


@dataclass(frozen=True)
class Endpoint:
    name: str
    model: str
    application: str
    index: int


def endpoints(per_app: int = 64, models: tuple[str, ...] = MODELS) -> list[Endpoint]:
    """The model set 3 endpoints in the paper's order (3 * per_app per model)."""
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
    """(TTFT SLO in s, TPOT SLO in ms) of an application on a model (13B if its name says so)."""
    size = "13B" if "13B" in model else "7B"
    return SLOS[Application(application)][size]


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    return float(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma))


def sample_lengths(application: str, rng: np.random.Generator) -> tuple[int, int]:
    """(prompt tokens, max output tokens) of one request of ``application``."""
    app = Application(application)
    if app is Application.CHATBOT:
        prompt, out = _lognormal(rng, 161.31, 1.0), _lognormal(rng, 337.99, 1.0)
    elif app is Application.CODE:
        prompt, out = _lognormal(rng, 130.0, 0.5), _lognormal(rng, 80.0, 0.6)
    else:
        prompt = MAX_PROMPT if rng.random() >= 0.05 else rng.uniform(256, MAX_PROMPT)
        out = min(_lognormal(rng, 300.0, 0.5), 512)
    return (int(min(MAX_PROMPT, max(4, round(prompt)))),
            int(min(MAX_OUTPUT, max(1, round(out)))))
