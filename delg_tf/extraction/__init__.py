"""delg_tf.extraction: DELG feature extraction with the official numerics.

* `extractor.DelgExtractor` -- image (array or path) -> `DelgFeatures`
  (`from_saved_model`, `from_config`, `from_model`).
* `pyramid.PyramidExtractor` -- the in-graph multi-scale extraction (one traced
  function, official raw outputs).
* `raw_model.load_raw_extraction_fn` -- raw call of any DELG SavedModel (TF2
  signature or TF1 tensor names).
* `geometry` -- receptive-field constants, boxes and keypoints.
* `store` -- crash-safe, resumable HDF5 feature store; `binarize` -- DELG*
  packed binary descriptors; `delf_io` -- official `.delf` / `.delg_global` files.
"""
