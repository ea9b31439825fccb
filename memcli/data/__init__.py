"""Data commands: generators, the token bank, product keys and the pipeline that chains them."""
