"""The flash engine: resident weights in memory, FFN neurons read from disk as tokens need them."""
