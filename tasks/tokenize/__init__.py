"""The tokenize stage: the cleaned corpus -> a byte-level BPE tokenizer and packed token shards."""
