"""Weight quantization codecs (pure numpy)."""
