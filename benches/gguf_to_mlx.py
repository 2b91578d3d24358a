"""Writes a GGUF file as an MLX model folder, so that servers that cannot read GGUF (mlx-lm's
own) serve the very same weights: ``python benches/gguf_to_mlx.py FILE.gguf OUT_DIR``."""

import sys

from pensieve_bridge.gguf import to_mlx_folder

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    to_mlx_folder(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]}")
