"""Data: webdataset shards for real runs, synthetic captioned shapes for the demo and tests."""
