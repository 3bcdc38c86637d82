"""Training data: one entry point (`batches.training_batches`) over the built-in shapes, a folder
of captioned images, webdataset shards and cached latents; the shard writer and reader."""
