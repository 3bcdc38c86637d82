"""Training data: webdataset shards for real images, and a built-in rendered dataset of coloured
shapes with captions and exact ground truth (`ldm.data.shapes`) for machines with no data."""
