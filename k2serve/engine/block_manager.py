"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix hashing.

A sequence's KV lives in blocks of ``block_size`` token slots, listed in its block table.
A block that is full is identified by the hash of its tokens chained with the hash of
the block before it, so equal hashes mean equal prefixes. Full, computed blocks are kept
in a hash table after their sequences finish; a later sequence with the same prefix
reuses them instead of recomputing (automatic prefix caching). Free blocks form an LRU
queue: a freed block goes to the back, allocation takes from the front, and a cached
block is evicted (its hash forgotten) only when it is handed out again.

A sequence may carry a cache salt (like vLLM's `cache_salt`): it seeds the hash of the first
block, so sequences share cached blocks only when their salts are equal. The server salts with
the API key, so one key cannot learn from `cached_tokens` what prompts another key sent.

A block may also mix in a key of its own (`keys`: block index -> bytes): the content hash of
the images whose embeddings start in it (k2serve.engine.multimodal), so equal token ids with
different images are different prefixes.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field


def salt_root(salt: str | None) -> bytes | None:
    """The parent hash of a salted sequence's first block (None: unsalted)."""
    if salt is None:
        return None
    return hashlib.blake2b(salt.encode("utf-8"), digest_size=16, person=b"k2serve-salt").digest()


def chain_hash(parent: bytes | None, tokens: list[int], key: bytes | None = None) -> bytes:
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    if key is not None:
        digest.update(b"\x00key" + key)
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and its KV computed


@dataclass
class BlockAllocation:
    """What `allocate` gave a sequence."""

    block_ids: list[int]
    num_cached_tokens: int  # leading tokens whose KV is already in the cache
    cached_hashes: list[bytes] = field(default_factory=list)  # hashes of the reused blocks
    in_flight_hashes: list[bytes] = field(default_factory=list)  # full blocks it will compute


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, first_block_id: int = 1):
        """Hands out block ids first_block_id .. first_block_id + num_blocks - 1 (id 0 is
        the KV pool's null block)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        ids = range(first_block_id, first_block_id + num_blocks)
        self.blocks = {i: Block(i) for i in ids}
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in ids)
        self._by_hash: dict[bytes, int] = {}
        # Hashes of full blocks allocated but not computed yet: a sequence that would
        # share them waits for them instead of computing the same prefix twice.
        self._in_flight: set[bytes] = set()
        # Prompt tokens looked up in the prefix cache, and those found (vLLM's
        # prefix_cache_queries / prefix_cache_hits): counted per admission, read at scrape.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_hashes(self, token_ids: list[int], salt: str | None = None,
                      keys: dict[int, bytes] | None = None) -> list[bytes]:
        """Chained hashes of the full blocks of `token_ids` (block i mixes in keys[i])."""
        hashes, parent = [], salt_root(salt)
        keys = keys or {}
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            parent = chain_hash(parent, token_ids[start:start + self.block_size],
                                keys.get(start // self.block_size))
            hashes.append(parent)
        return hashes

    def waits_for_in_flight(self, token_ids: list[int], salt: str | None = None,
                            keys: dict[int, bytes] | None = None,
                            among: set[bytes] | None = None) -> bool:
        """True when the first uncached full block is being computed for another sequence
        (with `among`: by one of the sequences whose in-flight hashes these are)."""
        for h in self.prefix_hashes(token_ids, salt, keys):
            if h in self._by_hash:
                continue
            return h in self._in_flight and (among is None or h in among)
        return False

    # -- allocation ---------------------------------------------------------------------
    def hash_block(self, parent: bytes | None, tokens: list[int], salt: str | None = None,
                   key: bytes | None = None) -> bytes:
        """The hash of a full block; `parent` is the previous block's (None for the first)."""
        return chain_hash(parent if parent is not None else salt_root(salt), tokens, key)

    def allocate(self, token_ids: list[int], use_cache: bool = True,
                 salt: str | None = None,
                 keys: dict[int, bytes] | None = None) -> BlockAllocation | None:
        """Blocks for `token_ids`, reusing cached ones (later tokens get blocks as they come).

        Returns None when there are not enough free blocks; nothing is changed then.
        At least the last token is always left to compute, so the caller gets logits.
        """
        hashes = self.prefix_hashes(token_ids, salt, keys)
        cached: list[int] = []
        for h in hashes if use_cache else ():
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            cached.append(block_id)
        if cached and len(cached) * self.block_size >= len(token_ids):
            cached.pop()  # a fully cached prompt recomputes its last block
        total = self.blocks_needed(len(token_ids))
        fresh_needed = total - len(cached)
        reusable_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if fresh_needed > self.num_free - reusable_free:
            return None

        for block_id in cached:
            self._take(block_id)
        fresh = [self._pop_free() for _ in range(fresh_needed)]
        if use_cache:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += len(cached) * self.block_size
        in_flight = [h for h in hashes[len(cached):] if h not in self._in_flight]
        self._in_flight.update(in_flight)
        return BlockAllocation(cached + fresh, len(cached) * self.block_size,
                               hashes[:len(cached)], in_flight)

    def append_block(self) -> int | None:
        """One more block for a growing sequence, or None when none is free."""
        if not self._free:
            return None
        return self._pop_free()

    def mark_computed(self, block_id: int, block_hash: bytes) -> None:
        """A full block's KV is now in the cache: make it findable by its prefix hash."""
        self._in_flight.discard(block_hash)
        block = self.blocks[block_id]
        if block.hash is not None or block_hash in self._by_hash:
            return  # same prefix already cached under another block; keep the first
        block.hash = block_hash
        self._by_hash[block_hash] = block_id

    def forget_in_flight(self, hashes: list[bytes]) -> None:
        """Pending hashes of a sequence that left before computing them."""
        self._in_flight.difference_update(hashes)

    def free(self, block_ids: list[int]) -> None:
        # Tail first, so a sequence's later blocks are evicted before its prefix.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                self._free[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the cached prefix it held
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id
