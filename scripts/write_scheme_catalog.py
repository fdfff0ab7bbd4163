"""Rewrite src/op_sensitivity/schemes/catalog.json from the installed tools (after upgrading one).

Usage: python scripts/write_scheme_catalog.py [out.json]
"""

import sys
from pathlib import Path

from op_sensitivity.schemes.catalog import CATALOG, write

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else CATALOG
    print(f"wrote {len(write(out))} schemes to {out}")
