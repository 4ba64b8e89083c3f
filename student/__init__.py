"""Trains and evaluates language models: the plain LM trainer (teachers), distillation against the store (students), evaluation and export."""
