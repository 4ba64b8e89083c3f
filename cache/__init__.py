"""kdcache.cache: the store format and nothing else: schema, codecs, shard layout, encoder, reader, verify, inspect.

`schema` defines the groups and arrays (spec: docs/cache-format.md); `layout` parses a sharded array's zarr.json
for `encoder`, which writes whole shards, and `reader`, which reads them through memory maps for training;
`manifest` records a digest of every file when a writer finishes; `verify` checks integrity; `inspect`/`stats`
summarise a store; `upgrade` converts an older format in place.
Nothing here imports torch, click, a teacher or a student.
"""

if __name__ != "kdcache.cache":  # the repository root on sys.path would load this folder a second time as `cache`
    raise ImportError(f"import kdcache.cache, not {__name__}: the stage folders install under the kdcache package")

# 2: topk_logits stored through the kdcache.sorted_key_delta codec (docs/cache-format.md)
# 3: topk_ids (uint16) stored through kdcache.vocab_rank; tokens/<split> carry vocab_order
FORMAT_VERSION = 3
UPGRADABLE_VERSION = 2  # `kdcache upgrade` (kdcache.cache.upgrade) converts such a store in place
