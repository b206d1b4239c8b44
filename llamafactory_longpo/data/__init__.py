"""Short-to-long data: the record, the dataset views, tokenization and collation."""
