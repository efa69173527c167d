"""A reference for the sampling parameters, written from their OpenAI (and vLLM) definitions,
on Hugging Face transformers' logits (tests only)."""
from __future__ import annotations

import math

import torch


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of every position."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def processed(logits: torch.Tensor, prompt: list[int], output: list[int], p, eos: set[int]
              ) -> torch.Tensor:
    """The definitions, written out token by token: logit_bias is added; before min_tokens,
    EOS and the stop ids are impossible; repetition_penalty (vLLM's): a logit of a token seen in
    the prompt or the output is divided by the penalty if positive, else multiplied; OpenAI's
    frequency and presence penalties: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) *
    presence_penalty, with c[j] the count of token j in the output so far."""
    x = logits.clone().tolist()
    for tok, bias in p.logit_bias:
        x[tok] += bias
    if len(output) < p.min_tokens:
        for tok in eos | set(p.stop_token_ids):
            x[tok] = -math.inf
    for tok in set(prompt) | set(output):
        if p.repetition_penalty != 1:
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(output):
        c = output.count(tok)
        x[tok] -= c * p.frequency_penalty + p.presence_penalty
    return torch.tensor(x)


def greedy(hf, prompt: list[int], p, eos: set[int]) -> list[int]:
    """Greedy decoding under ``p`` (an engine SamplingParams: its fields are the API's)."""
    out: list[int] = []
    while len(out) < p.max_tokens:
        logits = hf_logits(hf, prompt + out)[-1]
        tok = int(processed(logits, prompt, out, p, eos).argmax())
        out.append(tok)
        if tok in eos or tok in p.stop_token_ids:
            break
    return out
