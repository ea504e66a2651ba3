"""Script preamble for checks that an export runs where delg_tf cannot be imported."""

import textwrap

# Prepend to a `python -c` script: any import of delg_tf (or a submodule) then fails.
BLOCK_DELG_TF_IMPORTS = textwrap.dedent("""
    import importlib.abc, sys

    class _NoDelg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "delg_tf" or name.startswith("delg_tf."):
                raise ImportError("delg_tf must not be needed to serve the export")

    sys.meta_path.insert(0, _NoDelg())
""")
