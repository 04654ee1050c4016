"""Evaluation: perplexity bounds, HumanEval pass@1, infilling, syntax validity, and the sandbox that runs programs."""
