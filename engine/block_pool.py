"""A fixed pool of KV cache blocks with reference counts and a prefix cache.

Data structures:
- `KVBlock`: one block of `block_size` KV slots (slot = block_id * block_size +
  offset). `ref_cnt` is the number of block tables holding the block; a block with
  `ref_cnt == 0` sits in the free queue. `block_hash` is set only on a FULL block
  registered in the prefix cache; its content is then immutable.
- free queue: an ordered dict block_id -> KVBlock, allocation pops from the front.
  Blocks that were never cached go to the front, cached blocks to the back, so a
  freed cached block stays findable until everything older has been reused (LRU).
- cached_blocks: BlockHash -> KVBlock, for full blocks whether in use or free.

A block hash chains the parent block's hash with the block's token ids and the
request's extra keys, so a hit on block i implies the whole prefix 0..i matches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple


class BlockHash(NamedTuple):
    """Key of a full block in the prefix cache.

    `hash_value` folds in the parent chain; `token_ids` and `extra_keys` are kept
    so that dict lookups compare them exactly and only a parent-hash collision
    (64-bit) could alias two blocks.
    """

    hash_value: int
    token_ids: tuple[int, ...]
    extra_keys: tuple


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()
) -> BlockHash:
    token_ids = tuple(token_ids)
    parent_value = None if parent_hash is None else parent_hash.hash_value
    return BlockHash(hash((parent_value, token_ids, extra_keys)), token_ids, extra_keys)


class KVBlock:
    """One KV cache block: `block_id`, `ref_cnt`, `block_hash` (None unless cached)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else "uncached"
        return f"KVBlock({self.block_id}, ref_cnt={self.ref_cnt}, {cached})"


class BlockPool:
    """`num_blocks` blocks, a free queue with LRU eviction and the prefix cache."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )
        self._cached_blocks: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, including cached ones that can be evicted."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` blocks from the front of the free queue, ref_cnt 1.

        A cached block taken here is evicted from the prefix cache.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(
                f"num_blocks={num_blocks} exceeds the {self.num_free_blocks} free blocks"
            )
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add one owner to each block (prefix hit or fork), unfreeing it if needed."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one owner from each block; blocks reaching 0 join the free queue.

        Cached blocks are queued in the given order at the back (the first given
        is evicted first); uncached blocks go to the front to be reused first.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            self._free_queue[block.block_id] = block
            if block.block_hash is None:
                self._free_queue.move_to_end(block.block_id, last=False)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached_blocks.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block; a block with the same content already cached wins."""
        if block.block_hash is not None or block_hash in self._cached_blocks:
            return
        block.block_hash = block_hash
        self._cached_blocks[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached_blocks[block.block_hash]
            block.block_hash = None
