"""Judge NLL: per-token negative log-likelihood of generated text under an autoregressive judge.

As in the ADJUST paper's code: texts are re-tokenised with the judge's tokenizer without a BOS,
so the first token is context and not scored; padding and EOS targets are excluded; the NLL is
pooled over every scored token of every text (nats, not exponentiated). The judge is any
transformers causal LM (Qwen2.5-7B for paper parity) or a jdlm model run with `causal=True`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from jdlm.errors import JdlmError

# (tokens (B, L), attention_mask (B, L)) -> NLL of tokens 1..L-1 given their past, (B, L-1).
TokenNLL = Callable[[np.ndarray, np.ndarray], np.ndarray]
PAD_MULTIPLE = 32  # pad lengths to a multiple, so a jitted judge compiles a few shapes only


@dataclasses.dataclass(frozen=True)
class Judge:
    name: str
    token_nll: TokenNLL
    tokenizer: object | None = None
    eos_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class JudgeNLL:
    nll: float  # pooled: total NLL / scored tokens
    num_tokens: int
    num_texts: int
    judge: str
    per_text: tuple[float | None, ...]  # each text's mean NLL (None: fewer than 2 tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def transformers_judge(path: str, device: str = "cpu", dtype: str | None = None) -> Judge:
    """A transformers causal LM and its tokenizer from a local directory (or a hub name)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype) if dtype else torch.float32).to(device).eval()
    except OSError as err:
        raise JdlmError(f"judge {path!r} is not a loadable causal LM directory ({err}); pass "
                        "the directory of e.g. Qwen2.5-7B") from None

    @torch.no_grad()
    def token_nll(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(tokens, device=device)
        logits = model(input_ids=ids, attention_mask=torch.as_tensor(mask, device=device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return -logp.gather(-1, ids[:, 1:, None])[..., 0].cpu().numpy()

    return Judge(path, token_nll, tokenizer, tokenizer.eos_token_id)


def jdlm_judge(model, tokenizer=None) -> Judge:
    """A jdlm `Model` run causally (e.g. the tiny model trained with `--objective ar`)."""
    from jdlm.diffusion import next_token_nll

    def token_nll(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits = model.logits(tokens, mask, causal=True)
        return np.asarray(next_token_nll(logits, tokens, model.config.logit_shift))

    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    return Judge(model.path or "jdlm", token_nll, tokenizer, eos)


def judge_nll(texts: Sequence[str], judge: Judge, batch_size: int = 8) -> JudgeNLL:
    """Pooled per-token NLL of `texts` under `judge` (tokenised with its tokenizer, no BOS)."""
    if judge.tokenizer is None:
        raise JdlmError(f"judge {judge.name} has no tokenizer: pass one, or score token ids with "
                        "judge_nll_of_tokens")
    ids = [judge.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return judge_nll_of_tokens(ids, judge, batch_size)


def judge_nll_of_tokens(sequences: Sequence[Sequence[int]], judge: Judge,
                        batch_size: int = 8) -> JudgeNLL:
    """Pooled per-token NLL of already tokenised sequences (the judge's vocabulary)."""
    if not sequences:
        raise JdlmError("no texts to score")
    sums, counts = np.zeros(len(sequences)), np.zeros(len(sequences), dtype=np.int64)
    for start in tqdm(range(0, len(sequences), batch_size), desc=f"judge {judge.name}",
                      unit="batch", disable=len(sequences) <= batch_size):
        batch = sequences[start: start + batch_size]
        length = max(2, -(-max(len(s) for s in batch) // PAD_MULTIPLE) * PAD_MULTIPLE)
        tokens = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, seq in enumerate(batch):
            tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1
        nll = judge.token_nll(tokens, mask)
        scored = mask[:, 1:].astype(bool)  # target real: first token and padding never scored
        if judge.eos_token_id is not None:
            scored &= tokens[:, 1:] != judge.eos_token_id
        sums[start: start + len(batch)] = np.where(scored, nll, 0.0).sum(axis=1)
        counts[start: start + len(batch)] = scored.sum(axis=1)
    total = int(counts.sum())
    if total == 0:
        raise JdlmError(f"none of the {len(sequences)} texts has a second token to score")
    per_text = tuple(float(s / c) if c else None for s, c in zip(sums, counts))
    return JudgeNLL(float(sums.sum() / total), total, len(sequences), judge.name, per_text)
