"""Per-request block tables on top of the block pool: paging, prefix hits, forks.

Data structures (all keyed by request_id):
- block table: list[KVBlock]; block i holds the KV of token positions
  [i * block_size, (i + 1) * block_size) of the request, so the slot of position p
  is `table[p // block_size].block_id * block_size + p % block_size`.
- num_tokens: how many positions the table has slots for (computed + scheduled).
- block hashes: the prefix-cache hash of every full block of `all_token_ids`,
  extended lazily (tokens are only ever appended, so old hashes stay valid).
- num_cached_blocks: how many leading blocks of the table are registered in the
  prefix cache. A block is registered once all its tokens are computed, i.e. on
  the next `allocate_slots` or on `free`, never while its KV is still being written.

Copy-on-write: a block shared by several tables (after `fork`) is read-only. Before
a request writes into a shared, partially filled block it gets a fresh block and a
(src_block_id, dst_block_id) copy is queued; the runner takes them with
`take_block_copies()` and performs them before the forward pass.
"""

from __future__ import annotations

from engine.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates KV slots to requests; see the module docstring for the tables."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self._req_to_blocks: dict[str, list[KVBlock]] = {}
        # The same tables as block ids, rebuilt only when a table changes.
        self._req_to_block_ids: dict[str, list[int]] = {}
        self._req_num_tokens: dict[str, int] = {}
        self._req_to_hashes: dict[str, list[BlockHash]] = {}
        self._req_num_cached_blocks: dict[str, int] = {}
        self._block_copies: list[tuple[int, int]] = []
        # Token counts, taken when a request gets its first blocks.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by requests (free cached blocks do not count)."""
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as block ids: a live list, do not mutate it."""
        return self._req_to_block_ids.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of full blocks and the number of tokens it covers.

        The hit never covers the last token, so at least one token is computed and
        there are logits to sample from.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        computed_blocks = []
        for block_hash in self._block_hashes(request)[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        return computed_blocks, len(computed_blocks) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[KVBlock] | None:
        """Give the request slots for `num_new_tokens` more tokens.

        `new_computed_blocks` (from `get_computed_blocks`, only for a request with
        no blocks yet) are prefix hits placed before the new tokens;
        `num_lookahead_tokens` more slots follow the new tokens, for tokens not
        sampled yet (multi-step decode). Returns the newly allocated blocks
        (possibly empty), or None, changing nothing, when the pool is short.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
        request_id = request.request_id
        blocks = self._req_to_blocks.get(request_id, [])
        if blocks and not new_computed_blocks and self._fits_in_place(
                request, blocks, num_new_tokens, num_lookahead_tokens):
            return []
        new_computed_blocks = list(new_computed_blocks or ())
        if new_computed_blocks and blocks:
            raise ValueError("new_computed_blocks given for a request that has blocks")
        num_computed = (
            request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        )
        num_tokens = num_computed + num_new_tokens
        if num_tokens > request.num_tokens:
            raise ValueError(
                f"num_new_tokens={num_new_tokens} goes past the {request.num_tokens} "
                f"tokens of request {request_id!r}"
            )
        num_tokens += num_lookahead_tokens
        num_required = max(
            cdiv(num_tokens, self.block_size) - len(blocks) - len(new_computed_blocks), 0
        )
        cow_index = self._cow_index(blocks, num_computed)
        num_evictable_hits = sum(block.ref_cnt == 0 for block in new_computed_blocks)
        num_available = self.block_pool.num_free_blocks - num_evictable_hits
        if num_required + (cow_index is not None) > num_available:
            return None

        if request_id not in self._req_to_blocks and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        self.block_pool.touch(new_computed_blocks)
        blocks = self._req_to_blocks.setdefault(request_id, blocks)
        blocks.extend(new_computed_blocks)
        if cow_index is not None:
            self._copy_on_write(blocks, cow_index)
        new_blocks = self.block_pool.allocate(num_required)
        blocks.extend(new_blocks)
        self._req_to_block_ids[request_id] = [block.block_id for block in blocks]
        self._req_num_tokens[request_id] = num_tokens
        self._cache_full_blocks(request, num_computed)
        return new_blocks

    def _fits_in_place(self, request: Request, blocks: list[KVBlock], num_new_tokens: int,
                       num_lookahead_tokens: int) -> bool:
        """The common decode step, done without touching the pool: the new tokens fit the
        table's blocks and none of them lands in a shared block. False changes nothing."""
        num_computed = request.num_computed_tokens
        num_tokens = num_computed + num_new_tokens
        if num_tokens > request.num_tokens:
            return False
        num_tokens += num_lookahead_tokens
        if num_tokens > len(blocks) * self.block_size:
            return False
        if self._cow_index(blocks, num_computed) is not None:
            return False
        self._req_num_tokens[request.request_id] = num_tokens
        self._cache_full_blocks(request, num_computed)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks; its computed full blocks stay cached.

        Call before resetting `request.num_computed_tokens` (preemption).
        """
        request_id = request.request_id
        blocks = self._req_to_blocks.get(request_id)
        if blocks is not None:
            self._cache_full_blocks(request, request.num_computed_tokens)
            # Tail blocks are the least likely to be shared: evict them first.
            self.block_pool.free(reversed(blocks))
            dropped = {block.block_id for block in blocks if block.ref_cnt == 0}
            self._block_copies = [
                copy for copy in self._block_copies if copy[1] not in dropped
            ]
        for table in (
            self._req_to_blocks,
            self._req_to_block_ids,
            self._req_num_tokens,
            self._req_to_hashes,
            self._req_num_cached_blocks,
        ):
            table.pop(request_id, None)

    def fork(self, parent_request: Request, child_request: Request) -> None:
        """The child shares every block of the parent (copy-on-write on append)."""
        parent_id, child_id = parent_request.request_id, child_request.request_id
        if child_id in self._req_to_blocks:
            raise ValueError(f"request_id {child_id!r} already has blocks")
        blocks = self._req_to_blocks.get(parent_id, [])
        self.block_pool.touch(blocks)
        self._req_to_blocks[child_id] = list(blocks)
        self._req_to_block_ids[child_id] = [block.block_id for block in blocks]
        self._req_num_tokens[child_id] = self._req_num_tokens.get(parent_id, 0)
        self._req_num_cached_blocks[child_id] = self._req_num_cached_blocks.get(
            parent_id, 0
        )

    def take_block_copies(self) -> list[tuple[int, int]]:
        """(src_block_id, dst_block_id) copies queued since the last call, in order."""
        copies, self._block_copies = self._block_copies, []
        return copies

    def kv_waste(self) -> float:
        """Allocated-but-unused slots as a fraction of allocated slots (0 if none).

        A slot is used when a table holds a computed or scheduled token in it;
        a shared block counts once.
        """
        filled: dict[int, int] = {}
        for request_id, blocks in self._req_to_blocks.items():
            num_tokens = self._req_num_tokens[request_id]
            for i, block in enumerate(blocks):
                used = min(self.block_size, max(num_tokens - i * self.block_size, 0))
                filled[block.block_id] = max(filled.get(block.block_id, 0), used)
        if not filled:
            return 0.0
        return 1.0 - sum(filled.values()) / (len(filled) * self.block_size)

    def _cow_index(self, blocks: list[KVBlock], num_computed: int) -> int | None:
        """Index of the shared partial block the next token would be written into."""
        if num_computed % self.block_size == 0:
            return None
        index = num_computed // self.block_size
        if index < len(blocks) and blocks[index].ref_cnt > 1:
            return index
        return None

    def _copy_on_write(self, blocks: list[KVBlock], index: int) -> None:
        (fresh,) = self.block_pool.allocate(1)
        self._block_copies.append((blocks[index].block_id, fresh.block_id))
        self.block_pool.free([blocks[index]])
        blocks[index] = fresh

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        hashes = self._req_to_hashes.setdefault(request.request_id, [])
        token_ids = request.all_token_ids
        for i in range(len(hashes), request.num_tokens // self.block_size):
            parent = hashes[-1] if hashes else None
            block_tokens = token_ids[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(hash_block_tokens(parent, block_tokens, request.extra_keys))
        return hashes

    def _cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the table's blocks whose tokens are all computed."""
        if not self.enable_prefix_caching:
            return
        request_id = request.request_id
        num_full = num_computed_tokens // self.block_size
        start = self._req_num_cached_blocks.get(request_id, 0)
        if start >= num_full:
            return
        blocks = self._req_to_blocks[request_id]
        hashes = self._block_hashes(request)
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self._req_num_cached_blocks[request_id] = num_full
