"""Build script for delg_tf.

The only thing this adds to a plain setuptools build is compiling `protos/*.proto`
into `delg_tf/protos/*_pb2.py` with grpcio-tools (a pinned build requirement in
pyproject.toml), for regular and editable installs alike: no manual protoc step.
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "protos")
GENERATED_PACKAGE = os.path.join("delg_tf", "protos")


def compile_protos(out_root=HERE):
    """Compiles protos/*.proto into <out_root>/delg_tf/protos/*_pb2.py."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "*.proto")))
    if not protos:
        raise RuntimeError(f"no .proto files found in {PROTO_DIR}")
    os.makedirs(os.path.join(out_root, GENERATED_PACKAGE), exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{GENERATED_PACKAGE}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
    ] + protos
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")


class BuildPyWithProtos(build_py):
    """build_py that first generates the protobuf modules."""

    def run(self):
        compile_protos(HERE)
        if not self.editable_mode:
            compile_protos(self.build_lib)
        super().run()


setup(
    name="delg_tf",
    version="0.1.0",
    description=(
        "DELG (Cao, Araujo, Sim, ECCV 2020) and Glocal Retriever in "
        "TensorFlow/Keras 3: training, multi-scale extraction, "
        "SavedModel export, RANSAC re-ranking and evaluation."
    ),
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["delg_tf", "delg_tf.*"]),
    cmdclass={"build_py": BuildPyWithProtos},
    install_requires=[
        # Ranges tested on this project's CI machine (Python 3.11, CPU).
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        # 6.31.1 is what TF 2.21 and tensorflow-serving-api 2.21 accept at least; the beam
        # extra (apache-beam 2.77) needs < 7, so pip resolves 6.x with it and 7.x without.
        "protobuf>=6.31.1,<8",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<3",
        "pycolmap>=4.2,<4.3",
        "pillow>=12,<14",
        "scikit-image>=0.25,<0.27",
        "scipy>=1.13,<2",
        # Feature stores (delg_tf.extraction.store, evaluation) and the tests.
        "h5py>=3.11,<4",
        # Limits BLAS threads while re-ranking runs pairs in a thread pool.
        "threadpoolctl>=3.5,<4",
    ],
    extras_require={
        # h5py is now a requirement; the extra stays so `delg_tf[h5]` keeps installing.
        "h5": [],
        "faiss": ["faiss-cpu>=1.9,<2"],
        "progress": ["tqdm>=4.66,<5"],
        "plots": ["matplotlib>=3.9,<4"],
        # Client stubs (PredictionLog, PredictionService) for TF Serving requests.
        "serving": ["tensorflow-serving-api>=2.21,<2.22"],
        # Viewing the training scalars.
        "tensorboard": ["tensorboard>=2.21,<2.22"],
        "test": ["pytest>=8,<10"],
        # delg_tf.extract_beam (extraction as an Apache Beam pipeline); runners' own
        # extras (apache-beam[gcp] for Dataflow, ...) are installed on top where needed.
        "beam": ["apache-beam==2.77.*"],
        "all": [
            "faiss-cpu>=1.9,<2",
            "tqdm>=4.66,<5",
            "matplotlib>=3.9,<4",
            "tensorflow-serving-api>=2.21,<2.22",
            "tensorboard>=2.21,<2.22",
            "pytest>=8,<10",
            "apache-beam==2.77.*",
        ],
    },
    entry_points={
        "console_scripts": [
            "delg-train=delg_tf.train:run",
            "delg-export=delg_tf.export:cli",
            "delg-extract=delg_tf.extract:cli",
            "delg-extract-beam=delg_tf.extract_beam:cli",
            "delg-evaluate=delg_tf.evaluate:cli",
            "delg-convert-official=delg_tf.convert_official:cli",
            "delg-index=delg_tf.index:cli",
        ],
    },
)
