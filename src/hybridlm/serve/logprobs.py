"""Log-probabilities of chosen tokens and of the top alternatives, from raw model logits.

They are `log_softmax` of the model's logits as they come out of the forward (before
temperature, top-k/top-p or logits processors), as vLLM returns them by default; the
engine computes them on its thread for the requests that ask (`SamplingParams.logprobs`
for sampled tokens, `prompt_logprobs` for the prompt: echo and prompt scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # the requested number of (id, logprob), most likely first


def token_logprobs(logits: Tensor, tokens: Tensor, top_n: list[int]) -> list[TokenLogprob]:
    """One `TokenLogprob` per row: logits (b, vocab), tokens (b,) the chosen ids, top_n[i] alternatives of row i."""
    lsm = torch.log_softmax(logits.float(), dim=-1)                                    # (b, vocab)
    chosen = lsm.gather(1, tokens.reshape(-1, 1).to(lsm.device))[:, 0].tolist()
    k = min(max(top_n, default=0), lsm.shape[-1])
    top_ids, top_lp = ([], []) if k == 0 else (t.tolist() for t in reversed(torch.topk(lsm, k, dim=-1)))
    out = []
    for i, (tok, lp) in enumerate(zip(tokens.tolist(), chosen)):
        top = list(zip(top_ids[i][:top_n[i]], top_lp[i][:top_n[i]])) if k else []
        out.append(TokenLogprob(int(tok), float(lp), top))
    return out


def chunk_prompt_logprobs(logits: Tensor, prompt: Tensor, start: int, top_n: int) -> list[TokenLogprob]:
    """Log-probs of the prompt tokens that the logits of one prefill chunk predict.

    logits (n, vocab) are those of prompt positions start .. start+n-1; row j scores the
    token at start+j+1 (the prompt's last position scores nothing: it predicts the first
    generated token). prompt (P,).
    """
    targets = prompt[start + 1:start + 1 + logits.shape[0]]
    if targets.numel() == 0:
        return []
    return token_logprobs(logits[:targets.numel()], targets, [top_n] * targets.numel())
