"""The comparison benchmark behind `flashjax bench`: flashjax beside transformers, accelerate and llama.cpp.

Modules: compare (the runner and its command line), peers (one system per worker process, and
the page-out helper), disk_probe (the disk's cold random-read throughput), report (markdown and
PNG plots; matplotlib is optional and needed only for the plots), common (machine description,
prompt text, summaries, JSON output). The scripts in the repository's `benchmarks/` call these.

Nothing here is imported by the engine; `import flashjax.bench` is light (no JAX).
"""
