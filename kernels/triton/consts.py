"""Constants the tile plan, its kernel and the attention kernels' launcher share."""

SUB = 16  # granularity of the plan's run summaries: the smallest block size
LEVEL_BLOCKS = (16, 32, 64, 128, 256)  # the block sizes the kernels accept
BIG = 1 << 62  # "no bound" for int64 coordinates
# Per run: may_lo, may_hi, full_lo, full_hi (token indexes of the other side). The kernels
# read rows of 4 (a literal there: Triton kernels see only constexpr globals) and merge the
# runs of their tile: union of "may" spans, intersection of "full" spans.
INFO_FIELDS = 4
LOG2E = 1.4426950408889634
