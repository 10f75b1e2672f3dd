"""jdlm as an `lm-eval` (EleutherAI lm-evaluation-harness 0.4.x) model named "jdlm".

    python -m jdlm.eval.lm_eval_adapter --model jdlm \\
        --model_args path=checkpoints/llada-8b,gen_length=256,steps=256,block_length=32 \\
        --tasks gsm8k --batch_size 8

lm-eval 0.4 finds models only in its own registry (it reads no entry points), so this package
has to be imported before the harness parses `--model`: `python -m jdlm.eval.lm_eval_adapter`
(`__main__.py`) imports it and hands the command line, unchanged, to lm-eval's own
`cli_evaluate`. From Python: `import jdlm.eval.lm_eval_adapter` before
`lm_eval.simple_evaluate(model="jdlm", ...)`.

`--model_args` (comma-separated key=value):
  path            converted checkpoint or HF Dream/LLaDA directory (required)
  any SamplerConfig field (gen_length, steps, block_length, order, schedule, temperature, ...):
                  the one sampler `generate_until` uses; gen_length defaults to 256. Of a
                  task's generation kwargs only `until` is used: one sampler means one
                  compiled program, as in the Dream/LLaDA harnesses.
  seed            generation request i uses seed + i; every likelihood uses `seed`, so the
                  choices of one question share their Monte Carlo draws (common random numbers)
  mc_num, mc_batch_size, estimator   the Monte Carlo likelihood (`jdlm.diffusion`); LLaDA's
                  harness uses 128 and 32 with its exact-count "llada" estimator
  cfg_scale       classifier-free guidance for both generation and likelihood (LLaDA)
  greedy_check    is_greedy of `loglikelihood`: True (default) decodes the answer greedily one
                  token per pass, most confident first (LLaDA's `suffix_greedy_prediction`) and
                  compares; False skips that (len(answer) extra passes) and reports False
  max_length      context budget of `loglikelihood_rolling` chunks (default: the model's)
"""

from __future__ import annotations

import dataclasses

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from jdlm.errors import JdlmError
from jdlm.eval.benchmark import cut_at_stop_strings, decode_generated, sample
from jdlm.sampling import SamplerConfig, generate

_SAMPLER_FIELDS = {f.name for f in dataclasses.fields(SamplerConfig)}


@register_model("jdlm")
class JdlmLM(LM):
    def __init__(self, path: str, *, batch_size: int | str = 8, seed: int = 0, mc_num: int = 128,
                 mc_batch_size: int = 32, estimator: str = "llada", greedy_check: bool = True,
                 max_length: int | None = None, mesh: str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, **sampler_args):
        # lm-eval always passes max_batch_size and device; jdlm places the model with `mesh`.
        del max_batch_size, device
        super().__init__()
        from jdlm.checkpoint import load

        unknown = sorted(set(sampler_args) - _SAMPLER_FIELDS)
        if unknown:
            raise JdlmError(f"unknown --model_args {unknown}; jdlm takes path, batch_size, seed, "
                            "mc_num, mc_batch_size, estimator, greedy_check, max_length, mesh "
                            f"and the SamplerConfig fields {sorted(_SAMPLER_FIELDS)}")
        # The command line hands `--batch_size` over as a string.
        batch_size = int(batch_size) if str(batch_size).isdigit() else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise JdlmError(f"batch_size={batch_size!r}: pass a positive integer ('auto' is not "
                            "supported; jdlm compiles one program per batch shape)")
        self.sampler = SamplerConfig(**{"gen_length": 256, **sampler_args})
        self.model = load(path, mesh=mesh)
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise JdlmError(f"{path} ships no tokenizer (tokenizer.json); lm-eval works on text")
        self.path, self.batch_size, self.seed = path, batch_size, seed
        self.greedy_check, self.max_length = greedy_check, max_length
        self.likelihood_args = {"mc_num": mc_num, "batch_size": mc_batch_size,
                                "cfg_scale": self.sampler.cfg_scale, "estimator": estimator,
                                "seed": seed}
        cfg = self.model.config
        # What an empty context is scored after, as lm-eval's own models do.
        self.prefix_token_id = next(t for t in (cfg.bos_token_id, cfg.eos_token_id, 0)
                                    if t is not None)

    # -- requests ------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        prompts = [self._encode(r.args[0]) for r in requests]
        sampled = sample(self.model, prompts, self.sampler, seed=self.seed,
                         batch_size=self.batch_size)
        out = []
        for request, text in zip(requests, decode_generated(self.model, sampled.tokens)):
            text = cut_at_stop_strings(text, request.args[1].get("until"))
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from jdlm.diffusion import log_likelihood

        out = []
        for request in tqdm(requests, desc="jdlm loglikelihood"):
            context, answer = self._encode_pair(*request.args)
            logprob = log_likelihood(self.model, context, answer, **self.likelihood_args)
            result = (logprob, self._is_greedy(context, answer))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        from jdlm.diffusion import log_likelihood_rolling

        out = []
        for request in tqdm(requests, desc="jdlm loglikelihood_rolling"):
            ids = self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            logprob = log_likelihood_rolling(self.model, ids, max_length=self.max_length,
                                             prefix_ids=[self.prefix_token_id],
                                             **self.likelihood_args)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, logprob)
            out.append(logprob)
        return out

    # -- chat templates (`lm_eval --apply_chat_template`) --------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise JdlmError(f"the tokenizer of {self.path} has no chat template; drop "
                            "--apply_chat_template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # -- helpers -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        return ids or [self.prefix_token_id]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """LLaDA's `_encode_pair`: trailing spaces move to the continuation, which is the tail of
        the encoding of the whole string (so merges across the boundary stay as in training)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer(context + continuation)["input_ids"]
        context_ids = self.tokenizer(context)["input_ids"]
        answer = whole[len(context_ids):]
        if not answer:
            raise JdlmError(f"continuation {continuation!r} encodes to no tokens after context")
        return context_ids or [self.prefix_token_id], answer

    def _is_greedy(self, context: list[int], answer: list[int]) -> bool:
        if not self.greedy_check:
            return False
        one_per_pass = SamplerConfig(gen_length=len(answer), order="confidence",
                                     schedule="dream", temperature=0.0,
                                     cfg_scale=self.sampler.cfg_scale)
        decoded = generate(self.model, [context], one_per_pass, seed=self.seed)[0]
        return [int(t) for t in decoded[-len(answer):]] == list(answer)
