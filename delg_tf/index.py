"""Build a global-descriptor index on disk from feature stores: `python -m delg_tf.index`.

    python -m delg_tf.index --features=OUT/features-*-of-00004.h5 --index_dir=INDEX \
        [--method=flat|ivf_flat|ivf_pq|hnsw] [--nlist=N --nprobe=N] [--pq_m=N --pq_nbits=N]
        [--hnsw_m=N --ef_construction=N --ef_search=N] [--train_size=N] [--chunk_size=N]
        [--seed=0] [--overwrite] [--noprogress]

* `--features`: a store of `python -m delg_tf.extract` (`OUT/features.h5`), a parts
  directory, or a glob of its `--num_shards` files (every shard must be there).
* methods and their parameters (unset = chosen from the number of descriptors, for
  ~1M: nlist 4 sqrt(N), nprobe 32, pq_m 64, hnsw_m 32, ef_construction 80, ef_search
  128): `delg_tf.retrieval.index.IndexParams` (its fields are the flags).
* output: `INDEX/index.faiss`, `INDEX/names.json` (names in index order) and
  `INDEX/manifest.json`, written to a temporary folder and renamed into place; an
  existing `--index_dir` is replaced only with `--overwrite`.

The library function is `main(config) -> Path` (the index folder); searching a built
index is `delg_tf.retrieval.index.load_index(DIR).search(queries, k)`. Bad flags, a
missing store or an existing `--index_dir` exit with one `error:` line, code 2.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from delg_tf.configs import ConfigError, require
from delg_tf.retrieval.index import (
    FaissMissingError,
    IndexOutputError,
    IndexParams,
    build_index,
    quiet_faiss_loader,
    read_manifest,
)

BYTES_PER_MIB = 2**20
PARAMS_FIELD = "params"  # IndexConfig field holding IndexParams (whose fields are flags).


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Validated configuration of `python -m delg_tf.index`.

    Each attribute but `params` is the flag of the same name (this section is their
    help); the fields of `params` are flags too.

    Attributes:
      features: Feature store: an .h5 file, a parts directory or a glob of shard files
        (OUT/features-*-of-00004.h5).
      index_dir: Output folder of the index.
      params: The method and its parameters (`IndexParams`).
      overwrite: Replace an existing --index_dir.
      progress: Show progress bars.
    """

    features: str
    index_dir: str
    params: IndexParams = IndexParams()
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        require(
            self.features,
            "features",
            "a feature store: an .h5 file, a parts "
            "directory or a glob of shard files such as OUT/features-*-of-00004.h5",
        )
        require(self.index_dir, "index_dir", "the folder the index is written to")
        if not isinstance(self.params, IndexParams):
            raise ConfigError(
                f"IndexConfig.params must be an IndexParams, got {type(self.params).__name__}.",
                PARAMS_FIELD,
            )


def main(config: IndexConfig) -> Path:
    """Builds the index of `config.features` into `config.index_dir`.

    Returns:
      Path of the index folder.
    """
    started = time.perf_counter()
    index_dir = build_index(
        config.features,
        config.index_dir,
        config.params,
        overwrite=config.overwrite,
        progress=config.progress,
    )
    size = sum(p.stat().st_size for p in index_dir.iterdir() if p.is_file())
    manifest = read_manifest(index_dir)
    settings = ", ".join(f"{k}={v}" for k, v in manifest["params"].items()) or "exact"
    print(
        f"index: {manifest['method']} ({settings}) of {manifest['count']} descriptors of "
        f"dimension {manifest['dim']} in {time.perf_counter() - started:.1f} s, "
        f"{size / BYTES_PER_MIB:.1f} MiB: {index_dir}"
    )
    return index_dir


def _define_flags():
    from delg_tf import cli as runner

    # --method is a string flag validated by IndexParams: a bad value is one `error:`
    # line with exit code 2 (an absl enum would print absl's own two-line message).
    runner.define_config_flags(IndexParams)
    return runner.define_config_flags(IndexConfig, skip=(PARAMS_FIELD,))


def _config_from_flags(flag_values) -> IndexConfig:
    from delg_tf import cli as runner

    params = IndexParams(**runner.config_kwargs(IndexParams, flag_values))
    return IndexConfig(
        params=params, **runner.config_kwargs(IndexConfig, flag_values, skip=(PARAMS_FIELD,))
    )


# ConfigError and StoreError are ValueErrors; IndexExistsError is a FileExistsError.
EXPECTED_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IndexOutputError,
    FaissMissingError,
)


def cli():
    """Console entry point."""
    from delg_tf import cli as runner

    quiet_faiss_loader()
    runner.run_config_main(_define_flags, _config_from_flags, main, expected_errors=EXPECTED_ERRORS)


if __name__ == "__main__":
    cli()
