"""delg_tf: DELG and Glocal Retriever image retrieval in TensorFlow/Keras 3.

Rooms of the package:
    backbones/    ResNet-50/101 feature extractors (slim and Keras layouts)
    ops/          small pure functions (pooling, normalisation, geometry)
    layers/       Keras layers, one public layer per file
    losses/       ArcFace, reconstruction, attention, proxy-anchor, ...
    models/       DelgModel and GlocalModel with custom train steps
    data/         GLDv2 TFRecords, embedded default data, CUB-200-2011, augmentation
    training/     trainer loop, checkpoints, distribution strategies
    extraction/   multi-scale pyramid extraction, DelgExtractor, feature stores
    serving/      SavedModel export modules and signatures (TF Serving)
    matching/     putative correspondences and pycolmap RANSAC
    retrieval/    global search and re-ranking
    evaluation/   Revisited Oxford/Paris, GLDv2 and Recall@K metrics
    official/     official DELG SavedModels: loading and conversion
    visualization/ match and ranking plots

Entry modules (flags live only there): delg_tf.train, delg_tf.export,
delg_tf.extract, delg_tf.evaluate, delg_tf.convert_official, delg_tf.demo.
"""

__version__ = "0.1.0"

__all__ = ["DelgExtractor", "__version__"]


def __getattr__(name):
    # Lazy so that `import delg_tf` does not import TensorFlow.
    if name == "DelgExtractor":
        from delg_tf.extraction.extractor import DelgExtractor

        return DelgExtractor
    raise AttributeError(f"module 'delg_tf' has no attribute {name!r}")
