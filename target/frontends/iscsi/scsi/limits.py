"""Geometry and limits of the disk the logical unit presents (READ CAPACITY, Block Limits VPD).

512-byte logical blocks on 4 KiB physical blocks: the replicas track allocation per 4 KiB,
so that is the unit of alignment, optimal transfer and unmap granularity.
"""

BLOCK_SIZE = 512
PHYSICAL_BLOCK_EXPONENT = 3  # 2**3 logical blocks per 4 KiB physical block
BLOCKS_PER_PHYSICAL = 1 << PHYSICAL_BLOCK_EXPONENT

# 8 MiB per command keeps a request well inside the replica protocol's 32 MiB payload.
MAX_TRANSFER_BLOCKS = 16384
OPTIMAL_TRANSFER_BLOCKS = 2048  # 1 MiB
MAX_UNMAP_BLOCKS = 1 << 20  # 512 MiB per UNMAP command
MAX_UNMAP_DESCRIPTORS = 4095  # as many as a 16-bit parameter list length can carry
MAX_WRITE_SAME_BLOCKS = 1 << 15  # 16 MiB; below 65536, which a 16-bit WRITE SAME(10) reaches
MAX_COMPARE_AND_WRITE_BLOCKS = 255  # the largest NUMBER OF LOGICAL BLOCKS the CDB can hold
# WRITE SAME with a non-zero pattern is written in pieces of this many blocks.
WRITE_SAME_CHUNK_BLOCKS = 2048
