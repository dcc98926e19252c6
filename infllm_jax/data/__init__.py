"""Offline data for training and evaluation (docs DATA.md): nothing here downloads from a model hub.

Import the submodules directly, e.g. ``from infllm_jax.data import corpus, packing, tasks, tokenizer``:

* ``corpus``: Debian text packages and Paul Graham's essays as one text file per source, with a held-out split
  by source; also the command line ``python -m infllm_jax.data.corpus``.
* ``tokenizer``: ``ByteTokenizer`` and an 8K byte-level ``BPETokenizer`` trained on the training split.
* ``packing``: cached token streams, ``PackedBatches`` for training and ``eval_batches`` for held-out windows.
* ``tasks``: passkey, RULER NIAH (single, multikey) and MQAR generators with teacher-forced scorers.
"""

# No re-exports: importing corpus here would make `python -m infllm_jax.data.corpus` run a module that is
# already imported (runpy warns about it).
