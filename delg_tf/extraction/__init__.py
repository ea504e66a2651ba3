"""delg_tf.extraction: DELG feature extraction with the official numerics.

* `extractor.DelgExtractor` -- image (array or path) -> `DelgFeatures`
  (`from_saved_model`, `from_config`, `from_model`).
* `pyramid.PyramidExtractor` -- the in-graph multi-scale extraction (one traced
  function, official raw outputs).
* `raw_model.load_raw_extraction_fn` -- raw call of any DELG SavedModel
  (delg_tf export, official TF2 signature or official TF1 tensor names;
  `raw_model.detect_format`, formats `FORMAT_TF2` / `FORMAT_TF1`).
* `config` -- the extraction contract: `ExportConfig`, the official defaults and
  modes, DelfConfig reading (`load_delf_config`, `read_export_config`).
* `geometry` -- receptive-field constants, boxes and keypoints.
* `store` -- crash-safe, resumable HDF5 feature store; `binarize` -- DELG*
  packed binary descriptors; `delf_io` -- official `.delf` / `.delg_global` files.
"""
