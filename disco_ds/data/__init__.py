"""Token shards on disk and the batches each data-parallel rank trains on.

* :mod:`.shards`: the shard file format (modded-nanogpt / llm.c ``.bin``): writing, validating,
  reading and listing shards.
* :mod:`.stream`: the training stream (:class:`TokenStream`: one seeded order over the windows of
  all shards), the evaluation batches and the document positions.
* :mod:`.prefetch`: :class:`~disco_ds.data.prefetch.DevicePrefetcher`, the next batches pinned and
  on their way to the accelerator while the current one trains.
* :mod:`.prepare`: ``disco_ds prepare``, which tokenizes local text into shards.
"""

from disco_ds.data.shards import (
    MAGIC_UINT16,
    MAGIC_UINT32,
    ShardError,
    list_shards,
    read_shard,
    shard_info,
    write_shard,
)
from disco_ds.data.stream import TokenStream, document_positions, eval_batches

__all__ = [
    "MAGIC_UINT16",
    "MAGIC_UINT32",
    "ShardError",
    "write_shard",
    "read_shard",
    "shard_info",
    "list_shards",
    "TokenStream",
    "eval_batches",
    "document_positions",
]
