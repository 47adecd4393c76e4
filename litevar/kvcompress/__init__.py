"""KV-cache compression: head classification (HACK) and eviction policies on one compaction API."""
