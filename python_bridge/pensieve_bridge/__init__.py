"""pensieve's MLX bridge: what the Rust server imports to load a model and generate with it."""
