"""Image and video generation with `diffusers` pipelines from operator-provided directories
(`k2serve serve --image-model DIR`, `--video-model DIR`). diffusers is imported only when a
directory is configured (the `images` extra installs it)."""
