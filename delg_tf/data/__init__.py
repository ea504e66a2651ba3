"""delg_tf.data: datasets, readers and augmentation.

Modules (TensorFlow is imported only where marked *):
    embedded         the embedded default dataset (skimage photos, homographies)
    homography       its homography maths and view sampling (pure numpy)
    embedded_render  its view rendering (warp, lighting, noise)
    images           robust image loading (`load_image_rgb`, `ImageLoadError`)
    errors           `DataError`, `ImageLoadError`
    gldv2*           GLDv2 TFRecord format and tf.data reader (`make_dataset`)
    build_tfrecords* CLI + `build_tfrecords(BuildConfig)`, official DELF format
    augmentation*    DELG / metric-learning augmentation (stateless tf ops)
    cub              CUB-200-2011, Cars196, SOP readers (tf.data part lazy*)
    revisitop        Revisited Oxford/Paris ground truth (evaluation room)
    testing          `write_bad_image_corpus` test helper
"""
