"""Token shards on disk and the batches each data-parallel rank trains on.

* :mod:`.shards`: the shard file format (modded-nanogpt / llm.c ``.bin``): writing, validating,
  reading and listing shards.
* :mod:`.stream`: the training stream (:class:`TokenStream`), the evaluation batches and the
  document positions.
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
