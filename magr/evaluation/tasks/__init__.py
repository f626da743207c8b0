"""lm-eval task files (YAML) for the zero-shot tasks on local data; see magr.evaluation.zeroshot."""
