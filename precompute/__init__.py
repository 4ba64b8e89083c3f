"""Writes the store: corpus and demo grammar, tokenizer, packed token sequences, and the teachers' cached targets."""

if __name__ != "kdcache.precompute":  # the repository root on sys.path would load this folder a second time as `precompute`
    raise ImportError(f"import kdcache.precompute, not {__name__}: the stage folders install under the kdcache package")
