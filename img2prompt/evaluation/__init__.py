"""Evaluation: every method scored in one metric space with baselines and intervals
(``scores``), and the analyses behind the notebooks' conclusions (``analysis``)."""
