"""Writes the store: corpus and demo grammar, tokenizer, packed token sequences, and the teachers' cached targets."""
