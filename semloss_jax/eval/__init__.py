"""Evaluation, one module per `eval.py` subcommand (chat, bounds, run = evaluate, report), plus
the judges of responses (refusal detector, harm judges) and the metrics with their intervals."""
