#!/bin/sh
# Reproduce the loss comparison of docs/molecules.md (quotient vs conventional vs AF3-aligned
# losses, same EGNN / data / steps / seeds, plus RDKit ETKDG+MMFF on the same test molecules).
# All options are forwarded to scripts/compare_losses.py (see --help); the exact CLI commands it
# runs are written to OUT/commands.sh, the table to OUT/table.md.
set -e
# relative paths (--out) are the caller's: no cd
exec python "$(dirname "$0")/compare_losses.py" "$@"
