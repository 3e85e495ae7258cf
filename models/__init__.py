"""Model inputs and predict code shared by training and serving."""
