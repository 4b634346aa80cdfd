"""`python -m mucs_fast.compat SCRIPT.py ARGS...`: run a reference script (attrib.py, generate.py,
...) unchanged, with omegaconf containers allowlisted for `torch.load(weights_only=True)` in this
process (the reference stores its config in every checkpoint, which torch ≥ 2.6 otherwise
refuses)."""

import os
import runpy
import sys

from .reference_files import install_omegaconf_safe_globals


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"mucs_fast.compat: no such script: {script}", file=sys.stderr)
        return 2
    install_omegaconf_safe_globals()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
