"""`python -m jdlm.eval.lm_eval_adapter ARGS` is `lm_eval ARGS` with the "jdlm" model registered."""

import jdlm.eval.lm_eval_adapter  # noqa: F401  (registers "jdlm" with lm-eval)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
