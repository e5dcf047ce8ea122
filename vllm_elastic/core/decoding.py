"""LLaDA's decoding rule on a batch: candidates' logits in, committed tokens out.

Argmax (with Gumbel noise at temperature > 0) picks each candidate's token; its
confidence is the float64 softmax probability of that token. Then per request either the
top-k of the block schedule or the most confident candidate plus every other candidate
with confidence >= tau commits. One device-to-host transfer per step.
"""

from __future__ import annotations

import torch

from .request import Request


def add_gumbel_noise(logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's sampling: exp(logits) / (-log U)^T in float64 (identity at T = 0)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device,
                       generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def argmax_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax token and its float64 softmax probability."""
    logits = logits.float()
    x0 = logits.argmax(-1)
    conf = torch.softmax(logits.double(), -1).gather(-1, x0[:, None]).squeeze(-1)
    return x0, conf


def choose_tokens(logits: torch.Tensor, requests: list[Request], counts: list[int]
                  ) -> tuple[list[list[int]], list[list[float]]]:
    """Per request: each candidate's token and confidence (candidates in given order).

    logits: [sum(counts), vocab], the candidates of request i at rows
    sum(counts[:i]) .. sum(counts[:i+1]).
    """
    logits = logits.float()
    pieces_x0, pieces_conf = [], []
    offset = 0
    uniform = all(r.params.decode.temperature == 0 and not r.params.decode.logits_eos_inf
                  for r in requests)
    if uniform:
        x0, conf = argmax_confidence(logits)
        _confidence_masks(conf, x0, requests, counts)
        x0_host, conf_host = x0.tolist(), conf.tolist()
        for n in counts:
            pieces_x0.append(x0_host[offset:offset + n])
            pieces_conf.append(conf_host[offset:offset + n])
            offset += n
        return pieces_x0, pieces_conf
    xs, cs = [], []
    for r, n in zip(requests, counts):
        d = r.params.decode
        lg = logits[offset:offset + n]
        offset += n
        if d.logits_eos_inf:
            lg = lg.clone()
            lg[:, r.special.eos] = float("-inf")
        x0 = add_gumbel_noise(lg, d.temperature, r.generator).argmax(-1)
        conf = torch.softmax(lg.double(), -1).gather(-1, x0[:, None]).squeeze(-1)
        xs.append(x0)
        cs.append(conf)
    x0 = torch.cat(xs)
    conf = torch.cat(cs)
    _confidence_masks(conf, x0, requests, counts)
    x0_host, conf_host = x0.tolist(), conf.tolist()
    offset = 0
    for n in counts:
        pieces_x0.append(x0_host[offset:offset + n])
        pieces_conf.append(conf_host[offset:offset + n])
        offset += n
    return pieces_x0, pieces_conf


def _confidence_masks(conf: torch.Tensor, x0: torch.Tensor, requests: list[Request],
                      counts: list[int]) -> None:
    offset = 0
    for r, n in zip(requests, counts):
        if r.params.decode.confidence_eos_eot_inf:
            seg = x0[offset:offset + n]
            bad = torch.zeros_like(seg, dtype=torch.bool)
            for t in r.special.stop:
                bad |= seg == t
            conf[offset:offset + n].masked_fill_(bad, float("-inf"))
        offset += n


def select_commits(request: Request, candidates: list[int], tokens: list[int],
                   confidence: list[float]) -> tuple[list[int], list[int]]:
    """Which candidates commit: top-k of the schedule, or argmax plus conf >= tau."""
    if not candidates:
        return [], []
    order = sorted(range(len(candidates)), key=lambda i: (-confidence[i], i))
    k = request.tokens_to_commit()
    if k is not None:
        chosen = order[:min(k, len(order))]
    else:
        tau = request.params.decode.threshold
        chosen = [order[0]] + [i for i in order[1:] if confidence[i] >= tau]
    chosen.sort()
    return [candidates[i] for i in chosen], [tokens[i] for i in chosen]
