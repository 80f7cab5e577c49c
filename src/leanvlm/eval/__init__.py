"""Evaluation through lmms-eval (optional extra: ``pip install 'leanvlm[eval]'``, see docs/eval.md)."""
