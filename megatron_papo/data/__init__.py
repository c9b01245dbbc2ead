"""Data pipeline: datasets loading, image decode/resize, chat prompts, PAPO masking, synthetic task, collate."""
