"""Triton kernels, each beside its PyTorch reference (filled in by the Triton backend). Installed as
`softprompt.kernels`.

Run from a checkout's root (pytest, `python -m benchmarks...`), this folder is also on sys.path as a top-level
`kernels`, the name of Hugging Face's kernels package, which transformers >= 5.25 imports. Imported by that name
where that package is installed, this module hands over to it instead of shadowing it (where it is not, this stays
an empty module, as before: transformers < 5.25 probes the name and finds no version).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this file ran
        _spec.loader.exec_module(_module)
