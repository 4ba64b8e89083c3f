"""The kdcache store format: one Zarr v3 store holding token sequences and cached teacher targets.

`cache.schema` defines the layout (the spec is docs/cache-format.md); `cache.reader` reads shards
through memory maps for training; `cache.verify` checks integrity; `cache.config` is the run config
whose copy the store keeps as provenance; `cache.cli` is the `kdcache` command.
"""

# 2: topk_logits stored through the kdcache.sorted_key_delta codec (docs/cache-format.md)
# 3: topk_ids (uint16) stored through kdcache.vocab_rank; tokens/<split> carry vocab_order
FORMAT_VERSION = 3
UPGRADABLE_VERSION = 2  # `kdcache upgrade` (cache.upgrade) converts such a store in place
