"""Trains and evaluates language models: the plain LM trainer (teachers), distillation against the store (students), evaluation and export."""

if __name__ != "kdcache.student":  # the repository root on sys.path would load this folder a second time as `student`
    raise ImportError(f"import kdcache.student, not {__name__}: the stage folders install under the kdcache package")
