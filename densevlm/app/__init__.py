"""The interactive explorer (`densevlm app`): a gradio page over the library's segmenters and teacher labels."""
